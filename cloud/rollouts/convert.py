"""Rollout values <-> fleet_pb2 messages, in both directions, for the server and the client."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from edgefleet.cloud.rollouts.model import GateResult, Rollout, RolloutDevice, Stage
from edgefleet.cloud.rollouts.policy import Policy
from edgefleet.protos.fleet.v1 import device_pb2, fleet_pb2

_OPTIONAL = ("max_latency_regression", "max_memory_mb", "min_agreement", "min_accuracy")


def _ms(ts: float) -> int:
    return int(ts * 1000) if ts else 0


def _s(ms: int) -> float:
    return ms / 1000 if ms else 0.0


def policy_to_pb(p: Policy) -> fleet_pb2.RolloutPolicy:
    msg = fleet_pb2.RolloutPolicy(
        canary=p.canary,
        waves=list(p.waves),
        bake_s=p.bake_s,
        max_failure_rate=p.max_failure_rate,
        on_failure=p.on_failure,
        min_samples=p.min_samples,
        stage_timeout_s=p.stage_timeout_s,
        sample_rate=p.sample_rate,
    )
    for name in _OPTIONAL:
        value = getattr(p, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def policy_from_pb(m: fleet_pb2.RolloutPolicy) -> Policy:
    """Validated like the CLI's flags (InvalidArgument names the field)."""
    kw: dict[str, Any] = {
        "canary": m.canary,
        "waves": tuple(m.waves),
        "bake_s": m.bake_s,
        "max_failure_rate": m.max_failure_rate,
        "on_failure": m.on_failure or "rollback",
        "min_samples": m.min_samples or 20,
        "stage_timeout_s": m.stage_timeout_s or 300.0,
        "sample_rate": m.sample_rate or 1.0,
    }
    for name in _OPTIONAL:
        if m.HasField(name):  # type: ignore[arg-type]
            kw[name] = getattr(m, name)
    return Policy(**kw)


def _gate_to_pb(x: GateResult) -> fleet_pb2.GateResult:
    return fleet_pb2.GateResult(
        name=x.name, ok=x.ok, value=x.value, threshold=x.threshold, detail=x.detail
    )


def _stage_to_pb(s: Stage, eta: float) -> fleet_pb2.StageInfo:
    return fleet_pb2.StageInfo(
        name=s.name,
        fraction=s.fraction,
        devices=s.devices,
        state=s.state,
        by_state=dict(s.by_state),
        started_ms=_ms(s.started_at),
        bake_started_ms=_ms(s.bake_started_at),
        finished_ms=_ms(s.finished_at),
        eta_ms=_ms(eta),
        gates=[_gate_to_pb(x) for x in s.gates],
        samples=s.samples,
    )


def _device_to_pb(d: RolloutDevice, now: float) -> fleet_pb2.RolloutDeviceInfo:
    msg = fleet_pb2.RolloutDeviceInfo(
        device_id=d.device_id,
        stage=d.stage,
        variant=d.variant,
        phase=d.phase,
        state=d.state,
        reason=d.reason,
        detail=d.detail,
        generation=d.generation,
        last_seen_ms=_ms(d.last_seen),
        staleness_s=d.staleness(now) if d.last_seen else -1.0,
        shadow=dict(d.shadow),
    )
    if d.previous:
        p = d.previous
        msg.previous.CopyFrom(
            device_pb2.ModelRef(
                model=str(p.get("model", "")),
                version=int(p.get("version", 0)),
                variant=str(p.get("variant", "")),
                sha256=str(p.get("sha256", "")),
            )
        )
    return msg


def rollout_to_pb(
    r: Rollout, devices: Sequence[RolloutDevice] = (), *, now: float | None = None
) -> fleet_pb2.RolloutInfo:
    now = time.time() if now is None else now
    etas = r.etas(now)
    return fleet_pb2.RolloutInfo(
        rollout_id=r.rollout_id,
        ref=r.ref,
        selector=r.selector,
        policy=policy_to_pb(r.policy),
        state=r.state,
        reason=r.reason,
        stage=r.stage,
        stages=[_stage_to_pb(s, eta) for s, eta in zip(r.stages, etas, strict=True)],
        devices=[_device_to_pb(d, now) for d in devices],
        created_ms=_ms(r.created_at),
        updated_ms=_ms(r.updated_at),
        finished_ms=_ms(r.finished_at),
        skipped=len(r.skipped),
        dry_run=r.dry_run,
        skipped_devices=dict(r.skipped),
    )


def rollout_from_pb(m: fleet_pb2.RolloutInfo) -> tuple[Rollout, list[RolloutDevice]]:
    r = Rollout(
        rollout_id=m.rollout_id,
        ref=m.ref,
        model=m.ref.split(":")[0],
        version=int(m.ref.split(":")[1]) if ":" in m.ref else 0,
        selector=m.selector,
        policy=policy_from_pb(m.policy),
        state=m.state,
        stages=tuple(
            Stage(
                name=s.name,
                fraction=s.fraction,
                devices=s.devices,
                state=s.state,
                started_at=_s(s.started_ms),
                bake_started_at=_s(s.bake_started_ms),
                finished_at=_s(s.finished_ms),
                gates=tuple(
                    GateResult(x.name, x.ok, x.value, x.threshold, x.detail) for x in s.gates
                ),
                samples=s.samples,
                by_state=dict(s.by_state),
            )
            for s in m.stages
        ),
        stage=m.stage,
        reason=m.reason,
        created_at=_s(m.created_ms),
        updated_at=_s(m.updated_ms),
        finished_at=_s(m.finished_ms),
        skipped=dict(m.skipped_devices),
        dry_run=m.dry_run,
    )
    devices = [
        RolloutDevice(
            rollout_id=m.rollout_id,
            device_id=d.device_id,
            stage=d.stage,
            variant=d.variant,
            sha256="",
            previous=(
                {
                    "model": d.previous.model,
                    "version": d.previous.version,
                    "variant": d.previous.variant,
                    "sha256": d.previous.sha256,
                }
                if d.previous.model
                else None
            ),
            phase=d.phase,
            generation=d.generation,
            state=d.state,
            reason=d.reason,
            detail=d.detail,
            last_seen=_s(d.last_seen_ms),
            shadow=dict(d.shadow),
        )
        for d in m.devices
    ]
    return r, devices
