"""Offline installs, end to end: a model exported by `fleet models export` is installed
with `fleet-agent install` while the agent is stopped (the device has no broker in
reach), then the agent starts, connects to a real Mosquitto and the real coordinator
records the model active with reason offline_install. Refused input (tampered
artifact, manifest signed by a key the device does not trust, failing self-test)
gives one error line naming the file and the check, and changes nothing on disk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentSettings, config_from_bundle, write_config
from edgefleet.agent.offline import RECORD_FILE
from edgefleet.cloud.cli.main import run as fleet
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.keys import KeyRing
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.signing import load_private_key
from edgefleet.protos.manifest import SignedManifest, decode_manifest, sign_manifest
from tests.support.e2e import AGENT_CPU, Version, local_coordinator, trained_home, wait_born
from tests.support.identity import SecureBroker


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A FLEET_HOME with digits:1 and digits:2 (small MLPs) and digits:2/fp32 exported."""
    root = tmp_path_factory.mktemp("offline")
    home = trained_home(root, Version(epochs=1, seed=0), Version(epochs=1, seed=1))
    out = root / "export"
    assert fleet(["--home", str(home), "models", "export", "digits:2", "--out", str(out)]) == 0
    return {
        "home": home,
        "model": out / "digits-2-fp32.onnx",
        "manifest": out / "digits-2-fp32.manifest",
    }


def _device(
    home: Path, device_id: str, broker_url: str, state_dir: Path, config: Path
) -> AgentSettings:
    """Enrol a device as an installer would: bundle → `fleet-agent enroll`'s config."""
    client = LocalClient(load_settings(home=home))
    devices = DeviceStore(load_settings(home=home).registry_url)
    try:
        bundle = client.bundle(devices.enroll(device_id), broker_url=broker_url)
    finally:
        devices.close()
        client.close()
    settings = config_from_bundle(
        json.dumps(bundle.to_json()).encode(), state_dir=state_dir, listen=""
    )
    write_config(config, settings, force=True)
    return settings


