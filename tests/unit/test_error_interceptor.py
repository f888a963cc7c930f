"""ErrorInterceptor: a FleetError raised by a method becomes its gRPC status, in one place.

A real grpc.aio server on loopback serves a small generic service whose methods raise;
the client sees the status and message each error maps to (protos.grpc_errors), and a
stream ends with it after the items sent before the error. Behind AccessInterceptor
(as `fleet serve` installs them) the audit entry names the status the caller got.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgefleet.cloud.access.interceptor import AccessInterceptor
from edgefleet.cloud.access.model import ADMIN, AuditFilter
from edgefleet.cloud.access.store import SqlAccessStore
from edgefleet.cloud.api.errors import ErrorInterceptor
from edgefleet.protos.errors import (
    Conflict,
    FleetError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

SERVICE = "fleet.v1.FleetService"  # method names the access rules know
ERRORS: dict[str, FleetError] = {
    "GetVersion": NotFound("model version 'digits:7' not found; versions: 1, 2"),
    "ListModels": InvalidArgument("model name 'a b' has a space; use [a-z0-9_-]"),
    "Status": Unavailable("registry database sqlite:///x unreachable"),
    "GetDevice": PermissionDenied("not yours"),
    "Promote": Conflict("digits:2 is archived; promote a live version"),
    "ListDevices": FleetError("something we did not expect"),
}


def _identity(b: bytes) -> bytes:
    return b


def _service() -> grpc.GenericRpcHandler:
    def raising(error: BaseException) -> Callable[[bytes, Any], Awaitable[bytes]]:
        async def method(request: bytes, context: Any) -> bytes:
            raise error

        return method

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"
        raise Conflict("rollout r-1 is paused; resume it first")

    async def ok(request: bytes, context: Any) -> bytes:
        return b"ok:" + request

    async def crash(request: bytes, context: Any) -> bytes:
        raise ValueError("a bug, not a FleetError")

    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            raising(e), request_deserializer=_identity, response_serializer=_identity
        )
        for name, e in ERRORS.items()
    }
    handlers["WatchRollout"] = grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=_identity, response_serializer=_identity
    )
    handlers["GetRollout"] = grpc.unary_unary_rpc_method_handler(
        ok, request_deserializer=_identity, response_serializer=_identity
    )
    handlers["ListRollouts"] = grpc.unary_unary_rpc_method_handler(
        crash, request_deserializer=_identity, response_serializer=_identity
    )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def _serve(
    interceptors: list[Any], work: Callable[[grpc.aio.Channel], Awaitable[None]]
) -> None:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((_service(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            async with asyncio.timeout(20):
                await work(channel)
    finally:
        # grace: a handler goes on after the client has its status (context.abort sends
        # it first), e.g. to write the audit entry; stop(0) would cancel that
        await server.stop(5)


def _unary(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=_identity
    )


def test_each_fleet_error_becomes_its_status_with_its_message() -> None:
    seen: dict[str, tuple[grpc.StatusCode, str]] = {}

    async def work(channel: grpc.aio.Channel) -> None:
        for name in ERRORS:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _unary(channel, name)(b"x")
            seen[name] = (info.value.code(), info.value.details() or "")
        assert await _unary(channel, "GetRollout")(b"r-1") == b"ok:r-1"

    asyncio.run(_serve([ErrorInterceptor()], work))
    assert seen == {
        "GetVersion": (grpc.StatusCode.NOT_FOUND, ERRORS["GetVersion"].message),
        "ListModels": (grpc.StatusCode.INVALID_ARGUMENT, ERRORS["ListModels"].message),
        "Status": (grpc.StatusCode.UNAVAILABLE, ERRORS["Status"].message),
        "GetDevice": (grpc.StatusCode.PERMISSION_DENIED, ERRORS["GetDevice"].message),
        "Promote": (grpc.StatusCode.FAILED_PRECONDITION, ERRORS["Promote"].message),
        "ListDevices": (grpc.StatusCode.INTERNAL, ERRORS["ListDevices"].message),
    }


def test_a_stream_ends_with_the_status_after_what_it_sent() -> None:
    got: list[bytes] = []
    status: list[tuple[grpc.StatusCode, str]] = []

    async def work(channel: grpc.aio.Channel) -> None:
        call = channel.unary_stream(
            f"/{SERVICE}/WatchRollout",
            request_serializer=_identity,
            response_deserializer=_identity,
        )(b"r-1")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in call:
                got.append(item)
        status.append((info.value.code(), info.value.details() or ""))

    asyncio.run(_serve([ErrorInterceptor()], work))
    assert got == [b"one", b"two"]
    assert status == [
        (grpc.StatusCode.FAILED_PRECONDITION, "rollout r-1 is paused; resume it first")
    ]


def test_other_exceptions_are_not_dressed_up_as_fleet_errors() -> None:
    codes: list[grpc.StatusCode] = []

    async def work(channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _unary(channel, "ListRollouts")(b"")
        codes.append(info.value.code())

    asyncio.run(_serve([ErrorInterceptor()], work))
    assert codes == [grpc.StatusCode.UNKNOWN]


@pytest.fixture()
def access(tmp_path: Path) -> Iterator[tuple[SqlAccessStore, str]]:
    store = SqlAccessStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    _token, secret = store.create_token("ops", ADMIN, created_by="test")
    yield store, secret
    store.close()


def test_behind_access_the_audit_names_the_mapped_status(
    access: tuple[SqlAccessStore, str],
) -> None:
    store, secret = access
    metadata = (("authorization", f"Bearer {secret}"),)
    codes: list[grpc.StatusCode] = []

    async def work(channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _unary(channel, "Promote")(b"digits:2", metadata=metadata)
        codes.append(info.value.code())

    asyncio.run(_serve([ErrorInterceptor(), AccessInterceptor(store)], work))
    assert codes == [grpc.StatusCode.FAILED_PRECONDITION]
    entries = store.audit(AuditFilter(action="Promote"))  # written before the status
    assert [(e.who, e.result, e.message) for e in entries] == [
        ("ops", "FAILED_PRECONDITION", ERRORS["Promote"].message)
    ]
