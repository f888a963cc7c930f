"""Template contexts: the values and charts each page shows, built from store values.

The live console (`app`) and the static reports (`report`) build the rollout and the
model version pages here, so a report attached to a ticket shows the same charts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from edgefleet.cloud.console import charts
from edgefleet.cloud.console.queries import Overview
from edgefleet.cloud.drift.alerts import Alert
from edgefleet.cloud.drift.monitor import DriftRow
from edgefleet.cloud.fl.store import FlRun
from edgefleet.cloud.registry import ModelVersion
from edgefleet.cloud.rollouts.model import Rollout, RolloutDevice


def when(ts: float | datetime | None) -> str:
    """UTC time of an epoch second or a datetime, '-' for none."""
    if ts is None or ts == 0:
        return "-"
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(float(ts), UTC)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- fleet overview --------------------------------------------------------------------


def overview_page(o: Overview) -> dict[str, Any]:
    a = o.activity
    return {
        "o": o,
        "charts": [
            charts.bars("by-version", "Devices by model version", o.by_version, xlabel="version"),
            charts.bars("by-variant", "Devices by variant", o.by_variant, xlabel="variant"),
            charts.bars("by-state", "Devices by update state", o.by_state, xlabel="state"),
            charts.over_time(
                "activity",
                "Devices reporting telemetry, per minute",
                a["minute"],
                {"devices": a["devices"]},
                ylabel="devices",
            ),
            charts.over_time(
                "predictions",
                "Predictions per minute",
                a["minute"],
                {"predictions": a["predictions"]},
                ylabel="predictions",
            ),
        ],
    }


# -- rollouts --------------------------------------------------------------------------


def rollout_counts(devices: Iterable[RolloutDevice]) -> list[tuple[int, str, int]]:
    """(stage, state, devices) from a rollout's device list (what the console counts in SQL)."""
    got: dict[tuple[int, str], int] = {}
    for d in devices:
        key = (d.stage, d.state or d.phase)
        got[key] = got.get(key, 0) + 1
    return sorted((st, s, n) for (st, s), n in got.items())


def rollout_page(
    r: Rollout,
    counts: Sequence[tuple[int, str, int]],
    *,
    devices: Sequence[RolloutDevice] = (),
    now: float | None = None,
) -> dict[str, Any]:
    """The rollout page; `devices` listed one by one (the static report: the console
    links each device's own page instead)."""
    now = time.time() if now is None else now
    names = [s.name for s in r.stages]
    states = sorted({s for _, s, _ in counts})
    per_state: dict[str, list[float | None]] = {s: [0.0] * len(names) for s in states}
    for stage, state, n in counts:
        if 0 <= stage < len(names):
            per_state[state][stage] = (per_state[state][stage] or 0.0) + n
    start = r.created_at or min((s.started_at for s in r.stages if s.started_at), default=now)
    end = r.finished_at or now
    span = max(end - start, 1e-3)
    timeline = []
    for s in r.stages:
        if not s.started_at:
            timeline.append({"stage": s, "left": 100.0, "width": 0.0, "bake": 0.0})
            continue
        stop = s.finished_at or end
        left = 100.0 * (s.started_at - start) / span
        width = max(100.0 * (stop - s.started_at) / span, 0.5)
        bake = 100.0 * (stop - s.bake_started_at) / span if s.bake_started_at and width > 0 else 0.0
        timeline.append({"stage": s, "left": left, "width": width, "bake": min(bake, width)})
    gate_charts = []
    for i, s in enumerate(r.stages):
        if not s.gates:
            continue
        gate_charts.append(
            charts.grouped_bars(
                f"gates-{i}",
                f"Stage {s.name}: gate value and threshold",
                [g.name for g in s.gates],
                {
                    "value": [g.value for g in s.gates],
                    "threshold": [g.threshold for g in s.gates],
                },
                xlabel="gate",
            )
        )
    return {
        "r": r,
        "counts": counts,
        "devices": list(devices),
        "timeline": timeline,
        "span": span,
        "start": start,
        "etas": r.etas(now),
        "charts": [
            charts.grouped_bars(
                "stage-states", "Devices per state, per stage", names, per_state, xlabel="stage"
            ),
            *gate_charts,
        ],
    }


