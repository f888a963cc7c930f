"""RolloutStore against SQLite and PostgreSQL: rollouts, device rows, issuing desired states."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.devices.values import ServedModel
from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, RolloutStore, Stage
from edgefleet.cloud.rollouts.model import RolloutState
from edgefleet.protos.errors import AlreadyExists, Conflict, NotFound


@pytest.fixture
def stores(registry_url: str) -> Iterator[tuple[RolloutStore, DeviceStore]]:
    rollouts, devices = RolloutStore(registry_url), DeviceStore(registry_url)
    yield rollouts, devices
    rollouts.close()
    devices.close()


def _rollout(rid: str = "r1", state: RolloutState = RolloutState.PENDING) -> Rollout:
    return Rollout(
        rollout_id=rid,
        ref="digits:2",
        model="digits",
        version=2,
        selector="group=lab",
        policy=Policy(canary=0.5, waves=(1.0,), min_agreement=0.9),
        state=state,
        stages=(Stage("canary", 0.5, 1), Stage("wave 1", 1.0, 1)),
        skipped={"d9": "no variant fits"},
    )


def _devices(rid: str = "r1") -> list[RolloutDevice]:
    prev = ServedModel("digits", 1, "fp32", "a" * 64)
    return [
        RolloutDevice(rid, "d1", 0, "fp32", "b" * 64, prev),
        RolloutDevice(rid, "d2", 1, "fp32", "b" * 64, None),
    ]


def test_create_read_and_list(stores: tuple[RolloutStore, DeviceStore]) -> None:
    rollouts, _ = stores
    r = rollouts.create(_rollout(), _devices())
    assert r.created_at > 0 and r.policy == _rollout().policy
    got = rollouts.get("r1")
    assert got.stages == _rollout().stages and got.skipped == {"d9": "no variant fits"}
    devs = rollouts.devices("r1")
    assert [(d.device_id, d.stage, d.phase) for d in devs] == [
        ("d1", 0, "pending"),
        ("d2", 1, "pending"),
    ]
    assert devs[0].previous == _devices()[0].previous and devs[1].previous is None
    assert [d.device_id for d in rollouts.devices("r1", stages=[1])] == ["d2"]
    with pytest.raises(AlreadyExists, match="rollout 'r1' exists"):
        rollouts.create(_rollout(), [])
    with pytest.raises(NotFound, match="rollout 'nope' not found; 'fleet rollouts ls'"):
        rollouts.get("nope")
    rollouts.create(_rollout("r2", state=RolloutState.PENDING), [])
    assert [r.rollout_id for r in rollouts.find()] == ["r2", "r1"]


def test_state_changes_follow_the_table(stores: tuple[RolloutStore, DeviceStore]) -> None:
    rollouts, _ = stores
    r = rollouts.create(_rollout(), _devices())
    st = r.stages[0].with_changes(state="baking", bake_started_at=123.5)
    r = rollouts.save(r.with_stage(0, st).with_changes(state="canary"))
    assert rollouts.get("r1").stages[0].bake_started_at == 123.5
    with pytest.raises(Conflict, match="cannot go to rolled_back"):
        rollouts.save(r.with_changes(state="rolled_back"))
    with pytest.raises(Conflict, match="is canary now, not paused"):
        rollouts.save(r.with_changes(state="rolling"), expect_state="paused")
    r = rollouts.save(r.with_changes(state="done", finished_at=1_700_000_000.0))
    assert r.final and r.finished_at == 1_700_000_000.0
    assert rollouts.find(active_only=True) == []


def test_issue_is_once_per_action_and_one_transaction(
    stores: tuple[RolloutStore, DeviceStore],
) -> None:
    rollouts, devices = stores
    for d in ("d1", "d2"):
        devices.enroll(d)
    devices.next_generation("d1")  # d1 had a deploy before: generation 1
    rollouts.create(_rollout(), _devices())
    signed: list[tuple[str, int]] = []

    def sign(device: str, gen: int) -> bytes:
        signed.append((device, gen))
        return f"{device}@{gen}".encode()

    first = rollouts.issue("r1", ["d1", "d2"], "shadow", sign, phase="shadow")
    assert first == {"d1": (2, b"d1@2"), "d2": (1, b"d2@1")}
    again = rollouts.issue("r1", ["d1", "d2"], "shadow", sign, phase="shadow")
    assert again == first and len(signed) == 2  # nothing new signed, same generations
    assert devices.desired("d1") == b"d1@2" and devices.get("d1").rollout_id == "r1"
    rows = {d.device_id: d for d in rollouts.devices("r1")}
    assert (rows["d1"].action, rows["d1"].generation, rows["d1"].phase) == ("shadow", 2, "shadow")
    act = rollouts.issue("r1", ["d1"], "activate", sign, phase="active")
    assert act == {"d1": (3, b"d1@3")}
    assert devices.get("d1").desired_generation == 3
    with pytest.raises(NotFound, match="'d7' is not part of rollout r1"):
        rollouts.issue("r1", ["d1", "d7"], "rollback", sign, phase="rolled_back")
    assert devices.get("d1").desired_generation == 3  # refused as a whole


def test_device_rows_take_reported_state_and_shadow_results(
    stores: tuple[RolloutStore, DeviceStore],
) -> None:
    rollouts, _ = stores
    rollouts.create(_rollout(), _devices())
    rollouts.update_devices(
        "r1",
        {
            "d1": {"state": "shadowing", "reason": "ok", "last_seen": 1_700_000_000.25},
            "d2": {"phase": "failed", "state": "failed", "reason": "self_test_failed"},
        },
    )
    rollouts.update_devices("r1", {"d1": {"shadow": {"samples": 12.0, "agreed": 11.0}}})
    rows = {d.device_id: d for d in rollouts.devices("r1")}
    assert rows["d1"].state == "shadowing" and rows["d1"].last_seen == pytest.approx(
        1_700_000_000.25
    )
    assert rows["d1"].shadow == {"samples": 12.0, "agreed": 11.0}
    assert (rows["d2"].phase, rows["d2"].reason) == ("failed", "self_test_failed")
    with pytest.raises(ValueError, match="cannot be updated"):
        rollouts.update_devices("r1", {"d1": {"generation": 9}})
