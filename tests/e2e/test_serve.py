"""`fleet serve` as a real process: gRPC FleetService with token auth, its own Mosquitto,
the CLI through `--coordinator`, enrolment bundles, deploy to real agents, SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.config import ServeInfo
from edgefleet.cloud.devices.store import Birth
from edgefleet.cloud.devices.values import (
    Accelerator,
    Capabilities,
    ReasonCode,
    Reported,
    ServedModel,
    UpdateState,
)
from edgefleet.protos.errors import NotFound, Unauthenticated
from tests.conftest import Cli
from tests.e2e.conftest import MakeHome
from tests.support.e2e import AGENT_CPU, Version

REPO = Path(__file__).resolve().parents[2]
#: what a CPU-only device reports at birth, as the coordinator keeps it
CPU = Capabilities("x86_64", ("onnxruntime",), ("CPUExecutionProvider",), Accelerator.CPU, 0)


try:
    find_mosquitto()
except NotFound:  # the whole module needs a broker
    pytest.skip("mosquitto is not installed", allow_module_level=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def serve_argv(home: Path, *extra: str) -> list[str]:
    """`fleet serve` on free loopback ports (MQTT, gRPC, metrics), then `extra` options."""
    return [
        *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home), "serve"),
        *("--mqtt-port", "0", "--grpc-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"),
        *extra,
    ]


@contextmanager
def fleet_serve(
    home: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], ServeInfo]]:
    """`fleet serve` (plus `extra` options, `env` variables) on free loopback ports; yields
    once serve.json names it."""
    serve_json = home / "serve.json"
    proc = subprocess.Popen(
        serve_argv(home, *extra),
        cwd=REPO,
        env={**_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        info = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"fleet serve exited with {proc.returncode}: {err}")
            info = ServeInfo.read(serve_json)
            if info is not None and info.pid == proc.pid:
                break
            time.sleep(0.1)
        else:
            pytest.fail("fleet serve did not write serve.json within 60 s")
        assert info is not None
        yield proc, info
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture(scope="module")
def home(make_home: MakeHome) -> Path:
    """An initialised FLEET_HOME holding digits:1 with an int8 variant."""
    return make_home("serve", Version(epochs=3, variants=("int8",)))


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[ServeInfo]:
    with fleet_serve(home) as (_proc, info):
        yield info


def test_init_writes_a_private_token(home: Path) -> None:
    token = home / "keys" / "token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert len(token.read_text().strip()) >= 43  # 32 bytes, urlsafe base64


def test_models_through_the_coordinator_match_local(
    cli: Cli, home: Path, served: ServeInfo
) -> None:
    h = ("--home", str(home))
    remote = cli(*h, "--coordinator", served.grpc, "models", "ls")
    assert remote.code == 0, remote.err
    assert "digits" in remote.out
    assert remote.out == cli(*h, "models", "ls").out
    shown = cli(*h, "--coordinator", served.grpc, "models", "show", "digits:1")
    assert shown.code == 0, shown.err
    assert shown.out == cli(*h, "models", "show", "digits:1").out
    r = cli(*h, "--coordinator", served.grpc, "models", "verify", "digits:1")
    assert r.code == 0, r.err
    assert "int8" in r.out
    missing = cli(*h, "--coordinator", served.grpc, "models", "show", "digits:9")
    assert missing.code == 1
    assert missing.err.strip().startswith("error (not-found):")
    assert missing.err == cli(*h, "models", "show", "digits:9").err


def test_wrong_or_missing_token_is_refused(cli: Cli, home: Path, served: ServeInfo) -> None:
    r = cli("--home", str(home), "--coordinator", served.grpc, "--token", "wrong", "models", "ls")
    assert r.code == 1
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert "(unauthenticated)" in lines[0]
    assert "token" in lines[0]


def test_enroll_writes_a_bundle_and_devices_lists_it(
    cli: Cli, home: Path, served: ServeInfo, tmp_path: Path
) -> None:
    h = ("--home", str(home))
    out = tmp_path / "b.json"
    r = cli(*h, "--coordinator", served.grpc, "devices", "enroll", "d1", "--group", "g",
            "--tag", "site=lab", "--out", str(out))  # fmt: skip
    assert r.code == 0, r.err
    assert out.stat().st_mode & 0o777 == 0o600
    bundle = json.loads(out.read_text())
    assert bundle["device_id"] == "d1"
    assert bundle["signing_public_key"] == (home / "keys" / "signing.pub").read_text()
    assert bundle["broker_url"] == served.advertise_broker
    assert bundle["broker_url"].startswith("mqtt://127.0.0.1:")
    assert bundle["topic_prefix"] == "ef/v1"
    assert (bundle["group"], bundle["tags"]) == ("g", {"site": "lab"})

    listed = cli(*h, "--coordinator", served.grpc, "devices", "ls", "--json")
    assert listed.code == 0, listed.err
    devices = {d["device_id"]: d for d in json.loads(listed.out)}
    assert devices["d1"]["group"] == "g"
    assert devices["d1"]["state"] == "enrolled"
    # local mode reads the same store and prints the same
    assert cli(*h, "devices", "ls", "--json").out == listed.out
    shown = cli(*h, "--coordinator", served.grpc, "devices", "show", "d1", "--json")
    assert json.loads(shown.out)["tags"] == {"site": "lab"}
    again = cli(*h, "--coordinator", served.grpc, "devices", "enroll", "d1", "--out", "-")
    assert again.code == 1
    assert "error (already-exists)" in again.err
    # local enrolment names the running coordinator's broker too
    r = cli(*h, "devices", "enroll", "d1-local", "--out", str(tmp_path / "l.json"))
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "l.json").read_text())["broker_url"] == served.advertise_broker
    st = cli(*h, "status", "--json")
    assert st.code == 0, st.err
    assert json.loads(st.out)["coordinator"] == served.grpc


def test_batch_enroll_through_the_coordinator_and_every_device_gets_in(
    cli: Cli, home: Path, served: ServeInfo, tmp_path: Path
) -> None:
    from edgefleet.cloud.identity import IdentityStore
    from edgefleet.protos.transport import MqttAccess, MqttTransport

    h = ("--home", str(home), "--coordinator", served.grpc)
    out = tmp_path / "bulk"
    bad = cli(*h, "devices", "enroll", "bulk-ok", "bulk bad", "--out", str(out))
    assert bad.code == 1 and "device id 'bulk bad'" in bad.err
    r = cli(*h, "devices", "enroll", "--count", "15", "--prefix", "bulk", "--out", str(out))
    assert r.code == 0, r.err
    assert "enrolled 15 devices in 1 batch" in r.err
    ids = IdentityStore(home / "keys" / "mqtt")
    assert ids.applied() >= ids.version()  # the coordinator's broker runs with them
    bundles = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [b["device_id"] for b in bundles] == [f"bulk-{i:04d}" for i in range(15)]
    assert {b["broker_url"] for b in bundles} == {served.advertise_broker}
    # one known id refuses the whole batch through gRPC too: the new one is not enrolled
    refused = cli(*h, "devices", "enroll", "bulk-0001", "bulk-99", "--out", str(tmp_path / "x"))
    assert refused.code == 1 and "error (already-exists)" in refused.err
    assert "bulk-99" not in cli(*h, "devices", "ls").out

    async def connects(b: dict[str, Any]) -> bool:
        access = MqttAccess(b["broker_url"], username=b["username"], password=b["password"])
        async with MqttTransport(access.settings(b["device_id"])) as t:
            await t.wait_connected(timeout=10)
        return True

    async def every() -> list[bool]:
        return list(await asyncio.gather(*(connects(b) for b in bundles)))

    assert asyncio.run(every()) == [True] * 15


def test_reissue_through_the_coordinator_and_an_answer_cut_midway_loses_no_bundle(
    cli: Cli, home: Path, served: ServeInfo, tmp_path: Path
) -> None:
    """`fleet devices reissue` gives an enrolled device new credentials through gRPC (the
    old bundle stops working, the new one gets in). An `EnrollDevices` answer cut after
    its first page (a TCP proxy closes the link): the bundles that arrived are written,
    the ids of the rest listed in reissue.txt, and reissuing from that list through the
    coordinator gives every device of the batch a working bundle."""
    from edgefleet.protos.transport import MqttAccess, MqttTransport
    from tests.support.tcp_cut import ByteCutProxy

    async def connects(b: dict[str, Any]) -> bool:
        access = MqttAccess(b["broker_url"], username=b["username"], password=b["password"])
        try:
            async with MqttTransport(access.settings(b["device_id"])) as t:
                await t.wait_connected(timeout=10)
        except Unauthenticated:
            return False
        return True

    h = ("--home", str(home), "--coordinator", served.grpc)
    one = tmp_path / "ri.json"
    assert cli(*h, "devices", "enroll", "ri-a", "--group", "g", "--out", str(one)).code == 0
    old = json.loads(one.read_text())
    r = cli(*h, "devices", "reissue", "ri-a", "--out", str(one))  # replaces the old file
    assert r.code == 0, r.err
    assert "reissued ri-a" in r.err and one.stat().st_mode & 0o777 == 0o600
    new = json.loads(one.read_text())
    assert new["password"] != old["password"] and new["group"] == "g"
    assert asyncio.run(connects(new)) and not asyncio.run(connects(old))
    ghost = cli(*h, "devices", "reissue", "ri-a", "ghost", "--out", str(tmp_path / "g"))
    assert ghost.code == 1 and "'ghost'" in ghost.err and "not enrolled" in ghost.err
    audit = json.loads(cli(*h, "audit", "ls", "--json", "--action", "ReissueDevices").out)
    assert sorted(e["result"] for e in audit) == ["NOT_FOUND", "ok"]

    host, _, port = served.grpc.rpartition(":")
    n = 1100  # pages of 500, 500 and 100 bundles
    with ByteCutProxy((host, int(port))) as counting:
        via = ("--home", str(home), "--coordinator", counting.address)
        r = cli(*via, "devices", "enroll", "--count", str(n), "--prefix", "cnt",
                "--out", str(tmp_path / "cnt"))  # fmt: skip
        assert r.code == 0, r.err
    answer = max(counting.downstream)
    out = tmp_path / "cut"
    with ByteCutProxy((host, int(port)), cut_after=int(answer * 0.6)) as cutting:
        via = ("--home", str(home), "--coordinator", cutting.address)
        r = cli(*via, "devices", "enroll", "--count", str(n), "--prefix", "cut", "--out", str(out))
    assert r.code == 1 and cutting.cuts == 1
    assert "answer broke off" in r.err and "fleet devices reissue --from-file" in r.err
    ids = [f"cut-{i:04d}" for i in range(n)]
    written = sorted(p.stem for p in out.glob("*.json"))
    listed = (out / "reissue.txt").read_text().split()
    assert written == ids[:500] and listed == ids[500:]  # the first page, then the rest
    enrolled = {d["device_id"] for d in json.loads(cli(*h, "devices", "ls", "--json").out)}
    assert set(ids) <= enrolled  # the coordinator did the whole batch
    kept = (out / "cut-0000.json").read_bytes()
    r = cli(*h, "devices", "reissue", "--from-file", str(out / "reissue.txt"), "--out", str(out))
    assert r.code == 0, r.err
    assert f"reissued {n - 500} devices" in r.err
    assert sorted(p.stem for p in out.glob("*.json")) == ids
    assert (out / "cut-0000.json").read_bytes() == kept  # not reissued: untouched
    sample = [json.loads((out / f"{d}.json").read_text()) for d in (ids[0], ids[500], ids[-1])]

    async def all_in() -> list[bool]:
        return list(await asyncio.gather(*(connects(b) for b in sample)))

    assert asyncio.run(all_in()) == [True, True, True]


def test_deploy_to_a_device_never_online_fails(cli: Cli, home: Path, served: ServeInfo) -> None:
    h = ("--home", str(home))
    assert cli(*h, "devices", "enroll", "d-never", "--out", "-").code == 0
    r = cli(*h, "deploy", "digits:1", "--to", "device=d-never", "--timeout", "5")
    assert r.code == 1
    assert "d-never" in r.err
    assert "never online" in r.err


def test_deploy_to_an_offline_device_says_so_at_once(
    cli: Cli, home: Path, served: ServeInfo
) -> None:
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceStore

    store = DeviceStore(load_settings(home=home).registry_url)
    try:
        store.enroll("d-away", group="away")
        store.record_status("d-away", Birth(True, capabilities=CPU))
        store.record_status("d-away", Birth(False))
    finally:
        store.close()
    h = ("--home", str(home), "--coordinator", served.grpc)
    start = time.monotonic()
    r = cli(*h, "deploy", "digits:1", "--to", "device=d-away", "--timeout", "120")
    assert r.code == 0, r.err
    assert time.monotonic() - start < 60  # not the 120 s timeout: nothing waits for it
    assert "offline now: d-away; their desired state is kept" in r.err
    assert "1 offline (they update when they reconnect)" in r.err
    row = next(line.split() for line in r.out.splitlines() if line.startswith("d-away"))
    assert row[2:4] == ["waiting", "offline:"], row


def test_deploy_to_two_agents(cli: Cli, home: Path, served: ServeInfo, tmp_path: Path) -> None:
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.config import AgentSettings

    h = ("--home", str(home), "--coordinator", served.grpc)
    bundles: dict[str, dict[str, Any]] = {}
    for dev in ("edge-a", "edge-b"):
        path = tmp_path / f"{dev}.json"
        r = cli(*h, "devices", "enroll", dev, "--group", "edge", "--out", str(path))
        assert r.code == 0, r.err
        bundles[dev] = json.loads(path.read_text())

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    failure: list[BaseException] = []

    async def agents() -> None:
        ags = [
            Agent(
                AgentSettings(
                    device_id=b["device_id"],
                    state_dir=tmp_path / b["device_id"],
                    broker_url=b["broker_url"],
                    username=b["username"],
                    password=b["password"],
                    public_key_pem=b["signing_public_key"],
                    topic_prefix=b["topic_prefix"],
                    group=b["group"],
                    tags=b["tags"],
                    listen="",
                ),
                capabilities=AGENT_CPU,
                durable=False,
                want_interval=0.5,
            )
            for b in bundles.values()
        ]
        ready = [asyncio.Event() for _ in ags]
        tasks = [
            asyncio.create_task(a.run(stop.wait, ready=r)) for a, r in zip(ags, ready, strict=True)
        ]
        await asyncio.gather(*(r.wait() for r in ready))
        started.set()
        await asyncio.gather(*tasks)

    def thread_main() -> None:
        try:
            loop.run_until_complete(agents())
        except BaseException as e:
            failure.append(e)
            started.set()

    t = threading.Thread(target=thread_main, daemon=True)
    t.start()
    try:
        assert started.wait(30) and not failure, failure
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = cli(*h, "devices", "ls", "--selector", "group=edge", "--online", "--json")
            if len(json.loads(r.out)) == 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("agents did not come online")
        r = cli(*h, "deploy", "digits:1", "--to", "group=edge", "--timeout", "60")
        assert r.code == 0, r.out + r.err
        rows = {line.split()[0]: line.split() for line in r.out.splitlines()[1:] if line.strip()}
        assert set(rows) == {"edge-a", "edge-b"}
        for row in rows.values():
            assert row[1:3] == ["int8", "active"], row
        assert "2 of 2 active" in r.err
        # a plain deploy is a rollout like any other: listed, shown, one stage, done
        rollout_id = r.err.split("rollout ", 1)[1].split(":", 1)[0]
        shown = cli(*h, "rollouts", "show", rollout_id, "--json")
        assert shown.code == 0, shown.err
        got = json.loads(shown.out)
        assert got["state"] == "done" and [s["name"] for s in got["stages"]] == ["all"]
        assert {d["device_id"] for d in got["devices"]} == {"edge-a", "edge-b"}
        listed_ids = [x["rollout_id"] for x in json.loads(cli(*h, "rollouts", "ls", "--json").out)]
        assert rollout_id in listed_ids
        listed = cli(*h, "devices", "ls", "--state", "active", "--json")
        assert {d["device_id"] for d in json.loads(listed.out)} == {"edge-a", "edge-b"}
        for d in json.loads(listed.out):
            assert d["active"]["variant"] == "int8"
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(30)
        loop.close()
    assert not failure, failure


def test_sigterm_stops_serve_and_its_broker(tmp_path: Path) -> None:
    from edgefleet.cloud.cli.main import run

    home = tmp_path / "home"
    assert run(["--home", str(home), "init"]) == 0
    with fleet_serve(home) as (proc, info):
        port = int(info.broker_url.rsplit(":", 1)[1])
        mosquitto = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-f", f"mosquitto -c {home / 'broker'}"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
        ]
        assert len(mosquitto) == 1
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - start < 8
        with pytest.raises(ProcessLookupError):
            os.kill(mosquitto[0], 0)
        assert not (home / "serve.json").exists()
        import socket

        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass


def test_devices_ls_filters_locally_and_through_the_coordinator(
    cli: Cli, home: Path, served: ServeInfo
) -> None:
    from datetime import datetime, timedelta

    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceStore

    store = DeviceStore(load_settings(home=home).registry_url)
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    try:
        for device, group in (("f-a1", "fa"), ("f-a2", "fa"), ("f-b1", "fb")):
            store.enroll(device, group=group)
        v1 = ServedModel("digits", 1, "fp32", "ab")
        store.record_status("f-a1", Birth(True, active=v1))
        store.record_status("f-a2", Birth(False), now=long_ago)
        store.record_reported(
            "f-b1",
            Reported(
                "f-b1",
                0,
                UpdateState.FAILED,
                ReasonCode.UNSPECIFIED,
                active=dataclasses.replace(v1, version=2),
            ),
            now=long_ago,
        )
    finally:
        store.close()
    sel = ("--selector", "device=f-a1,f-a2,f-b1")
    cases = [
        (("--group", "fa"), ["f-a1", "f-a2"]),
        (("--group", "fa", "--online"), ["f-a1"]),
        (("--group", "fa", "--offline"), ["f-a2"]),
        ((*sel, "--version", "digits:1"), ["f-a1"]),
        ((*sel, "--version", "digits"), ["f-a1", "f-b1"]),
        ((*sel, "--state", "failed"), ["f-b1"]),
        ((*sel, "--stale", "1h"), ["f-a2", "f-b1"]),
        ((*sel, "--stale", "3h"), []),
    ]
    for remote in (False, True):
        h = ("--home", str(home), *(("--coordinator", served.grpc) if remote else ()))
        for args, want in cases:
            r = cli(*h, "devices", "ls", *args, "--json")
            assert r.code == 0, (args, r.err)
            assert [d["device_id"] for d in json.loads(r.out)] == want, (remote, args)
        r = cli(*h, "devices", "ls", "--stale", "soon")
        assert r.code == 1 and "--stale 'soon' is not a duration" in r.err
        r = cli(*h, "devices", "ls", "--online", "--offline")
        assert r.code == 1 and "--online and --offline exclude each other" in r.err
        # drift and alerts answer in both modes (nothing has sent traffic here)
        r = cli(*h, "alerts", "--all", "--json")
        assert r.code == 0 and json.loads(r.out) == [], r.err
        r = cli(*h, "drift", "--by", "device", "--json")
        assert r.code == 0 and json.loads(r.out) == [], r.err


def test_serve_with_ingest_workers_runs_and_stops_them(tmp_path: Path) -> None:
    """`fleet serve --ingest-workers 2`: two worker processes, their counters on
    /metrics, and none left after SIGTERM (tests/e2e/test_ingest_workers.py has the
    telemetry through them and a worker SIGKILLed)."""
    import urllib.request

    import psutil

    from edgefleet.cloud.cli.main import run

    home = tmp_path / "home"
    assert run(["--home", str(home), "init"]) == 0
    with fleet_serve(home, "--ingest-workers", "2") as (proc, info):

        def workers() -> list[psutil.Process]:
            return [
                c
                for c in psutil.Process(proc.pid).children()
                if "edgefleet.cloud.telemetry.worker" in " ".join(c.cmdline())
            ]

        found = workers()
        assert len(found) == 2
        with urllib.request.urlopen(info.metrics, timeout=10) as r:
            text = r.read().decode()
        assert "edgefleet_telemetry_received_total 0.0" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _gone, alive = psutil.wait_procs(found, timeout=10)
        assert not alive
