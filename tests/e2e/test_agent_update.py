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
import signal
import socket
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
from edgefleet.cloud.devices.values import Reported
from edgefleet.cloud.keys import KeyRing
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.rollouts import Policy, RolloutDevice, RolloutStore
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
    """A FLEET_HOME with digits:1: a small MLP, imported (no training needed here)."""
    import torch

    from edgefleet.cloud.training.export import export_onnx
    from edgefleet.models.arch import ArchConfig, build

    root = tmp_path_factory.mktemp("agent-update")
    home = root / "home"
    assert fleet(["--home", str(home), "init"]) == 0
    torch.manual_seed(0)
    model = root / "digits.onnx"
    model.write_bytes(export_onnx(build(ArchConfig("mlp", (64,), 10)), (64,)))
    assert fleet(["--home", str(home), "models", "import", str(model), "--name", "digits"]) == 0
    return home


# -- devices ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Device:
    """One device: its config, state folder, local port and `fleet-agent run` process."""

    def __init__(
        self, home: Path, broker: SecureBroker, root: Path, device_id: str, group: str
    ) -> None:
        self.device_id = device_id
        self.state_dir = root / device_id
        self.config = root / f"{device_id}.json"
        self.port = _free_port()
        self.log = root / f"{device_id}.log"
        client = LocalClient(load_settings(home=home))
        devices = DeviceStore(load_settings(home=home).registry_url)
        try:
            bundle = client.bundle(devices.enroll(device_id, group=group), broker_url=broker.url)
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


# -- a fleet of real agents ----------------------------------------------------------

POLICY = Policy(canary=0.5, waves=(1.0,), bake_s=0.0, max_failure_rate=0.0)
X = np.zeros((1, 64), dtype=np.float32)


@dataclass
class Session:
    coord: Coordinator
    controller: RolloutController
    devices: DeviceStore
    store: RolloutStore
    fleet: list[Device]
    group: Selector

    def logs(self) -> dict[str, str]:
        return {d.device_id: d.log.read_text()[-3000:] for d in self.fleet}

    async def until(self, pred: Callable[[], Any], what: str, timeout: float = 120) -> Any:
        try:
            async with asyncio.timeout(timeout):
                while not (got := await asyncio.to_thread(pred)):
                    await asyncio.sleep(0.2)
                return got
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; logs: {self.logs()}") from None

    def agent_versions(self) -> dict[str, str]:
        return {d.device_id: self.devices.get(d.device_id).agent_version for d in self.fleet}

    async def rollout(self, version: int) -> tuple[str, str, list[RolloutDevice]]:
        """Roll agent release `version` out to the group; its final state, once final."""
        r, devs = await self.controller.create(ModelRef(AGENT_MODEL, version), self.group, POLICY)

        def final() -> str:
            state = self.store.get(r.rollout_id).state
            return state if state in ("rolled_back", "done", "paused") else ""

        return r.rollout_id, await self.until(final, f"rollout {r.rollout_id} to end"), devs


