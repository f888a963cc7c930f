"""Shared sessions (`SimulatedFleet(share_sessions=True)`): 20 real agents on a real broker
take two deployments each through their own download, checks, slot, self-test and
activation, while their simulator process opens one ONNX Runtime session per model."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.inference import load
from edgefleet.agent.serde import UpdateState
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.protos.manifest import Manifest, SignedManifest, decode_manifest
from edgefleet.simulator.fleet import SimulatedDevice, SimulatedFleet
from edgefleet.simulator.plan import device_specs
from tests.e2e.conftest import MakeHome
from tests.support.e2e import Version, local_coordinator, wait_online
from tests.support.identity import SecureBroker

N = 20


@pytest.fixture(scope="module")
def home(make_home: MakeHome) -> Path:
    return make_home("shared", Version(), Version(seed=1))


def _golden(manifest: Manifest) -> np.ndarray:
    g = manifest.golden
    assert g is not None
    dtype = manifest.inputs[0].dtype if manifest.inputs else "float32"
    return np.frombuffer(g.input, dtype=np.dtype(dtype)).reshape(g.input_shape)


def _served(dev: SimulatedDevice) -> tuple[str, np.ndarray]:
    """The device's active model (sha256) and its prediction on that model's golden input."""
    active = dev.agent.holder.active
    assert active is not None, dev
    y, model = dev.agent.holder.predict(_golden(active.manifest))
    return model.manifest.sha256, y


def _session_id(dev: SimulatedDevice) -> int:
    """Identity of the runtime session under the device's model (the simulator's speed
    profile wraps it per device)."""
    active = dev.agent.holder.active
    assert active is not None, dev
    return id(getattr(active.session, "inner", active.session))


def _reference(dev: SimulatedDevice) -> np.ndarray:
    """The same bytes, from the device's active slot, on a session of their own."""
    inst = dev.agent.updater.slots.active()
    assert inst is not None
    manifest = decode_manifest(SignedManifest.from_bytes(inst.manifest_bytes).manifest_bytes)
    model = load(manifest, inst.path.read_bytes(), providers=("CPUExecutionProvider",), threads=1)
    return model.run(_golden(manifest))


def test_devices_share_one_session_per_model_and_each_still_installs_it(
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
        N,
        broker_url=broker.url,
        public_key_pem=settings.public_key_path.read_text(),
        state_root=tmp_path,
        profile="cpu",
        topic_prefix=prefix,
        want_interval=0.5,
        share_sessions=True,
    )
    shared = fleet.shared_sessions
    assert shared is not None
    broker.enroll_fleet(fleet, prefix=prefix)
    devices.enroll_many(device_specs(fleet.ids_for_enrollment()))

    async def deploy(coord: Coordinator, version: int) -> set[str]:
        outcome = await coord.deploy(ModelRef("digits", version), Selector.parse("all"))
        settled = await coord.wait_settled(outcome, timeout=90)
        assert {d.state for d in settled.values()} == {"active"}, {
            k: d.reported for k, d in settled.items()
        }
        assert fleet.states() == {"active": N}
        served = [_served(d) for d in fleet.devices]
        shas = {sha for sha, _ in served}
        assert shas == {outcome.targets[0].sha256}
        # every device serves the same predictions, and they are the model's own
        want = _reference(fleet.devices[0])
        for dev, (_, y) in zip(fleet.devices, served, strict=True):
            np.testing.assert_array_equal(y, want, err_msg=dev.device_id)
        return shas

    async def main() -> None:
        async with (
            asyncio.timeout(150),
            local_coordinator(
                client, devices, broker.coordinator(), topics=Topics(prefix), gather=0.05
            ) as coord,
            fleet,
        ):
            await wait_online(devices, N)
            await deploy(coord, 1)
            # each device loaded (and self-tested) the model on its own; one session
            assert shared.loads == N
            assert shared.opened == 1
            sessions = {_session_id(d) for d in fleet.devices}
            assert len(sessions) == 1
            # every device wrote its own slot: N copies on disk, one per state dir
            slots = [d.agent.updater.slots.active() for d in fleet.devices]
            assert len({s.path for s in slots if s is not None}) == N

            # a restarted device serves its installed model from disk on the same session
            dev = fleet.devices[3]
            await fleet.crash(dev.device_id)
            await fleet.restart(dev.device_id)
            assert dev.update_state == UpdateState.ACTIVE
            assert shared.loads == N + 1
            assert shared.opened == 1
            assert _session_id(dev) in sessions

            await deploy(coord, 2)
            assert shared.loads == 2 * N + 1
            assert shared.opened == 2  # one more for the new bytes, not one per device

    try:
        asyncio.run(main())
    finally:
        devices.close()
        client.close()
