"""Enrol → deploy → every simulated device active on the right variant, over a real Mosquitto.

Real coordinator code, real agent code (transport, updater, downloads, slots,
ONNX Runtime / LiteRT), many agents on one event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet.agent.agent import Agent
from edgefleet.agent.capabilities import Capabilities
from edgefleet.agent.config import AgentSettings
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.evaluation import EvalSet
from edgefleet.cloud.registry import ModelRef
from tests.e2e.conftest import MakeHome
from tests.support.e2e import Version, local_coordinator, wait_online
from tests.support.identity import SecureBroker

PROFILES: dict[str, Capabilities] = {
    "cpu": Capabilities(
        "x86_64", ("onnxruntime", "litert"), ("CPUExecutionProvider",), "cpu", memory_mb=0
    ),
    "gpu": Capabilities("x86_64", ("onnxruntime",), ("CPUExecutionProvider",), "gpu", memory_mb=0),
    "litert": Capabilities("x86_64", ("litert",), (), "cpu", memory_mb=0),
}
EXPECTED = {"cpu": "int8", "gpu": "fp16", "litert": "tflite-int8"}


@pytest.fixture(scope="module")
def home(make_home: MakeHome) -> Path:
    return make_home(
        "deploy", Version(epochs=5, variants=("int8", "fp16", "tflite-int8"), max_drop=1.0)
    )


def test_deploy_reaches_every_device_on_its_variant(
    home: Path, broker: SecureBroker, tmp_path: Path
) -> None:
    settings = load_settings(home=home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    names = {f"dev-{kind}-{i}": kind for kind in PROFILES for i in range(2)}
    for dev_id, kind in names.items():
        devices.enroll(dev_id, group=kind)
    pem = settings.public_key_path.read_text()

    async def main() -> None:
        async with asyncio.timeout(120):
            agents = {
                dev_id: Agent(
                    AgentSettings(
                        device_id=dev_id,
                        state_dir=tmp_path / dev_id,
                        **broker.agent_settings(dev_id),
                        public_key_pem=pem,
                        listen="127.0.0.1:0" if dev_id == "dev-cpu-0" else "",
                    ),
                    capabilities=PROFILES[kind],
                    durable=False,
                    want_interval=0.5,
                )
                for dev_id, kind in names.items()
            }
            stop = asyncio.Event()
            ready = [asyncio.Event() for _ in agents]
            tasks = [
                asyncio.create_task(a.run(stop.wait, ready=r))
                for a, r in zip(agents.values(), ready, strict=True)
            ]
            async with local_coordinator(
                client,
                devices,
                broker.coordinator(),
                chunk_size=8 * 1024,
                gather=0.05,
            ) as coord:
                await asyncio.gather(*(r.wait() for r in ready))
                await wait_online(devices, len(agents))
                outcome = await coord.deploy(ModelRef("digits", 1), Selector.parse("all"))
                assert outcome.skipped == {}
                settled = await coord.wait_settled(outcome, timeout=60)
                for dev_id, kind in names.items():
                    d = settled[dev_id]
                    assert d.state == "active", (dev_id, d.reported)
                    variant = next(t.variant for t in outcome.targets if t.device_id == dev_id)
                    fallback = "fp16" if kind == "gpu" else EXPECTED[kind]
                    assert variant == fallback
                    assert agents[dev_id].holder.active is not None
                    assert agents[dev_id].holder.active.ref.variant == variant
                # the coordinator sent each artifact about once, not once per device
                for sha in {t.sha256 for t in outcome.targets}:
                    st = coord.broadcaster.stats(sha)
                    assert st.bytes_sent <= 1.2 * st.size + 8 * 1024, st
                # predictions through one device's local gRPC API match the cloud's evaluation
                mv = client.registry.get_version(ModelRef("digits", 1))
                ev = EvalSet.from_bytes(client.pipeline.store.get(mv.evalset_sha256))
                port = agents["dev-cpu-0"].port
                from edgefleet.agent.serde import (
                    decode_predict_response,
                    encode_predict_request,
                )
                from edgefleet.protos.fleet.v1 import inference_pb2_grpc

                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = inference_pb2_grpc.InferenceServiceStub(ch)
                    resp = await stub.Predict(encode_predict_request(ev.x))
                    out = decode_predict_response(resp)
                acc = float((np.asarray(out.output).argmax(1) == ev.y).mean())
                assert acc == pytest.approx(mv.variant("int8").accuracy, abs=1e-9)
            stop.set()
            await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    finally:
        devices.close()
        client.close()
