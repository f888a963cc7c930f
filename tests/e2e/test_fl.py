"""Federated learning end to end: `fleet serve --fl` (a real SuperLink with TLS and node
auth), simulated devices whose real agents run real `flower-supernode` sidecars on
their own non-IID digits, and `fleet fl start` closing the loop into the registry
and a canary. Then the faults: a SuperNode losing its link mid-round, a device
dropping out mid-round, and a node whose key was never registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.broker import find_mosquitto
from cloud.config import ServeInfo
from protos.errors import NotFound
from protos.flower import flower_available
from tests.e2e.test_serve import REPO, _env, fleet_serve

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)
if not flower_available():
    pytest.skip("Flower is not installed (edgefleet[fl])", allow_module_level=True)

DEVICES = ["sim-0000", "sim-0001", "sim-0002"]


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLEET_HOME holding digits:1 (an MLP trained centrally for a few epochs)."""
    from cloud.cli.main import run
    from cloud.client import LocalClient
    from cloud.config import load_settings

    h = tmp_path_factory.mktemp("fl") / "home"
    assert run(["--home", str(h), "init"]) == 0
    client = LocalClient(load_settings(home=h))
    client.train(
        "digits", "digits", arch="mlp", epochs=5, seed=0, batch_size=64, lr=3e-3, on_epoch=None
    )
    client.close()
    return h


@contextlib.contextmanager
def coordinator(trained: Path, tmp: Path) -> Iterator[tuple[Path, ServeInfo]]:
    home = tmp / "home"
    shutil.copytree(trained, home)
    with fleet_serve(home, "--fl", "--fl-listen", "127.0.0.1:0") as (_proc, info):
        assert info.fl_superlink.startswith("127.0.0.1:")
        yield home, info


def enroll(home: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    """`fleet devices enroll ID --fl` for each device: its bundle."""
    from cloud.cli.main import run

    bundles = {}
    for d in DEVICES:
        path = tmp / f"{d}.json"
        assert run(["--home", str(home), "devices", "enroll", d, "--fl", "--out", str(path)]) == 0
        bundles[d] = json.loads(path.read_text())
        assert bundles[d]["fl"]["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY")
        assert bundles[d]["fl"]["node_id"], "registered with the running SuperLink at once"
    return bundles


def sim_fleet(info: ServeInfo, home: Path, tmp: Path, bundles: dict[str, dict[str, Any]]) -> Any:
    """Three simulated devices (real agents), each with its FL sidecar configured."""
    from agent.config import config_from_bundle
    from simulator.fleet import SimulatedFleet

    fleet = SimulatedFleet(
        len(DEVICES),
        broker_url=info.broker_url,
        public_key_pem=(home / "keys" / "signing.pub").read_text(),
        state_root=tmp / "sim",
        profile="cpu",
        data=True,
        alpha=1.0,
    )
    for dev in fleet:
        cfg = config_from_bundle(
            json.dumps(bundles[dev.device_id]).encode(), state_dir=tmp, listen=""
        )
        dev.configure(
            fl_superlink=cfg.fl_superlink,
            fl_ca_pem=cfg.fl_ca_pem,
            fl_private_key=cfg.fl_private_key,
            fl_data_dir=dev.data_dir,
        )
    return fleet


async def fl_ready(home: Path, fleet: Any, n: int) -> None:
    """Wait until the coordinator has seen `n` devices online with a ready FL sidecar."""
    from cloud.devices import DeviceStore

    store = DeviceStore(f"sqlite:///{home / 'registry.db'}")
    try:

        def ready() -> bool:
            devs = store.find(online=True)
            return sum(1 for d in devs if "fl" in d.capabilities.get("features", ())) >= n

        await fleet.wait(ready, timeout=60, what=f"{n} devices online with FL ready")
    finally:
        store.close()


async def fleet_cli(home: Path, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    """`fleet --home HOME ARGS…` as its own process (the agents keep running meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cloud.cli.main",
        "--home",
        str(home),
        *args,
        cwd=REPO,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def versions(home: Path) -> list[Any]:
    from cloud.client import LocalClient
    from cloud.config import load_settings

    client = LocalClient(load_settings(home=home))
    try:
        return client.list_versions("digits")
    finally:
        client.close()


# -- the closed loop ------------------------------------------------------------------------


def test_federated_round_registers_a_version_and_canaries_it(
    trained_home: Path, tmp_path: Path
) -> None:
    with coordinator(trained_home, tmp_path) as (home, info):
        fleet = sim_fleet(info, home, tmp_path, enroll(home, tmp_path))

        async def scenario() -> dict[str, Any]:
            async with fleet:
                await fl_ready(home, fleet, 3)
                code, out, err = await fleet_cli(
                    home,
                    "fl",
                    "start",
                    "digits:1",
                    "--rounds",
                    "1",
                    "--strategy",
                    "fedavg",
                    "--min-clients",
                    "2",
                    "--variants",
                    "int8",
                    "--then-deploy",
                    "canary=10%",
                    "--round-timeout",
                    "90",
                    "--json",
                )
                assert code == 0, err
                assert "round 1/1" in err  # per-round metrics streamed to the CLI
                run = json.loads(out)
                canary = run["deploy"]["targets"][0]
                active = fleet.device(canary).agent.holder.active
                assert active is not None and active.ref.version == 2
                return dict(run)

        run = asyncio.run(scenario())

    assert run["status"] == "succeeded" and run["result"] == "digits:2"
    assert sorted(run["participants"]) == DEVICES
    (rnd,) = run["history"]
    assert sorted(rnd["participants"]) == DEVICES
    assert 0.5 < rnd["evaluate"]["eval-accuracy"] <= 1.0  # on the devices' own held-out data
    assert run["deploy"]["ok"] and len(run["deploy"]["targets"]) == 1  # 10% of 3 -> 1

    v1, v2 = versions(home)
    lin = v2.lineage
    assert lin.source == "federated" and lin.parent_version == 1
    assert lin.federated is not None
    assert lin.federated["run_id"] == run["run_id"]
    assert lin.federated["flower_run_id"] == run["flower_run_id"]
    assert lin.federated["strategy"] == "fedavg" and lin.federated["rounds"] == 1
    assert sorted(lin.federated["participants"]) == DEVICES
    assert {v.name for v in v2.variants} == {"fp32", "int8"}
    assert all(v.deployable for v in v2.variants), [(v.name, v.reason) for v in v2.variants]
    assert v2.checkpoint_sha256 and v2.checkpoint_sha256 != v1.checkpoint_sha256
    assert v2.metrics["holdout_accuracy"] > 0.8
