"""Simulated devices running the real agent: many `agent.agent.Agent`s on one event loop.

::

    async with SimulatedFleet(50, broker_url=url, public_key_pem=pem, state_root=tmp) as fleet:
        store.enroll_many(device_specs(fleet.ids_for_enrollment()))  # one transaction
        ...
        await fleet.wait(lambda: fleet.states()["active"] == 50, timeout=60)

Each `SimulatedDevice` is one real agent (transport, updater, downloads, slots,
ONNX Runtime / LiteRT) with its own client id, state directory and hardware
profile. Nothing here fakes the protocol; what the simulator adds sits around the
agent:

- capabilities from the profile (`simulator.profiles`), and a slowdown of each
  model call by the profile's `speed_factor` (the session is wrapped; outputs are
  the real model's);
- faults through real code paths: `drop_link` (the socket is closed without
  DISCONNECT; the transport reconnects by itself), `crash` (socket dropped and
  the agent task cancelled, so the broker publishes the will; the state directory
  stays), `restart` (a new `Agent` on the same state directory: it serves the
  installed model and resumes a partial download), and `corrupt_next_chunks` (one
  byte of the chunk data flipped before the updater sees it, so the real
  per-chunk digest check rejects it and the chunk is fetched again).
  `slow_link` caps a device's chunk downlink (bytes/s): chunks reach the updater
  only as fast as such a link carries them. `drift` shifts and scales the
  device's input stream (`InputDrift`, applied by `simulator.traffic.Traffic`
  before each predict), so the agent's drift sketches see it.

Agents start in batches (`batch_size`, default 100): each batch is connected
before the next one dials, so a thousand agents do not hit the broker at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentSettings
from edgefleet.agent.inference import ActiveModel, ModelHolder, ModelLoader
from edgefleet.agent.serde import UpdateState, decode_chunk
from edgefleet.models.runtime import ModelSession
from edgefleet.protos.errors import Conflict, InvalidArgument, NotFound, Unavailable
from edgefleet.simulator.plan import Enrollment, plan
from edgefleet.simulator.profiles import Mix, Profile, parse_profile
from edgefleet.simulator.sessions import SharedSessions

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 100
#: device id -> its MQTT password (a mapping, or a callable asked at start)
Credentials = Mapping[str, str] | Callable[[str], str]
#: How long a clean stop may take before the agent task is cancelled again. A stop
#: can hang: on Python 3.11 `asyncio.wait_for` swallows a cancellation that lands in
#: the same loop step as the awaited result, so `MqttTransport.close()` cancelling
#: its connection task mid-connect (CONNACK/SUBACK/PUBACK just arrived) can leave
#: that task running and `close()` waiting on it forever. A second cancel unsticks it.
STOP_GRACE = 10.0


# -- speed: a slower device runs the same model -------------------------------------


class _SlowedSession(ModelSession):
    """Runs `inner`, then sleeps (factor - 1) x the time it took (in the caller's thread)."""

    runtime = "simulated"

    def __init__(self, inner: ModelSession, factor: float) -> None:
        self.inner = inner
        self.factor = factor
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.provider = inner.provider

    def _run(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - run() is overridden
        return self.inner.run(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        y = self.inner.run(x)
        time.sleep((self.factor - 1.0) * (time.perf_counter() - start))
        return y


class _ScaledHolder(ModelHolder):
    """A `ModelHolder` whose models run `speed_factor` times slower (latency stats included)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def prepare(self, model: ActiveModel) -> ActiveModel:
        if isinstance(model.session, _SlowedSession):
            return model
        return ActiveModel(
            model.manifest,
            _SlowedSession(model.session, self.factor),
            model.provider,
            model.self_test_diff,
            model.memory_bytes,
        )

    def swap(self, new: ActiveModel) -> ActiveModel | None:
        return super().swap(self.prepare(new))


# -- drift: the device's input stream changes ----------------------------------------


@dataclass(frozen=True)
class InputDrift:
    """Inputs as a drifted sensor would send them: ``x * scale + shift``."""

    shift: float = 0.0
    scale: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x * np.float32(self.scale) + np.float32(self.shift), dtype=x.dtype)


# -- corruption: flip one byte of a chunk's data ------------------------------------


def corrupt_chunk(payload: bytes) -> bytes:
    """`payload` (an ArtifactChunk) with one byte of its data flipped; unchanged if no data.

    The data field's bytes sit contiguously in the encoded message, so the flip
    leaves the framing intact and only the per-chunk digest check can catch it.
    """
    _sha, _index, _total, data = decode_chunk(payload)
    if not data:
        return payload
    at = payload.rfind(data)
    if at < 0:  # pragma: no cover - protobuf always stores bytes verbatim
        return payload
    pos = at + len(data) // 2
    out = bytearray(payload)
    out[pos] ^= 0xFF
    return bytes(out)


# -- one device ---------------------------------------------------------------------


class SimulatedDevice:
    """One simulated device: a real `Agent` (replaced by a new one on `restart`)."""

    def __init__(
        self,
        settings: AgentSettings,
        profile: Profile,
        *,
        want_interval: float = 2.0,
        data_dir: Path | None = None,
        model_loader: ModelLoader | None = None,
    ) -> None:
        self.device_id = settings.device_id
        self.model_loader = model_loader  # None: the agent's own (one session per device)
        self.settings = settings
        self.profile = profile
        self.want_interval = want_interval
        self.data_dir = data_dir
        self.boots = 0  # agents started on this device so far
        self.corrupted = 0  # chunks corrupted on purpose so far
        self._corrupt_pending = 0
        self.lost = 0  # chunks dropped on purpose so far
        self._lose_pending = 0
        self._link_bps = 0.0  # 0: no cap
        self._link_free_at = 0.0
        self.input_drift: InputDrift | None = None  # applied to live traffic
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.agent = self._new_agent()

    def __repr__(self) -> str:
        return f"<SimulatedDevice {self.device_id} {self.profile.name} {self.update_state.name}>"

    def _new_agent(self) -> Agent:
        agent = Agent(
            self.settings,
            capabilities=self.profile.caps,
            durable=False,
            want_interval=self.want_interval,
            holder=_ScaledHolder(self.profile.speed_factor)
            if self.profile.speed_factor > 1.0
            else None,
            chunk_filter=self._filter_chunk,
            model_loader=self.model_loader,
        )
        return agent

    async def _filter_chunk(self, payload: bytes) -> bytes | None:
        """The updater's chunk hook: the slow link, then lost and corrupted chunks."""
        if self._link_bps:
            await self._through_slow_link(len(payload))
        if self._lose_pending > 0:
            self._lose_pending -= 1
            self.lost += 1
            logger.info("%s: losing a chunk on purpose", self.device_id)
            return None
        if self._corrupt_pending > 0:
            bad = corrupt_chunk(payload)
            if bad != payload:
                self._corrupt_pending -= 1
                self.corrupted += 1
                logger.info("%s: corrupting a chunk on purpose", self.device_id)
                return bad
        return payload

    # state
    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def connected(self) -> bool:
        return self.running and self.agent.transport.connected

    @property
    def update_state(self) -> UpdateState:
        return self.agent.update_state

    @property
    def active_variant(self) -> str | None:
        active = self.agent.holder.active
        return active.ref.variant if active is not None else None

    @property
    def port(self) -> int | None:
        """The local InferenceService port (only a device started with `listen`)."""
        return self.agent.port

    # lifecycle
    async def start(self) -> None:
        """Run an agent in a task (a new one on the same state directory after the first
        boot); return once its transport is running (not yet connected)."""
        if self.running:
            raise Conflict(f"simulated device {self.device_id} is already running")
        if self.boots:  # an Agent runs once: every boot after the first gets a new one
            self.agent = self._new_agent()
        self._stop = asyncio.Event()
        ready = asyncio.Event()
        agent = self.agent
        task = asyncio.create_task(
            agent.run(self._stopped, ready=ready), name=f"sim-{self.device_id}"
        )
        self._task = task
        self.boots += 1
        waiter = asyncio.ensure_future(ready.wait())
        try:
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            task.result()  # raises what the agent raised
            raise Unavailable(f"simulated device {self.device_id}: agent exited while starting")

    async def _stopped(self) -> None:
        await self._stop.wait()

    async def wait_connected(self, timeout: float) -> None:
        await self.agent.transport.wait_connected(timeout)

    async def stop(self, *, grace: float = STOP_GRACE) -> None:
        """Stop the agent cleanly: offline status, DISCONNECT (no will).

        If it has not stopped after `grace` seconds it is cancelled again (see
        STOP_GRACE), then awaited.
        """
        task = self._task
        if task is None:
            return
        self._stop.set()
        done, _ = await asyncio.wait({task}, timeout=grace)
        while not done:
            logger.warning(
                "%s: agent still stopping after %.0fs; cancelling it", self.device_id, grace
            )
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=grace)
            # close() was cut short: finish its work (socket, message task) by hand
            self.agent.transport.abandon()
        if not task.cancelled() and (err := task.exception()) is not None:
            logger.error("%s: agent failed", self.device_id, exc_info=err)
        self._task = None

    # faults
    def drop_link(self) -> None:
        """Close the MQTT socket without DISCONNECT; the agent's transport reconnects."""
        self.agent.transport.drop_connection()

    async def crash(self) -> None:
        """Die abruptly: socket closed without DISCONNECT (the broker publishes the will),
        agent task cancelled wherever it is. The state directory is kept."""
        task = self._task
        if task is None or task.done():
            raise Conflict(f"simulated device {self.device_id} is not running; nothing to crash")
        # both in one step, so the transport cannot reconnect in between
        self.agent.transport.drop_connection()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._task = None
        logger.info("%s: crashed on purpose", self.device_id)

    async def restart(self, *, connect_timeout: float = 30.0) -> None:
        """Boot a new agent on the same state directory (stopping the old one cleanly if
        it runs); return once it is connected."""
        await self.stop()
        await self.start()
        await self.wait_connected(connect_timeout)

    def configure(self, **updates: Any) -> None:
        """Change this device's agent settings (e.g. the ``fl_*`` fields from an enrolment
        bundle's federated part); the device must be stopped; the next start uses them."""
        if self.running:
            raise Conflict(f"simulated device {self.device_id} is running; stop it to configure")
        self.settings = self.settings.model_copy(update=updates)
        self.agent = self._new_agent()

    def slow_link(self, bytes_per_s: float) -> None:
        """Cap this device's downlink for artifact chunks at `bytes_per_s` (0 lifts the cap).

        Chunks queue behind each other as on a real thin link: each is handed to
        the updater only once the link has carried it, and the messages behind it
        wait (the agent handles its messages in order)."""
        if bytes_per_s < 0:
            raise InvalidArgument(f"slow_link: bytes_per_s {bytes_per_s} must be >= 0")
        self._link_bps = float(bytes_per_s)
        self._link_free_at = time.monotonic()

    async def _through_slow_link(self, size: int) -> None:
        now = time.monotonic()
        self._link_free_at = max(now, self._link_free_at) + size / self._link_bps
        await asyncio.sleep(self._link_free_at - now)

    def lose_next_chunks(self, n: int) -> None:
        """Drop the next `n` chunks this device receives before the updater sees them
        (as if the network lost them: the device has to ask again)."""
        if n < 0:
            raise InvalidArgument(f"lose_next_chunks: n {n} must be >= 0")
        self._lose_pending += n

    def drift(self, *, shift: float = 0.0, scale: float = 1.0) -> None:
        """From now on this device's live inputs arrive as ``x * scale + shift``
        (shift 0 and scale 1 end the drift)."""
        if scale <= 0:
            raise InvalidArgument(f"drift: scale {scale} must be > 0")
        self.input_drift = None if (shift, scale) == (0.0, 1.0) else InputDrift(shift, scale)
        logger.info("%s: input drift %s", self.device_id, self.input_drift or "ended")

    def corrupt_next_chunks(self, n: int) -> None:
        """Flip a byte in the data of the next `n` chunks this device receives."""
        if n < 0:
            raise InvalidArgument(f"corrupt_next_chunks: n {n} must be >= 0")
        self._corrupt_pending += n


# -- the fleet ----------------------------------------------------------------------


class SimulatedFleet:
    """`n` simulated devices on the current event loop; `async with` runs them."""

    def __init__(
        self,
        n: int,
        *,
        broker_url: str,
        public_key_pem: str,
        state_root: Path,
        profile: str | Profile | Mix = "mixed",
        seed: int = 0,
        topic_prefix: str = "ef/v1",
        id_prefix: str = "sim",
        listen_first: bool = False,
        data: bool = False,
        alpha: float = 0.5,
        dataset: str = "digits",
        want_interval: float = 2.0,
        telemetry_interval: float = 10.0,
        batch_size: int = DEFAULT_BATCH,
        connect_timeout: float = 60.0,
        first: int = 0,
        total: int | None = None,
        credentials: Credentials | None = None,
        spread: Sequence[str] = (),
        mqtt_version: str = "auto",
        share_sessions: bool = False,
    ) -> None:
        """`spread`: a cluster's broker URLs to spread the devices over: the device with
        fleet index i (counting from `first`) connects to ``spread[i % k]`` first and
        lists the others after it, as its enrolment bundle would (`broker_url` is then
        unused). `mqtt_version`: auto, 5 or 3.1.1 for every device. `share_sessions`:
        devices that load the same model bytes share one ONNX Runtime session
        (`simulator.sessions`; each still downloads, verifies and self-tests)."""
        if n < 1:
            raise InvalidArgument(f"simulated fleet size {n} must be >= 1")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size {batch_size} must be >= 1")
        self.profile = parse_profile(profile)
        self.state_root = state_root
        self.batch_size = batch_size
        self.connect_timeout = connect_timeout
        self.startup_seconds: float | None = None
        planned = plan(n, self.profile, seed=seed, id_prefix=id_prefix, first=first, total=total)
        ids = [e.device_id for e in planned]
        profiles = [e.profile for e in planned]
        data_dirs: dict[str, Path] = {}
        if data:
            from edgefleet.simulator.data import write_partitions

            data_dirs = write_partitions(state_root, ids, dataset=dataset, alpha=alpha, seed=seed)
        self._devices: dict[str, SimulatedDevice] = {}
        #: the loader its devices share, when `share_sessions` (counts sessions opened)
        self.shared_sessions = SharedSessions() if share_sessions else None
        nodes = list(spread)
        for i, (dev_id, prof) in enumerate(zip(ids, profiles, strict=True)):
            urls = [broker_url]
            if nodes:
                k = (first + i) % len(nodes)
                urls = nodes[k:] + nodes[:k]
            settings = AgentSettings(
                device_id=dev_id,
                state_dir=state_root / dev_id / "agent",
                broker_url=urls[0],
                broker_urls=urls[1:],
                mqtt_version=mqtt_version,
                public_key_pem=public_key_pem,
                topic_prefix=topic_prefix,
                listen="127.0.0.1:0" if (listen_first and i == 0) else "",
                group=prof.name,
                tags={"profile": prof.name},
                # hundreds of sessions share this machine's cores: one thread each, or
                # their idle intra-op pools spin against each other
                inference_threads=1,
                telemetry_interval=telemetry_interval,
            )
            self._devices[dev_id] = SimulatedDevice(
                settings,
                prof,
                want_interval=want_interval,
                data_dir=data_dirs.get(dev_id),
                model_loader=self.shared_sessions,
            )
        self.credentials = credentials

    @property
    def credentials(self) -> Credentials | None:
        return self._credentials

    @credentials.setter
    def credentials(self, credentials: Credentials | None) -> None:
        """Each device's MQTT password (username = device id): a mapping, or a callable
        asked per device; applied to devices started from now on."""
        self._credentials = credentials
        if credentials is None:
            return
        for d in self.devices:
            dev = d.settings.device_id
            password: str | None = (
                credentials(dev) if callable(credentials) else credentials.get(dev)
            )
            if password is None:
                raise NotFound(f"simulated device {dev!r} has no MQTT credential")
            d.configure(username=dev, password=password)

    # lifecycle
    async def __aenter__(self) -> SimulatedFleet:
        start = time.monotonic()
        devices = self.devices
        try:
            for b in range(0, len(devices), self.batch_size):
                batch = devices[b : b + self.batch_size]
                await asyncio.gather(*(d.start() for d in batch))
                await asyncio.gather(*(d.wait_connected(self.connect_timeout) for d in batch))
        except BaseException:
            await self.stop()
            raise
        self.startup_seconds = time.monotonic() - start
        logger.info("%d simulated devices online in %.1fs", len(devices), self.startup_seconds)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop every running agent cleanly."""
        await asyncio.gather(*(d.stop() for d in self.devices))

    # access
    @property
    def devices(self) -> list[SimulatedDevice]:
        return list(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[SimulatedDevice]:
        return iter(self._devices.values())

    def device(self, device_id: str) -> SimulatedDevice:
        try:
            return self._devices[device_id]
        except KeyError:
            raise NotFound(
                f"no simulated device {device_id!r}; this fleet has "
                f"{next(iter(self._devices))} … {next(reversed(self._devices))}"
            ) from None

    def ids(self) -> list[str]:
        return list(self._devices)

    def ids_for_enrollment(self) -> list[Enrollment]:
        """One `Enrollment` per device: group = profile name, tag profile=<name>."""
        return [
            Enrollment(d.device_id, d.settings.group, dict(d.settings.tags), d.profile)
            for d in self.devices
        ]

    # observation
    def states(self) -> Counter[str]:
        """How many devices are in each update state ("idle", "downloading", "active", …)."""
        return Counter(d.update_state.name.lower() for d in self.devices)

    def active_variants(self) -> Counter[str]:
        """How many devices serve each variant (devices serving nothing are not counted)."""
        return Counter(v for d in self.devices if (v := d.active_variant) is not None)

    def active_versions(self) -> Counter[str]:
        """How many devices serve each model version ("model:version"); none: not counted."""
        return Counter(
            f"{a.ref.model}:{a.ref.version}"
            for d in self.devices
            if (a := d.agent.holder.active) is not None
        )

    def online(self) -> int:
        """Devices whose transport is connected now."""
        return sum(d.connected for d in self.devices)

    async def wait(
        self,
        predicate: Callable[[], bool | Awaitable[bool]],
        timeout: float,
        *,
        interval: float = 0.05,
        what: str = "condition",
    ) -> None:
        """Poll `predicate` until true; `TimeoutError` naming `what` after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{what} not met within {timeout:g}s "
                    f"(states {dict(self.states())}, online {self.online()}/{len(self)})"
                )
            await asyncio.sleep(interval)

    # faults
    def drop_link(self, ids: str | Iterable[str]) -> None:
        for dev in self._pick(ids):
            dev.drop_link()

    async def crash(self, device_id: str) -> None:
        await self.device(device_id).crash()

    async def restart(self, device_id: str) -> None:
        await self.device(device_id).restart()

    def corrupt_next_chunks(self, device_id: str, n: int) -> None:
        self.device(device_id).corrupt_next_chunks(n)

    def lose_next_chunks(self, device_id: str, n: int) -> None:
        self.device(device_id).lose_next_chunks(n)

    def slow_link(self, ids: str | Iterable[str], bytes_per_s: float) -> None:
        for dev in self._pick(ids):
            dev.slow_link(bytes_per_s)

    def drift(self, ids: str | Iterable[str], *, shift: float = 0.0, scale: float = 1.0) -> None:
        for dev in self._pick(ids):
            dev.drift(shift=shift, scale=scale)

    def _pick(self, ids: str | Iterable[str]) -> Sequence[SimulatedDevice]:
        if isinstance(ids, str):
            ids = [ids]
        return [self.device(i) for i in ids]


__all__ = ["Enrollment", "InputDrift", "SimulatedDevice", "SimulatedFleet", "corrupt_chunk"]
