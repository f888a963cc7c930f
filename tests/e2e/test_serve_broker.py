"""`fleet serve` and its managed Mosquitto: a taken port is refused by name, the broker
never outlives its coordinator (SIGKILL included), a stale broker from an earlier life is
stopped, and serve.json only counts when the coordinator answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edgefleet.cloud.broker import ManagedBroker, find_mosquitto, free_port
from edgefleet.cloud.config import ServeInfo
from edgefleet.protos.errors import NotFound
from tests.e2e.test_serve import REPO, _env, fleet_serve, serve_argv
from tests.support.identity import SecureBroker

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    from edgefleet.cloud.cli.main import run

    h = tmp_path / "home"
    assert run(["--home", str(h), "init"]) == 0
    return h


def serve_fails(home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_argv(home, "--metrics-listen", "off", *extra),
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not reaped yet) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_serve_refuses_a_port_held_by_another_program(home: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = serve_fails(home, "--mqtt-port", str(port))
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr  # one line, no traceback, no restart loop
    assert f"MQTT port 127.0.0.1:{port} is already taken by " in lines[0]
    assert f"(pid {os.getpid()})" in lines[0]  # who holds it: this test's process
    assert "--mqtt-port" in lines[0] and f"--broker mqtt://127.0.0.1:{port}" in lines[0]
    assert not (home / "serve.json").exists()


def test_serve_refuses_a_port_held_by_a_foreign_broker(home: Path, broker: SecureBroker) -> None:
    r = serve_fails(home, "--mqtt-port", str(broker.port))
    assert r.returncode == 1
    assert (
        f"MQTT port 127.0.0.1:{broker.port} is already taken by mosquitto (pid {broker.pid})"
        in (r.stderr)
    )
    assert broker.running  # the other broker is left alone


def test_sigkilled_serve_leaves_no_broker_and_a_restart_works(home: Path) -> None:
    port = free_port()
    with fleet_serve(home, "--mqtt-port", str(port)) as (proc, info):
        record = json.loads((home / "broker" / "broker.pid").read_text())
        assert record["port"] == port and info.broker_url.endswith(f":{port}")
        mosquitto = int(record["pid"])
        assert alive(mosquitto)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(mosquitto), "mosquitto outlived its SIGKILLed coordinator"
        assert ServeInfo.read(home / "serve.json") is None  # stale file, nobody answers
    with fleet_serve(home, "--mqtt-port", str(port)) as (proc2, info2):
        assert info2.pid == proc2.pid and info2.broker_url.endswith(f":{port}")
        new = json.loads((home / "broker" / "broker.pid").read_text())["pid"]
        assert new != mosquitto and alive(new)


def test_a_stale_broker_of_our_own_is_stopped_before_starting(home: Path) -> None:
    port = free_port()
    state = home / "broker"
    stale = ManagedBroker(state, port=port).start()
    pid = stale.pid
    assert pid is not None
    # as if its coordinator and the watchdog had died without stopping it
    assert stale._watchdog is not None
    stale._watchdog.kill()
    stale._watchdog.wait()
    stale._proc = None
    try:
        with fleet_serve(home, "--mqtt-port", str(port)) as (_proc, info):
            assert wait_gone(pid)
            assert info.broker_url.endswith(f":{port}")
            current = json.loads((state / "broker.pid").read_text())["pid"]
            assert current != pid and alive(current)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_serve_json_needs_an_answer_not_just_a_pid(tmp_path: Path) -> None:
    path = tmp_path / "serve.json"
    port = free_port()
    ServeInfo(
        grpc=f"127.0.0.1:{port}",
        broker_url="mqtt://127.0.0.1:1",
        advertise_broker="mqtt://127.0.0.1:1",
        pid=os.getpid(),  # alive, but no FleetService there
    ).write(path)
    assert ServeInfo.load(path) is not None
    assert ServeInfo.read(path) is None
