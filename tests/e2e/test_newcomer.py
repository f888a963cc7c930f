"""The README's story, driven through the CLI as a newcomer types it: `fleet serve`,
`fleet sim --traffic` with a drift fault on one group, a plain deploy that `fleet rollouts
show` finds, a dry run whose canary is the real rollout's, a staged deploy whose on-device
quality gate stops a broken model at the canary (every device stays on the good version),
and a drift alert for the drifted group only."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.config import ServeInfo
from edgefleet.protos.errors import NotFound
from tests.conftest import Cli
from tests.e2e.test_serve import REPO, _env, fleet_serve

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

DEVICES = 6  # profiles cpu,gpu in equal shares: groups "cpu" and "gpu", 3 each


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits:1 (good) and digits:2 (trained on shuffled labels: broken)."""
    from edgefleet.cloud.cli.main import run
    from edgefleet.models.data import load_dataset

    root = tmp_path_factory.mktemp("newcomer")
    h = ["--home", str(root / "home")]
    assert run([*h, "init"]) == 0
    assert run([*h, "train", "--model", "digits", "--arch", "mlp", "--epochs", "8"]) == 0
    ds = load_dataset("digits")
    shuffled = root / "shuffled.npz"
    np.savez(shuffled, X=ds.x, y=np.random.default_rng(0).permutation(ds.y))
    assert run([*h, "train", "--model", "digits", "--data", str(shuffled), "--epochs", "2"]) == 0
    return root / "home"


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[ServeInfo]:
    fast_drift = {"FLEET_DRIFT_INTERVAL": "1", "FLEET_DRIFT_WINDOW": "20"}
    with fleet_serve(home, env=fast_drift) as (_proc, info):
        yield info


@pytest.fixture(scope="module")
def sim(home: Path, served: ServeInfo) -> Iterator[subprocess.Popen[bytes]]:
    log = (home / "sim.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home), "sim"),
            *("--devices", str(DEVICES), "--profile", "cpu,gpu", "--processes", "1"),
            *("--traffic", "20", "--labelled", "1", "--telemetry-interval", "1"),
            *("--faults", "drift:group=gpu@1s=4", "--duration", "900"),
        ],
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for(what: str, check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.5)
    pytest.fail(f"{what} not within {timeout:.0f}s")


def test_sim_traffic_gates_a_broken_model_at_the_canary_and_drift_alerts_its_group(
    cli: Cli, home: Path, served: ServeInfo, sim: subprocess.Popen[bytes]
) -> None:
    h = ("--home", str(home))

    def devices() -> list[dict[str, Any]]:
        r = cli(*h, "devices", "ls", "--json")
        assert r.code == 0, r.err
        return json.loads(r.out)  # type: ignore[no-any-return]

    wait_for(
        "simulated devices online",
        lambda: sum(d["online"] and bool(d["capabilities"]) for d in devices()) == DEVICES,
    )
    assert sim.poll() is None, (home / "sim.log").read_text()

    # a plain deploy is a rollout like any other
    r = cli(*h, "deploy", "digits:1", "--to", "all", "--timeout", "120")
    assert r.code == 0, r.err
    assert f"{DEVICES} of {DEVICES} active" in r.err
    plain = r.err.split("rollout ", 1)[1].split(":", 1)[0]
    shown = cli(*h, "rollouts", "show", plain, "--json")
    assert shown.code == 0, shown.err
    assert json.loads(shown.out)["state"] == "done"

    staged = (
        *("deploy", "digits:2", "--to", "all", "--canary", "34%", "--waves", "100%"),
        *("--bake", "3s", "--min-accuracy", "0.6", "--min-samples", "20", "--json"),
    )
    # the dry run plans the canary the real rollout then uses
    dry = cli(*h, *staged, "--dry-run")
    assert dry.code == 0, dry.err
    assert "the real rollout puts the same devices in each stage" in dry.err
    planned = {d["device_id"] for d in json.loads(dry.out)["devices"] if d["stage"] == 0}
    assert len(planned) == 3  # 34% of 6, rounded up

    r = cli(*h, *staged)
    assert r.code == 1, r.err  # rolled back
    rollout = json.loads(r.out)
    assert rollout["state"] == "rolled_back", rollout
    assert "canary: gate accuracy" in rollout["reason"], rollout["reason"]
    shown = json.loads(cli(*h, "rollouts", "show", rollout["rollout_id"], "--json").out)
    real_canary = {d["device_id"] for d in shown["devices"] if d["stage"] == 0}
    assert real_canary == planned
    # the wave never started; the canary is counted as it is now, not as "shadowing"
    assert {d["phase"] for d in shown["devices"] if d["stage"] == 1} == {"pending"}
    assert shown["stages"][0]["by_state"] == {"rolled_back": 3}, shown["stages"][0]
    wait_for(
        "every device back on digits:1",
        lambda: all(d["active"].get("version") == 1 for d in devices()),
        timeout=60,
    )

    # live inputs of the gpu group were shifted from the start: its alert only
    def group_alerts() -> set[str]:
        r = cli(*h, "alerts", "--json")
        assert r.code == 0, r.err
        return {a["subject"] for a in json.loads(r.out) if a["scope"] == "group"}

    alerted = wait_for("a drift alert for group gpu", group_alerts)
    drift = cli(*h, "drift", "--by", "group", "--model", "digits:1", "--json")
    rows = {x["subject"]: x for x in json.loads(drift.out) if x["scope"] == "group"}
    assert alerted == {"gpu"}, rows
    assert rows["gpu"]["drifting"] and not rows["cpu"]["drifting"], rows
    assert sim.poll() is None
