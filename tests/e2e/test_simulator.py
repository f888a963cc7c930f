"""Simulator: 50 real agents on a real broker (the parts: tests/unit/test_simulator_parts.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.protos.errors import NotFound
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.transport import Message, MqttTransport
from edgefleet.simulator.fleet import SimulatedFleet

if TYPE_CHECKING:
    from tests.support.identity import SecureBroker


# -- 50 real agents on a real broker ------------------------------------------------------


def _pem() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def test_fifty_devices_come_online_crash_with_a_will_and_restart(
    broker: SecureBroker, tmp_path: Path
) -> None:
    prefix = f"test/{uuid.uuid4().hex[:10]}"
    statuses: dict[str, device_pb2.DeviceStatus] = {}

    def on_status(msg: Message) -> None:
        st = device_pb2.DeviceStatus()
        st.ParseFromString(msg.payload)
        statuses[st.device_id] = st

    async def main() -> None:
        watcher = MqttTransport(
            broker.watcher(),
            on_message=on_status,
        )
        await watcher.subscribe(f"{prefix}/dev/+/status", qos=1)
        fleet = SimulatedFleet(
            50,
            broker_url=broker.url,
            public_key_pem=_pem(),
            state_root=tmp_path,
            profile="mixed",
            seed=7,
            topic_prefix=prefix,
            listen_first=True,
        )
        broker.enroll_fleet(fleet, prefix=prefix)
        assert len(fleet.ids_for_enrollment()) == 50
        assert fleet.ids_for_enrollment()[3].group == fleet.device("sim-0003").profile.name
        async with asyncio.timeout(60), watcher:
            async with fleet:
                assert fleet.online() == 50
                assert fleet.devices[0].port is not None
                assert fleet.states() == {"idle": 50}
                assert fleet.active_variants() == {}

                def all_online() -> bool:
                    return len(statuses) == 50 and all(s.online for s in statuses.values())

                await fleet.wait(all_online, timeout=10, what="50 online births")
                for dev in fleet.devices:
                    st = statuses[dev.device_id]
                    assert tuple(st.capabilities.runtimes) == dev.profile.caps.runtimes
                    assert tuple(st.capabilities.providers) == dev.profile.caps.providers
                    assert st.capabilities.accelerator == dev.profile.caps.accelerator
                kinds = {statuses[d.device_id].capabilities.accelerator for d in fleet.devices}
                assert kinds == {"cpu", "gpu", "npu"}

                victim = "sim-0011"
                boot = statuses[victim].boot_id
                crashed_at = int(time.time() * 1000)
                await fleet.crash(victim)
                await fleet.wait(lambda: not statuses[victim].online, timeout=10, what="the will")
                # the will (made when the agent was built), not a status sent on the way out
                assert statuses[victim].boot_id == boot
                assert statuses[victim].timestamp_ms < crashed_at
                assert not fleet.device(victim).running
                assert not fleet.device(victim).connected
                assert fleet.online() == 49

                await fleet.restart(victim)
                await fleet.device(victim).wait_connected(10)
                await fleet.wait(lambda: statuses[victim].online, timeout=10, what="rebirth")
                assert statuses[victim].boot_id != boot
                assert fleet.device(victim).boots == 2

                fleet.drop_link(["sim-0001", "sim-0002"])
                await fleet.wait(lambda: fleet.online() == 50, timeout=10, what="reconnects")
                with pytest.raises(NotFound, match="sim-9999"):
                    fleet.device("sim-9999")
            # a clean stop publishes an offline status for every device
            assert fleet.online() == 0
            await fleet.wait(
                lambda: not any(s.online for s in statuses.values()), timeout=10, what="offline"
            )

    asyncio.run(main())


def test_stopping_devices_that_are_still_connecting_does_not_hang(
    broker: SecureBroker, tmp_path: Path
) -> None:
    # MqttTransport.close() during the connect can lose its cancel (Python 3.11
    # wait_for); SimulatedDevice.stop cancels again after its grace period
    async def main() -> None:
        fleet = SimulatedFleet(
            20, broker_url=broker.url, public_key_pem=_pem(), state_root=tmp_path, profile="cpu"
        )
        broker.enroll_fleet(fleet)
        async with asyncio.timeout(20):
            await asyncio.gather(*(d.start() for d in fleet.devices))
            await asyncio.gather(*(d.stop(grace=0.5) for d in fleet.devices))
        assert not any(d.running for d in fleet.devices)

    asyncio.run(main())
