"""The coordinator's MQTT side: device liveness and state in, desired state and chunks out.

One asyncio object: `async with Coordinator(...) as c:` connects, subscribes to
every device's status/reported/telemetry and every artifact's wants, and runs
the broadcaster. `deploy()` publishes signed desired state to the selected
devices, each with the variant that fits its reported capabilities.

The database, not the broker, is the source of truth for desired state: the
coordinator re-asserts (re-publishes, retained, in paced batches) the desired
state of every device whose reported generation is below its desired one on
every (re)connection of its MQTT client, for each device that comes online, and
every `reassert_interval` seconds. A broker that lost its retained messages (a
crash before its autosave) therefore cannot make a device miss a deployment.

Admission is paced: after a broker restart every device is born again within its
reconnect jitter, and the coordinator must not answer N births with N database
transactions. Device events are written in batches (at most `max_batch` per
transaction, one transaction per `flush_interval`), and the births of a batch are
re-asserted together (one database read per pass, publishes in `reassert_batch`
slices). `stats` counts both (tests/e2e/test_reconnect_storm.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.agent_releases import is_agent_release
from edgefleet.cloud.artifacts import ArtifactStore
from edgefleet.cloud.deltas import DeltaCache, DeltaRecord, DeltaStore
from edgefleet.cloud.deltas.offers import plan_offers
from edgefleet.cloud.devices import Device, DeviceEvent, DeviceStore, Selector
from edgefleet.cloud.devices.store import Birth, Sign
from edgefleet.cloud.devices.values import UpdateState
from edgefleet.cloud.distribution import DEFAULT_CHUNK_SIZE, Broadcaster
from edgefleet.cloud.inbound import (
    Refusals,
    Refused,
    ShadowReport,
    decode_reported,
    decode_shadow_report,
    decode_status,
    decode_telemetry,
    decode_want,
)
from edgefleet.cloud.registry import ModelRef, ModelVersion, RegistryStore, Variant
from edgefleet.cloud.selection import DeviceProfile, Plan, choose_variant
from edgefleet.cloud.serde import DESIRED_TTL_S, encode_desired, refresh_desired
from edgefleet.protos.delta import DeltaFormat, DeltaOffer
from edgefleet.protos.errors import (
    DataLoss,
    FleetError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from edgefleet.protos.manifest import SignedManifest
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import (
    COORDINATOR_BACKOFF_CAP,
    COORDINATOR_RECEIVE_MAXIMUM,
    Message,
    MqttAccess,
    MqttTransport,
    MqttVersion,
)

logger = logging.getLogger(__name__)

FINAL_STATES = frozenset({UpdateState.ACTIVE, UpdateState.FAILED, UpdateState.ROLLED_BACK})
#: devices whose latest shadow report is kept in memory (one per device)
MAX_SHADOW = 1_000_000


@dataclass(frozen=True)
class Target:
    device_id: str
    variant: str
    sha256: str
    generation: int
    size: int = 0  # bytes of the full artifact
    delta_sha256: str = ""  # the delta offered instead (cloud/deltas), if any
    delta_size: int = 0


@dataclass
class DeployOutcome:
    rollout_id: str
    ref: str
    targets: list[Target]
    skipped: dict[str, str] = field(default_factory=dict)  # device -> why

    def wire(self) -> tuple[int, int]:
        """(bytes one broadcast of every stream sends, bytes the full artifacts would):
        one stream per delta (base -> target) group, one per artifact fetched in full."""
        streams: dict[str, int] = {}
        full: dict[str, int] = {}
        for t in self.targets:
            full[t.sha256] = t.size
            if t.delta_sha256:
                streams[t.delta_sha256] = t.delta_size
            else:
                streams[t.sha256] = t.size
        return sum(streams.values()), sum(full.values())


def plan_deploy(
    registry: RegistryStore, devices: DeviceStore, ref: ModelRef, selector: Selector
) -> Plan:
    """Which variant each selected device gets from the capabilities it reported (blocking)."""
    mv = registry.get_version(ref)
    found = devices.find(selector)
    if not found:
        raise NotFound(f"selector {selector} matches no enrolled device")
    targets: list[tuple[Device, Variant]] = []
    skipped: dict[str, str] = {}
    for d in found:
        caps = d.capabilities
        if caps is None:
            skipped[d.device_id] = "has not reported its capabilities yet (never online)"
            continue
        if is_agent_release(mv.model):  # an agent release: the variant of its machine
            try:
                targets.append((d, mv.variant(caps.machine)))
            except NotFound as e:
                skipped[d.device_id] = f"machine {caps.machine or 'unknown'}: {e}"
            continue
        profile = DeviceProfile(
            runtimes=caps.runtimes,
            accelerator=str(caps.accelerator),
            tflite_runtime_legacy=caps.tflite_runtime_legacy,
        )
        try:
            targets.append((d, choose_variant(mv, profile)))
        except InvalidArgument as e:
            skipped[d.device_id] = str(e)
    return Plan(mv, targets, skipped)


@dataclass
class AdmissionStats:
    """How device events reached the database: `transactions` writes carried `events`
    (of which `births`); `largest` is the biggest batch. Re-asserts run in
    `reassert_passes` passes (one database read each), however many births they cover."""

    transactions: int = 0
    events: int = 0
    births: int = 0
    largest: int = 0
    reassert_passes: int = 0

    def recorded(self, events: int, births: int) -> None:
        self.transactions += 1
        self.events += events
        self.births += births
        self.largest = max(self.largest, events)


class Coordinator:
    def __init__(
        self,
        *,
        broker_url: str | MqttAccess,
        registry: RegistryStore,
        store: ArtifactStore,
        devices: DeviceStore,
        signing_key: Callable[[], Ed25519PrivateKey],
        topics: Topics | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        rate: float = 0.0,
        gather: float = 0.2,
        flush_interval: float = 0.05,
        telemetry: bool = True,
        refusals: Refusals | None = None,
        key_list: Callable[[], bytes] | None = None,
        desired_ttl_s: float = DESIRED_TTL_S,
        reassert_interval: float = 60.0,
        reassert_batch: int = 256,
        reassert_pause: float = 0.1,
        deltas: DeltaCache | bool = True,
        max_batch: int = 2000,
    ) -> None:
        self.topics = topics or Topics()
        self.registry = registry
        self.store = store
        self.devices = devices
        self._signing_key = signing_key
        self.chunk_size = chunk_size
        self.transport = MqttTransport(
            MqttAccess.of(broker_url).settings(
                f"coordinator-{uuid.uuid4().hex[:8]}",
                backoff_cap=COORDINATOR_BACKOFF_CAP,
                receive_maximum=COORDINATOR_RECEIVE_MAXIMUM,
            ),
            on_connect=self._subscribe,
            on_message=self._on_message,
        )
        self.broadcaster = Broadcaster(
            self._publish_chunk, topics=self.topics, gather=gather, rate=rate
        )
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        #: the latest shadow report per device (retained on the broker, so a restarted
        #: coordinator has them again moments after it subscribes)
        self.shadow_reports: dict[str, ShadowReport] = {}
        #: bytes of signed desired states published so far (coordinator egress besides chunks)
        self.desired_bytes = 0
        self.flush_interval = flush_interval
        self.telemetry = telemetry
        #: messages refused at the boundary, by kind and reason (exported on /metrics)
        self.refusals = refusals if refusals is not None else Refusals()
        #: the root-signed key list (`cloud.keys`), published retained on `{prefix}/keys`
        #: at connect and whenever it changes (rotation, revocation)
        self._key_list = key_list
        self._keys_published: bytes | None = None
        self._keys_task: asyncio.Task[None] | None = None
        self.desired_ttl_s = desired_ttl_s
        self._inbox: list[DeviceEvent] = []
        self._inbox_ready = asyncio.Event()
        # paced admission: what devices say (births above all: a broker restart brings
        # every device back within its reconnect jitter) is written `max_batch` events
        # per transaction, one transaction per `flush_interval`, whatever the burst
        if max_batch < 1:
            raise InvalidArgument(f"coordinator max_batch {max_batch} must be >= 1")
        self.max_batch = max_batch
        self.stats = AdmissionStats()
        # desired-state reconciliation
        self.reassert_interval = reassert_interval
        self.reassert_batch = reassert_batch
        self.reassert_pause = reassert_pause
        self.reasserted = 0  # desired states re-published so far
        self._desired_lock = asyncio.Lock()  # a re-assert never overtakes a newer deploy
        self._reassert_wake = asyncio.Event()
        self._reassert_all = True
        self._born: set[str] = set()
        self._reconciler: asyncio.Task[None] | None = None
        # model deltas (cloud/deltas): built per (base -> target) pair at prepare time
        self._deltas_arg = deltas
        self.deltas: DeltaCache | None = deltas if isinstance(deltas, DeltaCache) else None
        self._delta_records: DeltaStore | None = None
        #: device -> the delta its next desired state offers (see `prepare`)
        self.offers: dict[str, DeltaRecord] = {}
        self._loading: set[str] = set()
        self._load_tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Coordinator:
        if self._deltas_arg is True and self.deltas is None:
            self._delta_records = DeltaStore(self.devices.database)  # borrowed, one engine
            self.deltas = DeltaCache(self.store, self._delta_records)
        await self.transport.__aenter__()
        self._task = asyncio.create_task(self.broadcaster.run(), name="broadcaster")
        self._writer = asyncio.create_task(self._write_events(), name="device-events")
        self._reconciler = asyncio.create_task(self._reconcile(), name="desired-reconciler")
        await self.transport.wait_connected(timeout=30)
        if self._key_list is not None:
            try:
                await self.publish_keys()
            except Unavailable as e:
                # the link dropped before the broker acknowledged (a busy cluster node
                # closes it): the transport reconnects and the key watcher publishes it
                logger.warning("key list not published yet (%s); will try again", e)
            self._keys_task = asyncio.create_task(self._watch_keys(), name="key-list")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in (self._task, self._writer, self._keys_task, self._reconciler):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.transport.__aexit__(et, e, tb)
        await self._flush_events()
        if self._delta_records is not None:
            self._delta_records.close()
            self._delta_records, self.deltas = None, None
        for _ in range(len(self._inbox) // self.max_batch + 1):
            await self._flush_events()

    async def _subscribe(self) -> None:
        kinds = ["status", "reported", "shadow"]
        if self.telemetry:  # else a TelemetrySubscriber (cloud.monitoring) takes it
            kinds.append("telemetry")
        filters = [self.topics.all_devices(kind) for kind in kinds]
        for flt in [*filters, self.topics.all_wants()]:
            try:
                await self.transport.subscribe(flt, qos=1)
            except Unauthenticated as e:
                if self.transport.mqtt_version != MqttVersion.V311:
                    raise
                # 3.1.1 refuses without a reason, and a clustered broker refuses for a
                # moment while it moves a dead node's state: the transport keeps the
                # intent and sends it again; the other filters must not wait for it
                logger.warning("%s; it is sent again", e)
        # (re)connected: the broker may have restarted without its retained store
        self._reassert_all = True
        self._reassert_wake.set()

    async def publish_keys(self, *, force: bool = False) -> bool:
        """Publish the key list retained on `{prefix}/keys` if it changed since the last
        publish (or `force`). Returns whether it published."""
        if self._key_list is None:
            return False
        data = await asyncio.to_thread(self._key_list)
        if data == self._keys_published and not force:
            return False
        await self.transport.publish(self.topics.keys(), data, qos=1, retain=True, timeout=30)
        self._keys_published = data
        logger.info("key list published on %s (%d bytes)", self.topics.keys(), len(data))
        return True

    async def _watch_keys(self, interval: float = 2.0) -> None:
        """`fleet keys rotate|revoke` writes a new list into FLEET_HOME: pass it on."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.publish_keys()
            except FleetError as e:
                logger.warning("key list not published (%s); will try again", e)

    async def _publish_chunk(self, topic: str, payload: bytes) -> None:
        await self.transport.publish(topic, payload, qos=1)

    async def _on_message(self, msg: Message) -> None:
        """Decode once (`cloud.inbound`), then act; a refused message is counted and
        dropped without holding up anyone else's."""
        try:
            space, ident, kind = self.topics.parse(msg.topic)
        except InvalidArgument as e:
            self.refusals.refuse("topic", "?", "bad_topic", str(e))
            return
        try:
            if space == "art":
                want = decode_want(ident, msg.payload)
                if not self.broadcaster.known(want.sha256):
                    self._load_wanted(want.sha256)  # e.g. a delta, after a restart
                    return
                self.broadcaster.on_want(
                    want.sha256, list(want.missing), resume=want.resume, device_id=want.device_id
                )
                return
            now = datetime.now(UTC)
            if kind == "status":
                status = decode_status(ident, msg.payload)
                self._inbox.append(DeviceEvent(ident, status.birth, now))
            elif kind == "reported":
                if not msg.payload:  # a cleared retained report
                    return
                rep = decode_reported(ident, msg.payload)
                self._inbox.append(DeviceEvent(ident, rep, now))
            elif kind == "telemetry":
                decode_telemetry(ident, msg.payload, received_ms=int(now.timestamp() * 1000))
                self._inbox.append(DeviceEvent(ident, None, now))
            elif kind == "shadow":
                if not msg.payload:
                    self.shadow_reports.pop(ident, None)
                    return
                report = decode_shadow_report(ident, msg.payload)
                if ident not in self.shadow_reports and len(self.shadow_reports) >= MAX_SHADOW:
                    raise Refused("too_many", f"{MAX_SHADOW} devices already hold shadow reports")
                self.shadow_reports[ident] = report
                return
            else:
                return
            self._inbox_ready.set()
        except Refused as e:
            self.refusals.refuse(kind, ident, e.reason, str(e))

    def _load_wanted(self, sha256: str) -> None:
        """A want for bytes this coordinator has not prepared (it restarted since the
        desired state was issued, or a delta was offered by another replica): load them
        from the artifact store, where artifacts and deltas are kept by sha256, and
        register them; the device's next want is served. Unknown digests are ignored."""
        if sha256 in self._loading or len(self._loading) >= 64:
            return
        self._loading.add(sha256)

        async def load() -> None:
            try:
                if await asyncio.to_thread(self.store.exists, sha256):
                    data = await asyncio.to_thread(self.store.get, sha256)
                    if not self.broadcaster.known(sha256):
                        self.broadcaster.register(sha256, data, self.chunk_size)
                        logger.info("artifact %s loaded for a want", sha256[:12])
            except FleetError as e:
                logger.info("want for %s: not served (%s)", sha256[:12], e)
            finally:
                self._loading.discard(sha256)

        task = asyncio.create_task(load(), name=f"load-{sha256[:12]}")
        self._load_tasks.add(task)
        task.add_done_callback(self._load_tasks.discard)

    async def _write_events(self) -> None:
        """Apply what devices said to the database in batches: one transaction per
        `flush_interval` however many messages arrived, then wake the waiters."""
        while True:
            await self._inbox_ready.wait()
            await asyncio.sleep(self.flush_interval)
            await self._flush_events()

    async def _flush_events(self) -> None:
        self._inbox_ready.clear()
        batch, self._inbox = self._inbox[: self.max_batch], self._inbox[self.max_batch :]
        if self._inbox:  # the rest goes in the next transaction, `flush_interval` later
            self._inbox_ready.set()
        if batch:
            try:
                await asyncio.to_thread(self.devices.record, batch)
            except Exception:  # the database went away: keep the events, try again
                logger.exception("could not record %d device events; retrying", len(batch))
                self._inbox[:0] = batch
                self._inbox_ready.set()
                await asyncio.sleep(1.0)
                return
            born = {e.device_id for e in batch if isinstance(e.payload, Birth) and e.payload.online}
            self.stats.recorded(len(batch), len(born))
            if born:  # recorded first, so their reported generations are current
                self._born |= born
                self._reassert_wake.set()
        async with self._changed:
            self._changed.notify_all()

    # -- deploy ---------------------------------------------------------------------

    async def plan(self, ref: ModelRef, selector: Selector) -> Plan:
        """The version, and the variant each selected device would get from its capabilities."""
        return await asyncio.to_thread(plan_deploy, self.registry, self.devices, ref, selector)

    async def prepare(
        self, variants: Sequence[Variant], targets: Mapping[str, str] | None = None
    ) -> None:
        """Make each variant's chunks ready to broadcast, and, for `targets` ({device:
        artifact sha256}), the deltas from what each device holds (`offers`)."""
        for v in {v.sha256: v for v in variants}.values():
            if not self.broadcaster.known(v.sha256):
                data = await asyncio.to_thread(self.store.get, v.sha256)
                self.broadcaster.register(v.sha256, data, self.chunk_size)
        if targets:
            await self._prepare_deltas(targets)

    async def _prepare_deltas(self, targets: Mapping[str, str]) -> None:
        for dev in targets:
            self.offers.pop(dev, None)
        if self.deltas is None:
            return
        found = await self.find_devices(list(targets))
        offers = await asyncio.to_thread(plan_offers, self.deltas, found, targets)
        bad: set[str] = set()
        for rec in {r.sha256: r for r in offers.values()}.values():
            if self.broadcaster.known(rec.sha256):
                continue
            try:
                data = await asyncio.to_thread(self.deltas.load, rec)
                self.broadcaster.register(rec.sha256, data, self.chunk_size)
            except (DataLoss, NotFound) as e:  # altered in the store: send the full artifact
                logger.warning("delta %s not offered: %s", rec.sha256[:12], e)
                bad.add(rec.sha256)
        self.offers.update({d: r for d, r in offers.items() if r.sha256 not in bad})

    async def get_version(self, ref: ModelRef) -> ModelVersion:
        """A version from the registry (with its variants and signed manifests)."""
        return await asyncio.to_thread(self.registry.get_version, ref)

    async def find_devices(self, device_ids: Sequence[str]) -> list[Device]:
        """These devices as the database has them now (liveness, active, reported state)."""
        return await asyncio.to_thread(
            self.devices.find, Selector("device", devices=tuple(device_ids))
        )

    def shadow_report(self, device_id: str) -> ShadowReport | None:
        """The latest shadow report the device published, if any."""
        return self.shadow_reports.get(device_id)

    def signer(
        self,
        manifests: Mapping[str, tuple[bytes, str]],
        *,
        rollout_id: str,
        action: str,
        sample_rate: float = 1.0,
    ) -> Sign:
        """A `Sign` for {device: (signed manifest bytes, artifact sha256)}. Rollbacks carry
        no chunk list (nothing is downloaded); other actions need the artifact `prepare`d."""
        key = self._signing_key()

        def sign(device_id: str, generation: int) -> bytes:
            raw, sha = manifests[device_id]
            manifest = SignedManifest.from_bytes(raw)
            chunked = action != "rollback"
            offer = self.offers.get(device_id) if chunked else None
            delta = None
            if offer is not None and offer.target_sha256 == sha:
                delta = DeltaOffer(
                    base_sha256=offer.base_sha256,
                    sha256=offer.sha256,
                    size=offer.size,
                    format=int(DeltaFormat[offer.format.upper()]),
                    chunk_size=self.broadcaster.chunk_size(offer.sha256),
                    chunk_digests=tuple(self.broadcaster.digests(offer.sha256)),
                )
            return encode_desired(
                device_id=device_id,
                generation=generation,
                rollout_id=rollout_id,
                manifest=manifest,
                chunk_size=self.broadcaster.chunk_size(sha) if chunked else 0,
                chunk_digests=self.broadcaster.digests(sha) if chunked else [],
                action=action,
                key=key,
                sample_rate=sample_rate,
                ttl_s=self.desired_ttl_s,
                delta=delta,
            )

        return sign

    async def publish_desired(self, signed: Mapping[str, bytes], *, window: int = 256) -> None:
        """Every desired state in one burst (retained, QoS 1): a stage's devices ask for
        chunks within moments of each other and share one broadcast. Up to `window`
        publishes wait for their acknowledgements at once; one at a time, a thousand
        round trips would take seconds."""
        async with self._desired_lock:
            await self._publish_desired(signed, window=window)

    async def _publish_desired(self, signed: Mapping[str, bytes], *, window: int) -> None:
        gate = asyncio.Semaphore(window)
        if self._key_list is not None:  # a key rotated a moment ago reaches devices first
            await self.publish_keys()

        async def one(device_id: str, payload: bytes) -> None:
            async with gate:
                await self.transport.publish(
                    self.topics.desired(device_id), payload, qos=1, retain=True, timeout=60
                )
            self.desired_bytes += len(payload)

        await asyncio.gather(*(one(d, p) for d, p in signed.items()))

    # -- reconciliation ---------------------------------------------------------------

    async def reassert(self, device_ids: Sequence[str] | None = None) -> int:
        """Re-publish (retained) the desired state of the devices (all, or these) that have
        not reported it yet, `reassert_batch` at a time with `reassert_pause` between
        batches. The database is read under the same lock deploys publish under, so an
        older state never lands after a newer one. Returns how many were published."""
        async with self._desired_lock:
            pending = await asyncio.to_thread(self.devices.unreached, device_ids)
            key = self._signing_key()  # states near their expiry (or by a rotated key) re-signed
            items = [
                (d, refresh_desired(p, key, ttl_s=self.desired_ttl_s))
                for d, p in sorted(pending.items())
            ]
            for i in range(0, len(items), self.reassert_batch):
                if i:
                    await asyncio.sleep(self.reassert_pause)
                await self._publish_desired(
                    dict(items[i : i + self.reassert_batch]), window=self.reassert_batch
                )
        if items:
            self.reasserted += len(items)
            logger.info(
                "re-asserted the desired state of %d devices that have not reached it",
                len(items),
            )
        return len(items)

    async def _reconcile(self) -> None:
        """Wake on a (re)connection, on device births or every `reassert_interval` s."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.reassert_interval):
                    await self._reassert_wake.wait()
            if not self._reassert_wake.is_set():
                self._reassert_all = True  # the periodic pass
            self._reassert_wake.clear()
            if not self.transport.connected:
                try:
                    await self.transport.wait_connected(timeout=self.reassert_interval)
                except FleetError:
                    continue
            everyone, born = self._reassert_all, self._born
            self._reassert_all, self._born = False, set()
            self.stats.reassert_passes += 1
            try:
                await self.reassert(None if everyone else sorted(born))
            except FleetError as e:  # the link dropped mid-way: the reconnect re-runs it
                logger.warning("re-asserting desired states: %s", e)
                self._reassert_all = True
            except Exception:  # the database went away: try again at the next pass
                logger.exception("re-asserting desired states failed")
                self._reassert_all = True
            await asyncio.sleep(self.reassert_pause)  # coalesce a burst of births

    async def deploy(
        self, ref: ModelRef, selector: Selector, *, action: str = "activate"
    ) -> DeployOutcome:
        """Every selected device at once, no gates (a plain `fleet deploy`)."""
        plan = await self.plan(ref, selector)
        outcome = DeployOutcome(
            rollout_id=uuid.uuid4().hex[:12], ref=plan.version.ref, targets=[], skipped=plan.skipped
        )
        variants = {d.device_id: v for d, v in plan.targets}
        await self.prepare(
            list(variants.values()),
            {dev: v.sha256 for dev, v in variants.items()} if action != "rollback" else None,
        )
        sign = self.signer(
            {dev: (v.signed_manifest, v.sha256) for dev, v in variants.items()},
            rollout_id=outcome.rollout_id,
            action=action,
        )
        # all database work in one transaction, then every desired state in one burst
        issued = await asyncio.to_thread(
            self.devices.issue, list(variants), sign, rollout_id=outcome.rollout_id
        )
        await self.publish_desired({dev: payload for dev, (_g, payload) in issued.items()})
        for dev, (gen, _p) in issued.items():
            v = variants[dev]
            offer = self.offers.get(dev)
            d_sha, d_size = (offer.sha256, offer.size) if offer is not None else ("", 0)
            outcome.targets.append(Target(dev, v.name, v.sha256, gen, v.size, d_sha, d_size))
        wire, full = outcome.wire()
        logger.info(
            "rollout %s: %s to %d devices (%d skipped); %d bytes to send vs %d full (%d via deltas)",
            outcome.rollout_id,
            plan.version.ref,
            len(outcome.targets),
            len(outcome.skipped),
            wire,
            full,
            sum(1 for t in outcome.targets if t.delta_sha256),
        )
        return outcome

    async def changed(self, timeout: float) -> None:
        """Return when a device reported something, or after `timeout` seconds."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()

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
                if d.reported and d.reported.generation >= want[i] and d.state in FINAL_STATES
            }
            if len(done) == len(want) or loop.time() >= deadline:
                return devs
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, deadline - loop.time())):
                        await self._changed.wait()