@asynccontextmanager
async def session(
    home: Path, releases: dict[str, Path], broker: SecureBroker, tmp_path: Path, name: str, n: int
) -> AsyncIterator[Session]:
    """`n` devices running `fleet-agent run` from the venv with agent A, the coordinator
    and the rollout controller; every device serving digits:1."""
    settings = load_settings(home=home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    store = RolloutStore(settings.registry_url)
    fleet_ = [Device(home, broker, tmp_path, f"{name}-{i}", name) for i in range(n)]
    try:
        for d in fleet_:
            d.start(releases["venv_a"] / "bin" / "python")
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
            s = Session(coord, controller, devices, store, fleet_, Selector.parse(f"group={name}"))
            try:
                await s.until(
                    lambda: all(devices.get(d.device_id).online for d in fleet_), "devices online"
                )
                assert set(s.agent_versions().values()) == {A}
                out = await coord.deploy(ModelRef("digits", 1), s.group)
                settled = await coord.wait_settled(out, timeout=60)
                assert {st.state for st in settled.values()} == {"active"}
                yield s
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        for d in fleet_:
            d.stop()
        store.close()
        devices.close()
        client.close()


# -- the tests ----------------------------------------------------------------------


def test_agent_switches_to_a_new_version_canary_then_wave_while_predict_answers(
    home: Path, releases: dict[str, Path], broker: SecureBroker, tmp_path: Path
) -> None:
    async def main() -> None:
        async with session(home, releases, broker, tmp_path, "good", 2) as s:
            good = _publish(home, releases["good"], "0.1.1")
            a, b = s.fleet
            async with Caller(a.port, X) as c0, Caller(b.port, X) as c1:
                rollout_id, final, devs = await s.rollout(good)
                assert final == "done", (s.store.get(rollout_id).reason, s.logs())
                assert [d.stage for d in devs] == [0, 1]
                await s.until(
                    lambda: set(s.agent_versions().values()) == {"0.1.1"}, "agent 0.1.1 online"
                )
                await asyncio.sleep(0.5)  # answered by the new agents
            for c in (c0, c1):
                assert c.failed == [] and c.answered > 10, c.failed[:3]
            for d in s.fleet:
                assert d.proc is not None
                assert d.proc.wait(timeout=30) == 0  # A handed over and exited
                assert d.successor_pid() > 0
                link = d.state_dir / RELEASES_DIR / CURRENT
                assert link.resolve() == (d.state_dir / RELEASES_DIR / "0.1.1").resolve()
                rep = s.devices.get(d.device_id).reported
                assert rep is not None and rep.state == "active", rep
                assert rep.active is not None and rep.active.model == "digits", rep
            rows = s.store.devices(rollout_id)
            assert {(r.phase, r.state) for r in rows} == {("active", "active")}, rows

    asyncio.run(asyncio.wait_for(main(), 300))


def test_an_agent_that_dies_after_the_switch_is_rolled_back_while_predict_answers(
    home: Path, releases: dict[str, Path], broker: SecureBroker, tmp_path: Path
) -> None:
    async def main() -> None:
        async with session(home, releases, broker, tmp_path, "crash", 1) as s:
            (a,) = s.fleet
            crash = _publish(home, releases["broken_run"], "0.1.3")
            async with Caller(a.port, X) as caller:
                out = await s.coord.deploy(
                    ModelRef(AGENT_MODEL, crash), Selector.parse(f"device={a.device_id}")
                )
                gen = out.targets[0].generation

                def failed() -> Reported | None:
                    rep = s.devices.get(a.device_id).reported
                    ok = rep is not None and rep.generation == gen and rep.state == "failed"
                    return rep if ok else None

                rep = await s.until(failed, "the crashing release to be rolled back")
                assert rep.reason == "agent_unhealthy", rep
                assert "0.1.3 exited with status 7" in rep.detail, rep
                await asyncio.sleep(1.0)  # serving on after taking back
            assert caller.failed == [] and caller.answered > 10, caller.failed[:3]
            assert a.proc is not None and a.proc.poll() is None  # A serves on
            await s.until(lambda: s.agent_versions()[a.device_id] == A, "A online again")
            assert not (a.state_dir / RELEASES_DIR / CURRENT).exists()  # a restart runs A
            failed_before = json.loads((a.state_dir / RELEASES_DIR / "failed.json").read_text())
            assert any(v.startswith("AGENT_UNHEALTHY") for v in failed_before.values())

    asyncio.run(asyncio.wait_for(main(), 300))


@pytest.mark.slow
@pytest.mark.cluster
def test_a_release_whose_agent_fails_its_check_or_its_switch_stops_at_the_canary(
    home: Path, releases: dict[str, Path], broker: SecureBroker, tmp_path: Path
) -> None:
    async def main() -> None:
        async with session(home, releases, broker, tmp_path, "check", 2) as s:
            bad = _publish(home, releases["broken_check"], "0.1.2")
            rollout_id, final, devs = await s.rollout(bad)
            r = s.store.get(rollout_id)
            got = {d.device_id: d for d in s.store.devices(rollout_id)}
            assert final == "rolled_back", (r, got, s.logs())
            assert "failure_rate" in r.reason, r.reason
            canary = next(d for d in devs if d.stage == 0).device_id
            wave = next(d for d in devs if d.stage == 1).device_id
            # the canary failed its check; the rollback removed the staged install
            assert got[canary].state == "rolled_back", got[canary]
            assert "agent 0.1.2 removed" in got[canary].detail, got[canary]
            by_id = {d.device_id: d for d in s.fleet}
            releases_dir = by_id[canary].state_dir / RELEASES_DIR
            failed = json.loads((releases_dir / "failed.json").read_text())
            assert any(
                v.startswith("AGENT_CHECK_FAILED") and "selfcheck exited 5" in v
                for v in failed.values()
            ), failed
            assert not (releases_dir / "0.1.2").exists()
            assert got[wave].action == "" and got[wave].generation == 0  # never asked
            assert set(s.agent_versions().values()) == {A}
            assert all(d.proc is not None and d.proc.poll() is None for d in s.fleet)

            # a release that passes its check but whose agent dies once switched to: the
            # canary goes back to A by itself, and the gate stops the release there too
            crash = _publish(home, releases["broken_run"], "0.1.3")
            rollout_id, final, devs = await s.rollout(crash)
            r = s.store.get(rollout_id)
            got = {d.device_id: d for d in s.store.devices(rollout_id)}
            assert final == "rolled_back", (r, got, s.logs())
            assert "agent_unhealthy" in r.reason, r.reason
            wave = next(d for d in devs if d.stage == 1).device_id
            assert got[wave].action == "" and got[wave].generation == 0
            await s.until(lambda: set(s.agent_versions().values()) == {A}, "A everywhere")
            assert all(d.proc is not None and d.proc.poll() is None for d in s.fleet)

    asyncio.run(asyncio.wait_for(main(), 300))
