"""Staged rollouts end to end: real agents (simulator), real Mosquitto, the coordinator and
its rollout controller, live traffic with labels, shadow evaluation on the devices.

- a good model goes through the canary and every wave;
- a model whose accuracy collapses is stopped by the shadow gate at the canary and
  rolled back: every device ends on the previous version;
- a genuinely slower model (a much wider network) trips the latency gate (pause),
  then a rollback by hand;
- a broker restart mid-wave still ends with every device in a final state;
- `fleet serve` killed (SIGKILL) mid-rollout resumes where it was: no device updated
  twice or skipped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import CloudSettings, ServeInfo, load_settings
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.devices.store import Birth
from edgefleet.cloud.devices.values import Accelerator, Capabilities, ServedModel
from edgefleet.cloud.identity import IdentityStore
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.rollouts import Policy, Rollout, RolloutStore
from edgefleet.cloud.rollouts.controller import RolloutController
from edgefleet.protos.errors import Conflict, NotFound
from edgefleet.protos.topics import Topics
from edgefleet.simulator.fleet import SimulatedFleet
from edgefleet.simulator.traffic import Traffic
from tests.conftest import Cli
from tests.support.e2e import local_coordinator, wait_online
from tests.support.identity import SecureBroker

REPO = Path(__file__).resolve().parents[2]

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

GOOD, BAD, SLOW = 2, 3, 4


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits:1 (in service), :2 (as good), :3 (labels shifted: collapses), :4 (8x wider)."""
    from edgefleet.models.data import load_dataset

    root = tmp_path_factory.mktemp("rollouts")
    h = root / "home"
    client = LocalClient(load_settings(home=h))
    client.init()
    kw = {"arch": "mlp", "batch_size": 64, "lr": 3e-3, "on_epoch": None}
    client.train("digits", "digits", epochs=5, seed=0, **kw)
    client.train("digits", "digits", epochs=5, seed=1, **kw)
    ds = load_dataset("digits")
    shifted = root / "shifted.npz"
    np.savez(shifted, X=ds.x, y=(ds.y + 3) % 10)
    client.train("digits", str(shifted), epochs=5, seed=2, **kw)
    client.train("digits", "digits", epochs=2, seed=3, options={"hidden": [1024, 1024]}, **kw)
    client.close()
    return h


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from edgefleet.models.data import load_dataset

    ds = load_dataset("digits")
    return ds.x.astype(np.float32), ds.y


@dataclass
class Harness:
    settings: CloudSettings
    client: LocalClient
    devices: DeviceStore
    store: RolloutStore
    fleet: SimulatedFleet
    coord: Coordinator
    controller: RolloutController
    group: str

    @property
    def selector(self) -> Selector:
        return Selector.parse(f"group={self.group}")

    async def rollout(self, version: int, policy: Policy) -> Rollout:
        r, _devs = await self.controller.create(ModelRef("digits", version), self.selector, policy)
        return r

    async def wait_state(self, rollout_id: str, states: set[str], timeout: float = 90) -> Rollout:
        deadline = time.monotonic() + timeout
        while True:
            r = await asyncio.to_thread(self.store.get, rollout_id)
            if r.state in states:
                return r
            if time.monotonic() > deadline:
                devs = await asyncio.to_thread(self.store.devices, rollout_id)
                raise AssertionError(
                    f"rollout {rollout_id} still {r.state} ({r.current}) after {timeout}s: "
                    f"{[(d.device_id, d.phase, d.state, d.reason) for d in devs]}"
                )
            await asyncio.sleep(0.1)

    def versions(self) -> dict[str, int | None]:
        return {
            d.device_id: (d.agent.holder.active.ref.version if d.agent.holder.active else None)
            for d in self.fleet
        }


