"""/metrics on prometheus_client: families, the latency histogram in seconds, sources
that fail, build_info and process metrics, and the HTTP endpoint."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.agent.inference import LATENCY_BOUNDS_US
from edgefleet.cloud.devices.values import ServedModel
from edgefleet.cloud.metrics import (
    FleetCollector,
    LatencyHistograms,
    device_families,
    fleet_registry,
    render,
    serve_metrics,
    stop_metrics,
)


@dataclass
class Dev:
    online: bool
    state: str
    active: ServedModel | None = None


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _row(
    model: str, version: int, variant: str, counts: list[int], sum_us: float
) -> tuple[Any, ...]:
    """A telemetry row in `COLUMNS` order, as the ingest builds it."""
    bounds = "[" + ",".join(map(str, LATENCY_BOUNDS_US)) + "]"
    counts_text = "[" + ",".join(map(str, counts)) + "]"
    return ("d1", 1, 0, 0, 0, model, version, variant, sum(counts), 0, bounds, counts_text,
            sum_us, sum(counts), 0, 0.0, False)  # fmt: skip


def test_device_families() -> None:
    devs = [
        Dev(True, "active", ServedModel("digits", 2, "int8", "a" * 64)),
        Dev(True, "active", ServedModel("digits", 2, "int8", "a" * 64)),
        Dev(False, "failed", ServedModel("digits", 1, "fp16", "b" * 64)),
        Dev(False, "enrolled"),
    ]
    c = FleetCollector("1.2.3")
    c.add("devices", lambda: device_families(devs))
    s = _samples(render(fleet_registry(c)))
    assert s[("edgefleet_devices", (("status", "online"),))] == 2
    assert s[("edgefleet_devices", (("status", "offline"),))] == 2
    assert s[("edgefleet_devices_by_state", (("state", "failed"),))] == 1
    key = (("model", "digits"), ("variant", "int8"), ("version", "2"))
    assert s[("edgefleet_devices_by_version", key)] == 2
    assert s[("edgefleet_build_info", (("version", "1.2.3"),))] == 1
    assert any(name == "process_cpu_seconds_total" for name, _ in s)  # the process collector


def test_latency_histogram_in_seconds_per_version_and_variant() -> None:
    n = len(LATENCY_BOUNDS_US) + 1  # one overflow bucket
    lat = LatencyHistograms()
    w1 = [0] * n
    w1[0], w1[3] = 4, 6  # 4 at <= 50 µs, 6 at <= 500 µs
    w2 = [0] * n
    w2[3], w2[-1] = 1, 2  # 1 at <= 500 µs, 2 beyond the last bound
    lat.add_rows([_row("digits", 2, "int8", w1, 2000.0), _row("digits", 2, "int8", w2, 500_000.0)])
    lat.add_rows([_row("digits", 2, "fp32", w1, 1000.0), _row("", 0, "", [], 0.0)])
    lat.add_rows([("d2", 2, 0, 0, 0, "digits", 2, "int8", 1, 0, "[1,2]", "[1,0,0]", 1.0, 1)])
    assert lat.mismatched == 1  # other bounds: not mixed in

    c = FleetCollector()
    c.add("latency", lat.families)
    s = _samples(render(fleet_registry(c)))
    int8 = (("model", "digits"), ("variant", "int8"), ("version", "2"))

    def bucket(le: str) -> float:
        return s[("edgefleet_inference_latency_seconds_bucket", (("le", le), *int8))]

    assert bucket("5e-05") == 4 and bucket("0.0002") == 4
    assert bucket("0.0005") == 11 and bucket("0.1") == 11 and bucket("+Inf") == 13
    assert s[("edgefleet_inference_latency_seconds_count", int8)] == 13
    assert s[("edgefleet_inference_latency_seconds_sum", int8)] == pytest.approx(0.502)
    fp32 = (("model", "digits"), ("variant", "fp32"), ("version", "2"))
    assert s[("edgefleet_inference_latency_seconds_count", fp32)] == 10


def test_latency_histograms_of_several_processes_add_up() -> None:
    """What ingest worker processes report (`snapshot`) merged in the coordinator."""
    n = len(LATENCY_BOUNDS_US) + 1
    w = [0] * n
    w[0], w[-1] = 3, 1
    a, b = LatencyHistograms(), LatencyHistograms()
    a.add_rows([_row("digits", 2, "int8", w, 100.0)])
    b.add_rows([_row("digits", 2, "int8", w, 50.0), _row("digits", 2, "fp32", w, 10.0)])
    merged = LatencyHistograms()
    for snap in (a.snapshot(), b.snapshot()):
        merged.merge(snap)
    merged.merge([(["digits", "2", "int8"], "[1,2]", [1, 0, 0], 1.0)])  # other bounds
    assert merged.mismatched == 1
    got = {tuple(k): (counts, total) for k, _b, counts, total in merged.snapshot()}
    assert got[("digits", "2", "int8")] == ([6, *([0] * (n - 2)), 2], 150.0)
    assert got[("digits", "2", "fp32")] == ([3, *([0] * (n - 2)), 1], 10.0)


def test_a_failing_source_costs_only_its_own_families_and_the_endpoint_serves() -> None:
    c = FleetCollector()
    good = GaugeMetricFamily("edgefleet_up", "up", value=1)
    c.add("good", lambda: [good])

    def broken() -> list[Metric]:
        raise RuntimeError("database away")

    c.add("broken", broken)
    server, thread, port = serve_metrics(fleet_registry(c), "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            ctype, text = r.headers["Content-Type"], r.read().decode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405
    finally:
        stop_metrics(server, thread)
    assert ctype.startswith("text/plain; version=0.0.4")
    s = _samples(text)
    assert s[("edgefleet_up", ())] == 1
    assert s[("edgefleet_scrape_errors_total", ())] == 1


def test_rollouts_by_state_and_failed_gates() -> None:
    from edgefleet.cloud.metrics import rollout_families
    from edgefleet.cloud.rollouts.model import GateResult, Rollout, Stage
    from edgefleet.cloud.rollouts.policy import Policy

    def rollout(rid: str, state: str, *gates: GateResult) -> Rollout:
        stages = (Stage("canary", 0.1, 1, gates=gates), Stage("all", 1.0, 9))
        return Rollout(rid, "digits:2", "digits", 2, "all", Policy(), state, stages)

    failed = GateResult("failure_rate", False, 0.5, 0.02)
    rollouts = [
        rollout("r1", "rolled_back", failed, GateResult("self_test", True, 1, 1)),
        rollout("r2", "paused", GateResult("accuracy", False, 0.7, 0.9), failed),
        rollout("r3", "done", GateResult("failure_rate", True, 0.0, 0.02)),
    ]
    s = _samples(render(rollout_families(rollouts)))
    assert s[("edgefleet_rollouts", (("state", "rolled_back"),))] == 1
    assert s[("edgefleet_rollouts", (("state", "paused"),))] == 1
    assert s[("edgefleet_rollout_gates_failed", (("gate", "failure_rate"),))] == 2
    assert s[("edgefleet_rollout_gates_failed", (("gate", "accuracy"),))] == 1
    assert ("edgefleet_rollout_gates_failed", (("gate", "self_test"),)) not in s
