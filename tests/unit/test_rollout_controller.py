"""The rollout controller's transitions, against an in-memory fleet (no broker, no agents).

The controller is the real one, over the real `RolloutStore` (SQLite in tmp_path,
with the device rows `RolloutStore.issue` allocates generations on); only the
coordinator's side is `tests.support.fake_fleet.FakeFleet`. Time is the controller's
injectable clock: bakes and timeouts pass without sleeping.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.cloud.db import Database
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, RolloutStore
from edgefleet.cloud.rollouts.controller import OFFLINE, RolloutController
from edgefleet.cloud.rollouts.fleet import RolloutFleet
from edgefleet.cloud.rollouts.model import DevicePhase, RolloutState, StageState
from edgefleet.protos.errors import Conflict
from tests.support.fake_fleet import GOOD_SHADOW, OK, Clock, FakeFleet

IDS = [f"dev-{i}" for i in range(8)]
#: canary 2 of 8, then 4, then all; agreement gate on shadow samples
GATED = Policy(
    canary=0.25,
    waves=(0.5, 1.0),
    bake_s=10.0,
    max_failure_rate=0.0,
    min_agreement=0.9,
    min_samples=20,
    stage_timeout_s=120.0,
)
BAD_SHADOW = {**GOOD_SHADOW, "agreed": 10.0}


@dataclass
class World:
    clock: Clock
    fleet: FakeFleet
    store: RolloutStore
    devices: DeviceStore

    def controller(self) -> RolloutController:
        return RolloutController(
            self.fleet, self.store, interval=1.0, min_gap=0.0, clock=self.clock
        )

    def rows(self, rollout_id: str) -> dict[str, RolloutDevice]:
        return {d.device_id: d for d in self.store.devices(rollout_id)}

    def get(self, rollout_id: str) -> Rollout:
        return self.store.get(rollout_id)


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database migrated once (migrations take a second); each test gets a copy."""
    path = tmp_path_factory.mktemp("db") / "fleet.db"
    Database(f"sqlite:///{path}").close()
    return path


@pytest.fixture
def world(tmp_path: Path, empty_db: Path) -> Iterator[World]:
    shutil.copy(empty_db, tmp_path / "fleet.db")
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    devices = DeviceStore(db)
    store = RolloutStore(db)
    clock = Clock(time.time())
    fleet = FakeFleet(clock, step_s=5.0)
    v1 = fleet.add_version("digits", 1)
    fleet.add_version("digits", 2)
    for d in IDS:
        devices.enroll(d, group="lab")
        fleet.add_device(d, serving=v1)
    try:
        yield World(clock, fleet, store, devices)
    finally:
        store.close()
        devices.close()
        db.close()


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def start(w: World, c: RolloutController, policy: Policy) -> str:
    r, _devs = await c.create(ModelRef("digits", 2), Selector("group", groups=("lab",)), policy)
    return r.rollout_id


async def drive(
    w: World,
    c: RolloutController,
    rid: str,
    until: Callable[[Rollout], bool],
    *,
    step_s: float = 5.0,
    max_ticks: int = 200,
) -> Rollout:
    """Tick (the clock moving `step_s` each time) until `until(rollout)`."""
    for _ in range(max_ticks):
        await c.tick()
        r = w.get(rid)
        if until(r):
            return r
        w.clock.advance(step_s)
    raise AssertionError(f"rollout {rid} stuck: {w.get(rid).state} {w.get(rid).current}")


def stage_devices(w: World, rid: str, stage: int) -> list[str]:
    return [d.device_id for d in w.store.devices(rid, stages=[stage])]


def test_fake_fleet_satisfies_the_protocol(world: World) -> None:
    fleet: RolloutFleet = world.fleet  # mypy checks the structure; this checks it at run time
    assert callable(fleet.find_devices)


