"""Gates: what a stage's devices reported, judged against the policy.

Install gates (as soon as the stage's devices have settled, or failed past the
budget): install failure rate, self-test. Quality gates (after the bake, from the
devices' shadow reports, summed over the stage): latency regression of the
candidate against the model each device serves (median over devices of
``candidate p50 / active p50 - 1``), the candidate's memory on the worst device,
argmax agreement with the active model, and accuracy on labelled samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgefleet.cloud.rollouts.model import DevicePhase, GateResult, RolloutDevice
from edgefleet.cloud.rollouts.policy import Policy

SELF_TEST_REASON = "self_test_failed"


def failure_budget(policy: Policy, devices: int) -> int:
    """How many devices of a stage may fail to install before its failure-rate gate fails."""
    return math.floor(policy.max_failure_rate * devices + 1e-9)


def install_gates(policy: Policy, devices: Sequence[RolloutDevice]) -> list[GateResult]:
    n = max(1, len(devices))
    failed = [d for d in devices if d.phase == DevicePhase.FAILED]
    self_test = [d for d in failed if d.reason == SELF_TEST_REASON]
    rate = len(failed) / n
    reasons: dict[str, int] = {}
    for d in failed:
        reasons[d.reason or "unknown"] = reasons.get(d.reason or "unknown", 0) + 1
    why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    return [
        GateResult(
            "failure_rate",
            len(failed) <= failure_budget(policy, len(devices)),
            rate,
            policy.max_failure_rate,
            f"{len(failed)} of {len(devices)} failed" + (f" ({why})" if why else ""),
        ),
        GateResult(
            "self_test",
            not self_test,
            float(len(self_test)),
            0.0,
            f"{len(self_test)} device(s) failed the self-test"
            + (f", e.g. {self_test[0].device_id}: {self_test[0].detail}" if self_test else ""),
        ),
    ]


@dataclass(frozen=True)
class Quality:
    """Quality gate results, and whether there were enough samples to judge."""

    gates: list[GateResult]
    enough: bool
    samples: int


def _total(reports: Sequence[Mapping[str, float]], key: str) -> float:
    return float(sum(r.get(key, 0.0) for r in reports))


def quality_gates(policy: Policy, devices: Sequence[RolloutDevice]) -> Quality:
    reports = [d.shadow for d in devices if d.phase == DevicePhase.SHADOW and d.shadow]
    samples = int(_total(reports, "samples"))
    gates: list[GateResult] = []
    if not policy.quality_gates:
        return Quality(gates, True, samples)
    need = policy.min_samples
    if samples < need:
        gate = GateResult(
            "samples",
            False,
            float(samples),
            float(need),
            f"{samples} shadow samples from {len(reports)} device(s); the quality gates need "
            f"{need} (is there live traffic on these devices?)",
        )
        return Quality([gate], False, samples)
    enough = True
    if policy.max_latency_regression is not None:
        ratios = [
            r["candidate_p50_us"] / r["active_p50_us"] - 1
            for r in reports
            if r.get("samples", 0) > 0 and r.get("active_p50_us", 0) > 0
        ]
        value = statistics.median(ratios) if ratios else 0.0
        gates.append(
            GateResult(
                "latency",
                value <= policy.max_latency_regression,
                value,
                policy.max_latency_regression,
                f"median p50 change {value:+.0%} over {len(ratios)} device(s)",
            )
        )
    if policy.max_memory_mb is not None:
        worst = max((r.get("candidate_memory_mb", 0.0) for r in reports), default=0.0)
        gates.append(
            GateResult(
                "memory",
                worst <= policy.max_memory_mb,
                worst,
                policy.max_memory_mb,
                f"candidate uses up to {worst:.1f} MB",
            )
        )
    if policy.min_agreement is not None:
        value = _total(reports, "agreed") / samples
        gates.append(
            GateResult(
                "agreement",
                value >= policy.min_agreement,
                value,
                policy.min_agreement,
                f"{int(_total(reports, 'agreed'))} of {samples} samples agree",
            )
        )
    if policy.min_accuracy is not None:
        labelled = int(_total(reports, "labelled"))
        if labelled < need:
            enough = False
            gates.append(
                GateResult(
                    "accuracy",
                    False,
                    float(labelled),
                    float(need),
                    f"{labelled} labelled samples; the accuracy gate needs {need}",
                )
            )
        else:
            value = _total(reports, "candidate_correct") / labelled
            before = _total(reports, "active_correct") / labelled
            gates.append(
                GateResult(
                    "accuracy",
                    value >= policy.min_accuracy,
                    value,
                    policy.min_accuracy,
                    f"{value:.1%} on {labelled} labelled samples (active model {before:.1%})",
                )
            )
    return Quality(gates, enough, samples)
