"""How rollouts look on the terminal: tables for ls/show, JSON, and the live watch view."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from edgefleet.cloud.cli.output import iso_utc
from edgefleet.cloud.rollouts.model import FINAL, Rollout, RolloutDevice, Stage
from edgefleet.cloud.rollouts.policy import format_duration

#: exit codes of `fleet rollouts watch` (and a watched `fleet deploy`)
EXIT_DONE = 0
EXIT_FAILED = 1  # rolled back or aborted
EXIT_PAUSED = 3

_STATE_STYLE = {
    "done": "green",
    "rolled_back": "red",
    "aborted": "red",
    "paused": "yellow",
    "rolling_back": "red",
    "failed": "red",
}


def outcome_code(r: Rollout) -> int:
    if r.state == "done":
        return EXIT_DONE
    if r.state == "paused":
        return EXIT_PAUSED
    return EXIT_FAILED


def _when(ts: float) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "-"


def rollout_json(r: Rollout, devices: Sequence[RolloutDevice] = ()) -> dict[str, Any]:
    now = time.time()
    etas = r.etas(now)
    return {
        "rollout_id": r.rollout_id,
        "ref": r.ref,
        "selector": r.selector,
        "state": r.state,
        "reason": r.reason,
        "stage": r.stage,
        "dry_run": r.dry_run,
        "policy": r.policy.to_dict(),
        "created_at": iso_utc(r.created_at),
        "finished_at": iso_utc(r.finished_at),
        "stages": [
            {
                **s.to_dict(),
                **{k: iso_utc(v) for k, v in s.to_dict().items() if k.endswith("_at")},
                "eta": iso_utc(eta),
            }
            for s, eta in zip(r.stages, etas, strict=True)
        ],
        "skipped": dict(r.skipped),
        "devices": [
            {
                "device_id": d.device_id,
                "stage": d.stage,
                "variant": d.variant,
                "phase": d.phase,
                "state": d.state,
                "reason": d.reason,
                "detail": d.detail,
                "generation": d.generation,
                "previous": asdict(d.previous) if d.previous else None,
                "last_seen": iso_utc(d.last_seen),
                "staleness_s": round(d.staleness(now), 1) if d.last_seen else None,
                "shadow": dict(d.shadow),
            }
            for d in devices
        ],
    }


def _state(text: str) -> Text:
    return Text(text, style=_STATE_STYLE.get(text, ""))


def print_rollouts(console: Any, rollouts: Sequence[Rollout]) -> None:
    t = Table(box=None, pad_edge=False)
    for col in ("ID", "REF", "TARGET", "STATE", "STAGE", "DEVICES", "CREATED", "REASON"):
        t.add_column(col)
    for r in rollouts:
        t.add_row(
            r.rollout_id,
            r.ref,
            r.selector,
            _state(r.state),
            f"{r.current.name} ({r.current.state})",
            str(sum(s.devices for s in r.stages)),
            _when(r.created_at),
            r.reason,
        )
    console.print(t)


def _gates(s: Stage) -> Text:
    out = Text()
    for g in s.gates:
        if out:
            out.append("  ")
        out.append(("✓ " if g.ok else "✗ ") + g.name, style="green" if g.ok else "bold red")
        if g.name in ("agreement", "accuracy", "failure_rate"):
            out.append(f" {g.value:.1%}")
        elif g.name == "latency":
            out.append(f" {g.value:+.0%}")
        elif g.name == "memory":
            out.append(f" {g.value:.1f}MB")
    return out


def stages_table(r: Rollout, now: float) -> Table:
    etas = r.etas(now)
    t = Table(box=None, pad_edge=False)
    for col in ("STAGE", "DEVICES", "STATE", "PROGRESS", "BY STATE", "GATES", "ETA"):
        t.add_column(col)
    for i, (s, eta) in enumerate(zip(r.stages, etas, strict=True)):
        settled = sum(
            v
            for k, v in s.by_state.items()
            if k in ("shadowing", "active", "failed", "rolled_back")
        )
        done = s.devices if s.state == "done" else settled
        bar = _bar(done, s.devices, style=_STATE_STYLE.get(s.state, "cyan"))
        mark = "▶ " if i == r.stage and not r.final else "  "
        counts = " ".join(f"{k} {v}" for k, v in sorted(s.by_state.items()))
        extra = ""
        if s.state == "baking" and s.bake_started_at:
            left = max(0.0, r.policy.bake_s - (now - s.bake_started_at))
            extra = f" {format_duration(left)} left, {s.samples} samples"
        t.add_row(
            f"{mark}{s.name} ({s.fraction:.0%})",
            str(s.devices),
            Text(s.state + extra, style=_STATE_STYLE.get(s.state, "")),
            bar,
            Text(counts, style="dim"),
            _gates(s),
            _clock(eta)
            if eta and not s.finished_at
            else (_clock(s.finished_at) if s.finished_at else "-"),
        )
    return t


def _bar(done: int, total: int, *, style: str, width: int = 16) -> Text:
    filled = round(width * done / total) if total else 0
    return Text.assemble(
        ("█" * filled, style or "cyan"), ("░" * (width - filled), "dim"), f" {done}/{total}"
    )


def watch_view(r: Rollout) -> RenderableType:
    now = time.time()
    head = Text.assemble(
        ("rollout ", "bold"),
        (r.rollout_id, "bold"),
        f"  {r.ref} → {r.selector}  ",
        _state(r.state),
        f"  ({r.policy.describe()})",
    )
    parts: list[RenderableType] = [head, stages_table(r, now)]
    if r.reason:
        parts.append(Text(r.reason, style="red" if r.state != "done" else ""))
    return Group(*parts)


def print_rollout(console: Any, r: Rollout, devices: Sequence[RolloutDevice]) -> None:
    console.print(watch_view(r))
    if r.skipped:
        console.print(f"\nskipped {len(r.skipped)} device(s):")
        for dev, why in list(r.skipped.items())[:20]:
            console.print(f"  {dev}: {why}")
    if not devices:
        return
    now = time.time()
    t = Table(box=None, pad_edge=False, title=None)
    for col in (
        "DEVICE",
        "STAGE",
        "VARIANT",
        "PHASE",
        "STATE",
        "REASON",
        "PREVIOUS",
        "SEEN",
        "SHADOW",
    ):
        t.add_column(col)
    for d in devices:
        prev = d.previous
        shadow = ""
        if d.shadow.get("samples"):
            s = d.shadow
            shadow = f"{int(s['samples'])} samples, agree {s.get('agreed', 0) / s['samples']:.0%}"
            if s.get("active_p50_us"):
                shadow += f", p50 {s.get('candidate_p50_us', 0) / s['active_p50_us'] - 1:+.0%}"
        t.add_row(
            d.device_id,
            r.stages[d.stage].name if d.stage < len(r.stages) else str(d.stage),
            d.variant,
            _state(d.phase),
            d.state or "-",
            (d.reason + (f": {d.detail}" if d.detail and d.reason not in ("ok", "") else ""))
            or "-",
            str(prev) if prev else "-",
            f"{d.staleness(now):.0f}s ago" if d.last_seen else "never",
            shadow,
        )
    console.print(t)


def is_final(state: str) -> bool:
    return state in FINAL


def print_plain_deploy(console: Any, r: Rollout, devices: Sequence[RolloutDevice]) -> None:
    """Where each device of a plain deploy ended: DEVICE VARIANT STATE REASON."""
    t = Table(box=None, pad_edge=False)
    for col in ("DEVICE", "VARIANT", "STATE", "REASON"):
        t.add_column(col)
    for d in sorted(devices, key=lambda d: d.device_id):
        state = d.state or ("failed" if d.phase == "failed" else "waiting")
        reason = d.reason or "-"
        if d.detail and state != "active":
            reason = f"{reason}: {d.detail}"
        t.add_row(d.device_id, d.variant, state, reason)
    for dev, why in sorted(r.skipped.items()):
        t.add_row(dev, "-", "skipped", why)
    console.print(t)
