"""`fleet serve --ingest-workers N`: N telemetry ingest processes in the shared group.

Real Mosquitto (the tests' `broker` fixture, identities on), a real database (SQLite
in tmp_path, and a throwaway PostgreSQL cluster when one can be started), real agents
producing telemetry windows with their spools and acknowledgement timeouts, and the
real `IngestPool` with two worker processes. One worker is SIGKILLed while windows
flow: the pool starts it again, and every window each agent produced (its own record:
1..last seq) is stored exactly once; both workers took a share.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import AgentSettings
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.telemetry import TelemetryStore
from edgefleet.cloud.telemetry.pool import IngestPool
from edgefleet.cloud.telemetry.store import telemetry as telemetry_table
from edgefleet.protos.backoff import Backoff
from edgefleet.protos.transport import COORDINATOR_BACKOFF_CAP
from tests.support.e2e import AGENT_CPU
from tests.support.identity import SecureBroker
from tests.support.postgres import PostgresUnavailable, TempPostgres

DEVICES = 6


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    pg = TempPostgres()
    try:
        url = pg.__enter__()
    except PostgresUnavailable as e:
        pytest.skip(f"PostgreSQL: {e}")
    try:
        yield url
    finally:
        pg.__exit__(None, None, None)


def rows(store: TelemetryStore) -> list[tuple[str, int]]:
    with store.database.engine.connect() as c:
        q = sa.select(telemetry_table.c.device_id, telemetry_table.c.seq)
        return [(str(d), int(s)) for d, s in c.execute(q)]


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Agents:
    def __init__(self, broker: SecureBroker, root: Path) -> None:
        self.broker, self.root = broker, root
        self.agents: dict[str, Agent] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Event] = {}
        key = Ed25519PrivateKey.generate().public_key()
        self.pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    async def start(self, dev_id: str, *, interval: float) -> None:
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
        )
        stop, ready = asyncio.Event(), asyncio.Event()
        self.agents[dev_id], self.stops[dev_id] = agent, stop
        self.tasks[dev_id] = asyncio.create_task(agent.run(stop.wait, ready=ready))
        await ready.wait()
        await agent.transport.wait_connected(timeout=20)

    async def stop_all(self) -> None:
        for d in self.tasks:
            self.stops[d].set()
        await asyncio.gather(*self.tasks.values())


def test_two_ingest_workers_store_every_window_once_and_survive_a_sigkill(
    broker: SecureBroker, db_url: str, tmp_path: Path
) -> None:
    store = TelemetryStore(db_url)  # creates the schema, as `fleet init` does
    devices = DeviceStore(store.database)
    ids = [f"iw-{i}" for i in range(DEVICES)]
    for d in ids:
        devices.enroll(d)
    pool = IngestPool(
        2,
        db_url=db_url,
        settings=broker.coordinator().settings(
            "fleet-telemetry-workers", backoff_cap=COORDINATOR_BACKOFF_CAP
        ),
        interval=0.05,
        backoff=Backoff(base=0.2, cap=1.0),
    )
    pool.start()
    agents = Agents(broker, tmp_path / "agents")

    async def scenario() -> dict[str, int]:
        try:
            for d in ids:
                await agents.start(d, interval=0.05)
            await wait_for(lambda: pool.written >= 60, 60, "60 windows stored")
            victim = pool.pids[0]
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            await wait_for(
                lambda: pool.pids[0] not in (None, victim), 60, "the killed worker restarted"
            )
            written = pool.written
            await wait_for(lambda: pool.written >= written + 60, 60, "ingest after the restart")
            # stop producing; start again without new windows: they send what is unacknowledged
            await agents.stop_all()
            produced = {d: agents.agents[d].telemetry.spool.last_seq for d in ids}
            for d in ids:
                await agents.start(d, interval=3600)

            def drained() -> bool:
                return all(a.telemetry.unacked == 0 for a in agents.agents.values())

            await wait_for(drained, 90, "every spool acknowledged")
            return produced
        finally:
            await agents.stop_all()

    try:
        produced = asyncio.run(scenario())
        per_worker = pool.per_worker("received")
    finally:
        pool.stop()
    assert pool.restarts >= 1
    stored = rows(store)
    assert len(stored) == len(set(stored)), "a (device, seq) row stored twice"
    have: dict[str, set[int]] = {}
    for d, s in stored:
        have.setdefault(d, set()).add(s)
    for d, last in produced.items():
        assert last > 0
        missing = set(range(1, last + 1)) - have.get(d, set())
        assert not missing, f"{d}: windows {sorted(missing)[:10]} of 1..{last} never stored"
        assert have[d] <= set(range(1, last + 1))
    # the killed process's counters are included up to its last counter line
    assert 0 < pool.written <= len(stored)
    assert all(n > 0 for n in per_worker), per_worker  # the broker split the load
    assert pool.rejected == 0 and pool.refused == 0
    seen = {d.device_id for d in devices.find() if d.last_seen is not None}
    assert seen == set(ids)  # the workers mark devices seen
    devices.close()
    store.close()


def test_on_a_broker_without_shared_subscriptions_one_worker_stays(tmp_path: Path) -> None:
    """NATS's MQTT refuses `$share/…`: each worker falls back to the plain filter and
    would get every window, so the pool keeps worker 0 only; every window is stored
    once (the (device, seq) key covers what both got before the second stopped)."""
    from edgefleet.cloud.identity import IdentityStore
    from edgefleet.protos.transport import MqttTransport
    from tests.contract.test_telemetry import NOW, payload
    from tests.support.nats import NatsCluster

    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = TelemetryStore(db_url)
    cluster = NatsCluster(tmp_path / "nats", IdentityStore(tmp_path / "keys"), size=1)
    with cluster:
        pool = IngestPool(
            2,
            db_url=db_url,
            settings=cluster.coordinator().settings("fleet-telemetry-nats"),
            interval=0.05,
            touch_devices=False,
        )
        pool.start()
        try:
            deadline = time.monotonic() + 30
            while not (pool.unshared and pool.pids[1] is None):
                assert time.monotonic() < deadline, "the second worker was not stopped"
                time.sleep(0.1)
            assert pool.pids[0] is not None

            async def publish() -> None:
                settings = cluster.coordinator().settings("telemetry-pub")
                async with MqttTransport(settings) as t:
                    await t.wait_connected(timeout=10)
                    for i in range(40):
                        dev = f"n{i % 4}"
                        data = payload(dev, i + 1, NOW, [1, 0, 0, 0])
                        await t.publish(f"ef/v1/dev/{dev}/telemetry", data, qos=1)

            asyncio.run(publish())
            deadline = time.monotonic() + 30
            while pool.written < 40:
                assert time.monotonic() < deadline, f"{pool.written} of 40 stored"
                time.sleep(0.1)
            time.sleep(0.5)  # a duplicate delivery would show as received > 40
            restarts = pool.restarts
        finally:
            pool.stop()
    stored = rows(store)
    assert len(stored) == len(set(stored)) == 40
    assert pool.per_worker("received")[0] == 40
    assert restarts == 0  # the stopped worker is not started again
    store.close()