@asynccontextmanager
async def harness(
    home: Path,
    broker: SecureBroker,
    tmp_path: Path,
    digits: tuple[np.ndarray, np.ndarray],
    *,
    name: str,
    n: int,
    baseline: int = 1,
    rate: float = 40.0,
) -> AsyncIterator[Harness]:
    settings = load_settings(home=home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    store = RolloutStore(settings.registry_url)
    prefix = f"t-{name}"
    fleet = SimulatedFleet(
        n,
        broker_url=broker.url,
        public_key_pem=settings.public_key_path.read_text(),
        state_root=tmp_path / "devices",
        profile="gpu",  # onnxruntime, full speed: the fp32 variant
        id_prefix=name,
        topic_prefix=prefix,
        want_interval=0.5,
    )
    broker.enroll_fleet(fleet, prefix=prefix)
    for e in fleet.ids_for_enrollment():
        devices.enroll(e.device_id, group=name, tags={**e.tags, "test": name})
    try:
        async with (
            fleet,
            local_coordinator(
                client,
                devices,
                broker.coordinator(),
                topics=Topics(prefix),
                chunk_size=16 * 1024,
                gather=0.05,
            ) as coord,
        ):
            controller = RolloutController(coord, store, interval=0.2, min_gap=0.05)
            task = asyncio.create_task(controller.run())
            h = Harness(settings, client, devices, store, fleet, coord, controller, name)
            try:
                await wait_online(devices, n, h.selector, timeout=30)
                out = await coord.deploy(ModelRef("digits", baseline), h.selector)
                settled = await coord.wait_settled(out, timeout=60)
                assert {d.state for d in settled.values()} == {"active"}
                x, y = digits
                async with Traffic(fleet.devices, x, y, rate=rate):
                    yield h
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        store.close()
        devices.close()
        client.close()


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_good_model_goes_through_canary_and_every_wave(
    home: Path, broker: SecureBroker, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    policy = Policy(
        canary=0.1,
        waves=(0.5, 1.0),
        bake_s=1.5,
        min_agreement=0.8,
        min_accuracy=0.8,
        min_samples=20,
    )

    async def main() -> None:
        async with harness(home, broker, tmp_path, digits, name="good", n=10) as h:
            r = await h.rollout(GOOD, policy)
            assert [s.devices for s in r.stages] == [1, 4, 5]
            with pytest.raises(Conflict, match=f"is in rollout {r.rollout_id} "):
                await h.rollout(GOOD, policy)  # the same devices are busy
            r = await h.wait_state(r.rollout_id, {"done", "rolled_back", "paused"})
            assert r.state == "done", r.reason
            assert [s.state for s in r.stages] == ["done"] * 3
            for s in r.stages:
                names = {g.name: g for g in s.gates}
                assert names["agreement"].ok and names["accuracy"].value >= 0.8, s.gates
                assert s.samples >= 20
            assert set(h.versions().values()) == {GOOD}
            devs = await asyncio.to_thread(h.store.devices, r.rollout_id)
            assert {d.phase for d in devs} == {"active"}
            # shadow reports came from each device, with labels
            assert all(d.shadow.get("labelled", 0) > 0 for d in devs)

    run(main())


def test_collapsed_accuracy_is_stopped_at_the_canary_and_rolled_back(
    home: Path, broker: SecureBroker, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    policy = Policy(canary=0.25, waves=(1.0,), bake_s=1.0, min_accuracy=0.8, min_samples=20)

    async def main() -> None:
        async with harness(home, broker, tmp_path, digits, name="bad", n=8) as h:
            r = await h.rollout(BAD, policy)
            r = await h.wait_state(r.rollout_id, {"done", "rolled_back", "paused"})
            assert r.state == "rolled_back", r.reason
            canary, wave = r.stages
            assert canary.state == "failed" and wave.state == "pending"
            acc = next(g for g in canary.gates if g.name == "accuracy")
            assert not acc.ok and acc.value < 0.5, canary.gates
            assert "accuracy" in r.reason
            # every device ends on the previous version; the wave never received anything
            assert set(h.versions().values()) == {1}
            devs = await asyncio.to_thread(h.store.devices, r.rollout_id)
            assert {d.action for d in devs if d.stage == 1} == {""}
            assert {(d.phase, d.state) for d in devs if d.stage == 0} == {
                ("rolled_back", "rolled_back")
            }

    run(main())


def test_slower_model_trips_the_latency_gate_then_rolls_back_by_hand(
    home: Path, broker: SecureBroker, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    policy = Policy(
        canary=0.5,
        waves=(1.0,),
        bake_s=1.0,
        max_latency_regression=1.0,  # at most twice as slow
        min_samples=30,
        on_failure="pause",
    )

    async def main() -> None:
        async with harness(home, broker, tmp_path, digits, name="slow", n=4) as h:
            r = await h.rollout(SLOW, policy)
            r = await h.wait_state(r.rollout_id, {"done", "rolled_back", "paused"})
            assert r.state == "paused", r.reason
            lat = next(g for g in r.stages[0].gates if g.name == "latency")
            assert not lat.ok and lat.value > 1.0, lat
            # paused: the canary devices still serve version 1 and evaluate the candidate
            assert set(h.versions().values()) == {1}
            r = await h.controller.control(r.rollout_id, "rollback")
            assert r.state == "rolling_back"
            r = await h.wait_state(r.rollout_id, {"rolled_back"})
            assert set(h.versions().values()) == {1}
            assert all(d.agent.updater.shadow is None for d in h.fleet)

    run(main())


def test_broker_restart_mid_wave_ends_with_every_device_final(
    home: Path, broker: SecureBroker, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    policy = Policy(canary=0.2, waves=(1.0,), bake_s=1.0, min_agreement=0.8, min_samples=10)

    async def main() -> None:
        async with harness(home, broker, tmp_path, digits, name="mqtt", n=10) as h:
            r = await h.rollout(GOOD, policy)
            deadline = time.monotonic() + 60
            while r.stage < 1 or r.current.state == "pending":
                assert time.monotonic() < deadline, r
                await asyncio.sleep(0.05)
                r = await asyncio.to_thread(h.store.get, r.rollout_id)
            await asyncio.to_thread(broker.restart)  # the wave is installing
            r = await h.wait_state(r.rollout_id, {"done", "rolled_back", "paused"}, timeout=120)
            assert r.state == "done", r.reason
            devs = await asyncio.to_thread(h.store.devices, r.rollout_id)
            assert {(d.phase, d.state) for d in devs} == {("active", "active")}
            assert set(h.versions().values()) == {GOOD}

    run(main())


def test_broker_away_when_the_bake_ends_the_activation_is_issued_once_and_delivered(
    home: Path, broker: SecureBroker, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """The broker stops a moment before the canary's bake ends and comes back after it:
    the controller issues the activation (committed) but cannot publish it. The rollout
    must still finish, every device updated once: the coordinator re-publishes the
    desired states it could not send when its link is back. (It used to stay in its
    bake, its devices marked for activation and so no longer counted as shadowing,
    until the stage timeout rolled back a good model: seen as a hang in the replicas'
    nats-node case, whose NATS node died while the activation was published.)"""
    policy = Policy(canary=0.25, waves=(1.0,), bake_s=4.0, min_agreement=0.8, min_samples=10)

    async def main() -> None:
        async with harness(home, broker, tmp_path, digits, name="away", n=4) as h:
            r = await h.rollout(GOOD, policy)
            deadline = time.monotonic() + 60
            while r.current.state != "baking":
                assert time.monotonic() < deadline, r
                await asyncio.sleep(0.05)
                r = await asyncio.to_thread(h.store.get, r.rollout_id)
            bake_end = r.current.bake_started_at + policy.bake_s  # the controller's clock
            await asyncio.sleep(max(0.0, bake_end - 1.0 - time.time()))
            await asyncio.to_thread(broker.stop)
            try:  # the controller ticks every 0.2 s: it tries to activate while away
                while True:
                    r = await asyncio.to_thread(h.store.get, r.rollout_id)
                    devs = await asyncio.to_thread(h.store.devices, r.rollout_id)
                    if time.time() > bake_end + 2.0 and any(d.action == "activate" for d in devs):
                        break
                    assert time.time() < bake_end + 30, (r.current, devs)
                    await asyncio.sleep(0.1)
                assert not h.coord.transport.connected
            finally:
                await asyncio.to_thread(broker.start)
            r = await h.wait_state(r.rollout_id, {"done", "rolled_back", "paused"}, timeout=90)
            assert r.state == "done", r.reason
            assert r.stages[0].bake_started_at + policy.bake_s == bake_end
            devs = await asyncio.to_thread(h.store.devices, r.rollout_id)
            assert {(d.phase, d.state) for d in devs} == {("active", "active")}
            # baseline 1, shadow 2, activation 3 on the canary; the wave: baseline, 2, 3
            gens = {d.device_id: d.desired_generation for d in h.devices.find(h.selector)}
            assert gens == dict.fromkeys(gens, 3) and len(gens) == 4
            assert set(h.versions().values()) == {GOOD}

    run(main())


def _serve(home: Path, broker_url: str) -> tuple[subprocess.Popen[bytes], ServeInfo]:
    """`fleet serve` on a free loopback port against the test's broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home), "serve"),
            *("--broker", broker_url, "--grpc-listen", "127.0.0.1:0"),
        ],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fleet serve exited with {proc.returncode}")
        info = ServeInfo.read(home / "serve.json")
        if info is not None and info.pid == proc.pid:
            return proc, info
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    pytest.fail("fleet serve did not start within 60 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_coordinator_killed_mid_rollout_resumes_where_it_was(
    home: Path,
    broker: SecureBroker,
    tmp_path: Path,
    digits: tuple[np.ndarray, np.ndarray],
    cli: Cli,
) -> None:
    import json

    from edgefleet.cloud.client import read_token
    from edgefleet.cloud.remote import GrpcClient

    settings = load_settings(home=home)
    token = read_token(settings.token_path)
    devices = DeviceStore(settings.registry_url)
    store = RolloutStore(settings.registry_url)
    n = 6
    fleet = SimulatedFleet(
        n,
        broker_url=broker.url,
        public_key_pem=settings.public_key_path.read_text(),
        state_root=tmp_path / "devices",
        profile="gpu",
        id_prefix="kill",
        want_interval=0.5,
    )
    # `fleet serve --broker` connects with FLEET_HOME's coordinator credential
    broker.use_identities(IdentityStore(settings.identity_dir))
    broker.enroll_fleet(fleet)
    for e in fleet.ids_for_enrollment():
        devices.enroll(e.device_id, group="kill")
    selector = Selector.parse("group=kill")
    procs: list[subprocess.Popen[bytes]] = []
    address: list[str] = []

    def start() -> GrpcClient:
        proc, info = _serve(home, broker.coordinator_url)
        procs.append(proc)
        address[:] = [info.grpc]
        return GrpcClient(info.grpc, token)

    def fleet_cli(*args: str) -> Any:
        return cli("--coordinator", address[0], "--token", token, *args)

    async def main() -> None:
        x, y = digits
        async with fleet, Traffic(fleet.devices, x, y, rate=40):
            c = await asyncio.to_thread(start)
            await wait_online(devices, n, selector, timeout=30)  # serve recorded their births
            c.close()
            plain = await asyncio.to_thread(
                fleet_cli, "deploy", "digits:1", "--to", "group=kill", "--timeout", "60"
            )
            assert plain.code == 0 and f"{n} of {n} active" in plain.err, plain.err
            made = await asyncio.to_thread(
                fleet_cli,
                *("deploy", f"digits:{GOOD}", "--to", "group=kill", "--canary", "34%"),
                # a bake long enough that the kill, the restart and the pause below all
                # land inside it on a loaded machine (with 5s the restarted coordinator
                # could finish the canary first, and the pause found it rolling)
                *("--waves", "100%", "--bake", "20s", "--min-agreement", "0.8"),
                *("--min-samples", "10", "--no-watch", "--json"),
            )
            assert made.code == 0, made.err
            rid = json.loads(made.out)["rollout_id"]
            async with asyncio.timeout(60):
                while (cur := await asyncio.to_thread(store.get, rid)).current.state != "baking":
                    await asyncio.sleep(0.05)
            busy = await asyncio.to_thread(fleet_cli, "deploy", "digits:1", "--to", "group=kill")
            assert busy.code == 1 and f"is in rollout {rid}" in busy.err, busy.err
            procs[-1].send_signal(signal.SIGKILL)  # no cleanup of any kind
            await asyncio.to_thread(procs[-1].wait)
            before = await asyncio.to_thread(store.get, rid)
            assert (before.state, before.stage, before.current.state) == ("canary", 0, "baking")
            (await asyncio.to_thread(start)).close()
            # by hand through the restarted coordinator (ControlRollout)
            paused = await asyncio.to_thread(fleet_cli, "rollouts", "pause", rid)
            assert paused.code == 0 and f"rollout {rid}: paused" in paused.err, paused.err
            again = await asyncio.to_thread(fleet_cli, "rollouts", "pause", rid)
            assert again.code == 1 and "cannot go to paused" in again.err
            resumed = await asyncio.to_thread(fleet_cli, "rollouts", "resume", rid)
            assert resumed.code == 0 and f"rollout {rid}: canary" in resumed.err, resumed.err
            # followed live through the restarted coordinator (WatchRollout), to its outcome
            watched = await asyncio.to_thread(fleet_cli, "rollouts", "watch", rid)
            assert watched.code == 0, watched.err
            assert f"rollout {rid}: done" in watched.err
            shown = await asyncio.to_thread(fleet_cli, "rollouts", "show", rid, "--json")
            doc = json.loads(shown.out)
            assert {(d["phase"], d["state"]) for d in doc["devices"]} == {("active", "active")}
            assert all(d["staleness_s"] is not None for d in doc["devices"])
            cur = await asyncio.to_thread(store.get, rid)
            assert cur.state == "done", cur.reason
            # the bake kept its start time across the restart
            assert cur.stages[0].bake_started_at == before.stages[0].bake_started_at
            # one generation each for baseline, shadow and activation: nobody updated twice
            gens = {d.device_id: d.desired_generation for d in devices.find(selector)}
            assert gens == {d: 3 for d in fleet.ids()}
            assert {d.agent.updater.slots.generation for d in fleet} == {3}
            assert {d.agent.holder.active.ref.version for d in fleet if d.agent.holder.active} == {
                GOOD
            }

    try:
        asyncio.run(main())
    finally:
        for p in procs:
            _stop(p)
        store.close()
        devices.close()


def _generations(home: Path) -> dict[str, int]:
    devices = DeviceStore(load_settings(home=home).registry_url)
    try:
        return {d.device_id: d.desired_generation for d in devices.find()}
    finally:
        devices.close()


def _cli_fixtures(home: Path) -> str:
    """Ten devices that reported a birth (GPU class, running digits:1), and a finished
    rollout whose canary failed the accuracy gate; returns its id."""
    from edgefleet.cloud.rollouts import GateResult, Rollout, Stage
    from edgefleet.simulator.profiles import GPU

    url = load_settings(home=home).registry_url
    devices, store = DeviceStore(url), RolloutStore(url)
    try:
        active = ServedModel("digits", 1, "fp32", "a" * 64)
        gpu = Capabilities("aarch64", ("onnxruntime",), GPU.caps.providers, Accelerator.GPU, 8192)
        for i in range(10):
            devices.enroll(f"cli-{i}", group="cli")
            devices.record_status(f"cli-{i}", Birth(True, capabilities=gpu, active=active))
        gate = GateResult("accuracy", False, 0.12, 0.8, "12.0% on 80 labelled samples")
        r = Rollout(
            rollout_id="clifailed01",
            ref=f"digits:{BAD}",
            model="digits",
            version=BAD,
            selector="group=cli",
            policy=Policy(min_accuracy=0.8),
            state="rolled_back",
            stages=(Stage("canary", 0.1, 1, state="failed", gates=(gate,)),),
            reason="canary: gate accuracy failed",
        )
        store.create(r, [])
        return r.rollout_id
    finally:
        store.close()
        devices.close()


def test_cli_plans_lists_shows_and_refuses_bad_flags(home: Path, cli: Cli) -> None:
    import json

    rid = _cli_fixtures(home)
    h = ("--home", str(home))
    bad = cli(*h, "deploy", "digits:2", "--to", "all", "--canary", "150%")
    assert bad.code == 1 and "--canary '150%': must be from more than 0% to 100%" in bad.err
    bad = cli(*h, "deploy", "digits:2", "--to", "all", "--waves", "50%,20%,100%")
    assert bad.code == 1 and "must exceed the one before" in bad.err
    bad = cli(*h, "deploy", "digits:2", "--to", "all", "--sim", "3")
    assert bad.code == 1 and "--sim N tries a policy on simulated devices: add --dry-run" in bad.err
    # a plan from the database: stages, devices, what they run now; nothing is sent
    before = _generations(home)
    plan = cli(
        *(*h, "deploy", "digits:2", "--to", "group=cli", "--canary", "10%"),
        *("--waves", "50%,100%", "--min-agreement", "0.9", "--dry-run", "--json"),
    )
    assert plan.code == 0, plan.err
    doc = json.loads(plan.out)
    assert doc["dry_run"] and [s["devices"] for s in doc["stages"]] == [1, 4, 5]
    assert {d["variant"] for d in doc["devices"]} == {"fp32"}
    assert {d["previous"]["version"] for d in doc["devices"]} == {1}
    assert doc["policy"]["min_agreement"] == 0.9
    assert _generations(home) == before
    ls = cli(*h, "rollouts", "ls", "--json")
    assert ls.code == 0, ls.err
    assert {r["rollout_id"]: r["state"] for r in json.loads(ls.out)}[rid] == "rolled_back"
    show = cli(*h, "rollouts", "show", rid)
    assert show.code == 0 and "✗ accuracy 12.0%" in show.out and "rolled_back" in show.out
    assert cli(*h, "rollouts", "watch", rid).code == 1  # it was rolled back
    nope = cli(*h, "rollouts", "pause", rid)
    assert nope.code == 1 and "no coordinator running" in nope.err
    missing = cli(*h, "rollouts", "show", "nope")
    assert missing.code == 1 and "rollout 'nope' not found" in missing.err


def test_dry_run_on_a_simulated_fleet_reports_stages_and_the_rollback(home: Path, cli: Cli) -> None:
    import json

    res = cli(
        *("--home", str(home), "deploy", f"digits:{BAD}", "--to", "all"),
        *("--canary", "50%", "--waves", "100%", "--bake", "1s", "--min-agreement", "0.9"),
        *("--min-samples", "10", "--dry-run", "--sim", "4", "--sim-profile", "gpu", "--json"),
    )
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["baseline"] == f"digits:{GOOD}"  # the version before the one tried
    assert doc["outcome"] == "rolled_back" and "agreement" in doc["reason"]
    canary = doc["stages"][0]
    assert canary["state"] == "failed" and canary["install_s"] is not None
    assert doc["rollback_s"] is not None and doc["final_versions"] == {str(GOOD): 4}


def test_abort_ends_the_shadows_and_changes_nothing_else(
    home: Path, broker: SecureBroker, tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    policy = Policy(canary=0.5, waves=(1.0,), bake_s=60.0, min_agreement=0.5)

    async def main() -> None:
        async with harness(home, broker, tmp_path, digits, name="abort", n=4) as h:
            r = await h.rollout(GOOD, policy)
            async with asyncio.timeout(60):
                while r.current.state != "baking":
                    await asyncio.sleep(0.05)
                    r = await asyncio.to_thread(h.store.get, r.rollout_id)
            shadowing = [d for d in h.fleet if d.agent.updater.shadow is not None]
            assert len(shadowing) == 2  # the canary evaluates the candidate
            r = await h.controller.control(r.rollout_id, "abort")
            assert r.state == "aborted" and r.final
            async with asyncio.timeout(30):
                while any(d.agent.updater.shadow is not None for d in h.fleet):
                    await asyncio.sleep(0.05)
            assert set(h.versions().values()) == {1}
            with pytest.raises(Conflict, match="rollout .* is aborted: cannot go to paused"):
                await h.controller.control(r.rollout_id, "pause")

    run(main())