def test_canary_shadow_then_gates_then_waves_then_done(world: World) -> None:
    w = world

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, GATED)
        canary = stage_devices(w, rid, 0)
        assert len(canary) == 2 and [s.devices for s in w.get(rid).stages] == [2, 2, 4]

        await c.tick()  # pending -> canary: the candidate goes to the canary as a shadow
        r = w.get(rid)
        assert (r.state, r.current.state) == (RolloutState.CANARY, StageState.INSTALLING)
        assert all([i.action for i in w.fleet.issued(d)] == ["shadow"] for d in canary)
        assert not any(w.fleet.issued(d) for d in IDS if d not in canary)

        await c.tick()  # every canary device shadows: install gates pass, the bake starts
        r = w.get(rid)
        assert r.current.state == StageState.BAKING
        assert [(x.name, x.ok) for x in r.current.gates] == [
            ("failure_rate", True),
            ("self_test", True),
        ]
        w.clock.advance(GATED.bake_s - 1)
        await c.tick()  # still baking: nothing activated before the bake is over
        assert w.get(rid).current.state == StageState.BAKING
        assert all(w.fleet.serving(d) == 1 for d in IDS)

        w.clock.advance(2)
        await c.tick()  # quality gates pass: the canary activates the candidate
        r = w.get(rid)
        assert r.current.state == StageState.ACTIVATING
        assert {x.name: x.ok for x in r.current.gates}["agreement"] is True
        assert r.current.samples == 2 * GOOD_SHADOW["samples"]
        assert all([i.action for i in w.fleet.issued(d)] == ["shadow", "activate"] for d in canary)

        await c.tick()  # canary done; the first wave is next
        r = w.get(rid)
        assert (r.state, r.stage, r.stages[0].state) == (RolloutState.ROLLING, 1, StageState.DONE)
        assert all(w.fleet.serving(d) == 2 for d in canary)
        assert not any(w.fleet.issued(d) for d in IDS if d not in canary)

        r = await drive(w, c, rid, lambda r: r.state == RolloutState.DONE)
        assert [s.state for s in r.stages] == [StageState.DONE, StageState.DONE, StageState.DONE]
        assert r.finished_at > 0
        assert all(w.fleet.serving(d) == 2 for d in IDS)
        assert {d.phase for d in w.rows(rid).values()} == {DevicePhase.ACTIVE}
        # each device: one shadow, then one activation, one generation each
        for d in IDS:
            issued = w.fleet.issued(d)
            assert [i.action for i in issued] == ["shadow", "activate"]
            assert issued[0].generation < issued[1].generation

    run(go())


def test_failed_gate_rolls_the_touched_devices_back(world: World) -> None:
    w = world

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, GATED)
        canary = stage_devices(w, rid, 0)
        for d in canary:
            w.fleet.devices[d].shadow = BAD_SHADOW  # the candidate disagrees with the model
        r = await drive(
            w, c, rid, lambda r: r.state in (RolloutState.ROLLED_BACK, RolloutState.DONE)
        )
        assert r.state == RolloutState.ROLLED_BACK
        assert r.stages[0].state == StageState.FAILED
        assert [s.state for s in r.stages[1:]] == [StageState.PENDING, StageState.PENDING]
        assert "agreement" in r.reason
        gates = {x.name: x.ok for x in r.stages[0].gates}
        assert gates["agreement"] is False
        rows = w.rows(rid)
        for d in canary:
            assert [i.action for i in w.fleet.issued(d)] == ["shadow", "rollback"]
            assert rows[d].phase == DevicePhase.ROLLED_BACK
            assert w.fleet.serving(d) == 1
        assert not any(w.fleet.issued(d) for d in IDS if d not in canary)

    run(go())


