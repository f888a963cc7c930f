"""A replica inside `fleet serve --replica`: heartbeats, the election, the leader's work.

Every replica serves FleetService, records device births and reports, and ingests
telemetry from its share of the broker's shared subscription (`$share/…`; the
(device, seq) key drops a window two replicas both got). `Elector` keeps this
replica's row fresh and tries for the lease (`cloud.replicas.lease`); while it holds
it, `lead(fence)` runs: the rollout controller on a rollout store whose writes are
fenced, desired-state reassertion and answering artifact wants (the broadcaster),
telemetry compaction and drift scoring, and the FL supervisor. When the term ends
(renewal failed, own clock past the lease, a fenced write refused, shutdown) the
leader's work is cancelled before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.monitoring import Monitoring
from edgefleet.cloud.replicas.lease import Fence, LeaderLease
from edgefleet.cloud.replicas.registry import ReplicaStore
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.transport import Message

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: the leader forgets replicas silent for an hour every this many heartbeats
FORGET_EVERY = 100


def default_replica_id() -> str:
    return f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:6]}"


class ReplicaCoordinator(Coordinator):
    """The coordinator's MQTT side on a replica: device events on every replica; artifact
    wants and desired-state reassertion only while leading."""

    leading = False

    def lead(self, on: bool) -> None:
        self.leading = on
        if on:  # a new leader re-asserts everything once, as after a reconnect
            self._reassert_all = True
            self._reassert_wake.set()

    async def _on_message(self, msg: Message) -> None:
        if not self.leading and "/art/" in f"/{msg.topic}" and msg.topic.endswith("/want"):
            return  # the leader's broadcaster answers wants
        await super()._on_message(msg)

    async def reassert(self, device_ids: Sequence[str] | None = None) -> int:
        if not self.leading:
            return 0
        return await super().reassert(device_ids)


class ReplicaMonitoring(Monitoring):
    """Telemetry ingest and /metrics on every replica; compaction and drift scoring on
    the leader only (`leader_loops`).

    The telemetry session is clean, not persistent: a killed replica's session would
    otherwise stay in the shared group and keep its share of every device's windows
    queued at the broker (each sent again by its device only after the ack timeout)."""

    persistent_ingest = False

    async def __aenter__(self) -> ReplicaMonitoring:
        await super().__aenter__()
        for task in (self._compactor, self._drifter):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._compactor = self._drifter = None
        return self

    async def leader_loops(self) -> None:
        loops: list[Awaitable[None]] = [self._compact_loop()]
        if self.drift is not None:
            loops.append(self._drift_loop())
        await asyncio.gather(*loops)


class Elector:
    """Heartbeat, election and the leader's term, every `lease.lease_s / 3` seconds."""

    def __init__(
        self,
        lease: LeaderLease,
        registry: ReplicaStore,
        *,
        address: Callable[[], str],
        lead: Callable[[Fence], Awaitable[None]],
        poll_s: float | None = None,
    ) -> None:
        self.lease = lease
        self.registry = registry
        self.address = address
        self.lead = lead
        self.poll_s = poll_s if poll_s is not None else lease.lease_s / 3
        self.terms = 0  # terms this replica has led
        self._fenced = False
        self._term: asyncio.Task[None] | None = None
        self._token = 0  # the fencing token of the current (or last) term
        self._beats = 0
        self._late = 0.0  # the event loop's worst lateness in `_wait` since the last poll
        self.leading = asyncio.Event()

    @property
    def replica_id(self) -> str:
        return self.lease.replica_id

    async def run(self) -> None:
        try:
            while True:
                await self._beat()
                if self._term is None:
                    token = await self._timed("trying for the lease", self.lease.try_acquire)
                    if token is not None:
                        self._start(token)
                elif not await self._timed("renewing the lease", self.lease.renew):
                    await self._end("its lease could not be renewed")
                await self._wait()
        finally:
            await self._end("the replica stops", clean=True)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.registry.remove, self.replica_id)

    async def _timed(self, what: str, call: Callable[[], T]) -> T:
        """`call` in a worker thread; a warning when it took over a third of the lease,
        saying how much of that was spent waiting for a thread (the default executor is
        shared with every other blocking call of this process) and how late this
        replica's event loop woke up since the last poll: what a spurious failover under
        load is made of."""
        queued = time.monotonic()
        started = queued

        def timed() -> T:
            nonlocal started
            started = time.monotonic()
            return call()

        try:
            return await asyncio.to_thread(timed)
        finally:
            took = time.monotonic() - queued
            if took > self.lease.lease_s / 3:
                logger.warning(
                    "replica %s: %s took %.2fs of a %.1fs lease (%.2fs waiting for a worker "
                    "thread; event loop up to %.2fs late since the last poll)",
                    self.replica_id,
                    what,
                    took,
                    self.lease.lease_s,
                    started - queued,
                    self._late,
                )
            self._late = 0.0

    async def _beat(self) -> None:
        try:
            address = self.address()
            await self._timed(
                "the heartbeat", lambda: self.registry.heartbeat(self.replica_id, address)
            )
            self._beats += 1
            if self._term is not None and self._beats % FORGET_EVERY == 0:
                await asyncio.to_thread(self.registry.forget_stale)
        except Exception as e:  # the database is away: the lease decides what that means
            logger.warning("replica %s: heartbeat not written (%s)", self.replica_id, e)

    async def _wait(self) -> None:
        """Sleep until the next poll; a term whose lease ran out on this replica's own
        clock (or whose write was fenced) ends at once, even while a renewal hangs."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.poll_s
        while loop.time() < until:
            if self._term is not None:
                if self._fenced:
                    await self._end("a write was fenced: another replica leads")
                elif not self.lease.valid():
                    await self._end("its lease ran out before a renewal got through")
                elif self._term.done():
                    await self._end("its leader work stopped")
            nap = min(0.1, max(0.0, until - loop.time()))
            woke = loop.time() + nap
            await asyncio.sleep(nap)
            self._late = max(self._late, loop.time() - woke)

    def _on_fenced(self) -> None:  # from a writer thread
        self._fenced = True

    def _start(self, token: int) -> None:
        self.terms += 1
        self._token = token
        self._fenced = False
        fence = self.lease.fence(self._on_fenced)
        logger.warning("replica %s leads (fencing token %d)", self.replica_id, token)
        self._term = asyncio.create_task(self._run_term(fence), name=f"leader-term-{token}")
        self.leading.set()

    async def _run_term(self, fence: Fence) -> None:
        try:
            await self.lead(fence)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("replica %s: leader work failed", self.replica_id)

    async def _end(self, why: str, *, clean: bool = False) -> None:
        term, self._term = self._term, None
        if term is None:
            return
        self.leading.clear()
        term.cancel()
        await asyncio.gather(term, return_exceptions=True)
        await asyncio.to_thread(self.lease.release if clean else self.lease.lose)
        logger.warning("replica %s stops leading (token %d): %s", self.replica_id, self._token, why)


def fl_elsewhere(registry: ReplicaStore, replica_id: str) -> str:
    """Why replica `replica_id` (FL on, no federation now) cannot take a federated call:
    one line naming the leader and its address, or saying an election or the start of
    its own federation is under way."""
    leaders = [r for r in registry.list() if r.leader]
    if not leaders:
        return (
            f"replica {replica_id} does not lead and no replica leads right now (an election "
            "is under way): federated learning runs on the leader; try again in a few seconds"
        )
    lead = leaders[0]
    if lead.replica_id == replica_id:
        return (
            f"replica {replica_id} leads but its federation is still starting (or stopping): "
            "try again in a few seconds"
        )
    return (
        f"replica {replica_id} does not lead: federated learning runs on the leader "
        f"{lead.replica_id} at {lead.address}; send it there "
        f"(fleet --coordinator {lead.address} fl …)"
    )


def check_replica_settings(settings: Any) -> None:
    """Replica mode needs PostgreSQL, a shared artifact store and an external broker;
    one line naming what is accepted otherwise."""
    from edgefleet.cloud.replicas.lease import require_postgres

    require_postgres(settings.registry_url)
    scheme = settings.artifacts.partition("://")[0]
    if scheme != "s3":
        raise InvalidArgument(
            f"--replica needs an artifact store every replica reaches: {scheme}:// "
            f"({settings.artifacts}) is not accepted; accepted: s3:// (--artifact-uri s3://BUCKET/PREFIX)"
        )
    if not settings.broker:
        raise InvalidArgument(
            "--replica needs an external MQTT broker every replica shares: none given; "
            "accepted: --broker mqtt://HOST:PORT or mqtts://HOST:PORT (no managed Mosquitto)"
        )


__all__ = [
    "Elector",
    "ReplicaCoordinator",
    "ReplicaMonitoring",
    "check_replica_settings",
    "default_replica_id",
    "fl_elsewhere",
]
