"""The agent updates itself, end to end: real `fleet-agent run` processes installed from
an agent wheel built from this tree (A), a real Mosquitto with per-device credentials,
the real coordinator and rollout controller, and agent releases published like the
operator does (`fleet agent releases publish`):

- a release whose agent fails its check (B broken: `selfcheck` exits) fails on the canary;
  the failure-rate gate stops it there and rolls it back; the other device never gets it;
- a release whose agent dies once started (B crashes on connect) is switched to and
  rolled back automatically: the old agent takes over again, reports `agent_unhealthy`,
  and a client calling the device's local Predict throughout gets every call answered;
- a good release (B = A with a bumped version) goes canary → wave; both devices switch,
  report the new agent version, and Predict is answered throughout the switch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgefleet.agent.config import config_from_bundle, write_config
from edgefleet.agent.selfupdate import AGENT_MAIN, CURRENT, RELEASES_DIR, TRIAL_FILE
from edgefleet.agent.serde import encode_predict_request
from edgefleet.agent.server import CLIENT_RETRY_OPTIONS
from edgefleet.cloud.agent_releases import AGENT_MODEL
from edgefleet.cloud.cli.main import run as fleet
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.keys import KeyRing
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.rollouts import Policy, RolloutStore
from edgefleet.cloud.rollouts.controller import RolloutController
from edgefleet.cloud.signing import load_private_key
from edgefleet.protos.fleet.v1 import inference_pb2_grpc
from tests.e2e.test_packaging import _source_copy
from tests.support.identity import SecureBroker

PIP = (sys.executable, "-m", "pip")
A = "0.1.0"  # packaging/agent/pyproject.toml (tests/unit/test_packaging.py keeps it so)


# -- wheels -------------------------------------------------------------------------


def _rewrap(wheel: Path, out: Path, version: str, patch: Callable[[str, bytes], bytes]) -> Path:
    """A copy of the agent wheel with another version (dist-info, METADATA, RECORD) and
    `patch(name, data)` applied to every file."""
    old_info = f"edgefleet_agent-{A}.dist-info/"
    new_info = f"edgefleet_agent-{version}.dist-info/"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            data = z.read(name)
            if name == old_info + "METADATA":
                data = data.replace(
                    f"\nVersion: {A}\n".encode(), f"\nVersion: {version}\n".encode()
                )
            files[name.replace(old_info, new_info)] = patch(name, data)
    record = new_info + "RECORD"
    lines = []
    for name, data in files.items():
        if name == record:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    files[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    dest = out / f"edgefleet_agent-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return dest


def _unchanged(_name: str, data: bytes) -> bytes:
    return data


def _break_selfcheck(name: str, data: bytes) -> bytes:
    """The release's `fleet-agent` exits at once (a broken import, say)."""
    if name == "edgefleet/agent/cli.py":
        return data.replace(
            b"\napp = typer.Typer(", b"\nraise SystemExit(5)\napp = typer.Typer(", 1
        )
    return data


