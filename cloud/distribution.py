"""Artifact broadcast: each chunk goes out once per wave on a shared topic, whatever
the number of devices; devices say what they lack on `want`, and the coordinator
merges those wants and re-sends only missing chunks (a carousel).

Repairs go out on the same shared topic, so a re-send reaches every device still
subscribed: a chunk is sent again only when a want proves it lost (the device holds a
chunk sent after it: MQTT delivers one publisher's QoS 1 messages in order) or when
the device has shown no progress for a grace that grows with how long the broker is
seen to take to deliver a wave (`Broadcaster.grace`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edgefleet.cloud.serde import encode_chunk
from edgefleet.protos.errors import FleetError, InvalidArgument
from edgefleet.protos.topics import Topics

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
DEFAULT_CHUNK_SIZE = 64 * 1024


#: devices whose progress one artifact tracks (a want names its sender; beyond this
#: many, further senders get the send-time grace only)
MAX_TRACKED_DEVICES = 200_000


@dataclass
class _Device:
    """What the wants of one device have shown about one artifact's delivery to it."""

    mark: float  # send time of the newest chunk it held at its last want (-inf: none)
    seen_at: float  # when its last want arrived
    first_seen: float  # when the first want of this download arrived
    progress_at: float | None = None  # when a want last showed its mark advance


