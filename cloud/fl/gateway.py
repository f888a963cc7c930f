"""The Fleet API gateway: what devices' SuperNodes reach of the coordinator's SuperLink.

Flower 1.41 serves all of its APIs on one HTTPS port: the Fleet API SuperNodes use
(`/v1/fleet/…`), the Control API `flwr` uses (`/v1/control/…`: list and start runs,
register nodes …, with no client authentication in open-source Flower) and the
runtime API of the ServerApp (`/v1/runtime/…`). The port-splitting flags of older
releases (`--control-api-address`, `--serverappio-api-address`) are deprecated
no-ops. So the SuperLink listens on loopback only, and this gateway listens where
devices dial (`--fl-listen`), terminates TLS with the SuperLink's certificate, and
forwards `POST /v1/fleet/*` and `GET /health` to it; every other path is answered
404 here. A device holding its FL bundle (the CA certificate and its node key) can
pull and push its own messages, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from edgefleet.cloud.fl.tls import TlsFiles
from edgefleet.protos.errors import Unavailable

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
MAX_BODY = 256 * 1024 * 1024  # a SuperNode pushes model weights; bounded all the same
#: hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx sets itself
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def allowed(method: str, path: str) -> bool:
    """What devices may call: the Fleet API (POST) and the health check."""
    if method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path:
        return True
    return method == "GET" and path == "/health"


class FleetApiGateway:
    """`async with FleetApiGateway(...)`: listening once entered; `address` is HOST:PORT."""

    def __init__(self, *, host: str, port: int, upstream: str, tls: TlsFiles) -> None:
        self.host, self.port, self.upstream, self.tls = host, port, upstream, tls
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self.refused = 0  # requests answered 404 (not the Fleet API)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def __aenter__(self) -> FleetApiGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        import httpx
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise Unavailable(
                f"cannot listen on {self.address} for the FL Fleet API: {e.strerror}"
            ) from None
        sock.listen(128)
        sock.set_inheritable(False)
        self.port = int(sock.getsockname()[1])
        verify = ssl.create_default_context(cafile=str(self.tls.ca_cert))
        self._client = httpx.AsyncClient(
            base_url=f"https://{self.upstream}", verify=verify, timeout=120.0
        )
        config = uvicorn.Config(
            self._app,
            ssl_certfile=str(self.tls.server_cert),
            ssl_keyfile=str(self.tls.server_key),
            log_level="warning",
            lifespan="off",
            interface="asgi3",
            proxy_headers=False,
            access_log=False,
            server_header=False,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="fl-gateway")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise Unavailable(f"FL Fleet API gateway on {self.address} did not start")
            await asyncio.sleep(0.02)
        logger.info("FL Fleet API gateway on %s -> SuperLink %s", self.address, self.upstream)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        import httpx

        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if not allowed(method, path):
            self.refused += 1
            logger.warning("FL gateway refused %s %s from %s", method, path, scope.get("client"))
            await _answer(send, 404, b"not served here: devices reach only the Fleet API\n")
            return
        body = bytearray()
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = bool(msg.get("more_body"))
            if len(body) > MAX_BODY:
                await _answer(send, 413, b"request too large\n")
                return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _DROP
        ]
        url = path + (("?" + scope["query_string"].decode()) if scope.get("query_string") else "")
        try:
            req = self._client.build_request(method, url, headers=headers, content=bytes(body))
            resp = await self._client.send(req, stream=True)
        except httpx.HTTPError as e:
            logger.info("FL gateway: SuperLink unreachable for %s: %s", path, e)
            await _answer(send, 502, b"SuperLink unavailable\n")
            return
        try:
            out_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in resp.headers.multi_items()
                if k.lower() not in _DROP
            ]
            await send(
                {"type": "http.response.start", "status": resp.status_code, "headers": out_headers}
            )
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the coordinator owns its signal handlers

    return Server


def _Server(config: Any) -> Any:
    return _server_class()(config)
