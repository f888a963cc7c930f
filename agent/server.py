"""Local gRPC `InferenceService` over a `ModelHolder`, for apps on the device.

grpc.aio, in the agent's event loop; each prediction runs in a worker thread
(`asyncio.to_thread`) so a slow model never blocks MQTT or the updater. The server
binds only loopback addresses or Unix sockets: it has no authentication, so it
must not be reachable from the network.

`FleetError`s become gRPC statuses whose details are the error's message, which
names what was expected, e.g. INVALID_ARGUMENT
``input shape (2, 63) does not fit input: float32[N,64] (N is the batch size)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
import numpy as np

from edgefleet.agent import serde
from edgefleet.agent.inference import NO_MODEL, ActiveModel, ModelHolder
from edgefleet.agent.serde import AgentStatus
from edgefleet.protos.errors import FleetError, InvalidArgument, Unavailable
from edgefleet.protos.fleet.v1 import inference_pb2_grpc
from edgefleet.protos.grpc_errors import grpc_status

logger = logging.getLogger(__name__)

#: channel options for a local app that rides through an agent switching versions
#: (docs/agent.md, "Agent updates"): a call the old agent's server drops in the instant
#: it stops (CANCELLED, before any work was done) or a connection refused meanwhile
#: (UNAVAILABLE) is sent again, to the new agent. Predict is idempotent.
CLIENT_RETRY_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.enable_retries", 1),
    (
        "grpc.service_config",
        json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": "fleet.v1.InferenceService"}],
                        "retryPolicy": {
                            "maxAttempts": 4,
                            "initialBackoff": "0.01s",
                            "maxBackoff": "0.2s",
                            "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                        },
                    }
                ]
            }
        ),
    ),
)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: predictions whose recent latency is below this run inline on the event loop
INLINE_BELOW_US = 200.0
_ADDRESS_FORMS = "127.0.0.1:PORT, [::1]:PORT, localhost:PORT or unix:PATH"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self, holder: ModelHolder, *, status: Callable[[], AgentStatus] | None = None
    ) -> None:
        self._holder = holder
        self._status = status or AgentStatus

    async def Predict(
        self, request: serde.PredictRequest, context: grpc.aio.ServicerContext
    ) -> serde.PredictResponse:
        try:
            return await self._predict(request)
        except FleetError as e:
            await _abort(context, e, e.message)

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[serde.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[serde.PredictResponse]:
        # One at a time: the n-th response answers the n-th request.
        n = 0
        async for request in request_iterator:
            try:
                response = await self._predict(request)
            except FleetError as e:
                await _abort(
                    context, e, f"{e.message} (stream request #{n}, id {request.request_id!r})"
                )
            yield response
            n += 1

    async def GetModelMetadata(
        self, request: serde.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> serde.ModelMetadata:
        active = self._holder.active
        if active is None:
            await _abort(context, Unavailable(NO_MODEL), NO_MODEL)
        return serde.encode_model_metadata(active.manifest, provider=active.provider)

    async def Health(
        self, request: serde.HealthRequest, context: grpc.aio.ServicerContext
    ) -> serde.HealthResponse:
        active = self._holder.active
        status = self._status()
        return serde.encode_health(
            serving=active is not None,
            connected=status.connected,
            active=active.ref if active else None,
            update_state=status.update_state,
        )

    async def _predict(self, request: serde.PredictRequest) -> serde.PredictResponse:
        call = serde.decode_predict_request(request)
        if 0 < self._holder.recent_latency_us < INLINE_BELOW_US:
            # a thread hop costs 50-200 µs: models this fast run on the loop itself
            y, model, latency_us = self._run(call.x, call.labels)
        else:
            y, model, latency_us = await asyncio.to_thread(self._run, call.x, call.labels)
        return serde.encode_predict_response(
            y, model.ref, latency_us=latency_us, request_id=call.request_id
        )

    def _run(self, x: np.ndarray, labels: tuple[int, ...]) -> tuple[np.ndarray, ActiveModel, int]:
        start = time.perf_counter_ns()
        y, model = self._holder.predict(x, labels=labels)
        return y, model, (time.perf_counter_ns() - start) // 1000


async def _abort(context: grpc.aio.ServicerContext, e: FleetError, details: str) -> NoReturn:
    code = grpc_status(e)
    if code is grpc.StatusCode.INTERNAL:
        logger.warning("InferenceService: %s", details, exc_info=e)
    else:
        logger.debug("InferenceService: %s: %s", code.name, details)
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # it raises; for the type checker


def check_address(address: str) -> str:
    """Return `address` if it is loopback or a Unix socket, else raise `InvalidArgument`."""
    if address.startswith("unix:"):
        if not address[len("unix:") :].strip("/"):
            raise InvalidArgument(f"address {address!r} names no socket path; use unix:PATH")
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"address {address!r} is not HOST:PORT; accepted: {_ADDRESS_FORMS}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise InvalidArgument(
                f"address {address!r} is not loopback: the inference API has no "
                f"authentication and binds only {_ADDRESS_FORMS}"
            )
    return address


async def serve(
    holder: ModelHolder,
    *,
    address: str = "127.0.0.1:0",
    status: Callable[[], AgentStatus] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    share_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Start `InferenceService` on `address`; return the server and its port (0 for unix:).

    Stop it with `await server.stop(grace)`. Port 0 picks a free port. Raises
    `InvalidArgument` for a non-local address and `Unavailable` when it cannot bind.
    The socket allows SO_REUSEPORT so that a new agent version can bind beside this one
    while it switches (`share_port`, agent/selfupdate.py); without `share_port` a port
    some other process holds is refused first, so a second agent cannot steal requests.
    """
    check_address(address)
    if not share_port and not address.startswith("unix:"):
        _check_free(address)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1),
        ]
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        InferenceServicer(holder, status=status), server
    )
    try:
        port = int(server.add_insecure_port(address))
    except RuntimeError as e:
        raise Unavailable(f"cannot bind InferenceService to {address!r}: {e}") from e
    if address.startswith("unix:"):
        port = 0
    await server.start()
    logger.info(
        "InferenceService listening on %s", address if port == 0 else _with_port(address, port)
    )
    return server, port


def _check_free(address: str) -> None:
    """`Unavailable` if another socket is bound to `address` (host:port; port 0 is free)."""
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if port in ("", "0"):
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR (not REUSEPORT): closed connections in TIME_WAIT do not count,
        # a listening socket does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:
            raise Unavailable(f"cannot bind InferenceService to {address!r}: {e}") from e


def _with_port(address: str, port: int) -> str:
    return f"{address.rpartition(':')[0]}:{port}"