# -- models ----------------------------------------------------------------------------


def version_page(
    mv: ModelVersion, latency: Mapping[str, tuple[list[float], list[int]]] | None = None
) -> dict[str, Any]:
    points = [
        (
            v.size / 1024.0,
            v.accuracy,
            f"{v.name}: {v.size / 1024:.1f} KiB, accuracy "
            + (f"{v.accuracy:.3f}" if v.accuracy is not None else "-")
            + ", latency b1 "
            + (f"{v.latency_ms['b1']:.3f} ms" if "b1" in v.latency_ms else "-"),
        )
        for v in mv.variants
    ]
    made = [
        charts.scatter(
            "variants",
            "Variants: size against accuracy (latency in the legend)",
            points,
            xlabel="size (KiB)",
            ylabel="accuracy",
            label="accuracy",
        ),
        charts.Chart(
            id="variant-latency",
            title="Measured latency per variant (ms, batch 1)",
            kind=charts.BAR,
            x=[float(i) for i in range(len(mv.variants))],
            xlabels=[v.name for v in mv.variants],
            series=[charts.Series("b1 ms", [v.latency_ms.get("b1") for v in mv.variants])],
            xlabel="variant",
        ),
    ]
    if latency:
        bounds = next(iter(latency.values()))[0]
        made.append(
            charts.histogram(
                "live-latency",
                "Live latency on devices, last 10 minutes, per variant",
                bounds,
                {v: c for v, (_b, c) in latency.items()},
            )
        )
    return {"mv": mv, "lineage": mv.lineage.to_dict(), "charts": made}


# -- drift -----------------------------------------------------------------------------


def drift_page(
    history: Sequence[tuple[float, Sequence[DriftRow]]],
    alerts: Sequence[Alert],
    *,
    threshold: float,
) -> dict[str, Any]:
    """`history`: (time, group rows scored over the window ending then), oldest first."""
    keys = sorted(
        {(r.subject, f"{r.model}:{r.version}") for _, rows in history for r in rows},
    )
    series: dict[str, list[float | None]] = {f"{g} ({m})": [] for g, m in keys}
    for _, rows in history:
        have = {(r.subject, f"{r.model}:{r.version}"): r for r in rows}
        for g, m in keys:
            row = have.get((g, m))
            series[f"{g} ({m})"].append(
                round(max(row.input_psi, row.predictions), 4) if row and row.enough else None
            )
    times = [t for t, _ in history]
    series["threshold"] = [threshold] * len(times)
    latest = list(history[-1][1]) if history else []
    return {
        "alerts": alerts,
        "latest": latest,
        "threshold": threshold,
        "charts": [
            charts.over_time("psi", "PSI per group over time", times, series, ylabel="PSI"),
        ],
    }


# -- federated runs --------------------------------------------------------------------


def _numbers(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            out[prefix + k] = float(v)
        elif isinstance(v, Mapping):
            out.update(_numbers(v, f"{prefix}{k}."))
    return out


def fl_run_page(run: FlRun) -> dict[str, Any]:
    rounds = [h for h in run.history if "round" in h]
    metrics: dict[str, list[float | None]] = {}
    # a round event (models/fl/grid.py): round, participants, sampled, errors, train and
    # evaluate metrics (aggregated, weighted by examples)
    per_round = [
        _numbers({"train": h.get("train") or {}, "evaluate": h.get("evaluate") or {}})
        for h in rounds
    ]
    for name in sorted({k for m in per_round for k in m}):
        metrics[name] = [m.get(name) for m in per_round]
    xs = [float(h["round"]) for h in rounds]
    made = []
    if metrics:
        made.append(
            charts.Chart(
                id="rounds",
                title="Per-round metrics",
                kind=charts.LINE,
                x=xs,
                series=[charts.Series(k, v) for k, v in metrics.items()],
                xlabel="round",
            )
        )
    made.append(
        charts.Chart(
            id="participants",
            title="Participants per round",
            kind=charts.BAR,
            x=xs,
            series=[
                charts.Series("devices", [float(len(h.get("participants", []))) for h in rounds])
            ],
            xlabel="round",
        )
    )
    return {"run": run, "rounds": rounds, "metrics": metrics, "charts": made}