def _install(model: Path, manifest: Path, config: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgefleet.agent.cli", "install", str(model)]
    cmd += ["--manifest", str(manifest), "--config", str(config)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _one_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error ("), r.stderr
    return lines[0]


def _snapshot(state_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(state_dir)): p.read_bytes()
        for p in sorted(state_dir.rglob("*"))
        if p.is_file()
    }


def test_offline_install_activates_and_is_reported_after_reconnect(
    exported: dict[str, Path], broker: SecureBroker, tmp_path: Path
) -> None:
    home = exported["home"]
    settings = load_settings(home=home)
    state_dir, config = tmp_path / "k1", tmp_path / "agent.json"
    agent_settings = _device(home, "k1", broker.url, state_dir, config)
    agent_settings = agent_settings.model_copy(update=broker.agent_settings("k1"))
    write_config(config, agent_settings, force=True)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    v1 = client.registry.get_version(ModelRef("digits", 1)).variants[0].sha256
    v2 = decode_manifest(
        SignedManifest.from_bytes(exported["manifest"].read_bytes()).manifest_bytes
    ).sha256

    async def main() -> None:
        async with local_coordinator(
            client,
            devices,
            broker.coordinator(),
            key_list=KeyRing(settings.keys_dir).key_list_bytes,
            gather=0.05,
        ) as coord:
            stop = asyncio.Event()

            async def start() -> tuple[Agent, asyncio.Task[None]]:
                nonlocal stop
                a = Agent(agent_settings, capabilities=AGENT_CPU, durable=False, want_interval=0.3)
                stop = asyncio.Event()
                ready = asyncio.Event()
                task = asyncio.create_task(a.run(stop.wait, ready=ready))
                await ready.wait()
                await a.transport.wait_connected(timeout=10)
                return a, task

            async def reported(pred: Any) -> dict[str, Any]:
                async with asyncio.timeout(60):
                    while True:
                        got = (await asyncio.to_thread(devices.get, "k1")).reported
                        rep = dataclasses.asdict(got) if got else {}
                        if pred(rep):
                            return rep
                        await coord.changed(0.3)

            # online: digits:1 deployed over MQTT
            agent, task = await start()
            await wait_born(devices, "k1")
            out = await coord.deploy(ModelRef("digits", 1), Selector.parse("device=k1"))
            gen = out.targets[0].generation
            rep = await reported(lambda r: r.get("generation") == gen and r["state"] == "active")
            assert rep["active"]["sha256"] == v1

            # the running agent holds its state directory: an install is refused, not raced
            busy = await asyncio.to_thread(
                _install, exported["model"], exported["manifest"], config
            )
            assert "error (conflict)" in _one_error(busy) and str(state_dir) in busy.stderr
            stop.set()
            await task

            # offline: digits:2 from the exported files
            ok = await asyncio.to_thread(_install, exported["model"], exported["manifest"], config)
            assert ok.returncode == 0, ok.stderr
            assert "digits:2/fp32" in ok.stdout and "self-test ok" in ok.stdout
            assert (state_dir / RECORD_FILE).exists()
            slots = json.loads((state_dir / "slots.json").read_text())
            assert slots["active"] == v2 and slots["last_known_good"] == v1

            # reconnect: the coordinator records it active, with the reason
            agent, task = await start()
            rep = await reported(lambda r: r.get("reason") == "offline_install")
            assert rep["state"] == "active" and rep["active"]["sha256"] == v2, rep
            assert rep["last_known_good"]["sha256"] == v1
            assert "installed offline" in rep["detail"] and "digits-2-fp32.onnx" in rep["detail"]
            # the retained desired state (digits:1, same generation) does not undo it
            async with asyncio.timeout(30):
                while agent.updater.last_desired_generation != gen:
                    await asyncio.sleep(0.05)
            assert agent.holder.active is not None and agent.holder.active.ref.sha256 == v2
            assert not (state_dir / RECORD_FILE).exists()  # reported once
            d = await asyncio.to_thread(devices.get, "k1")
            assert d.active and d.active.sha256 == v2, d.active  # from the birth message
            stop.set()
            await task

    try:
        asyncio.run(asyncio.wait_for(main(), 240))
    finally:
        devices.close()
        client.close()


def test_refused_installs_name_the_file_and_change_nothing(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    home = exported["home"]
    state_dir, config = tmp_path / "k1", tmp_path / "agent.json"
    _device(home, "k2", "mqtt://127.0.0.1:1", state_dir, config)
    # the service's own user owns the state folder; the installer runs as root
    state_dir.mkdir(exist_ok=True)
    os.chown(state_dir, 65534, 65534)
    ok = _install(exported["model"], exported["manifest"], config)
    assert ok.returncode == 0, ok.stderr
    if os.geteuid() == 0:
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in [*state_dir.glob("*.json*")]}
        owners |= {(p.stat().st_uid, p.stat().st_gid) for p in (state_dir / "models").iterdir()}
        assert owners == {(65534, 65534)}, owners
    before = _snapshot(state_dir)

    tampered = tmp_path / "tampered.onnx"
    data = bytearray(exported["model"].read_bytes())
    data[len(data) // 2] ^= 0x55
    tampered.write_bytes(bytes(data))
    line = _one_error(_install(tampered, exported["manifest"], config))
    assert "error (data-loss)" in line and str(tampered) in line and "digest" in line
    assert _snapshot(state_dir) == before

    signed = SignedManifest.from_bytes(exported["manifest"].read_bytes())
    manifest = decode_manifest(signed.manifest_bytes)
    stranger = tmp_path / "stranger.manifest"
    stranger.write_bytes(sign_manifest(manifest, Ed25519PrivateKey.generate()).to_bytes())
    line = _one_error(_install(exported["model"], stranger, config))
    assert "error (unauthenticated)" in line and str(stranger) in line and "signature" in line
    assert _snapshot(state_dir) == before

    # signed by the fleet's own key, right digest, wrong golden output: the self-test
    assert manifest.golden is not None
    wrong = np.frombuffer(manifest.golden.output, dtype=np.float32) + 1.0
    golden = dataclasses.replace(manifest.golden, output=wrong.astype(np.float32).tobytes())
    key = load_private_key(load_settings(home=home).signing_key_path)
    bad_golden = tmp_path / "golden.manifest"
    bad_golden.write_bytes(
        sign_manifest(dataclasses.replace(manifest, golden=golden), key).to_bytes()
    )
    line = _one_error(_install(exported["model"], bad_golden, config))
    assert str(exported["model"]) in line and "self-test failed" in line, line
    assert _snapshot(state_dir) == before

    missing = _one_error(_install(tmp_path / "nope.onnx", exported["manifest"], config))
    assert "error (not-found)" in missing and "nope.onnx" in missing
    assert _snapshot(state_dir) == before
