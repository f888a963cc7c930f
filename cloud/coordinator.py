"""The coordinator's MQTT side: device liveness and state in, desired state and chunks out.

One asyncio object: `async with Coordinator(...) as c:` connects, subscribes to
every device's status/reported/telemetry and every artifact's wants, and runs
the broadcaster. `deploy()` publishes signed desired state to the selected
devices, each with the variant that fits its reported capabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.artifacts import ArtifactStore
from cloud.devices import Device, DeviceEvent, DeviceStore, Selector
from cloud.distribution import DEFAULT_CHUNK_SIZE, Broadcaster
from cloud.registry import ModelRef, RegistryStore
from cloud.selection import DeviceProfile, choose_variant
from cloud.serde import decode_reported, decode_status, decode_want, encode_desired
from protos.errors import FleetError, InvalidArgument, NotFound
from protos.manifest import SignedManifest
from protos.topics import Topics
from protos.transport import Message, MqttSettings, MqttTransport

logger = logging.getLogger(__name__)

FINAL_STATES = ("active", "failed", "rolled_back")


@dataclass(frozen=True)
class Target:
    device_id: str
    variant: str
    sha256: str
    generation: int


@dataclass
class DeployOutcome:
    rollout_id: str
    ref: str
    targets: list[Target]
    skipped: dict[str, str] = field(default_factory=dict)  # device -> why


class Coordinator:
    def __init__(
        self,
        *,
        broker_url: str,
        registry: RegistryStore,
        store: ArtifactStore,
        devices: DeviceStore,
        signing_key: Callable[[], Ed25519PrivateKey],
        topics: Topics | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        rate: float = 0.0,
        gather: float = 0.2,
        flush_interval: float = 0.05,
    ) -> None:
        self.topics = topics or Topics()
        self.registry = registry
        self.store = store
        self.devices = devices
        self._signing_key = signing_key
        self.chunk_size = chunk_size
        self.transport = MqttTransport(
            MqttSettings(url=broker_url, client_id=f"coordinator-{uuid.uuid4().hex[:8]}"),
            on_connect=self._subscribe,
            on_message=self._on_message,
        )
        self.broadcaster = Broadcaster(
            self._publish_chunk, topics=self.topics, gather=gather, rate=rate
        )
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.flush_interval = flush_interval
        self._inbox: list[DeviceEvent] = []
        self._inbox_ready = asyncio.Event()

    async def __aenter__(self) -> Coordinator:
        await self.transport.__aenter__()
        self._task = asyncio.create_task(self.broadcaster.run(), name="broadcaster")
        self._writer = asyncio.create_task(self._write_events(), name="device-events")
        await self.transport.wait_connected(timeout=30)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in (self._task, self._writer):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.transport.__aexit__(et, e, tb)
        await self._flush_events()

    async def _subscribe(self) -> None:
        for kind in ("status", "reported", "telemetry"):
            await self.transport.subscribe(self.topics.all_devices(kind), qos=1)
        await self.transport.subscribe(self.topics.all_wants(), qos=1)

    async def _publish_chunk(self, topic: str, payload: bytes) -> None:
        await self.transport.publish(topic, payload, qos=1)

    async def _on_message(self, msg: Message) -> None:
        try:
            space, ident, kind = self.topics.parse(msg.topic)
            if space == "art":
                _device, sha, _total, missing = decode_want(msg.payload)
                self.broadcaster.on_want(sha, missing)
                return
            now = datetime.now(timezone.utc)
            if kind == "status":
                status = decode_status(msg.payload) if msg.payload else {"online": False}
                self._inbox.append(DeviceEvent("status", ident, status, now))
            elif kind == "reported":
                rep = decode_reported(msg.payload)
                self._inbox.append(DeviceEvent("reported", ident, rep, now))
            elif kind == "telemetry":
                self._inbox.append(DeviceEvent("seen", ident, {}, now))
            else:
                return
            self._inbox_ready.set()
        except FleetError as e:
            logger.warning("message on %s rejected: %s", msg.topic, e)

    async def _write_events(self) -> None:
        """Apply what devices said to the database in batches: one transaction per
        `flush_interval` however many messages arrived, then wake the waiters."""
        while True:
            await self._inbox_ready.wait()
            await asyncio.sleep(self.flush_interval)
            await self._flush_events()

    async def _flush_events(self) -> None:
        self._inbox_ready.clear()
        batch, self._inbox = self._inbox, []
        if batch:
            try:
                await asyncio.to_thread(self.devices.record, batch)
            except Exception:  # the database went away: keep the events, try again
                logger.exception("could not record %d device events; retrying", len(batch))
                self._inbox[:0] = batch
                self._inbox_ready.set()
                await asyncio.sleep(1.0)
                return
        async with self._changed:
            self._changed.notify_all()

    # -- deploy ---------------------------------------------------------------------

    async def deploy(
        self, ref: ModelRef, selector: Selector, *, action: str = "activate"
    ) -> DeployOutcome:
        mv = await asyncio.to_thread(self.registry.get_version, ref)
        targets_dev = await asyncio.to_thread(self.devices.find, selector)
        if not targets_dev:
            raise NotFound(f"selector {selector} matches no enrolled device")
        key = self._signing_key()
        outcome = DeployOutcome(rollout_id=uuid.uuid4().hex[:12], ref=mv.ref, targets=[])
        ready: list[tuple[str, bytes]] = []
        for d in targets_dev:
            caps = d.capabilities
            if not caps:
                outcome.skipped[d.device_id] = (
                    "has not reported its capabilities yet (never online)"
                )
                continue
            profile = DeviceProfile(
                runtimes=tuple(caps.get("runtimes", ())),
                accelerator=str(caps.get("accelerator", "cpu")),
                tflite_runtime_legacy=bool(caps.get("tflite_runtime_legacy", False)),
            )
            try:
                v = choose_variant(mv, profile)
            except InvalidArgument as e:
                outcome.skipped[d.device_id] = str(e)
                continue
            if not self.broadcaster.known(v.sha256):
                data = await asyncio.to_thread(self.store.get, v.sha256)
                self.broadcaster.register(v.sha256, data, self.chunk_size)
            gen = await asyncio.to_thread(self.devices.next_generation, d.device_id)
            signed = encode_desired(
                device_id=d.device_id,
                generation=gen,
                rollout_id=outcome.rollout_id,
                manifest=SignedManifest.from_bytes(v.signed_manifest),
                chunk_size=self.broadcaster.chunk_size(v.sha256),
                chunk_digests=self.broadcaster.digests(v.sha256),
                action=action,
                key=key,
            )
            await asyncio.to_thread(
                self.devices.set_desired, d.device_id, gen, signed, rollout_id=outcome.rollout_id
            )
            await self.transport.publish(
                self.topics.desired(d.device_id), signed, qos=1, retain=True
            )
            outcome.targets.append(Target(d.device_id, v.name, v.sha256, gen))
        # all database work first, then every desired state in one burst: the wave's
        # devices ask for chunks within moments of each other and share one broadcast
        for device_id, signed in ready:
            await self.transport.publish(self.topics.desired(device_id), signed, qos=1, retain=True)
        logger.info(
            "rollout %s: %s to %d devices (%d skipped)",
            outcome.rollout_id,
            mv.ref,
            len(outcome.targets),
            len(outcome.skipped),
        )
        return outcome

    async def wait_settled(self, outcome: DeployOutcome, *, timeout: float) -> dict[str, Device]:
        """Wait until every target reports a final state for its generation (or timeout)."""
        want = {t.device_id: t.generation for t in outcome.targets}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            devs = {
                d.device_id: d
                for d in await asyncio.to_thread(
                    self.devices.find, Selector("device", devices=tuple(want))
                )
            }
            done = {
                i: d
                for i, d in devs.items()
                if int(d.reported.get("generation", 0)) >= want[i] and d.state in FINAL_STATES
            }
            if len(done) == len(want) or loop.time() >= deadline:
                return devs
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, deadline - loop.time())):
                        await self._changed.wait()
