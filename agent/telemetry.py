"""Telemetry: one window of counts, latency histogram and memory per interval.

Published on `dev/{id}/telemetry` (QoS 1). While the broker is unreachable the
windows are spooled on disk (bounded, oldest dropped first) and delivered after
reconnect, marked `spooled`; `seq` increases per device across restarts so the
coordinator can drop duplicates.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from edgefleet.agent.drift import DriftMonitor
from edgefleet.agent.inference import ModelHolder
from edgefleet.agent.resources import rss_bytes
from edgefleet.agent.serde import encode_telemetry, mark_spooled
from edgefleet.protos.errors import FleetError

logger = logging.getLogger(__name__)

Publish = Callable[[bytes], Awaitable[None]]
_LEN = struct.Struct("<I")


class Spool:
    """Length-prefixed records in one append-only file, at most `max_records`."""

    def __init__(self, directory: Path, *, max_records: int = 10_000) -> None:
        self.path = directory / "telemetry.spool"
        self.seq_path = directory / "telemetry.seq"
        self.max_records = max_records
        directory.mkdir(parents=True, exist_ok=True)

    def next_seq(self) -> int:
        try:
            seq = int(self.seq_path.read_text()) + 1
        except (OSError, ValueError):
            seq = 1
        tmp = self.seq_path.with_suffix(".tmp")
        tmp.write_text(str(seq))
        os.replace(tmp, self.seq_path)
        return seq

    def append(self, record: bytes) -> None:
        records = self.read()
        records.append(record)
        if len(records) > self.max_records:
            dropped = len(records) - self.max_records
            logger.warning("telemetry spool full: dropping the %d oldest windows", dropped)
            records = records[dropped:]
            self._write(records)
            return
        with open(self.path, "ab") as f:
            f.write(_LEN.pack(len(record)) + record)

    def read(self) -> list[bytes]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out, pos = [], 0
        while pos + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + n > len(data):
                logger.warning(
                    "telemetry spool ends in a partial record (%d bytes): ignored", len(data) - pos
                )
                break
            out.append(data[pos : pos + n])
            pos += n
        return out

    def _write(self, records: list[bytes]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for r in records:
                f.write(_LEN.pack(len(r)) + r)
        os.replace(tmp, self.path)

    def clear(self, keep: list[bytes] | None = None) -> None:
        if keep:
            self._write(keep)
        else:
            self.path.unlink(missing_ok=True)


class Telemetry:
    """Closes a window every `emit()`: inference counters, latency, memory and, with a
    `DriftMonitor` (registered on the holder here), drift sketches of live traffic."""

    def __init__(
        self,
        *,
        device_id: str,
        holder: ModelHolder,
        spool: Spool,
        publish: Publish,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.device_id = device_id
        self.holder = holder
        self.drift = drift
        if drift is not None:
            holder.add_observer(drift.observe)
        self.spool = spool
        self._publish = publish
        self._window_start = int(time.time() * 1000)

    async def emit(self) -> bool:
        """Close the current window and send it (or spool it). Returns whether it was sent."""
        stats = self.holder.snapshot_and_reset()
        now = int(time.time() * 1000)
        active = self.holder.active
        payload = encode_telemetry(
            device_id=self.device_id,
            seq=self.spool.next_seq(),
            window_start_ms=self._window_start,
            window_end_ms=now,
            active=active.ref if active else None,
            predictions=stats.predictions,
            errors=stats.errors,
            latency=stats.latency,
            rss_bytes=rss_bytes(),
            drift=self.drift.take() if self.drift is not None else (),
        )
        self._window_start = now
        try:
            await self._publish(payload)
            return True
        except FleetError as e:
            logger.debug("%s: telemetry spooled (%s)", self.device_id, e)
            self.spool.append(mark_spooled(payload))
            return False

    async def flush(self) -> int:
        """Deliver spooled windows, oldest first; stops at the first failure. Returns how many went."""
        records = self.spool.read()
        sent = 0
        for r in records:
            try:
                await self._publish(r)
            except FleetError:
                break
            sent += 1
        if sent:
            self.spool.clear(records[sent:])
            logger.info("%s: delivered %d spooled telemetry windows", self.device_id, sent)
        return sent
