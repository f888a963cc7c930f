"""What a real `fleet-agent run` process loads while idle (issue 16, BENCHMARKS.md).

An agent with no `listen` address runs no local InferenceService, so it must never
import grpc (about 16 MB of RSS). The process is the real command, started through a
wrapper that only adds a thread dumping `sys.modules` when asked (as bench/footprint.py
does), against a real Mosquitto with device credentials.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.footprint import MODULES_WRAPPER
from edgefleet.agent.config import AgentSettings, write_config
from edgefleet.cloud.broker import find_mosquitto
from edgefleet.protos.errors import NotFound
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import Message, MqttTransport
from tests.support.identity import SecureBroker

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


def _public_pem() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


async def _wait_online(broker: SecureBroker, device_id: str, proc: subprocess.Popen[bytes]) -> None:
    online = asyncio.Event()

    async def on_message(m: Message) -> None:
        if device_pb2.DeviceStatus.FromString(m.payload).online:
            online.set()

    watcher = MqttTransport(broker.watcher(), on_message=on_message)
    async with watcher:
        await watcher.wait_connected(timeout=10)
        await watcher.subscribe(Topics().status(device_id), qos=1)
        deadline = time.monotonic() + 60
        while not online.is_set():
            assert proc.poll() is None, "the agent exited"
            assert time.monotonic() < deadline, "the agent never reported online"
            await asyncio.sleep(0.1)


def _idle_modules(broker: SecureBroker, tmp_path: Path, *, listen: str) -> set[str]:
    dev = "fp-quiet" if not listen else "fp-serve"
    config = tmp_path / f"{dev}.json"
    write_config(
        config,
        AgentSettings(
            device_id=dev,
            state_dir=tmp_path / dev,
            public_key_pem=_public_pem(),
            listen=listen,
            telemetry_interval=3600,
            **broker.agent_settings(dev),
        ),
        force=True,
    )
    mods = tmp_path / f"{dev}.modules"
    log_path = tmp_path / f"{dev}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", MODULES_WRAPPER, str(mods), "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        asyncio.run(_wait_online(broker, dev, proc))
        Path(f"{mods}.req").touch()
        deadline = time.monotonic() + 30
        while not mods.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "no module list from the agent"
            time.sleep(0.1)
        return {m.split(".")[0] for m in mods.read_text().split()}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_an_agent_without_listen_never_imports_grpc(broker: SecureBroker, tmp_path: Path) -> None:
    held = _idle_modules(broker, tmp_path, listen="")
    assert "edgefleet" in held and "paho" in held  # the dump is the running agent's
    assert not {m for m in held if m.startswith("grpc")}, sorted(held)
    assert "psutil" not in held  # only to stop a Flower sidecar's process tree


def test_an_agent_with_listen_loads_grpc_for_its_server(
    broker: SecureBroker, tmp_path: Path
) -> None:
    from edgefleet.protos.flower import free_port

    held = _idle_modules(broker, tmp_path, listen=f"127.0.0.1:{free_port()}")
    assert "grpc" in held
