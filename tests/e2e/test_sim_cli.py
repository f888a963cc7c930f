"""`fleet sim` against a real `fleet serve`: devices enrolled through the coordinator,
run in two simulator processes, deployed to, with faults injected on the way."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cloud.config import ServeInfo
from edgefleet.simulator.cluster import SimCluster
from edgefleet.simulator.faults import parse_faults
from tests.conftest import Cli
from tests.e2e.test_serve import REPO, _env, fleet_serve
from tests.e2e.test_serve import home as home


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[ServeInfo]:
    with fleet_serve(home) as (_proc, info):
        yield info


def _fleet(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home), *args]


def test_fleet_sim_runs_devices_that_a_deploy_reaches_through_faults(
    home: Path,
    served: ServeInfo,
    tmp_path: Path,
) -> None:
    sim = subprocess.Popen(
        _fleet(
            home,
            "sim",
            "--devices",
            "6",
            "--processes",
            "2",
            "--profile",
            "cpu",
            "--id-prefix",
            "clisim",
            "--state-dir",
            str(tmp_path / "sim"),
            "--faults",
            "corrupt:2=2,lose:2=3,drop_link:1@0.5s",
            "--until-active",
            "6",
            "--json",
        ),
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # wait until the six are enrolled and online, then deploy to them
        deadline = 90.0
        devices: list[dict[str, object]] = []
        import time

        start = time.monotonic()
        while time.monotonic() - start < deadline:
            out = subprocess.run(
                _fleet(
                    home, "devices", "ls", "--selector", "tag=profile=cpu", "--online", "--json"
                ),
                cwd=REPO,
                env=_env(),
                capture_output=True,
                text=True,
                check=True,
            )
            devices = [
                d for d in json.loads(out.stdout) if str(d["device_id"]).startswith("clisim")
            ]
            if len(devices) == 6:
                break
            time.sleep(0.5)
        assert len(devices) == 6, f"only {len(devices)} simulated devices came online"
        dep = subprocess.run(
            _fleet(home, "deploy", "digits:1", "--to", "tag=profile=cpu", "--json"),
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert dep.returncode == 0, dep.stderr
        report = json.loads(dep.stdout)
        states = {d["device_id"]: d["state"] for d in report["devices"]}
        assert states == {f"clisim-{i:04d}": "active" for i in range(6)}
        # the coordinator's /metrics sees the same fleet
        import urllib.request

        assert served.metrics.startswith("http://127.0.0.1:")
        text = urllib.request.urlopen(served.metrics, timeout=10).read().decode()
        # (the simulator may already be stopping: it exits once all six are active)
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        counts = {s.labels["status"]: s.value for s in samples if s.name == "edgefleet_devices"}
        assert counts["online"] + counts["offline"] == 6, text
        by_version = {
            (s.labels["model"], s.labels["version"], s.labels["variant"]): s.value
            for s in samples
            if s.name == "edgefleet_devices_by_version"
        }
        assert by_version == {("digits", "1", "int8"): 6}
        received = [s.value for s in samples if s.name == "edgefleet_telemetry_received_total"]
        assert received and received[0] > 0  # the simulated devices' telemetry came in
        out_s, err_s = sim.communicate(timeout=120)
    finally:
        if sim.poll() is None:
            sim.terminate()
            sim.wait(30)
    assert sim.returncode == 0, err_s
    summary = json.loads(out_s)
    assert summary["devices"] == 6 and summary["processes"] == 2
    assert summary["states"].get("active") == 6
    assert summary["variants"] == {"int8": 6}
    kinds = {f["fault"]: f["devices"] for f in summary["faults"]}
    assert len(kinds["corrupt"]) == 2 and len(kinds["lose"]) == 2
    assert len(kinds["drop_link"]) == 1
    # the enrolment answer is cached, so a second run reuses the enrolled devices
    cached = json.loads((tmp_path / "sim" / "enrollment.json").read_text())
    assert cached["broker_url"].startswith("mqtt://127.0.0.1:")


def test_fleet_sim_rejects_a_bad_fault_plan(home: Path, cli: Cli) -> None:
    r = cli("--home", str(home), "sim", "--devices", "2", "--faults", "explode:3")
    assert r.code == 1
    assert "explode" in r.err and "drop_link" in r.err


def test_fault_plans_parse_and_pick_deterministically() -> None:
    plan = parse_faults("slow_link:50%@2s=64kB/s, crash:1@1s=never, corrupt:2=3, drop_link:10%")
    assert [(f.kind, f.at) for f in plan] == [
        ("corrupt", 0.0),
        ("drop_link", 0.0),
        ("crash", 1.0),
        ("slow_link", 2.0),
    ]
    slow = plan[-1]
    assert slow.arg == 64e3 and slow.count(10) == 5
    assert plan[2].arg < 0  # never reboot
    ids = [f"d-{i}" for i in range(10)]
    assert slow.pick(ids, seed=1) == slow.pick(ids, seed=1)
    assert len(set(slow.pick(ids, seed=1))) == 5
    for bad, word in [
        ("slow_link:2", "needs a rate"),
        ("drop_link:0", ">= 1"),
        ("drop_link:150%", "(0, 100]"),
        ("corrupt=x", "chunk count"),
        ("drop_link=3", "takes no"),
    ]:
        with pytest.raises(Exception, match=None) as ei:
            parse_faults(bad)
        assert word in str(ei.value), (bad, str(ei.value))


def test_cluster_reports_a_worker_that_cannot_start(tmp_path: Path) -> None:
    cluster = SimCluster(
        2,
        broker_url="mqtt://127.0.0.1:1",  # nothing listens there
        public_key_pem="x",
        state_root=tmp_path,
        processes=1,
        profile="cpu",
        connect_timeout=2.0,
    )

    async def main() -> None:
        async with cluster:
            pass

    with pytest.raises(Exception) as ei:
        asyncio.run(main())
    assert "did not start" in str(ei.value) and "worker-0.log" in str(ei.value)