def test_failed_gate_pauses_with_on_failure_pause_and_resume_judges_again(world: World) -> None:
    w = world
    policy = Policy(**{**GATED.to_dict(), "on_failure": "pause"})

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, policy)
        canary = stage_devices(w, rid, 0)
        for d in canary:
            w.fleet.devices[d].shadow = BAD_SHADOW
        r = await drive(w, c, rid, lambda r: r.state != RolloutState.CANARY)
        assert (r.state, r.current.state) == (RolloutState.PAUSED, StageState.FAILED)
        assert "agreement" in r.reason
        # paused: nothing moves however long it waits, nothing is rolled back
        sent = sum(len(w.fleet.issued(d)) for d in IDS)
        for _ in range(3):
            w.clock.advance(policy.stage_timeout_s)
            await c.tick()
        assert w.get(rid).state == RolloutState.PAUSED
        assert sum(len(w.fleet.issued(d)) for d in IDS) == sent
        assert not any(w.fleet.issued(d, "rollback") for d in IDS)

        for d in canary:  # more samples came in, and they agree now
            w.fleet.set_shadow(d, GOOD_SHADOW)
        r = await c.control(rid, "resume")
        assert (r.state, r.current.state, r.current.gates) == (
            RolloutState.CANARY,
            StageState.BAKING,
            (),
        )
        r = await drive(
            w,
            c,
            rid,
            lambda r: r.state in (RolloutState.DONE, RolloutState.ROLLED_BACK, RolloutState.PAUSED),
        )
        assert r.state == RolloutState.DONE
        assert all(w.fleet.serving(d) == 2 for d in IDS)

    run(go())


def test_pause_and_resume_by_hand(world: World) -> None:
    w = world

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, GATED)
        await drive(w, c, rid, lambda r: r.state == RolloutState.ROLLING)
        r = await c.control(rid, "pause")
        assert (r.state, r.reason) == (RolloutState.PAUSED, "paused by hand")
        with pytest.raises(Conflict, match="cannot go to paused"):
            await c.control(rid, "pause")
        sent = sum(len(w.fleet.issued(d)) for d in IDS)
        for _ in range(5):
            w.clock.advance(GATED.bake_s)
            await c.tick()
        assert (w.get(rid).state, sum(len(w.fleet.issued(d)) for d in IDS)) == (
            RolloutState.PAUSED,
            sent,
        )

        r = await c.control(rid, "resume")
        assert (r.state, r.stage) == (RolloutState.ROLLING, 1)
        r = await drive(w, c, rid, lambda r: r.state == RolloutState.DONE)
        assert all(w.fleet.serving(d) == 2 for d in IDS)

    run(go())


def test_abort_stops_the_shadows_and_keeps_what_switched(world: World) -> None:
    w = world

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, GATED)
        canary = set(stage_devices(w, rid, 0))
        # canary done, the first wave shadowing
        await drive(w, c, rid, lambda r: r.stage == 1 and r.current.state == StageState.BAKING)
        wave = set(stage_devices(w, rid, 1))
        r = await c.control(rid, "abort")
        assert (r.state, r.reason) == (RolloutState.ABORTED, "aborted by hand")
        assert r.finished_at > 0
        for d in wave:  # its shadows are stopped: told to go back to what it serves
            assert [i.action for i in w.fleet.issued(d)] == ["shadow", "rollback"]
            assert w.fleet.serving(d) == 1
        for d in canary:  # switched already: keeps the new version
            assert [i.action for i in w.fleet.issued(d)] == ["shadow", "activate"]
            assert w.fleet.serving(d) == 2
        assert not any(w.fleet.issued(d) for d in set(IDS) - canary - wave)
        await c.tick()  # final: the controller leaves it alone
        assert w.get(rid).state == RolloutState.ABORTED
        with pytest.raises(Conflict, match="aborted"):
            await c.control(rid, "resume")

    run(go())


