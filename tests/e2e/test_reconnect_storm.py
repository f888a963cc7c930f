"""A reconnect storm: the broker under hundreds of connected agents is SIGKILLed and comes
back; every agent reconnects within its jittered backoff and is born again, and the
coordinator admits them in paced batches, not one database transaction per birth.

Real Mosquitto, real agents (simulator, one event loop), the real coordinator on SQLite.
The assertions are on counts (births, transactions, the largest batch), not on time.
The default run has 300 agents; 1,000 are in the slow set.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.artifacts import open_artifact_store
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.registry import open_registry
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import Message, MqttTransport
from edgefleet.simulator.fleet import SimulatedFleet
from tests.support.identity import SecureBroker

MAX_BATCH = 64


def _pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _storm(broker: SecureBroker, tmp_path: Path, n: int) -> None:
    prefix = f"test/storm{n}"
    key = Ed25519PrivateKey.generate()
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    devices = DeviceStore(db)
    registry = open_registry(db)
    fleet = SimulatedFleet(
        n,
        broker_url=broker.url,
        public_key_pem=_pem(key),
        state_root=tmp_path / "devices",
        topic_prefix=prefix,
        id_prefix="storm",
        telemetry_interval=3600,
        connect_timeout=120,
    )
    broker.enroll_fleet(fleet, prefix=prefix)
    for d in fleet.ids():
        devices.enroll(d)

    kill_ms = [0]
    reborn: set[str] = set()  # devices whose birth after the kill was seen

    def on_status(msg: Message) -> None:
        st = device_pb2.DeviceStatus()
        st.ParseFromString(msg.payload)
        # a retained birth from before the kill is replayed too: count only new ones
        if st.online and kill_ms[0] and st.timestamp_ms >= kill_ms[0]:
            reborn.add(st.device_id)

    async def main() -> None:
        watcher = MqttTransport(broker.watcher("storm"), on_message=on_status)
        await watcher.subscribe(f"{prefix}/dev/+/status")
        async with (
            watcher,
            Coordinator(
                broker_url=broker.coordinator(),
                registry=registry,
                store=open_artifact_store(f"file://{tmp_path / 'artifacts'}"),
                devices=devices,
                signing_key=lambda: key,
                topics=Topics(prefix),
                max_batch=MAX_BATCH,
            ) as coord,
            fleet,
        ):
            await fleet.wait(lambda: coord.stats.births >= n, timeout=120, what=f"{n} first births")
            before = coord.stats.births, coord.stats.transactions, coord.stats.reassert_passes

            pid = broker.pid
            assert pid is not None
            kill_ms[0] = int(time.time() * 1000)
            os.kill(pid, signal.SIGKILL)
            await fleet.wait(lambda: fleet.online() == 0, timeout=60, what="every link down")
            await asyncio.to_thread(broker.stop)  # reaps the killed process
            await asyncio.to_thread(broker.start)
            t0 = time.monotonic()
            await fleet.wait(lambda: fleet.online() == n, timeout=120, what="all reconnected")
            await fleet.wait(lambda: len(reborn) == n, timeout=120, what=f"{n} new births")
            await fleet.wait(
                lambda: coord.stats.births - before[0] >= n,
                timeout=120,
                what=f"{n} births after the restart",
            )
            readmitted = time.monotonic() - t0
            await fleet.wait(
                lambda: coord.stats.reassert_passes > before[2], timeout=60, what="a re-assert"
            )
            births = coord.stats.births - before[0]
            transactions = coord.stats.transactions - before[1]
            passes = coord.stats.reassert_passes - before[2]
            online = await asyncio.to_thread(devices.find, online=True)
            assert {d.device_id for d in online} == set(fleet.ids()) == reborn
            # paced: batches of at most MAX_BATCH events, far fewer transactions than births
            assert coord.stats.largest <= MAX_BATCH
            assert transactions * 4 <= births, (transactions, births)
            assert transactions >= births // MAX_BATCH
            # births re-asserted together, not one database read per device
            assert 1 <= passes <= transactions
            print(
                f"\n{n} agents re-admitted {readmitted:.1f}s after a broker SIGKILL: "
                f"{births} births in {transactions} transactions (largest "
                f"{coord.stats.largest}), {passes} re-assert passes"
            )

    try:
        asyncio.run(asyncio.wait_for(main(), 400))
    finally:
        devices.close()
        registry.close()


@pytest.mark.parametrize(
    "n", [300, pytest.param(1000, marks=pytest.mark.slow, id="1000-slow")], ids=str
)
def test_agents_reconnecting_at_once_after_a_broker_sigkill_are_admitted_in_batches(
    broker: SecureBroker, tmp_path: Path, n: int
) -> None:
    _storm(broker, tmp_path, n)
