"""The shipped Grafana dashboard and Prometheus alert rules against a live `fleet serve`:
both files parse, and every metric named in every PromQL expression is one the
coordinator really exports on /metrics; `promtool check rules` where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_serve import fleet_serve

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "edgefleet.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"

# PromQL words that are not metric names (functions are recognised by their "(")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}  # fmt: skip
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum", ""),
    "gauge": ("",),
    "info": ("_info",),
    "unknown": ("",),
}


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: what is left once strings, label
    matchers, grouping clauses, ranges, Grafana variables and function calls are out."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", e):
        if m.group(2) is None and m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    def panels(ps: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def rule_exprs(rules: dict[str, Any]) -> list[str]:
    return [str(r["expr"]) for g in rules["groups"] for r in g["rules"]]


def test_metric_names_are_parsed_out_of_expressions() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, version) (rate(a_bucket{x="y"}[$__rate_interval])))'
        " / ignoring(status) clamp_min(sum(b_total offset 5m), 1) > bool 0.2 and on(k) c"
    ) == {"a_bucket", "b_total", "c"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sample names a real `fleet serve` exports (families with no samples yet
    count by their declared type: a histogram's _bucket/_count/_sum)."""
    from edgefleet.cloud.cli.main import run

    home = tmp_path_factory.mktemp("dash") / "home"
    assert run(["--home", str(home), "init"]) == 0
    with fleet_serve(home) as (_proc, info):
        assert info.metrics.startswith("http://127.0.0.1:")
        text = urllib.request.urlopen(info.metrics, timeout=10).read().decode()
    names: set[str] = set()
    for f in text_string_to_metric_families(text):
        names.update(s.name for s in f.samples)
        names.update(f.name + suffix for suffix in SUFFIXES[f.type])
    assert {"edgefleet_build_info", "process_resident_memory_bytes"} <= names, sorted(names)
    return names


def test_the_dashboard_names_only_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert "datasource" in {v["name"] for v in dashboard["templating"]["list"]}
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    for expr in exprs:
        used = metric_names(expr)
        assert used, f"no metric in {expr!r}"
        assert used <= exported, f"{expr!r} names {sorted(used - exported)}, not exported"
    used_all = set().union(*map(metric_names, exprs))
    for want in ("edgefleet_inference_latency_seconds_bucket", "edgefleet_drift_psi",
                 "edgefleet_rollouts", "edgefleet_telemetry_written_total",
                 "edgefleet_inbound_refused_total", "edgefleet_devices_by_version"):  # fmt: skip
        assert want in used_all


def test_the_alert_rules_name_only_exported_metrics(exported: set[str]) -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"EdgefleetFleetOffline", "EdgefleetRolloutPaused", "EdgefleetRolloutRolledBack",
            "EdgefleetRolloutGateFailed", "EdgefleetDriftHigh", "EdgefleetTelemetryRefused",
            "EdgefleetTelemetryDropped", "EdgefleetInboundRefusals"} <= alerts  # fmt: skip
    for expr in rule_exprs(rules):
        used = metric_names(expr)
        assert used, f"no metric in {expr!r}"
        assert used <= exported, f"{expr!r} names {sorted(used - exported)}, not exported"


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH (Debian package prometheus); rules parsed above")
    r = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert f"SUCCESS: {n} rules found" in r.stdout
