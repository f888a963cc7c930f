"""`fleet serve`: the coordinator process.

One asyncio loop runs the MQTT `Coordinator` and the gRPC `FleetService`
(grpc.aio). Without an external broker it starts a `ManagedBroker` under
FLEET_HOME/broker and restarts it if it dies (capped exponential backoff, full
jitter). Once listening it writes FLEET_HOME/serve.json so local CLI calls find it.

Shutdown is injected (`shutdown` is awaited; the CLI's signal handlers only set an
asyncio.Event): stop taking calls, let calls in flight finish within
`graceful_timeout`, then cancel them, leave MQTT, stop the broker, remove serve.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import grpc

from edgefleet.cloud.access.interceptor import AccessInterceptor
from edgefleet.cloud.access.service import AccessServicer
from edgefleet.cloud.api.errors import ErrorInterceptor
from edgefleet.cloud.api.service import FleetServicer
from edgefleet.cloud.broker import ManagedBroker, find_mosquitto
from edgefleet.cloud.config import CloudSettings, ServeInfo
from edgefleet.cloud.console import check_ui_listen, console_enabled, start_console
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.fl.federation import Federation
from edgefleet.cloud.fl.service import FederatedServicer
from edgefleet.cloud.grpc_tls import host_names, server_tls, split_host
from edgefleet.cloud.home import secure_home
from edgefleet.cloud.identity import (
    BrokerAuth,
    CredentialApplier,
    IdentityStore,
    write_broker_material,
)
from edgefleet.cloud.inbound import Refusals
from edgefleet.cloud.monitoring import Monitoring
from edgefleet.cloud.replicas.mode import ReplicaMode
from edgefleet.cloud.rollouts.controller import RolloutController
from edgefleet.cloud.services.fleet import FleetApp
from edgefleet.cloud.services.live import LiveRollouts
from edgefleet.cloud.services.setup import ensure_admin_token
from edgefleet.cloud.services.wiring import Services
from edgefleet.protos.backoff import Backoff
from edgefleet.protos.errors import InvalidArgument, Unavailable
from edgefleet.protos.fleet.v1 import access_pb2_grpc, federated_pb2_grpc, fleet_pb2_grpc
from edgefleet.protos.flower import find_flower
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import MqttAccess

logger = logging.getLogger(__name__)

GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def check_listen(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(
            f"--grpc-listen {address!r} is not HOST:PORT; e.g. 127.0.0.1:7443 or 0.0.0.0:7443"
        )
    return host, int(port)


async def supervise_broker(
    broker: ManagedBroker,
    stop: asyncio.Event,
    *,
    interval: float = 1.0,
    backoff: Backoff = Backoff(),
) -> None:
    """Restart `broker` whenever it is found dead, until `stop` is set."""
    attempt = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        if stop.is_set():
            return
        if broker.running:
            attempt = 0
            continue
        attempt += 1
        delay = backoff.delay(attempt)
        logger.warning(
            "mosquitto (%s) exited; restarting, retrying in %.1fs (attempt %d)",
            broker.url,
            delay,
            attempt,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        if stop.is_set():
            return
        try:
            await asyncio.to_thread(broker.start)
            logger.warning("mosquitto restarted on %s (pid %s)", broker.url, broker.pid)
        except Unavailable as e:
            logger.warning("mosquitto restart failed: %s", e)
        # a Conflict (another program took the port meanwhile) ends the supervisor: the
        # coordinator stops rather than talk to a broker it did not start


async def _until_shutdown(
    shutdown: Callable[[], Awaitable[object]], supervisor: asyncio.Task[None] | None
) -> None:
    """Return when `shutdown()` does, or when the broker supervisor gave up (its error is
    raised where the supervisor is awaited)."""
    waiter = asyncio.ensure_future(shutdown())
    watched: set[asyncio.Future[Any]] = {waiter}
    if supervisor is not None:
        watched.add(supervisor)
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    failed = supervisor is not None and supervisor.done() and not supervisor.cancelled()
    if failed and supervisor is not None and (e := supervisor.exception()) is not None:
        logger.error("the managed broker cannot run (%s); stopping the coordinator", e)


async def serve(
    settings: CloudSettings,
    shutdown: Callable[[], Awaitable[object]],
    *,
    on_ready: Callable[[ServeInfo], None] | None = None,
    graceful_timeout: float = 5.0,
) -> None:
    """Run the coordinator until `shutdown()` returns."""
    host, _port = check_listen(settings.grpc_listen)
    console_on = console_enabled(settings.ui_listen)
    if console_on:
        check_ui_listen(settings.ui_listen)
    services = Services(settings)
    services.require_init()
    replica = _replica_mode(settings, services)  # hook: None unless --replica
    secure_home(settings)
    services.signing_key()  # a wrong passphrase fails now, not at the first deploy
    tokens = services.access
    ensure_admin_token(settings, tokens)  # a home made before named tokens: its token is `admin`
    app = FleetApp(services)

    def names() -> list[str]:
        """One generated certificate for FleetService and the console: the names of both
        listeners (looked up only when TLS is served with a generated certificate)."""
        ui = host_names(split_host(settings.ui_listen)) if console_on else []
        return sorted({*host_names(host), *ui})

    tls = server_tls(
        listen=settings.grpc_listen,
        cert=settings.grpc_tls_cert,
        key=settings.grpc_tls_key,
        force=settings.grpc_tls,
        tls_dir=settings.grpc_tls_dir,
        hosts=names,
    )
    ui_tls = (
        server_tls(
            listen=settings.ui_listen,
            cert=settings.ui_tls_cert or settings.grpc_tls_cert,
            key=settings.ui_tls_key or settings.grpc_tls_key,
            force=settings.ui_tls,
            tls_dir=settings.grpc_tls_dir,
            flag="ui",
            what="the console",
            hosts=names,
        )
        if console_on
        else None
    )

    broker: ManagedBroker | None = None
    broker_stop = asyncio.Event()
    supervisor: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    own = services.identities.coordinator()
    if settings.broker:
        broker_url = settings.broker
        access = MqttAccess(
            settings.broker,
            username=own.username,
            password=own.password,
            ca_file=own.ca_file,
            cert_file=own.cert_file,
            key_file=own.key_file,
        )
        advertise = settings.advertise_broker or broker_url
    else:
        find_mosquitto()  # NotFound with install hints, before anything else starts
        listeners = settings.mqtt_listeners
        advertise = settings.advertise_broker or advertised_url(listeners)

        def material() -> BrokerAuth:
            return write_broker_material(
                services.identities,
                settings.broker_dir / "auth",
                topics=Topics(),
                tls_listeners=listeners,
                tls_hosts=[urlsplit(advertise).hostname or ""] if advertise else [],
            )

        broker = ManagedBroker(
            settings.broker_dir,
            port=settings.mqtt_port,
            auth=material(),
            max_inflight=settings.mqtt_max_inflight,
            max_inflight_bytes=settings.mqtt_max_inflight_kb * 1024,
        )
        await asyncio.to_thread(broker.start)
        broker_url = broker.url
        advertise = advertise or broker.url
        access = MqttAccess(broker.coordinator_url, username=own.username, password=own.password)
        supervisor = asyncio.create_task(
            supervise_broker(broker, broker_stop), name="broker-supervisor"
        )
        managed = broker

        def rewrite_and_reload() -> None:
            material()
            managed.reload()

        # gRPC enrolments and the watcher, from threads: one apply covers all waiting
        apply_credentials = CredentialApplier(services.identities, rewrite_and_reload)
        app.apply_credentials = apply_credentials

        watcher = asyncio.create_task(
            watch_identities(services.identities, apply_credentials, broker_stop),
            name="identity-watcher",
        )
    refusals = Refusals()  # one count of refused device messages for /metrics
    keyring = services.keyring
    if keyring.ensure():  # a FLEET_HOME from before key lists
        logger.warning(
            "created root key %s: move it offline (docs/operators.md, Keys)", keyring.root_key_path
        )
    server: grpc.aio.Server | None = None
    federation: Federation | None = None
    try:
        async with (
            (replica.coordinator_class if replica else Coordinator)(
                broker_url=access,
                registry=services.registry,
                store=services.artifacts,
                devices=services.devices,
                signing_key=services.signing_key,
                key_list=keyring.key_list_bytes,
                telemetry=False,
                refusals=refusals,
            ) as coordinator,
            (replica.monitoring_class if replica else Monitoring)(
                db=services.database,
                broker_url=access,
                home=replica.telemetry_home if replica else str(settings.home_dir),
                devices=services.devices,
                rollouts=services.rollouts,
                metrics_listen=settings.metrics_listen,
                registry=services.registry,
                drift_threshold=settings.drift_threshold,
                drift_window=settings.drift_window,
                drift_interval=settings.drift_interval,
                refusals=refusals,
                ingest_workers=settings.ingest_workers,
            ) as monitoring,
        ):
            controller = RolloutController(coordinator, services.rollouts)
            if replica is not None:  # hook: the leader runs the controller, FL, reassertion
                control_task = asyncio.create_task(
                    replica.run(coordinator, monitoring),
                    name="replica",
                )
            else:
                if settings.fl:
                    federation = await start_federation(settings, services, controller)
                control_task = asyncio.create_task(controller.run(), name="rollout-controller")
            console = None
            try:
                console = await start_console(
                    settings.ui_listen,
                    services=services,
                    tokens=tokens,
                    controller=controller,
                    tls=ui_tls,
                )
                server = grpc.aio.server(
                    # errors outermost: the audit (inside) records a FleetError's status before
                    # ErrorInterceptor sends it to the caller
                    interceptors=[ErrorInterceptor(), AccessInterceptor(tokens)],
                    options=[
                        ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                        ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                        ("grpc.so_reuseport", 0),
                    ],
                )
                fleet_pb2_grpc.add_FleetServiceServicer_to_server(
                    FleetServicer(
                        app,
                        LiveRollouts(services.rollouts, controller),
                        advertise_broker=advertise,
                    ),
                    server,
                )
                fl_servicer = FederatedServicer(
                    federation,
                    elsewhere=replica.fl_elsewhere if replica is not None else None,
                    # a follower with --fl reads the runs its leader writes
                    runs=services.fl_store if replica is not None and settings.fl else None,
                )
                if replica is not None:  # hook: given the federation while leading
                    replica.fl_servicer = fl_servicer
                federated_pb2_grpc.add_FederatedServiceServicer_to_server(fl_servicer, server)
                access_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(tokens), server)
                try:
                    if tls is not None:
                        port = int(server.add_secure_port(settings.grpc_listen, tls.credentials()))
                    else:
                        port = int(server.add_insecure_port(settings.grpc_listen))
                except RuntimeError as e:
                    raise Unavailable(
                        f"cannot listen on {settings.grpc_listen!r} for FleetService: {e}"
                    ) from e
                await server.start()
                reach = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host
                info = ServeInfo(
                    grpc=f"{reach}:{port}",
                    broker_url=broker_url,
                    advertise_broker=advertise,
                    pid=os.getpid(),
                    metrics=monitoring.metrics_url,
                    fl_superlink=federation.address if federation else "",
                    grpc_tls=tls is not None,
                    grpc_ca=str(tls.ca) if tls is not None and tls.ca is not None else "",
                    ui=console.url if console is not None else "",
                    ui_ca=str(ui_tls.ca) if ui_tls is not None and ui_tls.ca is not None else "",
                )
                info.write(settings.serve_path)
                if replica is not None:  # hook: the address `fleet status` shows for it
                    replica.listening(info.grpc)
                logger.info(
                    "FleetService on %s (%s); broker %s",
                    info.grpc,
                    f"TLS, CA {tls.ca or 'given'}" if tls is not None else "plain, loopback",
                    broker_url,
                )
                if on_ready is not None:
                    on_ready(info)
                await _until_shutdown(shutdown, supervisor)
                logger.info("shutting down: draining calls for up to %.0fs", graceful_timeout)
                await server.stop(graceful_timeout)
                server = None
            finally:
                if console is not None:
                    await console.stop()
                control_task.cancel()
                await asyncio.gather(control_task, return_exceptions=True)
    finally:
        if server is not None:
            await server.stop(0)
        if federation is not None:
            await federation.stop()
        broker_stop.set()
        if supervisor is not None:
            await supervisor
        if watcher is not None:
            await watcher
        if broker is not None:
            await asyncio.to_thread(broker.stop)
        current = ServeInfo.load(settings.serve_path)
        if current is not None and current.pid == os.getpid():
            settings.serve_path.unlink(missing_ok=True)
        services.close()


def _replica_mode(settings: CloudSettings, services: Services) -> ReplicaMode | None:
    """`--replica`: a `cloud.replicas.mode.ReplicaMode` (settings checked), else None."""
    if not settings.replica:
        return None
    return ReplicaMode(settings, services)


def advertised_url(listeners: list[tuple[str, int]]) -> str:
    """The URL bundles name: the first TLS listener (its host, or this machine's name
    when it listens on every address); "" for the loopback listener only."""
    if not listeners:
        return ""
    host, port = listeners[0]
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
        logger.warning(
            "--mqtt-listen %s:%d: bundles name %s; pass --advertise-broker "
            "mqtts://HOST:%d if devices reach this machine by another name",
            listeners[0][0],
            port,
            host,
            port,
        )
    return f"mqtts://{host}:{port}" if ":" not in host else f"mqtts://[{host}]:{port}"


async def watch_identities(
    identities: IdentityStore,
    apply: Callable[[], bool],
    stop: asyncio.Event,
    *,
    interval: float = 0.2,
) -> None:
    """Rewrite the broker's password/ACL/CRL files and reload it (SIGHUP: other sessions
    stay) whenever the credentials change (`fleet devices enroll|revoke|rm` in a shell);
    `apply` (a `CredentialApplier`) records the version applied (the shell waits for it)."""
    seen = identities.version()
    identities.mark_applied(seen)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        now = identities.version()
        if now == seen or stop.is_set():
            continue
        seen = now
        try:
            # False: an enrolment served here applied it already (and waited for it)
            if await asyncio.to_thread(apply):
                logger.info("MQTT credentials changed: broker reloaded")
        except Exception:
            logger.exception("could not apply the new MQTT credentials")


async def start_federation(
    settings: CloudSettings, services: Services, rollouts: RolloutController
) -> Federation:
    """The SuperLink and federated runs (`--fl`); needs Flower installed (edgefleet[fl])."""
    find_flower("flower-superlink")  # NotFound with install hints before anything starts
    federation = Federation(
        settings,
        pipeline=services.pipeline,
        devices=services.devices,
        store=services.fl_store,
        rollouts=rollouts,
    )
    try:
        await federation.start()
    except BaseException:
        await federation.stop()
        raise
    logger.info("SuperLink for federated learning on %s", federation.address)
    return federation
