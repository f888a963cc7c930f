"""The agent: one asyncio process supervising transport, updater, local server, telemetry.

`await Agent(settings).run(shutdown)` returns when `shutdown()` completes (a signal
handler sets an event; tests and the simulator pass their own trigger). The agent
serves predictions whether or not the broker is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import edgefleet
from edgefleet.agent import delta
from edgefleet.agent.capabilities import Capabilities, detect
from edgefleet.agent.config import AgentSettings, require_server
from edgefleet.agent.drift import DriftMonitor
from edgefleet.agent.fl import FlSidecar, fl_capability
from edgefleet.agent.inference import ModelHolder, ModelLoader
from edgefleet.agent.keys import load_trust
from edgefleet.agent.offline import state_lock
from edgefleet.agent.selfupdate import (
    AGENT_MAIN,
    TRIAL_ENV,
    Releases,
    SelfUpdate,
    SwitchTarget,
    Trial,
    clean_env,
    log_tail,
    running_root,
    sd_notify,
)
from edgefleet.agent.serde import AgentStatus, UpdateState, decode_telemetry_ack, encode_status
from edgefleet.agent.telemetry import Spool, Telemetry
from edgefleet.agent.updater import ChunkFilter, Updater
from edgefleet.protos.errors import Conflict, FleetError
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
        config_path: Path | None = None,
        model_loader: ModelLoader | None = None,
    ) -> None:
        require_server(settings.listen, f"agent config {config_path or ''}".rstrip())
        self.settings = settings
        #: the config file this agent was started with: a new agent version starts with it
        self.config_path = config_path
        self.releases = Releases(settings.state_dir)
        trial = os.environ.get(TRIAL_ENV)
        #: set when this process is a new agent version on trial (agent/selfupdate.py)
        self.trial = Trial.read(Path(trial)) if trial else None
        self._trial_path = Path(trial) if trial else None
        self._handed_over: asyncio.Event | None = None
        self._lock_fd: int | None = None
        self._switching: asyncio.Task[None] | None = None
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
            model_loader=model_loader,
            threads=settings.inference_threads,
            selfupdate=SelfUpdate(
                releases=self.releases,
                config_path=config_path,
                machine=caps.machine,
                running_version=AGENT_VERSION,
                switch=self._start_switch,
            )
            if config_path is not None
            else None,
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
        if self.trial is not None and not self.trial.healthy_pid:
            await asyncio.to_thread(self._trial_healthy)
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
        self._handed_over = asyncio.Event()
        with contextlib.ExitStack() as stack:
            self._lock_fd = await self._lock_state(stack)
            await self._run(shutdown, ready)

    async def _lock_state(self, stack: contextlib.ExitStack) -> int:
        """Lock the state directory; a new version on trial waits for the agent switching
        to it to let go (it does so just before starting this one)."""
        end = time.monotonic() + (10.0 if self.trial is not None else 0.0)
        while True:
            try:
                return stack.enter_context(
                    state_lock(self.settings.state_dir, holder=f"agent {self.device_id}")
                )
            except Conflict:
                if time.monotonic() >= end:
                    raise
                await asyncio.sleep(0.05)

    async def _run(
        self, shutdown: Callable[[], Awaitable[object]], ready: asyncio.Event | None
    ) -> None:
        await asyncio.to_thread(self.updater.load_active)
        server = None
        if self.settings.listen:
            # grpc only here: an agent without a listen address never loads it
            from edgefleet.agent.server import serve

            server, self.port = await serve(
                self.holder,
                address=self.settings.listen,
                status=self.status,
                share_port=self.trial is not None,  # beside the agent switching to this one
            )
        if self.trial is None:  # systemd (Type=notify): serving; a new version on trial
            sd_notify("READY=1")  # tells it MAINPID= once healthy instead
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
                await self._until_stopped(shutdown)
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

    async def _until_stopped(self, shutdown: Callable[[], Awaitable[object]]) -> None:
        """Until `shutdown()` returns or a new agent version has taken over."""
        assert self._handed_over is not None
        stop = asyncio.ensure_future(shutdown())
        over = asyncio.ensure_future(self._handed_over.wait())
        try:
            await asyncio.wait({stop, over}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stop, over):
                t.cancel()
            await asyncio.gather(stop, over, return_exceptions=True)
        if self._switching is not None and not self._switching.done():
            self._switching.cancel()
            await asyncio.gather(self._switching, return_exceptions=True)

    @property
    def handed_over(self) -> bool:
        """True once a new agent version took over from this process."""
        return self._handed_over is not None and self._handed_over.is_set()

    # -- switching agent versions (agent/selfupdate.py) ------------------------------

    def _start_switch(self, target: SwitchTarget) -> None:
        if self._switching is not None and not self._switching.done():
            logger.warning("%s: a switch is in progress; %s waits", self.device_id, target.version)
            return
        # a task of its own: the switch closes the transport whose dispatcher called us
        self._switching = asyncio.create_task(self._switch(target), name="agent-switch")

    async def _switch(self, target: SwitchTarget) -> None:
        """Start the agent `target` names beside this one. This one keeps answering
        Predict; once the new one is healthy it stops (in-flight calls finish), else it
        kills it, takes the state directory and the broker session back and reports."""
        assert self.config_path is not None and self._lock_fd is not None
        deadline = self.settings.switch_deadline_s
        trial = Trial(
            generation=target.generation,
            version=target.version,
            root=target.root,
            from_version=AGENT_VERSION,
            from_python=sys.executable,
            from_root=running_root(),
            deadline_ms=int((time.time() + deadline) * 1000),
        )
        path = self.releases.trial_path
        log = self.releases.root / f"agent-{target.version or 'base'}.log"
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_text, trial.to_json())
        logger.info("%s: switching to agent %s (%s)", self.device_id, target.version, target.python)
        await self.transport.close()  # the new agent takes the device's broker session
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)  # ... and the state directory
        proc: subprocess.Popen[bytes] | None = None
        why = ""
        try:
            with open(log, "ab") as out:
                cmd = [str(target.python), *AGENT_MAIN, "run"]
                proc = subprocess.Popen(
                    [*cmd, "--config", str(self.config_path)],
                    env=clean_env(**{TRIAL_ENV: str(path)}),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # it outlives this process
                )
            end = time.monotonic() + deadline
            while True:
                if proc.poll() is not None:
                    why = f"exited with status {proc.returncode}"
                    break
                seen = await asyncio.to_thread(Trial.read, path)
                if seen is not None and seen.healthy_pid == proc.pid:
                    logger.info(
                        "%s: agent %s (pid %d) is healthy; this one (%s) stops",
                        self.device_id,
                        target.version,
                        proc.pid,
                        AGENT_VERSION,
                    )
                    assert self._handed_over is not None
                    self._handed_over.set()
                    return
                if time.monotonic() > end:
                    why = f"not healthy within {deadline:.0f}s"
                    break
                await asyncio.sleep(0.1)
        except OSError as e:
            why = f"could not start: {e}"
        # not healthy: this agent serves on
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
        await self._take_back(trial)
        detail = f"agent {target.version} {why}; back on {AGENT_VERSION}"
        tail = log_tail(log, 300)
        logger.warning("%s: %s; its log ends: %s", self.device_id, detail, tail)
        await self.updater.agent_switch_failed(target, f"{detail}; log: {tail}" if tail else detail)

    async def _take_back(self, trial: Trial) -> None:
        assert self._lock_fd is not None
        async with asyncio.timeout(10):
            while True:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.05)
        if str(self.releases.current() or "") != trial.from_root:
            prev = self.releases.previous() or {}
            await asyncio.to_thread(self.releases.set_current, trial.from_root, previous=prev)
        await asyncio.to_thread(self.releases.trial_path.unlink, missing_ok=True)
        await self.transport.__aenter__()
        with contextlib.suppress(FleetError):  # the report waits for the broker, briefly
            await self.transport.wait_connected(timeout=30)

    def _trial_healthy(self) -> None:
        """This new agent version is connected and serves: tell the one that started it
        (it stops), make it the version a restart runs, and take over as systemd's main
        process. Not healthy (the active model did not load): exit, the old one serves on."""
        trial, path = self.trial, self._trial_path
        assert trial is not None and path is not None
        if self.updater.slots.active() is not None and self.holder.active is None:
            logger.error(
                "%s: agent %s cannot serve the active model", self.device_id, AGENT_VERSION
            )
            os._exit(3)
        healthy = replace(trial, healthy_pid=os.getpid())
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(healthy.to_json())
        tmp.replace(path)
        self.trial = healthy
        self.releases.set_current(
            trial.root,
            previous={
                "version": trial.from_version,
                "python": trial.from_python,
                "root": trial.from_root,
            },
        )
        sd_notify(f"MAINPID={os.getpid()}")
        removed = self.releases.gc({trial.root, trial.from_root})
        if removed:
            logger.info("%s: removed agent releases %s", self.device_id, ", ".join(removed))
        logger.info(
            "%s: agent %s healthy; took over from %s",
            self.device_id,
            AGENT_VERSION,
            trial.from_version,
        )

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_window = loop.time() + self.settings.telemetry_interval
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self._switching is not None and not self._switching.done():
                # the state folder (spool included) is the new agent's while it starts;
                # predictions answered meanwhile are counted in the next window if it
                # fails, and not reported if it takes over
                continue
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