def test_devices_that_never_settle_fail_at_the_stage_timeout(world: World) -> None:
    w = world

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, GATED)
        silent = stage_devices(w, rid, 0)[0]
        w.fleet.devices[silent].answers.pop("shadow")  # never answers the shadow
        await c.tick()
        await c.tick()
        for _ in range(3):  # waiting for it, short of the timeout
            w.clock.advance(GATED.stage_timeout_s / 4)
            await c.tick()
            assert w.get(rid).current.state == StageState.INSTALLING
        w.clock.advance(GATED.stage_timeout_s / 2)
        await c.tick()
        r = w.get(rid)
        gate = r.stages[0].gates[0]
        assert (gate.name, gate.ok) == ("failure_rate", False)
        assert "1 of 2 failed (timeout 1)" in gate.detail
        assert r.stages[0].state == StageState.FAILED
        r = await drive(w, c, rid, lambda r: r.state == RolloutState.ROLLED_BACK)
        assert all(w.fleet.serving(d) == 1 for d in IDS)

    run(go())


def test_a_tolerated_timeout_counts_as_failed_and_the_rollout_goes_on(world: World) -> None:
    w = world
    policy = Policy(**{**GATED.to_dict(), "max_failure_rate": 0.5})

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, policy)
        silent = stage_devices(w, rid, 0)[0]
        w.fleet.devices[silent].answers.clear()
        r = await drive(
            w,
            c,
            rid,
            lambda r: r.state in (RolloutState.DONE, RolloutState.ROLLED_BACK),
            step_s=20.0,
        )
        assert r.state == RolloutState.DONE
        row = w.rows(rid)[silent]
        assert (row.phase, row.reason) == ("failed", "timeout")
        assert "not settled within 120s" in row.detail
        assert [i.action for i in w.fleet.issued(silent)] == ["shadow"]  # never activated
        assert w.fleet.serving(silent) == 1
        assert all(w.fleet.serving(d) == 2 for d in IDS if d != silent)

    run(go())


def test_a_new_controller_resumes_where_the_old_one_stopped(world: World) -> None:
    w = world

    async def go() -> None:
        old = w.controller()
        rid = await start(w, old, GATED)
        wave = stage_devices(w, rid, 1)
        for d in wave:  # the first wave is offline when its shadow is issued
            w.fleet.devices[d].online = False
        await drive(
            w, old, rid, lambda r: r.stage == 1 and r.current.state == StageState.INSTALLING
        )
        assert all([i.action for i in w.fleet.issued(d)] == ["shadow"] for d in wave)
        issued_before = {d: list(w.fleet.issued(d)) for d in IDS}
        del old  # the coordinator stops here; the database holds everything

        for d in wave:
            w.fleet.devices[d].online = True
        new = w.controller()
        task = asyncio.create_task(new.run())
        try:
            async with asyncio.timeout(20):
                while w.get(rid).state not in (RolloutState.DONE, RolloutState.ROLLED_BACK):
                    await new.wait_changed(1.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        r = w.get(rid)
        assert r.state == RolloutState.DONE
        assert all(w.fleet.serving(d) == 2 for d in IDS)
        for d in IDS:
            issued = w.fleet.issued(d)
            assert issued[: len(issued_before[d])] == issued_before[d]
            # each action once, under one generation (re-published, never re-issued)
            by_action: dict[str, set[int]] = {}
            for i in issued:
                by_action.setdefault(i.action, set()).add(i.generation)
            assert by_action == {
                "shadow": {issued[0].generation},
                "activate": {issued[-1].generation},
            }
        for d in wave:  # the new controller published the wave's shadow again on start
            assert [i.action for i in w.fleet.issued(d)] == ["shadow", "shadow", "activate"]

    run(go())


def test_all_at_once_activates_directly_and_does_not_wait_for_offline_devices(
    world: World,
) -> None:
    w = world
    away = IDS[-1]
    w.fleet.devices[away].online = False

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, Policy.all_at_once())
        assert [s.name for s in w.get(rid).stages] == ["all"]
        await c.tick()
        r = w.get(rid)
        assert r.current.state == StageState.ACTIVATING
        assert all([i.action for i in w.fleet.issued(d)] == ["activate"] for d in IDS)
        r = await drive(w, c, rid, lambda r: r.state == RolloutState.DONE)
        rows = w.rows(rid)
        assert (rows[away].reason, rows[away].phase) == (OFFLINE, DevicePhase.ACTIVE)
        assert w.fleet.serving(away) == 1  # updates when it reconnects
        assert all(w.fleet.serving(d) == 2 for d in IDS if d != away)
        assert not any(w.fleet.issued(d, "shadow") for d in IDS)

    run(go())


