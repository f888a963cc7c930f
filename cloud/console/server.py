"""The console's HTTP server: uvicorn inside the coordinator's asyncio loop.

uvicorn's `Server.serve()` installs its own SIGINT/SIGTERM handlers, which would take
the coordinator's shutdown away from `fleet serve`; this runs its `startup`,
`main_loop` and `shutdown` steps instead, so the coordinator's injected shutdown
trigger stops the console like everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from edgefleet.protos.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from edgefleet.cloud.grpc_tls import ServerTls

logger = logging.getLogger(__name__)


def check_ui_listen(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(
            f"--ui-listen {address!r} is not HOST:PORT; e.g. 127.0.0.1:8080 (port 0 picks a free one)"
        )
    return host, int(port)


class ConsoleServer:
    """`await start()`, then `url`; `await stop()` ends it (connections get `grace` s).
    With `tls` it serves HTTPS only (a plain request gets no answer)."""

    def __init__(
        self, app: Any, listen: str, *, grace: float = 2.0, tls: ServerTls | None = None
    ) -> None:
        self.host, self.port = check_ui_listen(listen)
        self.app = app
        self.grace = grace
        self.tls = tls
        self.url = ""
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._sockets: list[Any] = []

    async def start(self) -> str:
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family, backlog=512)
        except OSError as e:
            raise Unavailable(
                f"cannot listen on {self.host}:{self.port} for the console (--ui-listen): {e}"
            ) from e
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=max(1, round(self.grace)),
            ssl_certfile=str(self.tls.cert) if self.tls is not None else None,
            ssl_keyfile=str(self.tls.key) if self.tls is not None else None,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        self._sockets = [sock]
        await server.startup(sockets=self._sockets)
        self._server = server
        port = int(sock.getsockname()[1])
        reach = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        reach = f"[{reach}]" if ":" in reach else reach
        scheme = "https" if self.tls is not None else "http"
        self.url = f"{scheme}://{reach}:{port}/"
        self._task = asyncio.create_task(server.main_loop(), name="console")
        logger.info("console on %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._server.shutdown(sockets=self._sockets)
        self._server = None
        for sock in self._sockets:
            sock.close()
