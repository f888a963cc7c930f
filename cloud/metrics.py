"""`/metrics` in the Prometheus text format (0.0.4), served by `fleet serve`.

Gauges are computed at scrape time from the database (devices, versions, update
states, rollouts, latency percentiles per version, drift) plus the ingest
counters kept in memory. Each source is a callable returning `Sample`s, so the
coordinator adds what it has (`MetricsRegistry.add`) and a failing source costs
only its own lines (it is logged and counted in `edgefleet_scrape_errors_total`).

The HTTP side is a minimal asyncio server (GET /metrics, GET /healthz): no web
framework in the coordinator for two read-only endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # gauge | counter
    help: str
    samples: Sequence[Sample] = field(default_factory=tuple)


Source = Callable[[], Iterable[Family]]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for f in families:
        lines.append(f"# HELP {f.name} {f.help}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for s in f.samples:
            labels = ""
            if s.labels:
                labels = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels) + "}"
            lines.append(f"{s.name}{labels} {_number(s.value)}")
    return "\n".join(lines) + "\n"


class MetricsRegistry:
    def __init__(self) -> None:
        self._sources: list[tuple[str, Source]] = []
        self.scrape_errors = 0

    def add(self, name: str, source: Source) -> None:
        self._sources.append((name, source))

    def collect(self) -> str:
        families: list[Family] = []
        for name, source in self._sources:
            try:
                families.extend(source())
            except Exception:
                self.scrape_errors += 1
                logger.exception("metrics source %s failed", name)
        families.append(
            Family(
                "edgefleet_scrape_errors_total",
                "counter",
                "Metric sources that failed during a scrape.",
                [Sample("edgefleet_scrape_errors_total", self.scrape_errors)],
            )
        )
        return render(families)


# -- sources --------------------------------------------------------------------------


def device_families(devices: Sequence[Any]) -> list[Family]:
    """Devices online/offline, by update state, and by the model version they serve."""
    online = sum(1 for d in devices if d.online)
    states = Counter(d.state for d in devices)
    versions: Counter[tuple[str, str, str]] = Counter()
    for d in devices:
        a = d.active or {}
        if a.get("model"):
            versions[(str(a["model"]), str(a.get("version", "")), str(a.get("variant", "")))] += 1
    return [
        Family(
            "edgefleet_devices",
            "gauge",
            "Enrolled devices by connectivity.",
            [
                Sample("edgefleet_devices", online, (("status", "online"),)),
                Sample("edgefleet_devices", len(devices) - online, (("status", "offline"),)),
            ],
        ),
        Family(
            "edgefleet_devices_by_state",
            "gauge",
            "Enrolled devices by update state.",
            [
                Sample("edgefleet_devices_by_state", n, (("state", s),))
                for s, n in sorted(states.items())
            ],
        ),
        Family(
            "edgefleet_devices_by_version",
            "gauge",
            "Devices serving each model version and variant.",
            [
                Sample(
                    "edgefleet_devices_by_version",
                    n,
                    (("model", m), ("version", v), ("variant", var)),
                )
                for (m, v, var), n in sorted(versions.items())
            ],
        ),
    ]


def latency_families(percentiles: Sequence[Any]) -> list[Family]:
    samples = []
    for p in percentiles:
        for q, v in (("0.5", p.p50_us), ("0.9", p.p90_us), ("0.99", p.p99_us)):
            if v is not None:
                samples.append(
                    Sample(
                        "edgefleet_inference_latency_us",
                        v,
                        (("model", p.model), ("version", str(p.version)), ("quantile", q)),
                    )
                )
    return [
        Family(
            "edgefleet_inference_latency_us",
            "gauge",
            "On-device Predict latency per model version over the last hour "
            "(upper bound of the histogram bucket holding the quantile).",
            samples,
        )
    ]


def ingest_families(ingest: Any) -> list[Family]:
    def one(name: str, kind: str, help_: str, value: float) -> Family:
        return Family(name, kind, help_, [Sample(name, value)])

    return [
        one(
            "edgefleet_telemetry_received_total",
            "counter",
            "Telemetry messages decoded.",
            ingest.received,
        ),
        one(
            "edgefleet_telemetry_written_total",
            "counter",
            "New telemetry rows committed.",
            ingest.written,
        ),
        one(
            "edgefleet_telemetry_rejected_total",
            "counter",
            "Malformed telemetry messages.",
            ingest.rejected,
        ),
        one(
            "edgefleet_telemetry_duplicated_total",
            "counter",
            "Telemetry windows received again after they were committed (skipped).",
            ingest.duplicated,
        ),
        one(
            "edgefleet_telemetry_refused_total",
            "counter",
            "Telemetry windows refused with the buffer full (not acknowledged: devices resend).",
            ingest.refused,
        ),
        one(
            "edgefleet_telemetry_acked_total",
            "counter",
            "Telemetry windows acknowledged to their devices once committed.",
            ingest.acked,
        ),
        one(
            "edgefleet_telemetry_ingest_rate",
            "gauge",
            "Telemetry rows written per second (recent).",
            ingest.rate,
        ),
        one(
            "edgefleet_telemetry_pending",
            "gauge",
            "Telemetry rows waiting to be written.",
            ingest.pending,
        ),
    ]


def refusal_families(refusals: Any) -> list[Family]:
    """Inbound MQTT messages refused at the boundary (`cloud.inbound.Refusals`), by
    message kind and reason."""
    name = "edgefleet_inbound_refused_total"
    return [
        Family(
            name,
            "counter",
            "Messages from devices refused at the coordinator's boundary, by kind and reason.",
            [
                Sample(name, n, (("kind", kind), ("reason", reason)))
                for (kind, reason), n in sorted(refusals.snapshot().items())
            ],
        )
    ]


def drift_families(rows: Sequence[Any], open_alerts: Sequence[Any]) -> list[Family]:
    """PSI per model version, fleet-wide and per group (the latest evaluation), and
    open drift alerts per scope. Per-device PSI stays out (one series per device)."""
    psi = []
    for r in rows:
        if r.scope == "device":
            continue
        base = (
            ("scope", r.scope),
            ("subject", r.subject),
            ("model", r.model),
            ("version", str(r.version)),
        )
        psi.append(Sample("edgefleet_drift_psi", r.input_psi, (*base, ("metric", "inputs"))))
        psi.append(Sample("edgefleet_drift_psi", r.predictions, (*base, ("metric", "predictions"))))
    by_scope = Counter(a.scope for a in open_alerts)
    return [
        Family(
            "edgefleet_drift_psi",
            "gauge",
            "Population stability index of live traffic against the version's reference, "
            "over the drift window (inputs: worst input feature).",
            psi,
        ),
        Family(
            "edgefleet_drift_alerts_open",
            "gauge",
            "Open drift alerts by scope.",
            [
                Sample("edgefleet_drift_alerts_open", by_scope.get(s, 0), (("scope", s),))
                for s in ("device", "group")
            ],
        ),
    ]


# -- HTTP -----------------------------------------------------------------------------


async def serve_metrics(
    registry: MetricsRegistry, host: str, port: int
) -> tuple[asyncio.Server, int]:
    """Serve GET /metrics and GET /healthz on host:port; returns (server, bound port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            if method != "GET":
                status, body, ctype = "405 Method Not Allowed", "only GET\n", "text/plain"
            elif path.split("?")[0] == "/metrics":
                text = await asyncio.to_thread(registry.collect)
                status, body, ctype = "200 OK", text, CONTENT_TYPE
            elif path == "/healthz":
                status, body, ctype = "200 OK", "ok\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", "try /metrics\n", "text/plain"
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    bound = int(server.sockets[0].getsockname()[1])
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound


__all__ = [
    "CONTENT_TYPE",
    "Family",
    "MetricsRegistry",
    "Sample",
    "device_families",
    "drift_families",
    "ingest_families",
    "latency_families",
    "render",
    "serve_metrics",
]