@dataclass
class _Artifact:
    sha256: str
    data: bytes
    chunk_size: int
    digests: list[bytes] = field(default_factory=list)
    pending: set[int] = field(default_factory=set)
    first_want_at: float | None = None
    last_want_at: float = 0.0
    sent_at: dict[int, float] = field(default_factory=dict)
    #: when the copies of each chunk still possibly on their way began: its first send,
    #: or its first after `max_grace` without one (a later wave)
    first_sent_at: dict[int, float] = field(default_factory=dict)
    chunks_sent: int = 0
    bytes_sent: int = 0
    wants: int = 0
    #: chunks a want put back in the pending set, by why: the want proved them lost,
    #: the device had reconnected, or the grace ran out (for a device subscribed when
    #: the chunk went out, or for one that asked only later: "late")
    repairs: dict[str, int] = field(
        default_factory=lambda: {"proven": 0, "resume": 0, "grace": 0, "late": 0}
    )
    devices: dict[str, _Device] = field(default_factory=dict)
    #: longest time the broker was seen to take to deliver a chunk to a device (a lower
    #: bound per observation), and when it was seen
    delivery: float = 0.0
    delivery_at: float = float("-inf")
    #: when a want last showed any device progress (the wave is still being delivered)
    progress_at: float = float("-inf")
    #: the chunk being published right now (its send time is not recorded yet)
    publishing: int | None = None

    @property
    def total(self) -> int:
        return max(1, -(-len(self.data) // self.chunk_size))

    def chunk(self, i: int) -> bytes:
        return self.data[i * self.chunk_size : (i + 1) * self.chunk_size]


def chunk_digests(data: bytes, chunk_size: int) -> list[bytes]:
    n = max(1, -(-len(data) // chunk_size))
    return [hashlib.sha256(data[i * chunk_size : (i + 1) * chunk_size]).digest() for i in range(n)]


@dataclass(frozen=True)
class ArtifactStats:
    sha256: str
    size: int
    chunks: int
    chunks_sent: int
    bytes_sent: int
    wants: int
    #: chunks re-queued by wants, by reason ("proven", "resume", "grace", "late")
    repairs: dict[str, int] = field(default_factory=dict)


class Broadcaster:
    """Serves every registered artifact's chunks from merged wants.

    Once wants have been quiet for `gather` seconds (or `max_gather` after the
    first one: a wave's devices ask within moments of each other) it sends every
    pending chunk, in index order, at most `rate` bytes/s (0: unlimited). Wants arriving meanwhile
    join the pending set, so a chunk wanted by 1,000 devices goes out once.

    Repairs (see `on_want`): a chunk the want proves lost goes out again `resend_after`
    seconds after its last send; one that may still be queued for the device at the
    broker waits `grace()` after the later of its last send and the device's last
    observed progress. `grace()` is `in_flight_grace`, or `delivery_factor` times the
    longest delivery the wants have shown (at most `max_grace`): a broker that takes a
    minute to serve a wave to 10,000 devices does not get every straggler's chunks
    re-sent to all of them every few seconds.
    """

    def __init__(
        self,
        publish: Publish,
        *,
        topics: Topics,
        gather: float = 0.2,
        rate: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0:
            raise InvalidArgument(f"rate limit {rate}: must be 0 (unlimited) or a positive bytes/s")
        self._publish = publish
        self._topics = topics
        self._gather = gather
        self._rate = rate
        self._clock = clock
        self._artifacts: dict[str, _Artifact] = {}
        self._wake = asyncio.Event()
        self.retry_delay = 0.5
        self.max_gather = max(2.0, 10 * gather)
        self.resend_after = 1.0
        self.in_flight_grace = 5.0
        self.delivery_factor = 2.0
        self.max_grace = 120.0

    def register(
        self, sha256: str, data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> list[bytes]:
        if chunk_size <= 0:
            raise InvalidArgument(f"chunk size {chunk_size}: must be positive")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise InvalidArgument(f"artifact bytes do not hash to {sha256[:16]}…")
        if sha256 not in self._artifacts:
            self._artifacts[sha256] = _Artifact(
                sha256, data, chunk_size, chunk_digests(data, chunk_size)
            )
        return self._artifacts[sha256].digests

    def known(self, sha256: str) -> bool:
        return sha256 in self._artifacts

    def digests(self, sha256: str) -> list[bytes]:
        return self._artifacts[sha256].digests

    def chunk_size(self, sha256: str) -> int:
        return self._artifacts[sha256].chunk_size

    def grace(self, sha256: str) -> float:
        """Seconds a chunk that may still be queued for a device gets before it is sent
        to everyone again: `in_flight_grace`, or `delivery_factor` times the longest
        delivery recently seen for this artifact, at most `max_grace`."""
        return self._grace(self._artifacts[sha256], self._clock())

    def _grace(self, art: _Artifact, now: float) -> float:
        delivery = art.delivery if now - art.delivery_at <= self.max_grace else 0.0
        return max(self.in_flight_grace, min(self.max_grace, self.delivery_factor * delivery))

    def on_want(
        self,
        sha256: str,
        ranges: list[tuple[int, int]],
        *,
        resume: bool = False,
        device_id: str = "",
    ) -> None:
        """Merge one device's want (the chunks it lacks) into the pending set.

        `device_id` (the want's sender; may be empty) lets the decisions use that
        device's progress: it is self-declared, so a device lying about it can only
        delay repairs, by at most `max_grace`, or hasten them to `in_flight_grace`.
        """
        art = self._artifacts.get(sha256)
        if art is None:
            logger.debug("want for unknown artifact %s ignored", sha256[:12])
            return
        art.wants += 1
        now = self._clock()
        wanted: set[int] = set()
        for start, end in ranges:
            wanted.update(range(max(0, start), min(art.total, end)))
        # MQTT delivers one publisher's QoS 1 messages on a topic in order. A device
        # that holds a chunk sent after chunk i has certainly lost i (or rejected it):
        # re-send at once. Otherwise i may still be queued for it at the broker (a
        # thousand subscribers take seconds to serve): wait for the grace before
        # sending it to everyone again.
        # A device that just (re)connected missed whatever was sent while it was away.
        # a device holding chunk j received a copy sent no earlier than j's first send:
        # the latest send is not a bound (a repair re-sends j while older copies of it
        # are still being delivered, and taking that one would "prove" the chunks queued
        # behind the older copy lost, and re-send them to everyone)
        held = max(
            (t for i, t in art.first_sent_at.items() if i not in wanted), default=float("-inf")
        )
        newest_held = float("inf") if resume else held
        d = self._track(art, device_id, held, now) if not resume else None
        grace = self._grace(art, now)
        for i in wanted:
            sent = art.sent_at.get(i)
            if sent is None:
                if i != art.publishing:  # not the one going out right now, for the first time
                    art.pending.add(i)
            elif sent < newest_held:
                if now - sent >= self.resend_after:
                    art.pending.add(i)
                    art.repairs["resume" if resume else "proven"] += 1
            elif now - self._since(art, d, sent) >= grace:
                art.pending.add(i)
                art.repairs["grace" if d is not None and d.first_seen < sent else "late"] += 1
        art.last_want_at = now
        if art.pending and art.first_want_at is None:
            art.first_want_at = now
        self._wake.set()

    def _since(self, art: _Artifact, d: _Device | None, sent: float) -> float:
        """From when the grace of a chunk sent at `sent`, wanted by `d`, counts."""
        if d is None:
            return sent
        since = max(sent, d.progress_at if d.progress_at is not None else sent)
        if d.first_seen < sent:
            # it subscribes before it wants: it was subscribed when this copy went out,
            # so the copy was queued for it (sessions are clean: a reconnect says
            # `resume`). While the wave is still being delivered to anyone, the broker
            # (or the device) is just slow: sending it to everyone again would only
            # queue a second copy behind the first
            since = max(since, art.progress_at)
        else:
            # it asked only after the send: it may have missed this copy, or its want
            # was just slow to come (most of them, at 3,000 devices on 2 cores). It
            # waits for the wave too, but not past `max_grace` after the send: the late
            # ones then get one gathered round, not one per grace
            since = max(since, min(art.progress_at, sent + self.max_grace))
        return since

    def _track(self, art: _Artifact, device_id: str, held: float, now: float) -> _Device | None:
        """Record what this want shows of the broker serving `device_id` (None: no id,
        or too many tracked)."""
        if not device_id:
            return None
        d = art.devices.get(device_id)
        if d is None or now - d.seen_at > self.max_grace:  # new, or a new download
            if d is None and len(art.devices) >= MAX_TRACKED_DEVICES:
                return None
            d = art.devices[device_id] = _Device(held, now, now)
            return d
        if held > d.mark:
            # it now holds a chunk sent at `held` that it lacked when it sent its last
            # want: the broker took at least (that want's arrival - send) to deliver it
            lag = d.seen_at - held
            if lag > 0:
                if now - art.delivery_at > self.max_grace:
                    art.delivery = 0.0
                if lag >= art.delivery:
                    art.delivery = lag
                art.delivery_at = now
            d.mark = held
            d.progress_at = art.progress_at = now
            # it received a chunk first sent at `held`: it was subscribed by then
            d.first_seen = min(d.first_seen, held)
        d.seen_at = now
        return d

    def stats(self, sha256: str) -> ArtifactStats:
        a = self._artifacts[sha256]
        return ArtifactStats(
            a.sha256, len(a.data), a.total, a.chunks_sent, a.bytes_sent, a.wants, dict(a.repairs)
        )

    async def run(self) -> None:
        """Send pending chunks until cancelled."""
        while True:
            due = [a for a in self._artifacts.values() if a.pending and a.first_want_at is not None]
            if not due:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self._clock()
            ready = [a for a in due if self._ripe(a, now)]
            if not ready:
                await asyncio.sleep(max(0.005, self._gather / 4))
                continue
            for art in ready:
                await self._send_round(art)

    def _ripe(self, a: _Artifact, now: float) -> bool:
        """A round starts once wants went quiet for `gather` s, or `max_gather` s after the first."""
        first = a.first_want_at if a.first_want_at is not None else now
        return now - a.last_want_at >= self._gather or now - first >= self.max_gather

    async def _send_round(self, art: _Artifact) -> None:
        topic = self._topics.chunk(art.sha256)
        while art.pending:
            i = min(art.pending)
            art.pending.discard(i)
            data = art.chunk(i)
            payload = encode_chunk(art.sha256, i, art.total, data)
            t0 = self._clock()
            art.publishing = i
            try:
                await self._publish(topic, payload)
            except FleetError as e:
                # broker gone or link dropped: keep the chunk pending and retry shortly;
                # devices re-ask for what they still lack after reconnecting anyway
                art.pending.add(i)
                logger.info(
                    "artifact %s: chunk %d not sent (%s); retrying in %.1fs",
                    art.sha256[:12],
                    i,
                    e,
                    self.retry_delay,
                )
                await asyncio.sleep(self.retry_delay)
                return
            finally:
                art.publishing = None
            art.chunks_sent += 1
            art.bytes_sent += len(data)
            t = self._clock()
            if t - art.sent_at.get(i, float("-inf")) > self.max_grace:
                art.first_sent_at[i] = t
            art.sent_at[i] = t
            if self._rate > 0:
                spare = len(payload) / self._rate - (self._clock() - t0)
                if spare > 0:
                    await asyncio.sleep(spare)
        art.first_want_at = None
        logger.debug(
            "artifact %s: round done, %d chunks sent so far", art.sha256[:12], art.chunks_sent
        )