def test_revoked_devices_are_left_out(world: World) -> None:
    w = world
    policy = Policy(canary=0.25, waves=(1.0,), bake_s=5.0, max_failure_rate=0.0)

    async def go() -> None:
        c = w.controller()
        rid = await start(w, c, policy)
        gone = [stage_devices(w, rid, 0)[0], stage_devices(w, rid, 1)[0]]
        for d in gone:  # what `fleet devices revoke` does to open rollouts
            w.devices.revoke(d)
            w.fleet.devices[d].online = False
            assert w.store.close_device(d, reason="revoked", detail="device revoked") == [rid]
        r = await drive(
            w,
            c,
            rid,
            lambda r: r.state in (RolloutState.DONE, RolloutState.ROLLED_BACK, RolloutState.PAUSED),
        )
        assert r.state == RolloutState.DONE
        rows = w.rows(rid)
        for d in gone:
            assert (rows[d].phase, rows[d].reason) == (DevicePhase.SKIPPED, "revoked")
            assert not w.fleet.issued(d)
        assert all(w.fleet.serving(d) == 2 for d in IDS if d not in gone)

    run(go())


def test_agent_release_is_judged_by_install_gates_and_an_unhealthy_switch_stops_it(
    world: World,
) -> None:
    """An agent release (cloud/agent_releases): no shadow samples to judge, so the quality
    gates do not hold it; a canary device whose new agent was unhealthy after the switch
    (it went back to its old agent) fails the stage; the rollback undoes the release."""
    from edgefleet.cloud.agent_releases import AGENT_MODEL

    w = world

    async def go() -> None:
        w.fleet.add_version(AGENT_MODEL, 1)
        release = w.fleet.versions[(AGENT_MODEL, 1)].variants[0].sha256
        c = w.controller()
        group = Selector("group", groups=("lab",))
        r, _devs = await c.create(ModelRef(AGENT_MODEL, 1), group, GATED)
        rid = r.rollout_id
        canary = stage_devices(w, rid, 0)
        for d in canary:
            w.fleet.devices[d].shadow = {}  # an agent release sends no shadow samples
        w.fleet.devices[canary[0]].answers["activate"] = "failed"
        w.fleet.devices[canary[0]].reason = "agent_unhealthy"
        r = await drive(
            w,
            c,
            rid,
            lambda r: r.state in (RolloutState.ROLLED_BACK, RolloutState.DONE, RolloutState.PAUSED),
        )
        assert r.state == RolloutState.ROLLED_BACK, r
        assert r.stages[0].state == StageState.FAILED and "agent_unhealthy" in r.reason, r.reason
        for d in canary:
            assert [i.action for i in w.fleet.issued(d)] == ["shadow", "activate", "rollback"]
            assert w.fleet.issued(d, "rollback")[0].sha256 == release  # the release undone
        assert not any(w.fleet.issued(d) for d in IDS if d not in canary)

        # a healthy release goes through every stage the same way, without shadow samples
        w.fleet.add_version(AGENT_MODEL, 2)
        for d in IDS:
            w.fleet.devices[d].shadow = {}
            w.fleet.devices[d].answers = dict(OK)
        r, _devs = await c.create(ModelRef(AGENT_MODEL, 2), group, GATED)
        r = await drive(
            w,
            c,
            r.rollout_id,
            lambda r: r.state in (RolloutState.ROLLED_BACK, RolloutState.DONE, RolloutState.PAUSED),
        )
        assert r.state == RolloutState.DONE, r
        assert all(s.state == StageState.DONE for s in r.stages)
        assert {x.phase for x in w.rows(r.rollout_id).values()} == {DevicePhase.ACTIVE}

    run(go())