def _crash_on_connect(name: str, data: bytes) -> bytes:
    """The release's agent passes its check but dies once it connects to the broker."""
    if name == "edgefleet/agent/agent.py":
        old = b"    async def _on_connect(self) -> None:\n"
        assert old in data
        return data.replace(old, old + b"        os._exit(7)\n", 1)
    return data


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with one agent wheel each: A (this tree), B (A, version bumped), and two
    broken B's; plus A installed in its own venv (what the device runs first)."""
    root = tmp_path_factory.mktemp("agent-wheels")
    src = _source_copy(root / "src")
    built = root / "built"
    build = [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(built)]
    subprocess.run(
        [*build, str(src / "packaging" / "agent")],
        check=True,
        capture_output=True,
    )
    wheel_a = built / f"edgefleet_agent-{A}-py3-none-any.whl"
    assert wheel_a.exists(), list(built.iterdir())
    out: dict[str, Path] = {}
    for key, version, patch in (
        ("good", "0.1.1", _unchanged),
        ("broken_check", "0.1.2", _break_selfcheck),
        ("broken_run", "0.1.3", _crash_on_connect),
    ):
        d = root / key
        d.mkdir()
        _rewrap(wheel_a, d, version, patch)
        out[key] = d
    # the device's first install: a venv with A, its dependencies from this test's venv
    venv = root / "venv-a"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = [*PIP, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-index"]
    subprocess.run(
        [*install, "--no-deps", str(wheel_a)],
        check=True,
        capture_output=True,
    )
    out["venv_a"] = venv
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLEET_HOME with digits:1 (a small MLP)."""
    home = tmp_path_factory.mktemp("agent-update") / "home"
    assert fleet(["--home", str(home), "init"]) == 0
    client = LocalClient(load_settings(home=home))
    client.train(
        "digits", "digits", arch="mlp", epochs=1, seed=0, batch_size=64, lr=3e-3, on_epoch=None
    )
    client.close()
    return home


# -- devices ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Device:
    """One device: its config, state folder, local port and `fleet-agent run` process."""

    def __init__(self, home: Path, broker: SecureBroker, root: Path, device_id: str) -> None:
        self.device_id = device_id
        self.state_dir = root / device_id
        self.config = root / f"{device_id}.json"
        self.port = _free_port()
        self.log = root / f"{device_id}.log"
        client = LocalClient(load_settings(home=home))
        devices = DeviceStore(load_settings(home=home).registry_url)
        try:
            bundle = client.bundle(devices.enroll(device_id, group="update"), broker_url=broker.url)
        finally:
            devices.close()
            client.close()
        settings = config_from_bundle(
            json.dumps(bundle.to_json()).encode(),
            state_dir=self.state_dir,
            listen=f"127.0.0.1:{self.port}",
        )
        settings = settings.model_copy(
            update={**broker.agent_settings(device_id), "switch_deadline_s": 45.0}
        )
        write_config(self.config, settings, force=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, python: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(python), *AGENT_MAIN, "run", "--config", str(self.config)],
                env=env,
                cwd=self.state_dir.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def successor_pid(self) -> int:
        """The pid of the agent the first one switched to (it runs on in its own session)."""
        path = self.state_dir / RELEASES_DIR / TRIAL_FILE
        try:
            return int(json.loads(path.read_text()).get("healthy_pid", 0))
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        pids = [p for p in (self.successor_pid(),) if p]
        if self.proc is not None and self.proc.poll() is None:
            pids.append(self.proc.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)


class Caller:
    """Calls a device's local Predict back to back; counts answers and failures."""

    def __init__(self, port: int, x: np.ndarray) -> None:
        self.port, self.x = port, x
        self.answered = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        # the retry policy an app uses to ride through a switch (docs/agent.md)
        opts = CLIENT_RETRY_OPTIONS
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=opts) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            while not self._stop.is_set():
                try:
                    await stub.Predict(encode_predict_request(self.x), timeout=10)
                    self.answered += 1
                except grpc.aio.AioRpcError as e:
                    self.failed.append(f"{e.code().name}: {e.details()}")
                await asyncio.sleep(0.01)

    async def __aenter__(self) -> Caller:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(30):
            while self.answered == 0 and not self.failed:
                await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


def _publish(home: Path, directory: Path, version: str) -> int:
    """`fleet agent releases publish`; the registry version it made."""
    args = ["--home", str(home), "agent", "releases", "publish", str(directory)]
    assert fleet([*args, "--version", version, "--json"]) == 0
    client = LocalClient(load_settings(home=home))
    try:
        versions = client.registry.list_versions(AGENT_MODEL)
    finally:
        client.close()
    return max(v.version for v in versions)


# -- the test -----------------------------------------------------------------------


