"""The simulator at scale and under faults: 1,000 real agents on one loop; a deploy that
survives corrupted chunks and a crash in the middle of a download. Slow: `make test-slow`."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.serde import UpdateState
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.transport import Message, MqttTransport
from edgefleet.simulator.fleet import SimulatedFleet
from edgefleet.simulator.plan import device_specs
from tests.e2e.conftest import MakeHome
from tests.support.e2e import Version, local_coordinator, wait_online
from tests.support.identity import SecureBroker

pytestmark = pytest.mark.slow


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pem() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def test_a_thousand_agents_come_online_on_one_loop(broker: SecureBroker, tmp_path: Path) -> None:
    n = 1000
    prefix = f"test/{uuid.uuid4().hex[:10]}"
    online: dict[str, bool] = {}

    def on_status(msg: Message) -> None:
        st = device_pb2.DeviceStatus()
        st.ParseFromString(msg.payload)
        online[st.device_id] = st.online

    async def main() -> None:
        watcher = MqttTransport(
            broker.watcher(),
            on_message=on_status,
        )
        await watcher.subscribe(f"{prefix}/dev/+/status", qos=1)
        async with asyncio.timeout(300), watcher:
            rss0 = _rss_mb()
            fleet = SimulatedFleet(
                n, broker_url=broker.url, public_key_pem=_pem(), state_root=tmp_path,
                topic_prefix=prefix, seed=1,
            )  # fmt: skip
            broker.enroll_fleet(fleet, prefix=prefix)
            t0 = time.monotonic()
            async with fleet:
                up = time.monotonic() - t0
                await fleet.wait(
                    lambda: sum(online.values()) == n, timeout=60, what="1,000 online births"
                )
                births = time.monotonic() - t0
                rss1 = _rss_mb()
                assert fleet.online() == n
                # the fleet stays up: a link drop on 100 devices heals by itself
                fleet.drop_link(fleet.ids()[:100])
                t1 = time.monotonic()
                await fleet.wait(lambda: fleet.online() == n, timeout=60, what="reconnects")
                healed = time.monotonic() - t1
                t2 = time.monotonic()
            stopped = time.monotonic() - t2
            await fleet.wait(lambda: not any(online.values()), timeout=60, what="offline")
            print(
                f"\n{n} agents: connected in {up:.1f}s, all births seen in {births:.1f}s, "
                f"100 dropped links healed in {healed:.1f}s, clean stop in {stopped:.1f}s; "
                f"RSS {rss0:.0f} -> {rss1:.0f} MB ({(rss1 - rss0) * 1024 / n:.0f} KB/agent)"
            )

    asyncio.run(main())


@pytest.fixture(scope="module")
def home(make_home: MakeHome) -> Path:
    return make_home("simdeploy", Version(variants=("int8", "fp16", "tflite-int8"), max_drop=1.0))


def test_deploy_survives_corrupt_chunks_and_a_crash_mid_download(
    home: Path, broker: SecureBroker, tmp_path: Path
) -> None:
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceStore, Selector
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.protos.topics import Topics

    settings = load_settings(home=home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    prefix = f"test/{uuid.uuid4().hex[:10]}"
    fleet = SimulatedFleet(
        12,
        broker_url=broker.url,
        public_key_pem=settings.public_key_path.read_text(),
        state_root=tmp_path,
        topic_prefix=prefix,
        seed=5,
        want_interval=0.5,
    )
    broker.enroll_fleet(fleet, prefix=prefix)
    devices.enroll_many(device_specs(fleet.ids_for_enrollment()))
    corrupt, victim = "sim-0001", "sim-0002"
    expected = {"cpu": "int8", "gpu": "fp16", "npu": "int8", "litert": "tflite-int8"}

    async def main() -> None:
        async with (
            asyncio.timeout(60),
            local_coordinator(
                client,
                devices,
                broker.coordinator(),
                topics=Topics(prefix),
                chunk_size=1024,
                rate=40_000,  # bytes/s: slow enough to crash a device mid-download
                gather=0.05,
            ) as coord,
            fleet,
        ):
            await wait_online(devices, len(fleet))
            fleet.corrupt_next_chunks(corrupt, 3)
            outcome = await coord.deploy(ModelRef("digits", 1), Selector.parse("all"))
            v = fleet.device(victim)
            await fleet.wait(
                lambda: v.update_state == UpdateState.DOWNLOADING, timeout=30, interval=0.005
            )
            await asyncio.sleep(0.2)
            partial = list((v.settings.state_dir / "downloads").iterdir())
            assert partial, "no partial download on disk to resume"
            await fleet.crash(victim)
            assert v.active_variant is None
            await asyncio.sleep(0.3)
            await fleet.restart(victim)
            settled = await coord.wait_settled(outcome, timeout=90)
            assert {d.state for d in settled.values()} == {"active"}, {
                k: d.reported for k, d in settled.items()
            }
            for dev in fleet.devices:
                assert dev.active_variant == expected[dev.profile.name], dev
            assert fleet.device(corrupt).corrupted == 3
            assert fleet.states() == {"active": 12}
            gpu = next(d for d in fleet.devices if d.profile.name == "gpu")
            active = gpu.agent.holder.active
            assert active is not None
            assert active.provider == "CPUExecutionProvider"  # CUDA was only claimed

            # a crash after install: the new agent serves the installed model from disk
            other = fleet.devices[5]
            await fleet.crash(other.device_id)
            await fleet.restart(other.device_id)
            assert other.active_variant == expected[other.profile.name]
            assert other.update_state == UpdateState.ACTIVE

    try:
        asyncio.run(main())
    finally:
        devices.close()
        client.close()
