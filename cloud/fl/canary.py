"""`--then-deploy canary=10%[,bake=60s]`: a staged rollout of the new version.

The rollout engine (`cloud.rollouts`) does the work: the candidate goes to a
canary slice of the selected devices as a shadow, its install and quality gates
are checked, it bakes, it is activated, and the waves follow (the default
policy's, 25%/50%/100%) unless a gate stops it. A federated run waits for the
canary stage to settle, records the rollout, and leaves the waves to the
controller (`fleet rollouts watch ID`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgefleet.cloud.devices import Selector
from edgefleet.protos.errors import InvalidArgument

if TYPE_CHECKING:
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.cloud.rollouts import Policy
    from edgefleet.cloud.rollouts.controller import RolloutController

ACCEPTED = "canary=PERCENT%[,bake=DURATION], e.g. canary=10% or canary=10%,bake=30s"


@dataclass(frozen=True)
class CanaryPlan:
    fraction: float
    bake_s: float | None = None  # None: the rollout policy's default

    @classmethod
    def parse(cls, text: str) -> CanaryPlan:
        from edgefleet.cloud.rollouts.policy import parse_duration, parse_fraction

        fraction: float | None = None
        bake: float | None = None
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if key == "canary" and sep:
                fraction = parse_fraction("--then-deploy canary", value, allow_one=False)
            elif key == "bake" and sep:
                bake = parse_duration("--then-deploy bake", value)
            else:
                raise InvalidArgument(
                    f"--then-deploy {text!r}: {part!r} not understood; {ACCEPTED}"
                )
        if fraction is None:
            raise InvalidArgument(f"--then-deploy {text!r}: no canary share; accepted: {ACCEPTED}")
        return cls(fraction, bake)

    def policy(self) -> Policy:
        from edgefleet.cloud.rollouts import Policy
        from edgefleet.cloud.rollouts.policy import DEFAULT_WAVES

        # the engine's waves, less those the canary already covers
        p = Policy(canary=self.fraction, waves=tuple(w for w in DEFAULT_WAVES if w > self.fraction))
        return p if self.bake_s is None else p.with_changes(bake_s=self.bake_s)

    def __str__(self) -> str:
        bake = f",bake={self.bake_s:g}s" if self.bake_s is not None else ""
        return f"canary={self.fraction * 100:g}%{bake}"


@dataclass(frozen=True)
class CanaryResult:
    rollout_id: str
    ref: str
    state: str  # the rollout's state when the canary settled (canary, rolling, paused, …)
    stage: str  # the canary stage's state (done, failed, rolled_back, …)
    targets: tuple[str, ...]  # the canary stage's devices
    states: dict[str, str] = field(default_factory=dict)  # device -> phase
    skipped: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.stage == "done"

    def to_dict(self) -> dict[str, object]:
        return {
            "rollout_id": self.rollout_id,
            "ref": self.ref,
            "state": self.state,
            "stage": self.stage,
            "targets": list(self.targets),
            "states": dict(self.states),
            "skipped": dict(self.skipped),
            "reason": self.reason,
            "ok": self.ok,
        }


async def start_canary(
    controller: RolloutController,
    ref: ModelRef,
    selector: Selector,
    plan: CanaryPlan,
    *,
    timeout: float,
) -> CanaryResult:
    """Create the staged rollout; return once its canary stage settled (or `timeout`)."""
    rollout, _devices = await controller.create(ref, selector, plan.policy())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = await asyncio.to_thread(controller.store.get, rollout.rollout_id)
        canary = r.stages[0]
        settled = canary.state in ("done", "failed", "rolled_back")
        if settled or r.final or r.state in ("paused", "rolling_back") or loop.time() >= deadline:
            break
        await controller.wait_changed(1.0)
    devs = [
        d for d in await asyncio.to_thread(controller.store.devices, r.rollout_id) if d.stage == 0
    ]
    return CanaryResult(
        rollout_id=r.rollout_id,
        ref=r.ref,
        state=r.state,
        stage=canary.state if settled else f"{canary.state} (timed out after {timeout:g}s)",
        targets=tuple(d.device_id for d in devs),
        states={d.device_id: d.phase for d in devs},
        skipped=dict(r.skipped),
        reason=r.reason,
    )
