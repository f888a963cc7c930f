"""`--then-deploy canary=10%`: put a new version on a canary slice of the selected devices.

Until the staged-rollout engine (`cloud/rollouts`) is on main this is one small
function over `Coordinator.deploy`: it picks ceil(fraction x N) of the online
devices the selector matches (at least one; sorted by id, so a rerun picks the
same ones), deploys to them and waits for them to settle. Swap the body for a
staged rollout when that lands; callers only see `CanaryPlan` and `CanaryResult`.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloud.devices import Selector
from protos.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from cloud.coordinator import Coordinator
    from cloud.registry import ModelRef

ACCEPTED = "canary=PERCENT%, e.g. canary=10%"


@dataclass(frozen=True)
class CanaryPlan:
    fraction: float

    @classmethod
    def parse(cls, text: str) -> CanaryPlan:
        key, sep, value = text.strip().partition("=")
        if key != "canary" or not sep:
            raise InvalidArgument(f"--then-deploy {text!r} not understood; accepted: {ACCEPTED}")
        v = value.strip()
        try:
            fraction = float(v[:-1]) / 100.0 if v.endswith("%") else float(v)
        except ValueError:
            raise InvalidArgument(f"--then-deploy {text!r}: {v!r} is not a number") from None
        if not 0.0 < fraction <= 1.0:
            raise InvalidArgument(f"--then-deploy {text!r}: the canary must be >0% and <=100%")
        return cls(fraction)

    def __str__(self) -> str:
        return f"canary={self.fraction * 100:g}%"


@dataclass(frozen=True)
class CanaryResult:
    rollout_id: str
    ref: str
    targets: tuple[str, ...]
    states: dict[str, str] = field(default_factory=dict)  # device -> final state
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.targets) and all(s == "active" for s in self.states.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "rollout_id": self.rollout_id,
            "ref": self.ref,
            "targets": list(self.targets),
            "states": dict(self.states),
            "skipped": dict(self.skipped),
            "ok": self.ok,
        }


async def deploy_canary(
    coordinator: Coordinator,
    ref: ModelRef,
    selector: Selector,
    plan: CanaryPlan,
    *,
    timeout: float,
) -> CanaryResult:
    online = await asyncio.to_thread(coordinator.devices.find, selector, online=True)
    if not online:
        raise NotFound(f"selector {selector} matches no online device to put a canary on")
    n = max(1, math.ceil(plan.fraction * len(online)))
    chosen = tuple(sorted(d.device_id for d in online)[:n])
    outcome = await coordinator.deploy(ref, Selector("device", devices=chosen))
    devs = await coordinator.wait_settled(outcome, timeout=timeout)
    states = {t.device_id: devs[t.device_id].state for t in outcome.targets if t.device_id in devs}
    return CanaryResult(
        outcome.rollout_id,
        outcome.ref,
        tuple(t.device_id for t in outcome.targets),
        {d: states.get(d, "timeout") for d in (t.device_id for t in outcome.targets)},
        dict(outcome.skipped),
    )
