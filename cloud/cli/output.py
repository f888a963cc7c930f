"""CLI output: data to stdout (tables or --json), progress and errors to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from edgefleet.cloud.registry import ModelSummary, ModelVersion

if TYPE_CHECKING:
    from edgefleet.cloud.client import FleetStatus
    from edgefleet.cloud.devices import Device
    from edgefleet.cloud.devices.values import ServedModel
    from edgefleet.cloud.drift import Alert, DriftRow

# piped output gets a wide fixed width so tables never wrap mid-cell
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def iso_utc(when: datetime | float | None) -> str | None:
    """The one time format of every --json output: ISO 8601 in UTC, e.g.
    2026-11-29T05:28:27.123Z. Takes a datetime (naive ones are UTC) or epoch seconds;
    None or 0 (never) gives None."""
    if when is None or (not isinstance(when, datetime) and not when):
        return None
    if isinstance(when, datetime):
        dt = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    else:
        dt = datetime.fromtimestamp(float(when), timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_default, sort_keys=False) + "\n")


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return iso_utc(o)
    if isinstance(o, bytes):
        return o.hex()
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    raise TypeError(type(o).__name__)


def fmt_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.2f} MB"


def fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a * 100:.2f}%"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} µs" if v < 1 else f"{v:.2f} ms"


def version_json(mv: ModelVersion) -> dict[str, Any]:
    return {
        "model": mv.model,
        "version": mv.version,
        "stage": mv.stage,
        "created_at": iso_utc(mv.created_at),
        "arch": mv.arch,
        "inputs": [t.to_dict() for t in mv.inputs],
        "outputs": [t.to_dict() for t in mv.outputs],
        "classes": list(mv.classes),
        "metrics": dict(mv.metrics),
        "lineage": mv.lineage.to_dict(),
        "checkpoint_sha256": mv.checkpoint_sha256,
        "variants": [
            {
                "name": v.name,
                "runtime": v.runtime,
                "sha256": v.sha256,
                "size": v.size,
                "accuracy": v.accuracy,
                "latency_ms": dict(v.latency_ms),
                "quantization": dict(v.quantization),
                "deployable": v.deployable,
                "reason": v.reason,
            }
            for v in mv.variants
        ],
    }


def print_models(models: Sequence[ModelSummary]) -> None:
    t = Table(title=None, box=None, pad_edge=False)
    for col in ("MODEL", "VERSIONS", "LATEST", "PRODUCTION", "CREATED"):
        t.add_column(col)
    for m in models:
        t.add_row(
            m.name,
            str(m.versions),
            str(m.latest_version or "-"),
            str(m.production_version or "-"),
            m.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(t)


def print_versions(versions: Sequence[ModelVersion]) -> None:
    t = Table(box=None, pad_edge=False)
    for col in ("VERSION", "STAGE", "ARCH", "SOURCE", "ACCURACY", "VARIANTS", "CREATED"):
        t.add_column(col)
    for mv in versions:
        t.add_row(
            mv.ref,
            mv.stage,
            mv.arch,
            mv.lineage.source,
            fmt_acc(mv.metrics.get("holdout_accuracy")),
            ",".join(v.name for v in mv.variants),
            mv.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    out.print(t)


def print_version(mv: ModelVersion) -> None:
    lin = mv.lineage
    out.print(f"[bold]{mv.ref}[/bold]  stage={mv.stage}  arch={mv.arch}  source={lin.source}")
    out.print(f"  inputs:   {', '.join(t.describe() for t in mv.inputs)}")
    out.print(f"  outputs:  {', '.join(t.describe() for t in mv.outputs)}")
    if mv.classes:
        out.print(
            f"  classes:  {len(mv.classes)} ({', '.join(mv.classes[:12])}{' …' if len(mv.classes) > 12 else ''})"
        )
    if lin.dataset_name:
        out.print(f"  dataset:  {lin.dataset_name} (sha256 {lin.dataset_digest[:12]}…)")
    if lin.parent_version:
        out.print(f"  parent:   {mv.model}:{lin.parent_version}")
    if lin.training_config:
        tc = lin.training_config
        out.print(
            "  training: "
            + " ".join(
                f"{k}={tc[k]}" for k in ("epochs", "seed", "batch_size", "lr", "device") if k in tc
            )
        )
    if lin.origin:
        out.print(f"  imported: {lin.origin.get('file')} ({lin.origin.get('format')})")
    out.print(f"  code:     {lin.code_version}   created {mv.created_at:%Y-%m-%d %H:%M:%S}")
    fp32 = next((v for v in mv.variants if v.name == "fp32"), None)
    t = Table(box=None, pad_edge=False, title_justify="left")
    for col, just in (
        ("VARIANT", "left"),
        ("RUNTIME", "left"),
        ("SIZE", "right"),
        ("x FP32", "right"),
        ("ACCURACY", "right"),
        ("Δ PTS", "right"),
        ("P50 B1", "right"),
        ("P50 B64", "right"),
        ("DEPLOYABLE", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for v in mv.variants:
        ratio = f"{v.size / fp32.size:.2f}" if fp32 else "-"
        delta = (
            f"{(v.accuracy - fp32.accuracy) * 100:+.2f}"
            if fp32 and v.accuracy is not None and fp32.accuracy is not None
            else "-"
        )
        t.add_row(
            v.name,
            v.runtime,
            fmt_size(v.size),
            ratio,
            fmt_acc(v.accuracy),
            delta,
            fmt_ms(v.latency_ms.get("b1")),
            fmt_ms(v.latency_ms.get("b64")),
            "yes" if v.deployable else "no (below)",
        )
    out.print()
    out.print(t)
    for v in mv.variants:
        if not v.deployable:
            out.print(f"  {v.name} not deployable: {v.reason}")


# -- devices ------------------------------------------------------------------------------


def _active_ref(active: ServedModel | None) -> str:
    return "-" if active is None else str(active)


def _fields(value: Any) -> dict[str, Any]:
    """A device value (capabilities, model, report) as JSON fields; {} for none."""
    return {} if value is None else asdict(value)


def device_json(d: Device) -> dict[str, Any]:
    """The same in local and --coordinator mode (only what FleetService carries)."""
    return {
        "device_id": d.device_id,
        "group": d.group,
        "tags": dict(d.tags),
        "online": d.online,
        "last_seen": iso_utc(d.last_seen),
        "state": d.state,
        "active": _fields(d.active),
        "capabilities": _fields(d.capabilities),
        "reported": _fields(d.reported),
        "desired_generation": d.desired_generation,
        "agent_version": d.agent_version,
    }


def print_devices(devices: Sequence[Device]) -> None:
    t = Table(box=None, pad_edge=False)
    cols = ("DEVICE", "GROUP", "TAGS", "ONLINE", "STATE", "ACTIVE", "ACCEL", "AGENT", "LAST SEEN")
    for col in cols:
        t.add_column(col)
    for d in devices:
        t.add_row(
            d.device_id,
            d.group or "-",
            ",".join(f"{k}={v}" for k, v in sorted(d.tags.items())) or "-",
            "yes" if d.online else "no",
            d.state,
            _active_ref(d.active),
            str(d.capabilities.accelerator) if d.capabilities else "-",
            d.agent_version or "-",
            d.last_seen.strftime("%Y-%m-%d %H:%M:%S") if d.last_seen else "never",
        )
    out.print(t)


def print_device(d: Device) -> None:
    caps = d.capabilities
    rep = d.reported
    out.print(
        f"[bold]{d.device_id}[/bold]  group={d.group or '-'}  online={'yes' if d.online else 'no'}"
    )
    out.print(f"  tags:       {', '.join(f'{k}={v}' for k, v in sorted(d.tags.items())) or '-'}")
    seen = d.last_seen.strftime("%Y-%m-%d %H:%M:%S") if d.last_seen else "never"
    out.print(f"  last seen:  {seen}")
    out.print(f"  active:     {_active_ref(d.active)}")
    out.print(f"  agent:      {d.agent_version or '-'}")
    line = f"  state:      {d.state}"
    if rep:
        line += f" (generation {rep.generation}, reason {rep.reason})"
    out.print(line)
    if rep and rep.detail:
        out.print(f"  detail:     {rep.detail}")
    if rep and rep.chunks_total:
        out.print(f"  chunks:     {rep.chunks_have}/{rep.chunks_total}")
    out.print(f"  desired:    generation {d.desired_generation}")
    if caps:
        out.print(f"  device:     {caps.machine or '?'}, {caps.accelerator}, {caps.memory_mb} MB")
        out.print(f"  runtimes:   {', '.join(caps.runtimes) or '-'}")
        out.print(f"  providers:  {', '.join(caps.providers) or '-'}")


def drift_json(r: DriftRow) -> dict[str, Any]:
    return {
        **asdict(r),
        "inputs": dict(r.inputs),
        "input_psi": r.input_psi,
        "worst_feature": r.worst_feature,
        "enough_samples": r.enough,
        "drifting": r.drifting,
    }


def print_drift(rows: Sequence[DriftRow]) -> None:
    if not rows:
        err.print("no drift sketches in the window (no live traffic on a version with a reference)")
        return
    t = Table(box=None, pad_edge=False)
    for col in ("SCOPE", "SUBJECT", "VERSION", "DEVICES", "ROWS", "PSI INPUTS", "PSI PREDS", ""):
        t.add_column(col)
    for r in rows:
        verdict = "few samples" if not r.enough else "DRIFT" if r.drifting else "ok"
        t.add_row(
            r.scope,
            r.subject,
            f"{r.model}:{r.version}",
            str(r.devices),
            str(r.rows),
            f"{r.input_psi:.3f} ({r.worst_feature})",
            f"{r.predictions:.3f}",
            verdict,
        )
    out.print(t)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def alert_json(a: Alert) -> dict[str, Any]:
    d = asdict(a)
    for key in ("first_seen", "last_seen", "resolved"):
        ms = d.pop(f"{key}_ms")
        d[key] = iso_utc(ms / 1000) if ms else None
    return d


def print_alerts(alerts: Sequence[Alert]) -> None:
    if not alerts:
        err.print("no drift alerts")
        return
    t = Table(box=None, pad_edge=False)
    for col in (
        "ID",
        "STATE",
        "SCOPE",
        "SUBJECT",
        "VERSION",
        "METRIC",
        "PSI",
        "MAX",
        "FIRST",
        "LAST",
    ):
        t.add_column(col)
    for a in alerts:
        t.add_row(
            str(a.id),
            a.state,
            a.scope,
            a.subject,
            f"{a.model}:{a.version}",
            a.metric,
            f"{a.psi:.3f}",
            f"{a.max_psi:.3f}",
            _when(a.first_seen_ms),
            _when(a.last_seen_ms),
        )
    out.print(t)


def status_json(s: FleetStatus) -> dict[str, Any]:
    return {
        "coordinator": s.coordinator or None,
        "coordinator_version": s.coordinator_version,
        "broker_url": s.broker_url or None,
        "devices": s.devices,
        "online": s.online,
        "by_state": dict(s.by_state),
        "replicas": [
            {
                "replica_id": r.replica_id,
                "address": r.address or None,
                "host": r.host,
                "pid": r.pid,
                "last_heartbeat_s": round(r.heartbeat_age_s, 3),
                "leader": r.leader,
                "token": r.token or None,
            }
            for r in s.replicas
        ],
        "leader": next((r.replica_id for r in s.replicas if r.leader), None),
    }


def print_status(s: FleetStatus) -> None:
    out.print(f"coordinator  {s.coordinator or 'not running'} (edgefleet {s.coordinator_version})")
    out.print(f"broker       {s.broker_url or '-'}")
    out.print(f"devices      {s.devices} enrolled, {s.online} online")
    for state, n in sorted(s.by_state.items()):
        out.print(f"  {state:<12} {n}")
    if s.replicas:
        leader = next((r for r in s.replicas if r.leader), None)
        who = f"{leader.replica_id} (token {leader.token})" if leader else "none (election)"
        out.print(f"replicas     {len(s.replicas)}, leader {who}")
        for r in s.replicas:
            role = "leader" if r.leader else "follower"
            out.print(
                f"  {r.replica_id:<24} {r.address or '-':<22} {role:<9} "
                f"heartbeat {r.heartbeat_age_s:.1f}s ago  pid {r.pid} on {r.host}"
            )
