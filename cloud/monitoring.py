"""Fleet monitoring inside `fleet serve`: telemetry ingest, retention, drift, `/metrics`.

`Monitoring` is an async context manager the coordinator process enters once it
knows its broker: it starts the `TelemetrySubscriber` (own MQTT client, persistent
shared subscription; see `cloud.telemetry.ingest`), folds old telemetry into hourly
rows every `compact_every` seconds, scores drift and opens/resolves drift alerts
every `drift_interval` seconds (`cloud.drift`; needs the registry for the
versions' references), and serves Prometheus metrics on
`metrics_listen` (HOST:PORT; empty or 'off': none) with prometheus_client's HTTP server
(`cloud.metrics`). A metrics port that cannot be bound is logged, not
fatal: the fleet keeps running without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

from edgefleet.cloud.db import Database
from edgefleet.cloud.drift import AlertStore, DriftMonitor
from edgefleet.cloud.inbound import Refusals
from edgefleet.cloud.metrics import (
    FleetCollector,
    device_families,
    drift_families,
    fleet_registry,
    ingest_families,
    refusal_families,
    rollout_families,
    serve_metrics,
    stop_metrics,
)
from edgefleet.cloud.telemetry import TelemetryIngest, TelemetryStore, TelemetrySubscriber
from edgefleet.cloud.telemetry.pool import (
    MAX_WORKERS,
    IngestPool,
    forget_sessions,
    worker_client_ids,
)
from edgefleet.protos.transport import (
    COORDINATOR_BACKOFF_CAP,
    COORDINATOR_RECEIVE_MAXIMUM,
    MqttAccess,
    MqttSettings,
)

logger = logging.getLogger(__name__)


def telemetry_client_id(home: str) -> str:
    """Stable per coordinator home, so a restart resumes the same persistent session."""
    return "fleet-telemetry-" + hashlib.sha256(home.encode()).hexdigest()[:12]


class _Merged:
    """The coordinator's refusal counts plus its ingest workers' (for /metrics)."""

    def __init__(self, refusals: Refusals, more: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.refusals, self.more = refusals, more

    def snapshot(self) -> dict[tuple[str, str], int]:
        out = Counter(self.refusals.snapshot())
        out.update(self.more())
        return dict(out)


class Monitoring:
    #: the telemetry session survives a restart (a replica's does not: cloud.replicas)
    persistent_ingest = True

    def __init__(
        self,
        *,
        db: Database | str,
        broker_url: str | MqttAccess,
        home: str,
        devices: Any,
        rollouts: Any | None = None,
        metrics_listen: str = "",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        compact_every: float = 3600.0,
        registry: Any | None = None,
        drift_threshold: float = 0.2,
        drift_window: float = 600.0,
        drift_interval: float = 30.0,
        drift_min_samples: int = 200,
        refusals: Refusals | None = None,
        ingest_workers: int = 0,
    ) -> None:
        self.store = TelemetryStore(db)
        self.refusals = refusals if refusals is not None else Refusals()
        self.ingest = TelemetryIngest(self.store, on_written=devices.touch, refusals=self.refusals)
        mqtt = (
            MqttAccess.of(broker_url).settings(
                telemetry_client_id(home),
                backoff_cap=COORDINATOR_BACKOFF_CAP,
                receive_maximum=COORDINATOR_RECEIVE_MAXIMUM,
            )
            if username is None
            else MqttSettings(
                url=str(broker_url),
                client_id=telemetry_client_id(home),
                username=username,
                password=password,
                ca_file=ca_file,
                backoff_cap=COORDINATOR_BACKOFF_CAP,
                receive_maximum=COORDINATOR_RECEIVE_MAXIMUM,
            )
        )
        self.subscriber = TelemetrySubscriber(mqtt, self.ingest, persistent=self.persistent_ingest)
        #: --ingest-workers N: N worker processes ingest instead of `subscriber`
        self.pool: IngestPool | None = None
        if ingest_workers > 0:
            url = db if isinstance(db, str) else db.engine.url.render_as_string(False)
            self.pool = IngestPool(
                ingest_workers, db_url=url, settings=mqtt, persistent=self.persistent_ingest
            )
        self.devices = devices
        self.rollouts = rollouts
        self.metrics = FleetCollector()
        self.metrics_registry = fleet_registry(self.metrics)
        self.metrics.add("devices", lambda: device_families(devices.find()))
        pool = self.pool
        if pool is None:
            self.metrics.add("latency", self.ingest.latency.families)
            self.metrics.add("ingest", lambda: ingest_families(self.ingest))
            self.metrics.add("refused", lambda: refusal_families(self.refusals))
        else:
            self.metrics.add("latency", lambda: pool.latency.families())
            self.metrics.add("ingest", lambda: ingest_families(pool))
            self.metrics.add(
                "refused", lambda: refusal_families(_Merged(self.refusals, pool.refusal_counts))
            )
        if rollouts is not None:
            self.metrics.add("rollouts", lambda: rollout_families(rollouts.find(limit=1000)))
        self.drift: DriftMonitor | None = None
        self.alerts: AlertStore | None = None
        self.drift_interval = drift_interval
        if registry is not None:
            self.alerts = AlertStore(db)
            self.drift = DriftMonitor(
                telemetry=self.store,
                alerts=self.alerts,
                registry=registry,
                devices=devices,
                threshold=drift_threshold,
                window_s=drift_window,
                min_samples=drift_min_samples,
            )
            drift = self.drift
            alerts = self.alerts
            self.metrics.add(
                "drift", lambda: drift_families(drift.last, alerts.find(open_only=True))
            )
        self.metrics_listen = metrics_listen
        self.metrics_url = ""
        self.compact_every = compact_every
        self._server: tuple[WSGIServer, threading.Thread] | None = None
        self._compactor: asyncio.Task[None] | None = None
        self._drifter: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Monitoring:
        if self.persistent_ingest:  # sessions from another --ingest-workers would keep a share
            await asyncio.to_thread(self._forget_other_sessions)
        await asyncio.to_thread(self.pool.start if self.pool else self.subscriber.start)
        self._compactor = asyncio.create_task(self._compact_loop(), name="telemetry-compact")
        if self.drift is not None:
            self._drifter = asyncio.create_task(self._drift_loop(), name="drift-monitor")
        if self.metrics_listen.strip().lower() not in ("", "off", "none"):
            host, _, port = self.metrics_listen.rpartition(":")
            try:
                server, thread, bound = await asyncio.to_thread(
                    serve_metrics, self.metrics_registry, host, int(port)
                )
                self._server = (server, thread)
                self.metrics_url = f"http://{host}:{bound}/metrics"
            except (OSError, ValueError) as e:
                logger.warning(
                    "metrics: cannot listen on %s (%s); /metrics is off", self.metrics_listen, e
                )
        return self

    def _forget_other_sessions(self) -> None:
        base = self.subscriber.settings.client_id
        n = self.pool.workers if self.pool is not None else 0
        stale = worker_client_ids(base, range(n, MAX_WORKERS))
        if n:
            stale.append(base)  # the in-process subscriber's
        forget_sessions(self.subscriber.settings, stale)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in (self._compactor, self._drifter):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._server is not None:
            await asyncio.to_thread(stop_metrics, *self._server)
            self._server = None
        await asyncio.to_thread(self.pool.stop if self.pool else self.subscriber.stop)
        if self.alerts is not None:
            self.alerts.close()
        self.store.close()

    async def _compact_loop(self) -> None:
        while True:
            await asyncio.sleep(self.compact_every)
            try:
                await asyncio.to_thread(self.store.compact)
            except Exception:
                logger.exception("telemetry compaction failed; will try again")

    async def _drift_loop(self) -> None:
        assert self.drift is not None
        while True:
            await asyncio.sleep(self.drift_interval)
            try:
                await asyncio.to_thread(self.drift.evaluate)
            except Exception:
                logger.exception("drift evaluation failed; will try again")


__all__ = ["Monitoring", "telemetry_client_id"]
