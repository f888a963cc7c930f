"""A real `fleet-agent run` process SIGKILLed at random points of an update.

Each trial deploys the other version (v1 → v2 → v1 …, a new generation each time),
waits a random 0-0.8 s (downloading, verifying, loading, self-testing, swapping),
SIGKILLs the agent process and starts it again on the same state directory. The
trial passes when the device reports the new generation active and the model on
disk is the one deployed: its file hashes to the deployed variant's sha256 (the
agent verified it; the test checks again). `pytest -s` prints the figures.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentSettings, write_config
from edgefleet.agent.slots import ModelSlots
from edgefleet.cloud.devices import Selector
from edgefleet.cloud.registry import ModelRef
from tests.faults.conftest import cloud
from tests.support.identity import SecureBroker

DEV = "crash-0"


class AgentProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet.agent.cli", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _verified(state_dir: Path, sha256: str) -> bool:
    active = ModelSlots(state_dir).active()
    return (
        active is not None
        and active.sha256 == sha256
        and hashlib.sha256(active.path.read_bytes()).hexdigest() == sha256
    )


def trials(fault_home: Path, broker: SecureBroker, tmp: Path, n: int, seed: int) -> str:
    c = cloud(fault_home, tmp)
    settings, devices = c.settings, c.devices
    devices.enroll(DEV)
    state_dir = tmp / DEV
    config = tmp / "agent.json"
    write_config(
        config,
        AgentSettings(
            device_id=DEV,
            state_dir=state_dir,
            **broker.agent_settings(DEV),
            public_key_pem=settings.public_key_path.read_text(),
            listen="",
            telemetry_interval=3600,
        ),
        force=True,
    )
    agent = AgentProcess(config, tmp / "agent.log")
    rng = random.Random(seed)
    killed_in: collections.Counter[str] = collections.Counter()
    recover: list[float] = []

    async def main() -> None:
        async with c.coordinator(broker.coordinator()) as coord:
            agent.start()
            deadline = time.monotonic() + 60
            while not (await asyncio.to_thread(devices.get, DEV)).online:
                assert time.monotonic() < deadline, "agent never came online"
                await asyncio.sleep(0.1)
            for i in range(n):
                version = 2 - i % 2  # v2, v1, v2, …: every trial is an update
                outcome = await coord.deploy(
                    ModelRef("digits", version), Selector.parse(f"device={DEV}")
                )
                (target,) = outcome.targets
                await asyncio.sleep(rng.uniform(0.0, 0.8))
                seen = await asyncio.to_thread(devices.get, DEV)
                reported = seen.reported.generation if seen.reported else 0
                killed_in[seen.state if reported == target.generation else "no report yet"] += 1
                agent.kill()
                t0 = time.monotonic()
                agent.start()
                settled = await coord.wait_settled(outcome, timeout=90)
                d = settled[DEV]
                assert d.state == "active", (i, d.reported, agent.log_tail())
                assert d.reported and d.reported.generation == target.generation, d.reported
                assert d.active and d.active.version == version, d.active
                recover.append(time.monotonic() - t0)
                assert await asyncio.to_thread(_verified, state_dir, target.sha256), i

    try:
        asyncio.run(asyncio.wait_for(main(), 60 + 100 * n))
    finally:
        agent.stop()
        c.close()
    return (
        f"trials={n} verified={n} killed while {dict(sorted(killed_in.items()))} "
        f"recover_median={sorted(recover)[len(recover) // 2]:.1f}s max={max(recover):.1f}s"
    )


def test_agent_sigkilled_mid_update_always_ends_on_a_verified_model(
    fault_home: Path, broker: SecureBroker, tmp_path: Path
) -> None:
    print("\nagent SIGKILL mid-update:", trials(fault_home, broker, tmp_path, n=3, seed=1))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~8 s a trial on 2 cores
def test_agent_sigkilled_mid_update_200_times(
    fault_home: Path, broker: SecureBroker, tmp_path: Path
) -> None:
    n = int(os.environ.get("FLEET_AGENT_CRASH_TRIALS", "200"))  # fewer for a quick look
    print("\nagent SIGKILL mid-update:", trials(fault_home, broker, tmp_path, n=n, seed=2))
