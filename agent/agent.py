"""The agent: one asyncio process supervising transport, updater, local server, telemetry.

`await Agent(settings).run(shutdown)` returns when `shutdown()` completes (a signal
handler sets an event; tests and the simulator pass their own trigger). The agent
serves predictions whether or not the broker is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import edgefleet
from edgefleet.agent import delta
from edgefleet.agent.capabilities import Capabilities, detect
from edgefleet.agent.config import AgentSettings
from edgefleet.agent.drift import DriftMonitor
from edgefleet.agent.fl import FlSidecar, fl_capability
from edgefleet.agent.inference import ModelHolder
from edgefleet.agent.keys import load_trust
from edgefleet.agent.offline import state_lock
from edgefleet.agent.serde import UpdateState, decode_telemetry_ack, encode_status
from edgefleet.agent.server import AgentStatus, serve
from edgefleet.agent.telemetry import Spool, Telemetry
from edgefleet.agent.updater import ChunkFilter, Updater
from edgefleet.protos.errors import FleetError
from edgefleet.protos.flower import fl_features
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import Message, MqttSettings, MqttTransport, MqttVersion, Will

logger = logging.getLogger(__name__)

AGENT_VERSION = edgefleet.__version__  # package metadata, like the coordinator's


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        capabilities: Capabilities | None = None,
        durable: bool = True,
        want_interval: float = 2.0,
        holder: ModelHolder | None = None,
        chunk_filter: ChunkFilter | None = None,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.topics = Topics(settings.topic_prefix)
        caps = capabilities if capabilities is not None else detect()
        fl = fl_capability(settings)
        if fl is not None:
            caps = replace(caps, features=(*caps.features, *fl_features(**fl)))
            if not fl["ready"]:
                logger.warning("%s: federated learning off: %s", self.device_id, fl["reason"])
        if delta.available() and delta.FEATURE not in caps.features:
            caps = replace(caps, features=(*caps.features, delta.FEATURE))
        self.capabilities = caps
        self.fl = FlSidecar(settings) if fl is not None and fl["ready"] else None
        self.holder = holder if holder is not None else ModelHolder()
        self.boot_id = uuid.uuid4().hex[:12]
        tls = settings.broker_url.lower().startswith("mqtts:")
        self.transport = MqttTransport(
            MqttSettings(
                # the broker forces client id = username = device id (docs/protocol.md)
                url=settings.broker_url,
                client_id=self.device_id,
                username=settings.username,
                password=settings.password,
                ca_file=settings.ca_file if tls else None,
                cert_file=settings.cert_file if tls else None,
                key_file=settings.key_file if tls else None,
                flow_control=True,
                fallback_urls=tuple(settings.broker_urls),
                mqtt_version=MqttVersion.parse(settings.mqtt_version),
            ),
            will=Will(
                self.topics.status(self.device_id), self._status(online=False), qos=1, retain=True
            ),
            on_connect=self._on_connect,
            on_message=self._on_message,
        )
        self.updater = Updater(
            device_id=self.device_id,
            state_dir=settings.state_dir,
            trust=load_trust(
                state_dir=settings.state_dir,
                public_key_pem=settings.public_key_pem,
                root_public_key_pem=settings.root_public_key_pem,
                key_list_b64=settings.key_list,
            ),
            holder=self.holder,
            runtimes=caps.runtimes,
            providers=caps.providers or ("CPUExecutionProvider",),
            topics=self.topics,
            publish=self._publish,
            subscribe=lambda t: self.transport.subscribe(t, qos=1),
            unsubscribe=self.transport.unsubscribe,
            durable=durable,
            want_interval=want_interval,
            tflite_runtime_legacy=caps.tflite_runtime_legacy,
            chunk_filter=chunk_filter,
            threads=settings.inference_threads,
        )
        self.telemetry = Telemetry(
            device_id=self.device_id,
            holder=self.holder,
            spool=Spool(
                settings.state_dir / "spool",
                max_records=settings.telemetry_spool_max,
                durable=durable,
            ),
            publish=lambda p: self.transport.publish(
                self.topics.telemetry(self.device_id), p, qos=1
            ),
            drift=DriftMonitor(),
            ack_timeout=settings.telemetry_ack_timeout,
        )
        self._stopping = False
        self.port: int | None = None

    def _status(self, *, online: bool) -> bytes:
        active = self.holder.active
        return encode_status(
            device_id=self.device_id,
            online=online,
            agent_version=AGENT_VERSION,
            capabilities=self.capabilities if online else None,
            active=active.ref if (online and active) else None,
            boot_id=self.boot_id,
            timestamp_ms=int(time.time() * 1000),
        )

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        await self.transport.publish(topic, payload, qos=1, retain=retain)

    async def _on_connect(self) -> None:
        await self.transport.publish(
            self.topics.status(self.device_id), self._status(online=True), qos=1, retain=True
        )
        await self.updater.on_reconnect()
        await self.updater.report_offline_install()
        self.telemetry.reconnected()

    async def _on_message(self, msg: Message) -> None:
        try:
            if msg.topic == self.topics.desired(self.device_id):
                await self.updater.on_desired(msg.payload)
            elif msg.topic == self.topics.keys():
                await self.updater.on_keys(msg.payload)
            elif msg.topic == self.topics.ack(self.device_id):
                self.telemetry.on_ack(decode_telemetry_ack(self.device_id, msg.payload))
            elif msg.topic.endswith("/chunk"):
                await self.updater.on_chunk(msg.payload)
        except FleetError as e:
            logger.warning("%s: message on %s: %s", self.device_id, msg.topic, e)

    def status(self) -> AgentStatus:
        return AgentStatus(connected=self.transport.connected, update_state=self.updater.state)

    async def run(
        self, shutdown: Callable[[], Awaitable[object]], *, ready: asyncio.Event | None = None
    ) -> None:
        # the state directory is this process's while it runs: `fleet-agent install` refuses
        with state_lock(self.settings.state_dir, holder=f"agent {self.device_id}"):
            await self._run(shutdown, ready)

    async def _run(
        self, shutdown: Callable[[], Awaitable[object]], ready: asyncio.Event | None
    ) -> None:
        await asyncio.to_thread(self.updater.load_active)
        server = None
        if self.settings.listen:
            server, self.port = await serve(
                self.holder, address=self.settings.listen, status=self.status
            )
        sidecar = asyncio.create_task(self.fl.run(), name="fl-sidecar") if self.fl else None
        if sidecar is not None:
            sidecar.add_done_callback(self._sidecar_done)
        try:
            await self._run_connected(shutdown, ready)
        finally:
            if sidecar is not None:
                sidecar.cancel()
                await asyncio.gather(sidecar, return_exceptions=True)
            if server is not None:
                await server.stop(1.0)

    def _sidecar_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (e := task.exception()) is not None:
            logger.error("%s: federated sidecar stopped", self.device_id, exc_info=e)

    async def _run_connected(
        self, shutdown: Callable[[], Awaitable[object]], ready: asyncio.Event | None
    ) -> None:
        if self.updater.trust.rotatable:  # first: a rotated key list before the desired state
            await self.transport.subscribe(self.topics.keys(), qos=1)
        await self.transport.subscribe(self.topics.desired(self.device_id), qos=1)
        await self.transport.subscribe(self.topics.ack(self.device_id), qos=1)
        async with self.transport:
            ticker = asyncio.create_task(self._ticker(), name=f"{self.device_id}-ticker")
            if ready is not None:
                ready.set()
            try:
                await shutdown()
            finally:
                self._stopping = True
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                if self.transport.connected:
                    with contextlib.suppress(FleetError):
                        await self.transport.publish(
                            self.topics.status(self.device_id),
                            self._status(online=False),
                            qos=1,
                            retain=True,
                            timeout=2,
                        )

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_window = loop.time() + self.settings.telemetry_interval
        while not self._stopping:
            await asyncio.sleep(0.5)
            try:
                if not self.transport.backlog:  # behind on what arrived: not stalled
                    await self.updater.tick()
                if self.updater.shadow is not None:
                    await self.updater.shadow.step()
                if self.transport.connected:  # unacknowledged windows, rate-limited
                    await self.telemetry.replay()
                if loop.time() >= next_window:
                    next_window += self.settings.telemetry_interval
                    await self.telemetry.emit()
            except FleetError as e:
                logger.debug("%s: tick: %s", self.device_id, e)

    @property
    def update_state(self) -> UpdateState:
        return self.updater.state
