"""`/metrics` for `fleet serve`, on prometheus_client.

`FleetCollector` is a prometheus_client custom collector: at scrape time it asks
each source the coordinator added (`FleetCollector.add`) for its metric families,
read from the database (devices, versions, update states, rollouts, gate failures,
drift) or from in-process counters (telemetry ingest, inbound refusals, the
latency histograms the ingest accumulates). A failing source costs only its own
families (logged and counted in `edgefleet_scrape_errors_total`).

`fleet_registry` puts it in its own `CollectorRegistry` with prometheus_client's
process collector (`process_*`) and `edgefleet_build_info`; `serve_metrics` serves
that registry with prometheus_client's own HTTP server. Names and labels follow
Prometheus conventions: counters end in `_total`, latency is a histogram in
seconds, no precomputed rates, and no per-device labels.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import ProcessCollector, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

logger = logging.getLogger(__name__)

Source = Callable[[], Iterable[Metric]]


class FleetCollector(Collector):
    """The coordinator's metrics, computed at scrape time from its sources."""

    def __init__(self, version: str = "") -> None:
        self._sources: list[tuple[str, Source]] = []
        self.version = version
        self.scrape_errors = 0

    def add(self, name: str, source: Source) -> None:
        self._sources.append((name, source))

    def describe(self) -> Iterable[Metric]:
        return ()  # no scrape at registration; names are not checked for clashes

    def collect(self) -> Iterable[Metric]:
        build = GaugeMetricFamily(
            "edgefleet_build_info", "The coordinator's edgefleet version.", labels=["version"]
        )
        build.add_metric([self.version or _version()], 1)
        yield build
        for name, source in self._sources:
            try:
                families = list(source())
            except Exception:
                self.scrape_errors += 1
                logger.exception("metrics source %s failed", name)
                continue
            yield from families
        yield CounterMetricFamily(
            "edgefleet_scrape_errors",
            "Metric sources that failed during a scrape.",
            value=self.scrape_errors,
        )


def _version() -> str:
    import edgefleet

    return str(edgefleet.__version__)


def fleet_registry(collector: FleetCollector) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one: tests run several
    coordinators in one process) with `collector` and the process collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(what: CollectorRegistry | Iterable[Metric]) -> str:
    """A registry, or some metric families, in the Prometheus text format."""
    if not isinstance(what, CollectorRegistry):
        families = list(what)
        collector = FleetCollector()
        collector.add("families", lambda: families)
        what = CollectorRegistry(auto_describe=False)
        what.register(collector)
    return generate_latest(what).decode()


# -- sources --------------------------------------------------------------------------


def device_families(devices: Sequence[Any]) -> list[Metric]:
    """Devices online/offline, by update state, and by the model version they serve."""
    online = sum(1 for d in devices if d.online)
    states = Counter(str(d.state) for d in devices)
    versions: Counter[tuple[str, str, str]] = Counter()
    for d in devices:
        if (a := d.active) is not None:
            versions[(a.model, str(a.version), a.variant)] += 1
    status = GaugeMetricFamily(
        "edgefleet_devices", "Enrolled devices by connectivity.", labels=["status"]
    )
    status.add_metric(["online"], online)
    status.add_metric(["offline"], len(devices) - online)
    by_state = GaugeMetricFamily(
        "edgefleet_devices_by_state", "Enrolled devices by update state.", labels=["state"]
    )
    for s, n in sorted(states.items()):
        by_state.add_metric([s], n)
    by_version = GaugeMetricFamily(
        "edgefleet_devices_by_version",
        "Devices serving each model version and variant.",
        labels=["model", "version", "variant"],
    )
    for (m, v, var), n in sorted(versions.items()):
        by_version.add_metric([m, v, var], n)
    return [status, by_state, by_version]


