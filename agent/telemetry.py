"""Telemetry: one window of counts, latency histogram and memory per interval.

Published on `dev/{id}/telemetry` (QoS 1). Delivery is end to end: every window is
written to the spool (disk, bounded, oldest dropped first) *before* it is sent, and
leaves the spool only when the coordinator says it is committed to its database (a
`TelemetryAck` on `dev/{id}/ack`); the broker's PUBACK is not enough, since a broker
that crashes, or has no subscriber yet, acknowledges and then loses. A window not
acknowledged within `ack_timeout` seconds, or still spooled when the link comes back,
is sent again (marked `spooled`), at most `replay_per_tick` per call and with its own
timeout doubling up to `ack_timeout_cap`. The coordinator drops duplicates by
`(device_id, seq)` and acknowledges them again.

The `seq` rule: `seq` increases by one per window for the life of the device's state
directory. The last one issued is kept in `telemetry.seq` (written to a temporary file
and renamed over it; flushed to disk too when the spool is durable), and a restarted
agent continues from the larger of that and the highest spooled window, so a SIGKILLed
or restarted agent never issues a `seq` twice (a power cut without `durable` may: its
new windows would then be taken for duplicates).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from edgefleet.agent.drift import DriftMonitor
from edgefleet.agent.inference import ModelHolder
from edgefleet.agent.resources import rss_bytes
from edgefleet.agent.serde import encode_telemetry, mark_spooled, telemetry_seq
from edgefleet.protos.errors import FleetError

logger = logging.getLogger(__name__)

Publish = Callable[[bytes], Awaitable[None]]
_LEN = struct.Struct("<I")
_SUFFIX = ".tw"


def _write(path: Path, data: bytes, *, durable: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    """Unacknowledged windows, one file per window (``{seq:020d}.tw``), at most
    `max_records` (the oldest are dropped first, with a warning). With `durable`
    every file is flushed to disk before it counts as written."""

    def __init__(
        self, directory: Path, *, max_records: int = 10_000, durable: bool = False
    ) -> None:
        self.directory = directory
        self.seq_path = directory / "telemetry.seq"
        self.max_records = max_records
        self.durable = durable
        self.dropped = 0  # windows dropped because the spool was full
        directory.mkdir(parents=True, exist_ok=True)
        self._seqs: list[int] = []  # sorted
        for name in os.listdir(directory):
            if name.endswith(".tmp"):  # a write cut short by a crash: never counted
                (directory / name).unlink(missing_ok=True)
            elif name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
                self._seqs.append(int(name[: -len(_SUFFIX)]))
        self._seqs.sort()
        self._migrate(directory / "telemetry.spool")
        try:
            last = int(self.seq_path.read_text())
        except (OSError, ValueError):
            last = 0
        self._seq = max(last, self._seqs[-1] if self._seqs else 0)

    def _migrate(self, legacy: Path) -> None:
        """Windows spooled by an older agent (one length-prefixed file) become files."""
        try:
            data = legacy.read_bytes()
        except FileNotFoundError:
            return
        pos = moved = 0
        while pos + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            pos += _LEN.size
            if pos + n > len(data):
                break  # a record cut short by a crash
            record = data[pos : pos + n]
            pos += n
            seq = telemetry_seq(record)
            if seq and seq not in self._seqs:
                self.put(seq, record)
                moved += 1
        legacy.unlink()
        logger.info("telemetry spool: %d windows moved from %s", moved, legacy.name)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:020d}{_SUFFIX}"

    def next_seq(self) -> int:
        """The next window's `seq`, recorded before it is used."""
        self._seq += 1
        _write(self.seq_path, str(self._seq).encode(), durable=self.durable)
        return self._seq

    @property
    def last_seq(self) -> int:
        """The last `seq` issued (0: none yet): every window from 1 to it was produced."""
        return self._seq

    def put(self, seq: int, payload: bytes) -> None:
        """Keep `payload` until `remove`d; drops the oldest windows beyond `max_records`."""
        self.write(seq, payload)
        self.add(seq)

    def write(self, seq: int, payload: bytes) -> None:
        """Only the file (safe off the event loop); `add` then counts it in."""
        _write(self._path(seq), payload, durable=self.durable)

    def add(self, seq: int) -> None:
        """Count a `write`-n window in; drops the oldest beyond `max_records`."""
        i = bisect.bisect_left(self._seqs, seq)
        if i == len(self._seqs) or self._seqs[i] != seq:
            self._seqs.insert(i, seq)
        excess = len(self._seqs) - self.max_records
        if excess > 0:
            logger.warning("telemetry spool full: dropping the %d oldest windows", excess)
            self.dropped += excess
            self.remove(self._seqs[:excess])

    def get(self, seq: int) -> bytes | None:
        try:
            return self._path(seq).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, seqs: Iterable[int]) -> int:
        gone = set(seqs).intersection(self._seqs)
        for seq in gone:
            self._path(seq).unlink(missing_ok=True)
        if gone:
            self._seqs = [s for s in self._seqs if s not in gone]
        return len(gone)

    def remove_ranges(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Remove the spooled windows whose seq falls in any inclusive range; returns them."""
        hit: list[int] = []
        for first, last in ranges:
            lo = bisect.bisect_left(self._seqs, first)
            hi = bisect.bisect_right(self._seqs, last)
            hit.extend(self._seqs[lo:hi])
        self.remove(hit)
        return hit

    def seqs(self) -> list[int]:
        """Spooled windows' seqs, oldest first."""
        return list(self._seqs)

    def read(self) -> list[bytes]:
        """Spooled windows, oldest first."""
        return [p for s in self._seqs if (p := self.get(s)) is not None]

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        i = bisect.bisect_left(self._seqs, seq)
        return i < len(self._seqs) and self._seqs[i] == seq


class Telemetry:
    """Closes a window every `emit()`: inference counters, latency, memory and, with a
    `DriftMonitor` (registered on the holder here), drift sketches of live traffic.
    `on_ack` forgets committed windows; `replay` re-sends what is due."""

    def __init__(
        self,
        *,
        device_id: str,
        holder: ModelHolder,
        spool: Spool,
        publish: Publish,
        drift: DriftMonitor | None = None,
        ack_timeout: float = 30.0,
        ack_timeout_cap: float = 600.0,
        replay_per_tick: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.holder = holder
        self.drift = drift
        if drift is not None:
            holder.add_observer(drift.observe)
        self.spool = spool
        self._publish = publish
        self.ack_timeout = ack_timeout
        self.ack_timeout_cap = ack_timeout_cap
        self.replay_per_tick = replay_per_tick
        self._clock = clock
        #: spooled seq -> (when to send it again, sends so far); a window spooled by an
        #: earlier run is due at once
        self._due: dict[int, tuple[float, int]] = {s: (0.0, 0) for s in spool.seqs()}
        self._window_start = int(time.time() * 1000)
        self._dropped_seen = spool.dropped
        self.acked = 0
        self.resent = 0

    @property
    def unacked(self) -> int:
        return len(self.spool)

    async def _put(self, seq: int, payload: bytes) -> None:
        if self.spool.durable:  # a flushed write waits on the disk: off the loop
            await asyncio.to_thread(self.spool.write, seq, payload)
            self.spool.add(seq)  # the index changes on the loop only (acks change it too)
        else:
            self.spool.put(seq, payload)
        if self.spool.dropped != self._dropped_seen:  # a full spool dropped the oldest
            self._dropped_seen = self.spool.dropped
            for gone in [s for s in self._due if s not in self.spool]:
                del self._due[gone]

    async def emit(self) -> bool:
        """Close the current window, spool it and send it. Returns whether it was sent
        (it stays spooled until acknowledged either way)."""
        stats = self.holder.snapshot_and_reset()
        now = int(time.time() * 1000)
        active = self.holder.active
        if self.spool.durable:  # emit is its only caller: nothing else touches the counter
            seq = await asyncio.to_thread(self.spool.next_seq)
        else:
            seq = self.spool.next_seq()
        payload = encode_telemetry(
            device_id=self.device_id,
            seq=seq,
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
        await self._put(seq, payload)
        self._due[seq] = (0.0, 0)  # not sent: due as soon as the link is up
        try:
            await self._publish(payload)
        except FleetError as e:
            logger.debug("%s: telemetry window %d spooled (%s)", self.device_id, seq, e)
            return False
        if seq in self._due:  # else its ack came before the PUBACK
            self._due[seq] = (self._clock() + self.ack_timeout, 1)
        return True

    def on_ack(self, ranges: Iterable[tuple[int, int]]) -> int:
        """The coordinator committed these windows: delete them. Returns how many were spooled."""
        gone = self.spool.remove_ranges(ranges)
        for seq in gone:
            self._due.pop(seq, None)
        self.acked += len(gone)
        return len(gone)

    def reconnected(self) -> None:
        """The link is back: every unacknowledged window is due now (the coordinator or the
        broker may have lost it meanwhile)."""
        self._due = {s: (0.0, n) for s, (_t, n) in self._due.items()}

    async def replay(self, *, limit: int | None = None) -> int:
        """Send again up to `limit` (default `replay_per_tick`) due windows, oldest first;
        stops at the first failure. Returns how many went."""
        limit = self.replay_per_tick if limit is None else limit
        now = self._clock()
        due = sorted(s for s, (t, _n) in self._due.items() if t <= now)[:limit]
        sent = 0
        for seq in due:
            payload = self.spool.get(seq)
            if payload is None:
                self._due.pop(seq, None)
                continue
            try:
                await self._publish(mark_spooled(payload))
            except FleetError:
                break
            sent += 1
            if seq in self._due:
                n = self._due[seq][1]
                wait = min(self.ack_timeout_cap, self.ack_timeout * 2 ** min(n, 16))
                self._due[seq] = (self._clock() + wait, n + 1)
        if sent:
            self.resent += sent
            logger.info(
                "%s: sent %d unacknowledged telemetry windows again (%d spooled)",
                self.device_id,
                sent,
                len(self.spool),
            )
        return sent

    async def flush(self) -> int:
        """Send every unacknowledged window now (tests, shutdown). Returns how many went."""
        self.reconnected()
        return await self.replay(limit=len(self._due))
