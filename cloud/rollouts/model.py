"""Rollouts as values: the rollout, its stages, its devices, gate results; the state machine.

A rollout moves PENDING → CANARY → ROLLING → DONE, or to ROLLED_BACK through
ROLLING_BACK; it can be PAUSED from CANARY or ROLLING, and ABORTED while not
final. Every allowed move is in `TRANSITIONS`; any other raises `Conflict`.

A stage (the canary, then each wave) moves PENDING → INSTALLING (candidate sent
as a shadow) → BAKING (shadow evaluation) → ACTIVATING → DONE, or FAILED when a
gate fails. Per device, `phase` is what the rollout asked of it last and how far
it got: pending, shadow, active, failed, rolled_back, skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from edgefleet.cloud.devices.values import ServedModel, UpdateState
from edgefleet.cloud.rollouts.policy import Policy
from edgefleet.protos.errors import Conflict


class RolloutState(StrEnum):
    """Where a rollout is (its stored value is the lower-case name)."""

    PENDING = "pending"
    CANARY = "canary"
    ROLLING = "rolling"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    DONE = "done"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


FINAL = frozenset({RolloutState.DONE, RolloutState.ROLLED_BACK, RolloutState.ABORTED})
#: rollout states in which the controller moves stages forward
ADVANCING = frozenset({RolloutState.CANARY, RolloutState.ROLLING})

_R = RolloutState
TRANSITIONS: Mapping[RolloutState, frozenset[RolloutState]] = {
    _R.PENDING: frozenset({_R.CANARY, _R.ABORTED, _R.ROLLING_BACK}),
    _R.CANARY: frozenset({_R.ROLLING, _R.DONE, _R.PAUSED, _R.ROLLING_BACK, _R.ABORTED}),
    _R.ROLLING: frozenset({_R.DONE, _R.PAUSED, _R.ROLLING_BACK, _R.ABORTED}),
    _R.PAUSED: frozenset({_R.CANARY, _R.ROLLING, _R.ROLLING_BACK, _R.ABORTED}),
    _R.ROLLING_BACK: frozenset({_R.ROLLED_BACK}),
    _R.DONE: frozenset({_R.ROLLING_BACK}),
    _R.ABORTED: frozenset({_R.ROLLING_BACK}),
    _R.ROLLED_BACK: frozenset(),
}


class StageState(StrEnum):
    """Where one stage (the canary, a wave) is."""

    PENDING = "pending"
    INSTALLING = "installing"
    BAKING = "baking"
    ACTIVATING = "activating"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class DevicePhase(StrEnum):
    """What the rollout asked of one device last and how far it got."""

    PENDING = "pending"
    SHADOW = "shadow"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"


def check_transition(rollout_id: str, old: RolloutState, new: RolloutState) -> None:
    allowed_moves = TRANSITIONS.get(old, frozenset())
    if new not in allowed_moves:
        allowed = ", ".join(sorted(allowed_moves)) or "nothing (it is final)"
        raise Conflict(f"rollout {rollout_id} is {old}: cannot go to {new}; from {old}: {allowed}")


@dataclass(frozen=True)
class GateResult:
    name: str  # failure_rate | self_test | latency | memory | agreement | accuracy | samples
    ok: bool
    value: float
    threshold: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "value": self.value,
            "threshold": self.threshold,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        return cls(
            str(d["name"]),
            bool(d["ok"]),
            float(d["value"]),
            float(d["threshold"]),
            str(d.get("detail", "")),
        )


@dataclass(frozen=True)
class Stage:
    name: str
    fraction: float
    devices: int
    state: StageState = StageState.PENDING
    started_at: float = 0.0
    bake_started_at: float = 0.0
    activated_at: float = 0.0
    finished_at: float = 0.0
    gates: tuple[GateResult, ...] = ()
    samples: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)
    eta: float = 0.0  # estimated finish (epoch seconds) when last saved

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fraction": self.fraction,
            "devices": self.devices,
            "state": self.state,
            "started_at": self.started_at,
            "bake_started_at": self.bake_started_at,
            "activated_at": self.activated_at,
            "finished_at": self.finished_at,
            "gates": [g.to_dict() for g in self.gates],
            "samples": self.samples,
            "by_state": dict(self.by_state),
            "eta": self.eta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stage:
        return cls(
            name=str(d["name"]),
            fraction=float(d["fraction"]),
            devices=int(d["devices"]),
            state=StageState(d.get("state", StageState.PENDING)),
            started_at=float(d.get("started_at", 0.0)),
            bake_started_at=float(d.get("bake_started_at", 0.0)),
            activated_at=float(d.get("activated_at", 0.0)),
            finished_at=float(d.get("finished_at", 0.0)),
            gates=tuple(GateResult.from_dict(g) for g in d.get("gates", ())),
            samples=int(d.get("samples", 0)),
            by_state={str(k): int(v) for k, v in dict(d.get("by_state", {})).items()},
            eta=float(d.get("eta", 0.0)),
        )

    def with_changes(self, **changes: Any) -> Stage:
        return replace(self, **changes)

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.ok]


@dataclass(frozen=True)
class RolloutDevice:
    rollout_id: str
    device_id: str
    stage: int
    variant: str
    sha256: str
    previous: ServedModel | None  # what it served before
    phase: DevicePhase = DevicePhase.PENDING
    action: str = ""  # the desired action last issued: shadow | activate | rollback
    generation: int = 0
    state: UpdateState | None = None  # last reported update state (None: no report yet)
    reason: str = ""
    detail: str = ""
    last_seen: float = 0.0
    shadow: Mapping[str, float] = field(default_factory=dict)

    def staleness(self, now: float) -> float:
        return max(0.0, now - self.last_seen) if self.last_seen else float("inf")


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    ref: str
    model: str
    version: int
    selector: str
    policy: Policy
    state: RolloutState
    stages: tuple[Stage, ...]
    stage: int = 0
    reason: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float = 0.0
    skipped: Mapping[str, str] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def current(self) -> Stage:
        return self.stages[min(self.stage, len(self.stages) - 1)]

    def with_stage(self, index: int, stage: Stage) -> Rollout:
        stages = list(self.stages)
        stages[index] = stage
        return replace(self, stages=tuple(stages))

    def with_changes(self, **changes: Any) -> Rollout:
        return replace(self, **changes)

    def etas(self, now: float, *, install_s: float = 30.0, activate_s: float = 5.0) -> list[float]:
        """Estimated finish time per stage (epoch seconds; the real one once finished).

        Install and activation take what the last finished stage took, else the
        defaults; every stage bakes for the policy's bake time.
        """
        done = [
            s for s in self.stages if s.state == StageState.DONE and s.started_at and s.finished_at
        ]
        if done:
            last = done[-1]
            per = max(0.0, last.finished_at - last.started_at - self.policy.bake_s)
            install_s, activate_s = per * 0.8, per * 0.2
        per_stage = install_s + self.policy.bake_s + activate_s
        out: list[float] = []
        t = now
        for s in self.stages:
            if s.finished_at:
                out.append(s.finished_at)
                continue
            if self.final:
                out.append(0.0)
                continue
            if s.state == StageState.BAKING and s.bake_started_at:
                t = max(t, s.bake_started_at + self.policy.bake_s + activate_s)
            elif s.state == StageState.ACTIVATING:
                t = max(t, now + activate_s)
            elif s.state == StageState.INSTALLING and s.started_at:
                t = max(t, s.started_at + per_stage)
            else:
                t = t + per_stage
            out.append(t)
        return out