class LatencyHistograms:
    """On-device Predict latency summed over every telemetry window the ingest
    committed, per (model, version, variant): the agents' fixed-bound histograms
    (µs, one overflow bucket) added up. Thread-safe (the ingest's writer thread adds,
    scrapes read). A series keeps the bounds of the first window it saw; a window
    with other bounds is left out of it (counted in `mismatched`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], tuple[str, list[int], float]] = {}
        self._parsed: dict[str, tuple[float, ...]] = {}
        self.mismatched = 0

    def add_rows(self, rows: Iterable[Sequence[Any]]) -> None:
        """Telemetry rows in `cloud.telemetry.store.COLUMNS` order (model, version,
        variant at 5-7; bounds and counts as JSON text at 10-11; sum in µs at 12).

        Runs in the ingest's writer thread, so a batch is grouped by series first and
        each group's counts parsed with one `json.loads`."""
        groups: dict[tuple[Any, Any, Any, str], tuple[list[str], list[float]]] = {}
        for r in rows:
            if not r[5] or r[11] == "[]":
                continue  # no model active, or no predictions in the window
            key = (r[5], r[6], r[7], r[10])
            g = groups.get(key)
            if g is None:
                g = groups[key] = ([], [0.0])
            g[0].append(r[11])
            g[1][0] += float(r[12])
        with self._lock:
            for (model, version, variant, bounds_text), (texts, sum_us) in groups.items():
                bounds = self._parsed.get(bounds_text)
                if bounds is None:
                    bounds = self._parsed[bounds_text] = tuple(json.loads(bounds_text))
                windows = json.loads("[" + ",".join(texts) + "]")
                series = (str(model), str(version), str(variant))
                have = self._series.get(series)
                # (cloud.inbound admits only len(bounds) + 1 counts: the check is a guard)
                if (have is not None and have[0] != bounds_text) or any(
                    len(w) != len(bounds) + 1 for w in windows
                ):
                    self.mismatched += len(windows)
                    continue
                added = [sum(col) for col in zip(*windows, strict=True)]
                if have is None:
                    self._series[series] = (bounds_text, added, sum_us[0])
                else:
                    acc = [a + b for a, b in zip(have[1], added, strict=True)]
                    self._series[series] = (bounds_text, acc, have[2] + sum_us[0])

    def snapshot(self) -> list[tuple[list[str], str, list[int], float]]:
        """Every series as ([model, version, variant], bounds JSON, counts, sum µs): what
        an ingest worker process reports to its parent (`cloud.telemetry.pool`)."""
        with self._lock:
            return [(list(k), b, list(c), s) for k, (b, c, s) in self._series.items()]

    def merge(self, snapshot: Iterable[Sequence[Any]]) -> None:
        """Add another histogram's `snapshot()` (series with other bounds are left out
        and counted in `mismatched`, as in `add_rows`)."""
        with self._lock:
            for key, bounds_text, counts, sum_us in snapshot:
                series = (str(key[0]), str(key[1]), str(key[2]))
                if bounds_text not in self._parsed:
                    self._parsed[bounds_text] = tuple(json.loads(bounds_text))
                have = self._series.get(series)
                if have is None:
                    self._series[series] = (bounds_text, list(counts), float(sum_us))
                elif have[0] != bounds_text or len(have[1]) != len(counts):
                    self.mismatched += 1
                else:
                    acc = [a + int(b) for a, b in zip(have[1], counts, strict=True)]
                    self._series[series] = (bounds_text, acc, have[2] + float(sum_us))

    def families(self) -> list[Metric]:
        h = HistogramMetricFamily(
            "edgefleet_inference_latency_seconds",
            "On-device Predict latency, from the agents' latency histograms in the "
            "telemetry windows this coordinator committed since it started.",
            labels=["model", "version", "variant"],
        )
        with self._lock:
            series = [(k, self._parsed[b], list(c), s) for k, (b, c, s) in self._series.items()]
        for key, bounds, counts, sum_us in sorted(series):
            buckets, seen = [], 0
            for bound, c in zip(bounds, counts, strict=False):
                seen += c
                buckets.append((repr(bound / 1e6), seen))
            buckets.append(("+Inf", sum(counts)))
            h.add_metric(list(key), buckets, sum_us / 1e6)
        return [h]