def test_agent_updates_itself_gated_and_rolled_back_while_predict_answers(
    home: Path, releases: dict[str, Path], broker: SecureBroker, tmp_path: Path
) -> None:
    settings = load_settings(home=home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    store = RolloutStore(settings.registry_url)
    fleet_ = [Device(home, broker, tmp_path, f"upd-{i}") for i in range(2)]
    python_a = releases["venv_a"] / "bin" / "python"
    for d in fleet_:
        d.start(python_a)
    x = np.zeros((1, 64), dtype=np.float32)
    group = Selector.parse("group=update")

    async def main() -> None:
        async with Coordinator(
            broker_url=broker.coordinator(),
            registry=client.registry,
            store=client.pipeline.store,
            devices=devices,
            signing_key=lambda: load_private_key(settings.signing_key_path),
            key_list=KeyRing(settings.keys_dir).key_list_bytes,
            gather=0.05,
        ) as coord:
            controller = RolloutController(coord, store, interval=0.2, min_gap=0.05)
            task = asyncio.create_task(controller.run())

            async def until(pred: Callable[[], Any], what: str, timeout: float = 90) -> Any:
                try:
                    async with asyncio.timeout(timeout):
                        while not (got := await asyncio.to_thread(pred)):
                            await asyncio.sleep(0.2)
                        return got
                except TimeoutError:
                    raise AssertionError(f"timed out waiting for {what}; logs: {logs()}") from None

            def logs() -> dict[str, str]:
                return {d.device_id: d.log.read_text()[-3000:] for d in fleet_}

            def agent_versions() -> dict[str, str]:
                return {d.device_id: devices.get(d.device_id).agent_version for d in fleet_}

            def rollout_state(rollout_id: str) -> str:
                return store.get(rollout_id).state

            try:
                await until(
                    lambda: all(devices.get(d.device_id).online for d in fleet_), "devices online"
                )
                assert set(agent_versions().values()) == {A}
                out = await coord.deploy(ModelRef("digits", 1), group)
                settled = await coord.wait_settled(out, timeout=60)
                assert {s.state for s in settled.values()} == {"active"}

                # 1. a release whose agent fails its check stops at the canary
                bad = _publish(home, releases["broken_check"], "0.1.2")
                policy = Policy(canary=0.5, waves=(1.0,), bake_s=0.0, max_failure_rate=0.0)
                r, devs = await controller.create(ModelRef(AGENT_MODEL, bad), group, policy)
                assert [s.devices for s in r.stages] == [1, 1]
                final = await until(
                    lambda: (
                        rollout_state(r.rollout_id) in ("rolled_back", "done", "paused")
                        and rollout_state(r.rollout_id)
                    ),
                    "the broken release's rollout to end",
                )
                got = {d.device_id: d for d in store.devices(r.rollout_id)}
                assert final == "rolled_back", (store.get(r.rollout_id), got, logs())
                canary = next(d for d in devs if d.stage == 0).device_id
                wave = next(d for d in devs if d.stage == 1).device_id
                # the canary failed its check, then the rollback removed the staged install
                assert got[canary].state == "rolled_back", got[canary]
                assert "agent 0.1.2 removed" in got[canary].detail, got[canary]
                by_id = {d.device_id: d for d in fleet_}
                failed = json.loads(
                    (by_id[canary].state_dir / RELEASES_DIR / "failed.json").read_text()
                )
                assert any(
                    v.startswith("AGENT_CHECK_FAILED") and "selfcheck exited 5" in v
                    for v in failed.values()
                ), failed
                assert not (by_id[canary].state_dir / RELEASES_DIR / "0.1.2").exists()
                assert got[wave].action == "" and got[wave].generation == 0  # never asked
                r = store.get(r.rollout_id)
                assert "failure_rate" in r.reason, r.reason
                assert set(agent_versions().values()) == {A}

                # 2. an agent that dies once started: switched to, and undone by itself;
                # the device's Predict answers every call meanwhile
                first = fleet_[0]
                crash = _publish(home, releases["broken_run"], "0.1.3")
                async with Caller(first.port, x) as caller:
                    out = await coord.deploy(
                        ModelRef(AGENT_MODEL, crash), Selector.parse(f"device={first.device_id}")
                    )
                    gen = out.targets[0].generation
                    rep = await until(
                        lambda: (
                            (rr := devices.get(first.device_id).reported).get("generation") == gen
                            and rr.get("state") == "failed"
                            and rr
                        ),
                        "the crashing release to be rolled back",
                    )
                    assert rep["reason"] == "agent_unhealthy", rep
                    assert "0.1.3 exited with status 7" in rep["detail"], rep
                    await asyncio.sleep(1.0)  # serving on after taking back
                assert caller.failed == [] and caller.answered > 10, caller.failed[:3]
                assert first.proc is not None and first.proc.poll() is None  # A serves on
                await until(lambda: agent_versions()[first.device_id] == A, "A online again")
                link = first.state_dir / RELEASES_DIR / CURRENT
                assert not link.exists()  # a restart runs A too

                # 3. a good release: canary, then the wave; both switch while Predict answers
                good = _publish(home, releases["good"], "0.1.1")
                async with Caller(first.port, x) as c0, Caller(fleet_[1].port, x) as c1:
                    r, _ = await controller.create(ModelRef(AGENT_MODEL, good), group, policy)
                    final = await until(
                        lambda: (
                            rollout_state(r.rollout_id) in ("rolled_back", "done", "paused")
                            and rollout_state(r.rollout_id)
                        ),
                        "the good release's rollout to end",
                    )
                    assert final == "done", store.get(r.rollout_id).reason
                    await until(
                        lambda: set(agent_versions().values()) == {"0.1.1"}, "agent 0.1.1 online"
                    )
                    await asyncio.sleep(0.5)
                for c in (c0, c1):
                    assert c.failed == [] and c.answered > 10, c.failed[:3]
                for d in fleet_:
                    assert d.proc is not None
                    assert d.proc.wait(timeout=30) == 0  # A handed over and exited
                    assert d.successor_pid() > 0
                    link = d.state_dir / RELEASES_DIR / CURRENT
                    assert link.resolve() == (d.state_dir / RELEASES_DIR / "0.1.1").resolve()
                    rep = devices.get(d.device_id).reported
                    assert rep["state"] == "active" and rep["active"]["model"] == "digits", rep
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(asyncio.wait_for(main(), 400))
    finally:
        for d in fleet_:
            d.stop()
        store.close()
        devices.close()
        client.close()
        shutil.rmtree(tmp_path / "unused", ignore_errors=True)
