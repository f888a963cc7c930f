"""AccessService (protos/fleet/v1/access.proto): tokens and the audit log over gRPC.

Roles and the audit record come from `AccessInterceptor`; this only does the work.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import grpc

from edgefleet.cloud.access.convert import entry_to_pb, token_to_pb
from edgefleet.cloud.access.interceptor import current_caller
from edgefleet.cloud.access.model import AuditFilter
from edgefleet.cloud.access.store import AccessStore
from edgefleet.protos.fleet.v1 import access_pb2, access_pb2_grpc

MAX_AUDIT_LIMIT = 10_000


def _who() -> str:
    caller = current_caller()
    return caller.who if caller is not None else ""


class AccessServicer(access_pb2_grpc.AccessServiceServicer):
    def __init__(self, store: AccessStore) -> None:
        self.store = store

    async def CreateToken(
        self, request: access_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.CreatedToken:
        who = _who()
        token, secret = await asyncio.to_thread(
            lambda: self.store.create_token(request.name, request.role, created_by=who)
        )
        return access_pb2.CreatedToken(token=token_to_pb(token), secret=secret)

    async def ListTokens(
        self, request: access_pb2.ListTokensRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ListTokensResponse:
        tokens = await asyncio.to_thread(self.store.list_tokens)
        return access_pb2.ListTokensResponse(tokens=[token_to_pb(t) for t in tokens])

    async def RevokeToken(
        self, request: access_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.TokenInfo:
        who = _who()
        token = await asyncio.to_thread(lambda: self.store.revoke_token(request.name, by=who))
        return token_to_pb(token)

    async def ListAudit(
        self, request: access_pb2.ListAuditRequest, context: grpc.aio.ServicerContext
    ) -> access_pb2.ListAuditResponse:
        where = AuditFilter(
            since=(
                datetime.fromtimestamp(request.since_ms / 1000, timezone.utc)
                if request.since_ms > 0
                else None
            ),
            who=request.who[:128],
            action=request.action[:64],
            limit=min(max(request.limit, 0) or 1000, MAX_AUDIT_LIMIT),
        )
        entries = await asyncio.to_thread(self.store.audit, where)
        return access_pb2.ListAuditResponse(entries=[entry_to_pb(e) for e in entries])