def ingest_families(ingest: Any) -> list[Metric]:
    """The telemetry ingest's counters (`cloud.telemetry.TelemetryIngest`)."""

    def counter(name: str, help_: str, value: float) -> Metric:
        return CounterMetricFamily(name, help_, value=value)

    return [
        counter("edgefleet_telemetry_received", "Telemetry messages decoded.", ingest.received),
        counter("edgefleet_telemetry_written", "New telemetry rows committed.", ingest.written),
        counter("edgefleet_telemetry_rejected", "Malformed telemetry messages.", ingest.rejected),
        counter(
            "edgefleet_telemetry_duplicated",
            "Telemetry windows received again after they were committed (skipped).",
            ingest.duplicated,
        ),
        counter(
            "edgefleet_telemetry_refused",
            "Telemetry windows refused with the buffer full (not acknowledged: devices resend).",
            ingest.refused,
        ),
        counter(
            "edgefleet_telemetry_dropped",
            "Telemetry rows the database refused for their content (dropped).",
            ingest.refused_rows,
        ),
        counter(
            "edgefleet_telemetry_write_errors",
            "Telemetry batches that could not be written (database away; rows kept).",
            ingest.write_errors,
        ),
        counter(
            "edgefleet_telemetry_acked",
            "Telemetry windows acknowledged to their devices once committed.",
            ingest.acked,
        ),
        GaugeMetricFamily(
            "edgefleet_telemetry_pending", "Telemetry rows waiting to be written.", ingest.pending
        ),
    ]


def refusal_families(refusals: Any) -> list[Metric]:
    """Inbound MQTT messages refused at the boundary (`cloud.inbound.Refusals`), by
    message kind and reason."""
    c = CounterMetricFamily(
        "edgefleet_inbound_refused",
        "Messages from devices refused at the coordinator's boundary, by kind and reason.",
        labels=["kind", "reason"],
    )
    for (kind, reason), n in sorted(refusals.snapshot().items()):
        c.add_metric([kind, reason], n)
    return [c]


def rollout_families(rollouts: Sequence[Any]) -> list[Metric]:
    """Rollouts by state and failed gate results by gate, over `rollouts` (the
    coordinator passes the 1,000 most recent)."""
    by_state = GaugeMetricFamily(
        "edgefleet_rollouts", "Rollouts by state (the 1,000 most recent).", labels=["state"]
    )
    for s, n in sorted(Counter(str(r.state) for r in rollouts).items()):
        by_state.add_metric([s], n)
    failed: Counter[str] = Counter()
    for r in rollouts:
        for st in r.stages:
            failed.update(g.name for g in st.gates if not g.ok)
    gates = GaugeMetricFamily(
        "edgefleet_rollout_gates_failed",
        "Failed gate results in the stages of the 1,000 most recent rollouts, by gate.",
        labels=["gate"],
    )
    for g, n in sorted(failed.items()):
        gates.add_metric([g], n)
    return [by_state, gates]


def drift_families(rows: Sequence[Any], open_alerts: Sequence[Any]) -> list[Metric]:
    """PSI per model version, fleet-wide and per group (the latest evaluation), and
    open drift alerts per scope. Per-device PSI stays out (one series per device)."""
    psi = GaugeMetricFamily(
        "edgefleet_drift_psi",
        "Population stability index of live traffic against the version's reference, "
        "over the drift window (inputs: worst input feature).",
        labels=["scope", "subject", "model", "version", "metric"],
    )
    for r in rows:
        if r.scope == "device":
            continue
        base = [r.scope, r.subject, r.model, str(r.version)]
        psi.add_metric([*base, "inputs"], r.input_psi)
        psi.add_metric([*base, "predictions"], r.predictions)
    by_scope = Counter(a.scope for a in open_alerts)
    alerts = GaugeMetricFamily(
        "edgefleet_drift_alerts_open", "Open drift alerts by scope.", labels=["scope"]
    )
    for s in ("device", "group"):
        alerts.add_metric([s], by_scope.get(s, 0))
    return [psi, alerts]


# -- HTTP -----------------------------------------------------------------------------


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[WSGIServer, threading.Thread, int]:
    """prometheus_client's HTTP server for `registry` on host:port (port 0: a free
    one) in a daemon thread; returns (server, thread, bound port). Stop it with
    `stop_metrics`."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return server, thread, bound


def stop_metrics(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(10)


__all__ = [
    "FleetCollector",
    "LatencyHistograms",
    "device_families",
    "drift_families",
    "fleet_registry",
    "ingest_families",
    "refusal_families",
    "render",
    "rollout_families",
    "serve_metrics",
    "stop_metrics",
]
