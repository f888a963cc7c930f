"""`ErrorInterceptor`: a FleetError raised by any method of our gRPC services becomes
its gRPC status (`protos.grpc_errors`, the one table) with the error's message, in one
place. Clients (`cloud.remote`) turn the status back into the same FleetError class.

Installed after `AccessInterceptor` (`fleet serve`), so the audit record of a call
that failed names the status the caller got.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from edgefleet.cloud.access.interceptor import StreamBehavior, UnaryBehavior, wrap_handler
from edgefleet.protos.errors import FleetError
from edgefleet.protos.grpc_errors import grpc_status

logger = logging.getLogger(__name__)


async def abort_with(context: grpc.aio.ServicerContext, e: FleetError, method: str) -> NoReturn:
    """End the call with `e`'s status and message (INTERNAL ones logged with the trace)."""
    code = grpc_status(e)
    if code is grpc.StatusCode.INTERNAL:
        logger.warning("%s: %s", method, e, exc_info=e)
    else:
        logger.info("%s: %s: %s", method, code.name, e)
    await context.abort(code, e.message)
    raise AssertionError("context.abort returned")  # it raises; for the type checker


def _unary(method: str) -> Callable[[UnaryBehavior], UnaryBehavior]:
    def wrap(behavior: UnaryBehavior) -> UnaryBehavior:
        async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except FleetError as e:
                await abort_with(context, e, method)

        return serve

    return wrap


def _stream(method: str) -> Callable[[StreamBehavior], StreamBehavior]:
    def wrap(behavior: StreamBehavior) -> StreamBehavior:
        async def serve(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except FleetError as e:
                await abort_with(context, e, method)

        return serve

    return wrap


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc.aio is untyped here
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        return wrap_handler(handler, method, unary=_unary(method), stream=_stream(method))
