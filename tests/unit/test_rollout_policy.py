"""Rollout policy parsing, stage planning, gates and the rollout state machine (pure logic)."""

from __future__ import annotations

import pytest

from edgefleet.cloud.devices import Selector
from edgefleet.cloud.rollouts import Policy, RolloutDevice, parse_policy
from edgefleet.cloud.rollouts.controller import plan_stages
from edgefleet.cloud.rollouts.gates import failure_budget, install_gates, quality_gates
from edgefleet.cloud.rollouts.model import check_transition
from edgefleet.cloud.rollouts.policy import parse_duration
from edgefleet.protos.errors import Conflict, InvalidArgument


def test_no_policy_flag_means_all_at_once() -> None:
    assert parse_policy() is None


def test_flags_as_operators_type_them() -> None:
    p = parse_policy(
        canary="10%",
        waves="25%,50%,100%",
        bake="90s",
        max_failure_rate="2%",
        max_latency_regression="20%",
        max_memory="64MB",
        min_agreement="0.95",
        min_accuracy="90%",
        on_failure="Pause",
        stage_timeout="5m",
    )
    assert p == Policy(
        canary=0.1,
        waves=(0.25, 0.5, 1.0),
        bake_s=90.0,
        max_failure_rate=0.02,
        max_latency_regression=0.2,
        max_memory_mb=64.0,
        min_agreement=0.95,
        min_accuracy=0.9,
        on_failure="pause",
        stage_timeout_s=300.0,
    )
    assert Policy.from_dict(p.to_dict()) == p
    assert parse_policy(canary="0.1") == parse_policy(canary="10%") == Policy()
    assert parse_policy(canary="100%") == Policy(canary=1.0, waves=())
    assert [parse_duration("--bake", t) for t in ("500ms", "2m", "1h", "7")] == [
        0.5,
        120.0,
        3600.0,
        7.0,
    ]


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"canary": "150%"}, r"--canary '150%': must be from more than 0% to 100%"),
        ({"canary": "0"}, r"--canary '0': must be from more than 0%"),
        ({"canary": "ten"}, r"--canary 'ten': not a percentage; e.g. 10% or 0.1"),
        ({"min_agreement": "95"}, r"--min-agreement '95': .* for percent write 95%"),
        ({"waves": "50%,25%,100%"}, r"--waves 50%,25%,100%: each wave .* must exceed"),
        ({"waves": "25%,50%"}, r"--waves 25%,50%: the last wave must be 100%"),
        ({"canary": "30%", "waves": "20%,100%"}, r"must exceed the one before \(canary 30%\)"),
        ({"canary": "100%", "waves": "100%"}, r"--canary 100% reaches every device at once"),
        ({"bake": "soon"}, r"--bake 'soon': not a duration; accepted: 90, 90s, 500ms, 5m, 1h"),
        ({"max_memory": "-3"}, r"--max-memory '-3': must be more than 0 MB"),
        ({"max_memory": "lots"}, r"--max-memory 'lots': not a number of MB"),
        ({"max_latency_regression": "fast"}, r"--max-latency-regression 'fast': not a percentage"),
        ({"on_failure": "explode"}, r"--on-failure 'explode': accepted: rollback, pause"),
        ({"min_samples": 0}, r"--min-samples 0: must be >= 1"),
        ({"sample_rate": "0%"}, r"--sample-rate '0%': must be from more than 0%"),
    ],
)
def test_bad_flags_name_the_flag_the_value_and_what_is_accepted(
    flags: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_policy(**flags)  # type: ignore[arg-type]


def test_stages_are_cumulative_stable_and_never_empty() -> None:
    ids = [f"d{i:02d}" for i in range(10)]
    stages, assign = plan_stages("r1", ids, Policy(canary=0.1, waves=(0.5, 1.0)))
    assert [(s.name, s.devices) for s in stages] == [("canary", 1), ("wave 1", 4), ("wave 2", 5)]
    assert sorted(assign) == ids and sorted(set(assign.values())) == [0, 1, 2]
    assert plan_stages("r1", ids, Policy(canary=0.1, waves=(0.5, 1.0)))[1] == assign
    assert plan_stages("r2", ids, Policy(canary=0.1, waves=(0.5, 1.0)))[1] != assign
    # three devices, default 10% / 25,50,100%: the 25% wave would be empty and is dropped
    small, _ = plan_stages("r1", ids[:3], Policy())
    assert [(s.name, s.devices) for s in small] == [("canary", 1), ("wave 2", 1), ("wave 3", 1)]
    one, _ = plan_stages("r1", ids, Policy.all_at_once())
    assert [(s.name, s.devices) for s in one] == [("all", 10)]


def _dev(i: int, **kw: object) -> RolloutDevice:
    return RolloutDevice("r", f"d{i}", 0, "fp32", "0" * 64, None, **kw)  # type: ignore[arg-type]


def test_install_gates_count_failures_and_self_tests() -> None:
    p = Policy(max_failure_rate=0.1)
    assert failure_budget(p, 10) == 1 and failure_budget(Policy(), 10) == 0
    devs = [_dev(i, phase="shadow", state="shadowing") for i in range(9)]
    one_failed = [*devs, _dev(9, phase="failed", reason="timeout")]
    rate, self_test = install_gates(p, one_failed)
    assert rate.ok and rate.value == pytest.approx(0.1) and self_test.ok
    broken = [*devs[:8], _dev(8, phase="failed", reason="self_test_failed", detail="Δ 3.2")]
    broken.append(_dev(9, phase="failed", reason="timeout"))
    rate, self_test = install_gates(p, broken)
    assert not rate.ok and "2 of 10 failed (self_test_failed 1, timeout 1)" in rate.detail
    assert not self_test.ok and "d8: Δ 3.2" in self_test.detail


def _shadow(
    samples: int, agreed: int, act_us: float, cand_us: float, **kw: float
) -> dict[str, float]:
    return {
        "samples": samples,
        "agreed": agreed,
        "active_p50_us": act_us,
        "candidate_p50_us": cand_us,
        **kw,
    }


def test_quality_gates_judge_summed_shadow_reports() -> None:
    p = Policy(
        max_latency_regression=0.2,
        min_agreement=0.9,
        min_accuracy=0.8,
        max_memory_mb=10,
        min_samples=10,
    )
    few = [_dev(0, phase="shadow", shadow=_shadow(4, 4, 100, 100))]
    q = quality_gates(p, few)
    assert not q.enough and q.gates[0].name == "samples" and "need 10" in q.gates[0].detail
    devs = [
        _dev(
            0,
            phase="shadow",
            shadow=_shadow(
                50,
                45,
                100,
                110,
                labelled=50,
                candidate_correct=40,
                active_correct=49,
                candidate_memory_mb=3,
            ),
        ),
        _dev(
            1, phase="shadow", shadow=_shadow(50, 50, 100, 300, labelled=0, candidate_memory_mb=12)
        ),
        _dev(2, phase="shadow", shadow=_shadow(50, 50, 100, 120)),
        _dev(3, phase="failed", shadow=_shadow(1000, 0, 1, 1000)),  # not shadowing: not counted
    ]
    q = quality_gates(p, devs)
    got = {g.name: g for g in q.gates}
    assert q.enough and q.samples == 150
    assert (
        got["latency"].value == pytest.approx(0.2) and got["latency"].ok
    )  # median of 10%, 200%, 20%
    assert got["agreement"].value == pytest.approx(145 / 150) and got["agreement"].ok
    assert got["accuracy"].value == pytest.approx(0.8) and got["accuracy"].ok
    assert "active model 98.0%" in got["accuracy"].detail
    assert not got["memory"].ok and got["memory"].value == 12


def test_rollout_moves_are_checked_against_one_table() -> None:
    check_transition("r", "canary", "rolling")
    check_transition("r", "done", "rolling_back")
    with pytest.raises(Conflict, match="rollout r is rolled_back: cannot go to canary"):
        check_transition("r", "rolled_back", "canary")
    with pytest.raises(Conflict, match="from done: rolling_back"):
        check_transition("r", "done", "paused")


def test_tag_expressions_and_group_lists() -> None:
    tags = {"site": "paris", "tier": "prod"}
    assert Selector.parse("tag=site=paris,tier=prod").matches("d", "g", tags)
    assert not Selector.parse("tag=site=paris,tier=dev").matches("d", "g", tags)
    assert Selector.parse("tag=site=lyon|tier=prod").matches("d", "g", tags)
    assert Selector.parse("tag=site!=lyon").matches("d", "g", tags)
    assert Selector.parse("tag=tier").matches("d", "g", tags)
    assert not Selector.parse("tag=gpu").matches("d", "g", tags)
    assert Selector.parse("group=a,b").matches("d", "b", {})
    assert str(Selector.parse("tag= site=paris , tier|x!=1")) == "tag=site=paris,tier|x!=1"
