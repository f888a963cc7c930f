"""The broker SIGKILLed under telemetry and a pending deployment: nothing is lost.

Real Mosquitto (the tests' `broker` fixture, killed with SIGKILL and started again
on the same port and state directory), the coordinator's real telemetry path
(`TelemetrySubscriber` + `TelemetryIngest` writing SQLite and acknowledging), the
real `Coordinator` (desired states, re-assertion from the database) and N real
agents on one event loop. Each agent's own record of what it produced (its `seq`
file: every window from 1 to the last) is compared with the `(device, seq)` rows
in the database at the end: zero lost. A device that was offline during the crash,
with a deployment pending whose retained message the broker lost (its persistence
file is deleted with the kill, the worst case of a crash before autosave), is
updated when it comes back.

`pytest -s` prints the figures (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentSettings
from edgefleet.cloud.devices import Selector
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.telemetry import TelemetryIngest, TelemetryStore, TelemetrySubscriber
from edgefleet.cloud.telemetry.store import telemetry as telemetry_table
from edgefleet.protos.transport import COORDINATOR_BACKOFF_CAP
from tests.faults.conftest import cloud
from tests.support.e2e import AGENT_CPU
from tests.support.identity import SecureBroker

LATE = "late-0"  # the device that is offline while the broker crashes


@dataclass
class Figures:
    agents: int
    kills: int
    produced: int = 0
    lost: int = 0
    duplicated: int = 0
    resent: int = 0
    recover_s: list[float] = field(default_factory=list)

    def line(self) -> str:
        worst = max(self.recover_s, default=0.0)
        return (
            f"agents={self.agents} broker SIGKILLs={self.kills} windows={self.produced} "
            f"lost={self.lost} duplicated={self.duplicated} resent={self.resent} "
            f"recover_max={worst:.1f}s"
        )


def kill_broker(broker: SecureBroker, *, wipe: bool) -> None:
    """SIGKILL (no chance to save); with `wipe` also lose what it had saved."""
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGKILL)
    while broker.running:
        time.sleep(0.01)
    if wipe:
        for f in broker.state_dir.glob("mosquitto.db*"):
            f.unlink()


def stored_seqs(store: TelemetryStore) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    with store._db.engine.connect() as c:
        for dev, seq in c.execute(sa.select(telemetry_table.c.device_id, telemetry_table.c.seq)):
            out.setdefault(str(dev), set()).add(int(seq))
    return out


class Fleet:
    def __init__(self, broker: SecureBroker, pem: str, root: Path) -> None:
        self.broker, self.pem, self.root = broker, pem, root
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.resent = 0

    async def start(self, dev_id: str, *, interval: float = 0.2) -> Agent:
        agent = Agent(
            AgentSettings(
                device_id=dev_id,
                state_dir=self.root / dev_id,
                **self.broker.agent_settings(dev_id),
                public_key_pem=self.pem,
                listen="",
                telemetry_interval=interval,
                telemetry_ack_timeout=2.0,
            ),
            capabilities=AGENT_CPU,
            durable=False,
            want_interval=0.3,
        )
        stop, ready = asyncio.Event(), asyncio.Event()
        self.agents[dev_id], self.stops[dev_id] = agent, stop
        self.tasks[dev_id] = asyncio.create_task(agent.run(stop.wait, ready=ready))
        await ready.wait()
        await agent.transport.wait_connected(timeout=20)
        return agent

    async def stop(self, dev_id: str) -> None:
        self.stops[dev_id].set()
        await self.tasks[dev_id]
        self.resent += self.agents[dev_id].telemetry.resent

    async def stop_all(self) -> None:
        for d in list(self.tasks):
            if not self.tasks[d].done():
                await self.stop(d)


async def wait_for(pred: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def campaign(
    home: Path,
    broker: SecureBroker,
    tmp: Path,
    *,
    n_agents: int,
    crash: Callable[[Callable[[], Awaitable[None]]], Awaitable[int]],
) -> Figures:
    c = cloud(home, tmp)
    settings, devices = c.settings, c.devices
    store = TelemetryStore(settings.registry_url)
    ids = [f"dev-{i:02d}" for i in range(n_agents)]
    for d in [*ids, LATE]:
        devices.enroll(d)
    ingest = TelemetryIngest(store, interval=0.05, on_written=devices.touch)
    sub = TelemetrySubscriber(
        broker.coordinator().settings(
            "fleet-telemetry-faults", backoff_cap=COORDINATOR_BACKOFF_CAP
        ),
        ingest,
    )
    await asyncio.to_thread(sub.start)
    fleet = Fleet(broker, settings.public_key_path.read_text(), tmp / "agents")
    figures = Figures(agents=n_agents, kills=0)
    try:
        # only reconnections and births may re-assert here
        async with c.coordinator(broker.coordinator(), reassert_interval=3600) as coord:
            for d in [*ids, LATE]:
                await fleet.start(d)

            async def all_online() -> bool:
                return len(await asyncio.to_thread(devices.find, online=True)) == len(ids) + 1

            await wait_for(all_online, 30, "every device online")
            await fleet.stop(LATE)  # goes offline; then a deployment waits for it

            async def late_offline() -> bool:
                return not (await asyncio.to_thread(devices.get, LATE)).online

            await wait_for(late_offline, 30, f"{LATE} offline")
            outcome = await coord.deploy(ModelRef("digits", 1), Selector.parse(f"device={LATE}"))
            assert [t.device_id for t in outcome.targets] == [LATE]

            async def restart_broker() -> None:
                """Start the killed broker again; time until everything produced before
                the restart is committed."""
                cutoff = {d: fleet.agents[d].telemetry.spool.last_seq for d in ids}
                await asyncio.to_thread(broker.start)
                t0 = time.monotonic()

                async def caught_up() -> bool:
                    have = await asyncio.to_thread(stored_seqs, store)
                    return all(set(range(1, cutoff[d] + 1)) <= have.get(d, set()) for d in ids)

                await wait_for(caught_up, 60, "windows produced before the restart")
                figures.recover_s.append(time.monotonic() - t0)

            figures.kills = await crash(restart_broker)

            # the offline device comes back to a broker that lost its retained message
            late = await fleet.start(LATE)

            async def late_updated() -> bool:
                a = late.holder.active
                return a is not None and a.ref.version == 1

            await wait_for(late_updated, 60, f"{LATE} serving digits v1")
            settled = await coord.wait_settled(outcome, timeout=30)
            assert settled[LATE].state == "active", settled[LATE].reported
            assert coord.reasserted >= 1

            # stop every agent (its last windows may be unacknowledged), start them again
            # without new windows: they send what is still spooled
            await fleet.stop_all()
            produced = {d: fleet.agents[d].telemetry.spool.last_seq for d in [*ids, LATE]}
            for d in [*ids, LATE]:
                await fleet.start(d, interval=3600)

            async def drained() -> bool:
                return all(a.telemetry.unacked == 0 for a in fleet.agents.values())

            await wait_for(drained, 60, "every spool acknowledged")
            await fleet.stop_all()
    finally:
        await fleet.stop_all()
        await asyncio.to_thread(sub.stop)
    have = stored_seqs(store)
    for d, last in produced.items():
        assert last > 0 or d == LATE  # LATE may live too briefly for a window
        missing = set(range(1, last + 1)) - have.get(d, set())
        figures.lost += len(missing)
        assert not missing, f"{d}: windows {sorted(missing)[:10]} of 1..{last} never stored"
        assert have.get(d, set()) <= set(range(1, last + 1))
    figures.produced = sum(produced.values())
    figures.duplicated = ingest.duplicated
    figures.resent = fleet.resent
    assert ingest.refused == 0
    store.close()
    c.close()
    return figures


def test_broker_sigkill_loses_no_telemetry_and_no_deployment(
    fault_home: Path, broker: SecureBroker, tmp_path: Path
) -> None:
    async def crash(restart: Callable[[], Awaitable[None]]) -> int:
        await asyncio.sleep(1.5)  # telemetry flowing
        await asyncio.to_thread(kill_broker, broker, wipe=True)
        await asyncio.sleep(2.0)  # agents keep producing, spooled
        await restart()
        return 1

    figures = asyncio.run(
        asyncio.wait_for(campaign(fault_home, broker, tmp_path, n_agents=4, crash=crash), 240)
    )
    print("\nbroker SIGKILL once:", figures.line())
    assert figures.lost == 0 and figures.kills == 1


@pytest.mark.slow
def test_broker_sigkilled_repeatedly_for_40s_under_20_agents(
    fault_home: Path, broker: SecureBroker, tmp_path: Path
) -> None:
    rng = random.Random(11)

    async def crash(restart: Callable[[], Awaitable[None]]) -> int:
        kills = 0
        end = time.monotonic() + 40  # of telemetry under kills, recoveries not counted
        while kills < 6 or time.monotonic() < end:
            await asyncio.sleep(rng.uniform(0.5, 3.0))  # up, under telemetry
            await asyncio.to_thread(kill_broker, broker, wipe=rng.random() < 0.3)
            kills += 1
            down = rng.uniform(0.2, 3.0)
            await asyncio.sleep(down)
            t0 = time.monotonic()
            await restart()
            end += time.monotonic() - t0
        return kills

    figures = asyncio.run(
        asyncio.wait_for(campaign(fault_home, broker, tmp_path, n_agents=20, crash=crash), 600)
    )
    print("\nbroker SIGKILLed repeatedly:", figures.line())
    assert figures.lost == 0 and figures.kills >= 6
