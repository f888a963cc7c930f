"""Tokens and audit for the CLI: in-process (`LocalAccess`) or through `fleet serve` (`GrpcAccess`).

In-process, every state-changing call is recorded in the audit log as `local:<unix
user>`; `LocalClient` does the same for its state-changing methods (`LOCAL_ACTIONS`),
so the CLI without a running coordinator leaves the same trail as through one.
"""

from __future__ import annotations

import dataclasses
import getpass
import inspect
import logging
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet.cloud.access.convert import entry_from_pb, token_from_pb
from edgefleet.cloud.access.model import ADMIN, AuditEntry, AuditFilter, Token
from edgefleet.cloud.access.store import AccessStore, SqlAccessStore
from edgefleet.protos.errors import FleetError
from edgefleet.protos.fleet.v1 import access_pb2

if TYPE_CHECKING:
    from edgefleet.cloud.remote import GrpcClient

logger = logging.getLogger(__name__)

#: LocalClient methods that change state -> the action name the audit log uses
#: (the FleetService method doing the same through a coordinator)
LOCAL_ACTIONS = {
    "train": "Train",
    "quantize": "Quantize",
    "import_model": "ImportModel",
    "promote": "Promote",
    "enroll_device": "EnrollDevice",
    "enroll_devices": "EnrollDevices",
    "reissue_devices": "ReissueDevices",
}


def local_user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"local:{user}"


def _status_name(e: FleetError) -> str:
    from edgefleet.protos.grpc_errors import grpc_status

    return str(grpc_status(e).name)


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set | frozenset):
        return [_jsonable(x) for x in v]
    if (  # a plain value (DeviceSpec) as its fields; one with its own text (ModelRef) as that
        dataclasses.is_dataclass(v)
        and not isinstance(v, type)
        and type(v).__str__ is object.__str__
    ):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return str(v)


def call_args(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A call's arguments by name, as JSON values; callbacks left out."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {f"arg{i}": a for i, a in enumerate(args)} | kwargs
    return {k: _jsonable(v) for k, v in bound.items() if not callable(v)}


class Auditor:
    """Records in-process actions as one caller (e.g. local:alice), in `store`: the
    coordinator's database by URL (opened here, and closed by `close`), or a function
    giving the shared one's `AccessStore` (`Services.access`; its owner closes it)."""

    def __init__(self, store: str | Callable[[], AccessStore], who: str) -> None:
        self._source, self.who = store, who

    @cached_property
    def store(self) -> AccessStore:
        if isinstance(self._source, str):
            return SqlAccessStore(self._source)
        return self._source()

    def run(self, action: str, args: dict[str, Any], work: Callable[[], Any]) -> Any:
        try:
            result = work()
        except FleetError as e:
            self._record(action, args, _status_name(e), e.message)
            raise
        self._record(action, args, "ok", "")
        return result

    def _record(self, action: str, args: dict[str, Any], result: str, message: str) -> None:
        entry = AuditEntry(
            who=self.who, role=ADMIN, action=action, args=args, result=result, message=message
        )
        try:
            self.store.record(entry)
        except FleetError as e:
            logger.error("audit entry for %s by %s not recorded: %s", action, self.who, e)

    def close(self) -> None:
        if "store" in self.__dict__ and isinstance(self._source, str):
            self.store.close()


class AccessClient(Protocol):
    def create_token(self, name: str, role: str) -> tuple[Token, str]: ...
    def list_tokens(self) -> list[Token]: ...
    def revoke_token(self, name: str) -> Token: ...
    def audit(self, where: AuditFilter) -> list[AuditEntry]: ...
    def close(self) -> None: ...


class LocalAccess:
    """Tokens and audit in this process, against the coordinator's database."""

    def __init__(self, store: str | Callable[[], AccessStore], who: str) -> None:
        self.auditor = Auditor(store, who)

    @property
    def store(self) -> AccessStore:
        return self.auditor.store

    def create_token(self, name: str, role: str) -> tuple[Token, str]:
        result: tuple[Token, str] = self.auditor.run(
            "CreateToken",
            {"name": name, "role": role},
            lambda: self.store.create_token(name, role, created_by=self.auditor.who),
        )
        return result

    def list_tokens(self) -> list[Token]:
        return self.store.list_tokens()

    def revoke_token(self, name: str) -> Token:
        token: Token = self.auditor.run(
            "RevokeToken",
            {"name": name},
            lambda: self.store.revoke_token(name, by=self.auditor.who),
        )
        return token

    def audit(self, where: AuditFilter) -> list[AuditEntry]:
        return self.store.audit(where)

    def close(self) -> None:
        self.auditor.close()


class GrpcAccess:
    """AccessService of a running `fleet serve`, over a GrpcClient's channel and token."""

    def __init__(self, client: GrpcClient) -> None:
        from edgefleet.protos.fleet.v1 import access_pb2_grpc  # grpc: only with a coordinator

        self.client = client
        self._stub = access_pb2_grpc.AccessServiceStub(client.channel)

    def create_token(self, name: str, role: str) -> tuple[Token, str]:
        resp = self.client.call(
            self._stub.CreateToken, access_pb2.CreateTokenRequest(name=name, role=role)
        )
        return token_from_pb(resp.token), resp.secret

    def list_tokens(self) -> list[Token]:
        resp = self.client.call(self._stub.ListTokens, access_pb2.ListTokensRequest())
        return [token_from_pb(t) for t in resp.tokens]

    def revoke_token(self, name: str) -> Token:
        return token_from_pb(
            self.client.call(self._stub.RevokeToken, access_pb2.RevokeTokenRequest(name=name))
        )

    def audit(self, where: AuditFilter) -> list[AuditEntry]:
        req = access_pb2.ListAuditRequest(
            since_ms=int(where.since.timestamp() * 1000) if where.since else 0,
            who=where.who,
            action=where.action,
            limit=where.limit,
        )
        return [entry_from_pb(e) for e in self.client.call(self._stub.ListAudit, req).entries]

    def close(self) -> None:
        self.client.close()
