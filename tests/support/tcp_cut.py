"""A TCP proxy on loopback that passes bytes both ways untouched and, once the server
has sent `cut_after` bytes on one connection, closes both sides of it: a link that drops
in the middle of an answer (TLS and HTTP/2 pass through; only the byte count matters).
With `cut_after=None` it only counts.

    with ByteCutProxy(("127.0.0.1", port), cut_after=1_000_000) as proxy:
        proxy.address     # 127.0.0.1:PORT, in front of the server
        proxy.downstream  # bytes the server sent, per connection, in accept order
        proxy.cuts        # connections cut so far
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

HOST = "127.0.0.1"


class ByteCutProxy:
    def __init__(self, upstream: tuple[str, int], *, cut_after: int | None = None) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.downstream: list[int] = []
        self.cuts = 0
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def __enter__(self) -> ByteCutProxy:
        self._spawn(self._accept)
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(self._listener)
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            self._close(s)
        for t in self._threads:
            t.join(timeout=5)

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    @staticmethod
    def _close(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
                index = len(self.downstream)
                self.downstream.append(0)
            self._spawn(self._pump, client, server, None)
            self._spawn(self._pump, server, client, index)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: int | None) -> None:
        """Copy src -> dst; `counted`: the connection whose server bytes these are."""
        try:
            while data := src.recv(65536):
                if counted is not None and self.cut_after is not None:
                    room = self.cut_after - self.downstream[counted]
                    if len(data) >= room:
                        dst.sendall(data[: max(0, room)])
                        self.downstream[counted] += max(0, room)
                        with self._lock:
                            self.cuts += 1
                        break
                dst.sendall(data)
                if counted is not None:
                    self.downstream[counted] += len(data)
        except OSError:
            pass
        self._close(src)
        self._close(dst)
