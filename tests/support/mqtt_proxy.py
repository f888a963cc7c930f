"""A TCP proxy on loopback in front of a real broker that cuts a client's connection when
it publishes on a chosen topic, the first `times` times: what a busy NATS node does when
JetStream cannot store a retained message in time (it closes the connection before the
PUBACK). Bytes pass through untouched otherwise, both ways.

    async with CuttingProxy(broker_port, cut_topic="ef/v1/keys") as proxy:
        proxy.url     # mqtt://127.0.0.1:PORT
        proxy.cuts    # connections cut so far
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

HOST = "127.0.0.1"
PUBLISH = 3  # MQTT control packet type


def _packet(buf: bytes | bytearray) -> int | None:
    """The length of the complete MQTT packet at the start of `buf` (None: not all there)."""
    length, mult = 0, 1
    for i in range(1, 5):
        if i >= len(buf):
            return None
        length += (buf[i] & 0x7F) * mult
        if not buf[i] & 0x80:
            end = i + 1 + length
            return end if len(buf) >= end else None
        mult *= 128
    raise ValueError("malformed MQTT remaining length")


def _publish_topic(packet: bytes | bytearray) -> str | None:
    if packet[0] >> 4 != PUBLISH:
        return None
    i = 1
    while packet[i] & 0x80:
        i += 1
    start = i + 1
    n = int.from_bytes(packet[start : start + 2], "big")
    return bytes(packet[start + 2 : start + 2 + n]).decode("utf-8", "replace")


class CuttingProxy:
    def __init__(self, upstream_port: int, *, cut_topic: str, times: int = 1) -> None:
        self.upstream_port = upstream_port
        self.cut_topic = cut_topic
        self.times = times
        self.cuts = 0
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
        self._writers |= {writer, up_writer}

        async def down() -> None:  # broker -> client, as it comes
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()

        async def up() -> None:  # client -> broker, packet by packet
            buf = bytearray()
            while data := await reader.read(65536):
                buf += data
                while (end := _packet(buf)) is not None:
                    packet, buf = buf[:end], buf[end:]
                    if _publish_topic(packet) == self.cut_topic and self.cuts < self.times:
                        self.cuts += 1
                        return  # cut: neither side hears of it
                    up_writer.write(packet)
                await up_writer.drain()

        tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await w.wait_closed()
