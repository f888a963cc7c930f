"""Fuzz what devices (or anyone on the broker) can send: the coordinator's MQTT inputs
through the real decoders into a real SQLite database, and the agent's desired-state
and chunk handlers. Zero crashes (any exception escaping a handler fails the test),
zero stalls (afterwards a good message still lands).

The default run feeds a few thousand messages; the slow one at least 100,000
(BENCHMARKS.md has the figures)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.agent import Agent
from edgefleet.agent.capabilities import Capabilities
from edgefleet.agent.config import AgentSettings
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.distribution import chunk_digests
from edgefleet.cloud.inbound import Refusals
from edgefleet.cloud.serde import encode_chunk, encode_desired
from edgefleet.cloud.telemetry import TelemetryIngest, TelemetryStore
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.manifest import Manifest, TensorSpec, sign_manifest
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import Message
from tests.support.e2e import local_coordinator
from tests.support.fuzz import payload, random_message

BATCH = 50  # messages per hypothesis example
ART = b"x" * 4000
SHA = hashlib.sha256(ART).hexdigest()


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _valid() -> dict[str, bytes]:
    t = device_pb2.Telemetry(device_id="d1", seq=1, window_end_ms=_now_ms(), predictions=3)
    t.latency.bounds_us.extend([10, 100])
    t.latency.counts.extend([1, 1, 1])
    t.drift.add(rows=3, predictions=[1, 2]).inputs.add(counts=[1, 2])
    t.drift[0].model.model = "m"
    r = device_pb2.ReportedState(device_id="d1", generation=2, state=6, reason=1)
    s = device_pb2.DeviceStatus(device_id="d1", online=True)
    s.capabilities.runtimes.append("onnxruntime")
    sh = device_pb2.ShadowReport(device_id="d1", generation=2, samples=5, agreed=4)
    w = device_pb2.ArtifactWant(device_id="d1", sha256=SHA, chunks_total=4)
    w.missing.add(start=0, end=2)
    return {
        "telemetry": t.SerializeToString(),
        "reported": r.SerializeToString(),
        "status": s.SerializeToString(),
        "shadow": sh.SerializeToString(),
        "want": w.SerializeToString(),
    }


CLASSES = {
    "telemetry": device_pb2.Telemetry,
    "reported": device_pb2.ReportedState,
    "status": device_pb2.DeviceStatus,
    "shadow": device_pb2.ShadowReport,
    "want": device_pb2.ArtifactWant,
}


def _drive(examples: int, one: Callable[[random.Random], Awaitable[None]]) -> float:
    """Run `one(rng)` for `examples` seeds Hypothesis draws (warnings muted: every
    refusal would log); returns the seconds it took."""

    @_settings(examples)
    @given(st.integers(0, 2**64 - 1))
    def run(seed: int) -> None:
        asyncio.run(one(random.Random(seed)))  # type: ignore[arg-type]

    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    try:
        run()
    finally:
        logging.disable(logging.NOTSET)
    return time.perf_counter() - t0


def _inputs(rng: random.Random) -> list[tuple[str, str, bytes]]:
    valid = _valid()
    kinds = list(CLASSES)
    out = []
    for _ in range(BATCH):
        kind = rng.choice(kinds)
        dev = rng.choice(["d1", "d2", "ghost", "bad id", "x" * 70])
        out.append((kind, dev, payload(rng, CLASSES[kind], valid[kind], device_id=dev)))
    return out


def _fuzz_coordinator(tmp: Path, examples: int) -> dict[str, float]:
    home = tmp / "home"
    client = LocalClient(load_settings(home=home))
    client.init()
    s = load_settings(home=home)
    devices = DeviceStore(s.registry_url)
    for d in ("d1", "d2"):
        devices.enroll(d)
    refusals = Refusals()
    store = TelemetryStore(s.registry_url)
    ingest = TelemetryIngest(store, refusals=refusals)
    coord = local_coordinator(
        client,
        devices,
        "mqtt://127.0.0.1:1",  # never connected: handlers are driven directly
        refusals=refusals,
    )
    coord.broadcaster.register(SHA, ART, 1000)
    topics = Topics()
    sent = 0

    async def feed(batch: list[tuple[str, str, bytes]]) -> None:
        nonlocal sent
        for kind, dev, data in batch:
            if kind == "telemetry":
                ingest.add(dev, data)
            topic = topics.want(SHA) if kind == "want" else f"{topics.prefix}/dev/{dev}/{kind}"
            await coord._on_message(Message(topic, data, 1, False))
            sent += 1
        await coord._flush_events()
        assert ingest.flush()

    elapsed = _drive(examples, lambda rng: feed(_inputs(rng)))

    # no stall: good messages still land
    before = store.count()
    good = device_pb2.Telemetry(device_id="d2", seq=2**62, window_end_ms=_now_ms())
    assert ingest.add("d2", good.SerializeToString())
    assert ingest.flush() and store.count() == before + 1
    rep = device_pb2.ReportedState(device_id="d2", generation=424242, state=6, reason=1)

    async def last() -> None:
        await coord._on_message(Message(topics.reported("d2"), rep.SerializeToString(), 1, False))
        await coord._flush_events()

    asyncio.run(last())
    rep = devices.get("d2").reported
    assert rep and rep.generation == 424242
    store.close()
    devices.close()
    client.close()
    return {"messages": sent, "seconds": elapsed, "refused": refusals.total()}


def _agent(tmp: Path, key: Ed25519PrivateKey) -> Agent:
    from cryptography.hazmat.primitives import serialization

    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Agent(
        AgentSettings(
            device_id="d1",
            state_dir=tmp / "agent",
            broker_url="mqtt://127.0.0.1:1",  # never connected: reports fail, handlers run
            public_key_pem=pem.decode(),
            listen="",
        ),
        capabilities=Capabilities("x86_64", ("onnxruntime",), ("CPUExecutionProvider",), "cpu", 0),
        durable=False,
    )


def _fuzz_agent(tmp: Path, examples: int) -> dict[str, float]:
    key = Ed25519PrivateKey.generate()
    agent = _agent(tmp, key)
    art = bytes(range(256)) * 40  # 10 KiB: not a model; enough to download
    chunk = 1024
    art_sha = hashlib.sha256(art).hexdigest()
    manifest = sign_manifest(
        Manifest(
            model="m",
            version=1,
            variant="fp32",
            runtime="onnxruntime",
            sha256=art_sha,
            size=len(art),
            inputs=(TensorSpec("x", "float32", (-1, 2)),),
            outputs=(TensorSpec("y", "float32", (-1, 2)),),
            created_at_ms=0,
        ),
        key,
    )
    topics = Topics()
    gen = 0

    def desired(**kw: object) -> bytes:
        nonlocal gen
        gen += 1
        args: dict[str, object] = {
            "device_id": "d1",
            "generation": gen,
            "rollout_id": "r",
            "manifest": manifest,
            "chunk_size": chunk,
            "chunk_digests": chunk_digests(art, chunk),
            "action": "activate",
            "key": key,
        }
        args.update(kw)
        return encode_desired(**args)  # type: ignore[arg-type]

    good_desired = desired()
    kid = agent.updater.trust.keys.keys[0].key_id
    good_chunk = encode_chunk(art_sha, 0, 10, b"x" * chunk)

    def inputs(rng: random.Random) -> list[tuple[str, bytes]]:
        out = []
        for _ in range(BATCH):
            pick = rng.random()
            if pick < 0.35:
                data = payload(rng, device_pb2.SignedDesiredState, good_desired)
                out.append((topics.desired("d1"), data))
            elif pick < 0.55:  # signed by the trusted key, any field values
                body = random_message(
                    rng, device_pb2.DesiredState.DESCRIPTOR, device_id="d1"
                ).SerializeToString()
                signed = device_pb2.SignedDesiredState(
                    desired=body, signature=key.sign(body), key_id=kid
                )
                out.append((topics.desired("d1"), signed.SerializeToString()))
            elif pick < 0.9:
                out.append(
                    (topics.chunk(art_sha), payload(rng, device_pb2.ArtifactChunk, good_chunk))
                )
            else:
                out.append((topics.keys(), rng.randbytes(rng.randint(0, 200))))
        return out

    sent = 0

    async def feed(batch: list[tuple[str, bytes]]) -> None:
        nonlocal sent
        for topic, data in batch:
            await agent._on_message(Message(topic, data, 1, False))
            sent += 1

    elapsed = _drive(examples, lambda rng: feed(inputs(rng)))

    # no stall: a good desired state starts a download and its chunks complete it
    async def last() -> None:
        await agent._on_message(Message(topics.desired("d1"), desired(generation=2**62), 1, False))
        assert agent.updater.accepted_generation == 2**62
        for i in range(0, len(art), chunk):
            data = encode_chunk(art_sha, i // chunk, len(art) // chunk, art[i : i + chunk])
            await agent._on_message(Message(topics.chunk(art_sha), data, 1, False))

    asyncio.run(last())
    assert agent.updater.slots.has(art_sha)  # downloaded, verified, installed
    return {"messages": sent, "seconds": elapsed, "refused": sum(agent.updater.refused.values())}


Runner = Callable[[Path, int], dict[str, float]]


@pytest.mark.parametrize("runner", [_fuzz_coordinator, _fuzz_agent], ids=["coordinator", "agent"])
def test_fuzz_bounded(runner: Runner, tmp_path: Path) -> None:
    got = runner(tmp_path, 60)
    assert got["messages"] == 60 * BATCH
    assert got["refused"] > 0  # the fuzz did reach the checks


@pytest.mark.slow
@pytest.mark.parametrize("runner", [_fuzz_coordinator, _fuzz_agent], ids=["coordinator", "agent"])
def test_fuzz_100k(runner: Runner, tmp_path: Path) -> None:
    got = runner(tmp_path, 2000)
    assert got["messages"] >= 100_000
    logging.getLogger(__name__).warning(
        "fuzz %s: %d messages in %.1f s, %d refused, 0 crashes",
        runner.__name__,
        got["messages"],
        got["seconds"],
        got["refused"],
    )
