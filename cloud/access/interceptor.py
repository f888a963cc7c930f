"""Authentication, roles and audit for every gRPC call the coordinator serves.

`AccessInterceptor` wraps each method handler. Per call it reads the bearer token
from the `authorization` metadata, finds the token in the `AccessStore` (hash
lookup), refuses a missing, unknown or revoked one (UNAUTHENTICATED) and one whose
role is below what `roles.METHODS` asks (PERMISSION_DENIED), then runs the method
with the `Caller` (token name, role, peer) in `current_caller()`. Calls the table
marks audited are recorded once they end (ok, or the status they ended with),
refused ones included.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from edgefleet.cloud.access.model import AuditEntry, Caller, role_allows
from edgefleet.cloud.access.roles import Rule, rule_for, short_name
from edgefleet.cloud.access.store import AccessStore
from edgefleet.protos.errors import FleetError
from edgefleet.protos.grpc_errors import grpc_status

logger = logging.getLogger(__name__)

_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)

NO_TOKEN = "(no token)"
UNKNOWN_TOKEN = "(unknown token)"


def current_caller() -> Caller | None:
    """The caller of the gRPC call being served (None outside one)."""
    return _CALLER.get()


def _bearer(details: Any) -> str:
    for key, value in details.invocation_metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode(errors="replace")
            return text.removeprefix("Bearer ").strip()
    return ""


def _args(request: Any) -> dict[str, Any]:
    try:
        return MessageToDict(request, preserving_proto_field_name=True)
    except (TypeError, AttributeError):
        return {}


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, who: str, role: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.who, self.role = code, message, who, role


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, store: AccessStore) -> None:
        self.store = store

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        call = _Call(self.store, details.method, rule_for(details.method), _bearer(details))
        return wrap_handler(handler, details.method, unary=call.unary, stream=call.stream)


UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    *,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler | None:
    """`handler` with its behaviour wrapped (unary-unary by `unary`, unary-stream by
    `stream`), for a server interceptor. Our services have no client-streaming methods:
    one is refused (None) rather than passed on unchecked."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    logger.warning("refusing %s: streaming requests are not served", method)
    return None


class _Call:
    """One call's checks and audit record."""

    def __init__(self, store: AccessStore, method: str, rule: Rule, secret: str) -> None:
        self.store, self.method, self.rule, self.secret = store, method, rule, secret
        self.action = short_name(method)

    async def _admit(self, context: grpc.aio.ServicerContext) -> Caller:
        peer = context.peer() or ""
        if not self.secret:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "no API token: send metadata 'authorization: Bearer <token>' (fleet --token or "
                "FLEET_TOKEN; the coordinator's FLEET_HOME/keys/token is the admin token)",
                NO_TOKEN,
            )
        token = await asyncio.to_thread(self.store.authenticate, self.secret)
        if token is None:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "API token rejected: it is not a token of this coordinator ('fleet tokens ls')",
                UNKNOWN_TOKEN,
            )
        if not token.active:
            assert token.revoked_at is not None
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"API token {token.name!r} was revoked at "
                f"{token.revoked_at:%Y-%m-%d %H:%M:%S}Z; ask an admin for a new one",
                token.name,
                token.role,
            )
        if not role_allows(token.role, self.rule.role):
            raise _Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {token.name!r} ({token.role}) may not call {self.action}; "
                f"needs {self.rule.role}",
                token.name,
                token.role,
            )
        return Caller(who=token.name, role=token.role, peer=peer)

    async def _record(
        self, request: Any, who: str, role: str, peer: str, result: str, message: str
    ) -> None:
        if not self.rule.audited:
            return
        entry = AuditEntry(
            who=who,
            role=role,
            action=self.action,
            args=_args(request),
            result=result,
            message=message,
            peer=peer,
        )
        try:
            # shielded: a server stopping cancels the call's task; the entry is written anyway
            await asyncio.shield(asyncio.to_thread(self.store.record, entry))
        except FleetError as e:  # the call's own outcome stands; say loudly what was lost
            logger.error("audit entry for %s by %s not recorded: %s", self.action, who, e)

    async def _refuse(self, request: Any, context: grpc.aio.ServicerContext, r: _Refused) -> None:
        logger.warning("refused %s from %s: %s", self.action, context.peer(), r.message)
        await self._record(request, r.who, r.role, context.peer() or "", r.code.name, r.message)
        await context.abort(r.code, r.message)

    def _outcome(
        self, context: grpc.aio.ServicerContext, e: BaseException | None
    ) -> tuple[str, str]:
        if e is None:
            return "ok", ""
        if isinstance(e, FleetError):  # ErrorInterceptor (outside) turns it into this status
            return grpc_status(e).name, e.message
        code = context.code()
        if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
            return code.name, str(context.details() or "")
        if isinstance(e, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED.name, "call cancelled"
        return grpc.StatusCode.UNKNOWN.name, f"{type(e).__name__}: {e}"[:500]

    async def _enter(self, request: Any, context: grpc.aio.ServicerContext) -> Caller | None:
        """The caller, in `current_caller()` for the method; None once refused (aborted)."""
        try:
            caller = await self._admit(context)
        except _Refused as r:
            await self._refuse(request, context, r)
            return None
        _CALLER.set(caller)  # each call runs in its own task: no reset needed
        return caller

    async def _leave(
        self,
        request: Any,
        context: grpc.aio.ServicerContext,
        caller: Caller,
        error: BaseException | None,
    ) -> None:
        result, message = self._outcome(context, error)
        await self._record(request, caller.who, caller.role, caller.peer, result, message)

    def unary(self, behavior: UnaryBehavior) -> UnaryBehavior:
        async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = await self._enter(request, context)
            if caller is None:
                return None
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                await self._leave(request, context, caller, error)

        return serve

    def stream(self, behavior: StreamBehavior) -> StreamBehavior:
        async def serve(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            caller = await self._enter(request, context)
            if caller is None:
                return
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as e:
                error = e
                raise
            finally:
                await self._leave(request, context, caller, error)

        return serve
