"""Model deltas end to end: real agents over a real (secured) broker get a new version
as a delta against the model they run, and every fallback — no base, a delta for
another base, a corrupted delta, tampered delta chunks, a delta altered in the
coordinator's store — ends on the right, verified model via the full artifact.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.agent import Agent
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.deltas import DeltaStore
from edgefleet.cloud.distribution import chunk_digests
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.serde import encode_chunk, encode_desired
from edgefleet.models.checkpoint import Checkpoint, dump_checkpoint, load_checkpoint
from edgefleet.protos.delta import DeltaFormat, DeltaOffer, encode_zstd
from edgefleet.protos.manifest import SignedManifest
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import MqttTransport
from tests.conftest import Cli
from tests.e2e.test_updates import CHUNK, Harness, harness, run
from tests.support.identity import SecureBroker


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits v1 (trained) and v2: v1 with only its output layer fine-tuned (a
    federated registration, so v2's ONNX shares every other tensor with v1's)."""
    h = tmp_path_factory.mktemp("deltas") / "home"
    client = LocalClient(load_settings(home=h))
    client.init()
    v1 = client.train(
        "digits", "digits", arch="mlp", epochs=1, seed=0, batch_size=64, lr=3e-3, on_epoch=None
    )
    ckpt = load_checkpoint(client.pipeline.store.get(v1.checkpoint_sha256))
    arrays = dict(ckpt.arrays)
    rng = np.random.default_rng(0)
    for name in list(arrays)[-2:]:  # the last Linear: weight and bias
        a = arrays[name]
        arrays[name] = (a + rng.normal(0, 1e-2, a.shape)).astype(a.dtype)
    client.pipeline.register_federated(
        ModelRef("digits", 1),
        dump_checkpoint(Checkpoint(ckpt.config, arrays)),
        federated={"strategy": "test", "rounds": 1},
        training_config={"head_only": True},
    )
    client.close()
    return h


def sha_of(h: Harness, version: int) -> str:
    return h.client.registry.get_version(ModelRef("digits", version)).variant("fp32").sha256


def on_disk(agent: Agent) -> str:
    active = agent.updater.slots.active()
    assert active is not None
    return hashlib.sha256(active.path.read_bytes()).hexdigest()


async def settle(h: Harness, version: int, sel: str) -> Any:
    out = await h.deploy(version, sel)
    await h.coord.wait_settled(out, timeout=60)
    return out


def reasons(h: Harness, dev: str) -> list[str]:
    return [r["reason"] for r in h.reports[dev]]


def test_delta_to_devices_on_the_parent_and_full_to_the_rest(
    home: Path, broker: SecureBroker, tmp_path: Path, cli: Cli
) -> None:
    async def main() -> None:
        async with harness(home, broker, tmp_path, ["d1", "d2", "d3"]) as h:
            v1, v2 = sha_of(h, 1), sha_of(h, 2)
            await settle(h, 1, "device=d1,d2")
            out = await settle(h, 2, "all")
            by_dev = {t.device_id: t for t in out.targets}
            # d1 and d2 run v1: one delta stream for both; d3 runs nothing: full
            assert (
                by_dev["d1"].delta_sha256 and by_dev["d1"].delta_sha256 == by_dev["d2"].delta_sha256
            )
            assert not by_dev["d3"].delta_sha256
            assert by_dev["d1"].delta_size < 0.15 * by_dev["d1"].size
            wire, full = out.wire()
            assert full == by_dev["d1"].size and wire == full + by_dev["d1"].delta_size
            stats = h.coord.broadcaster.stats(by_dev["d1"].delta_sha256)
            assert 0 < stats.bytes_sent <= 2 * stats.size  # one stream, a few re-sends at most
            for d in ("d1", "d2", "d3"):
                agent = h.agents[d]
                assert agent.holder.active is not None and agent.holder.active.ref.sha256 == v2
                assert on_disk(agent) == v2
            assert "delta_failed" not in reasons(h, "d1") + reasons(h, "d2")
            # recorded in the registry beside the version; the next deploy reuses it
            rec = DeltaStore(h.devices.url).get(v1, v2)
            assert rec is not None and rec.sha256 == by_dev["d1"].delta_sha256
            assert rec.format == "tensor"
            # `fleet models show` lists it (the harness keeps devices in a database of their
            # own; in a real home both share one)
            home_db = DeltaStore(h.client.settings.registry_url)
            home_db.put(rec)
            home_db.close()
            shown = await asyncio.to_thread(cli, "--home", str(home), "models", "show", "digits:2")
            assert shown.code == 0, shown.err
            assert (
                f"digits:1/fp32 -> digits:2/fp32: tensor {rec.size} B of {rec.target_size} B"
                in (shown.out)
            )
            shown = await asyncio.to_thread(
                cli, "--home", str(home), "models", "show", "digits:2", "--json"
            )
            assert json.loads(shown.out)["deltas"][0]["size"] == rec.size

    run(main())


def test_every_fallback_ends_on_the_right_verified_model(
    home: Path, broker: SecureBroker, tmp_path: Path
) -> None:
    """One device per case, all on v1, each offered v2 with a delta that cannot work
    (or arrives tampered) in a desired state the coordinator's key signed."""
    cases = ["nobase", "wrongbase", "corrupt", "tampered", "unserved"]

    async def main() -> None:
        async with harness(home, broker, tmp_path, cases) as h:
            v1, v2 = sha_of(h, 1), sha_of(h, 2)
            await settle(h, 1, "all")
            store = h.client.pipeline.store
            full = store.get(v2)
            mv2 = h.client.registry.get_version(ModelRef("digits", 2))
            manifest = SignedManifest.from_bytes(mv2.variant("fp32").signed_manifest)
            await h.coord.prepare([mv2.variant("fp32")])
            raw = MqttTransport(broker.watcher("attacker"))

            async def offer(dev: str, delta: bytes, *, base: str = v1) -> list[str]:
                """Offer v2 as `delta` against `base`; wait until `dev` runs v2 and return
                the reasons it reported on the way."""
                sha = hashlib.sha256(delta).hexdigest()
                if dev in ("nobase", "tampered"):  # not prepared: loaded from the store on a want
                    store.put(delta)
                elif dev == "unserved":  # nowhere: the device gives up on it
                    pass
                elif not h.coord.broadcaster.known(sha):
                    h.coord.broadcaster.register(sha, delta, CHUNK)
                payload = encode_desired(
                    device_id=dev,
                    generation=100,
                    rollout_id="deltas",
                    manifest=manifest,
                    chunk_size=CHUNK,
                    chunk_digests=chunk_digests(full, CHUNK),
                    action="activate",
                    key=h.key(),
                    delta=DeltaOffer(
                        base, sha, len(delta), 1, CHUNK, tuple(chunk_digests(delta, CHUNK))
                    ),
                )
                await raw.publish(Topics().desired(dev), payload, qos=1, retain=False)
                await h.wait_report(
                    dev, lambda r: r["generation"] == 100 and r["state"] == "active", timeout=40
                )
                agent = h.agents[dev]
                assert agent.holder.active is not None and agent.holder.active.ref.sha256 == v2
                assert on_disk(agent) == v2
                return [r["reason"] for r in h.reports[dev] if r["generation"] == 100]

            async with raw:
                await raw.wait_connected(timeout=10)
                good = encode_zstd(store.get(v1), full)
                assert DeltaFormat(good[4]) is DeltaFormat.ZSTD
                corrupt = bytearray(good)
                corrupt[len(corrupt) // 2] ^= 0xFF
                # tampered chunks of the good delta on the wire: refused by the signed
                # chunk digests, fetched again, and the delta then applies
                sha = hashlib.sha256(good).hexdigest()
                forged = bytearray(good[:CHUNK])
                forged[10] ^= 0x01
                total = -(-len(good) // CHUNK)

                async def forge() -> None:
                    while True:
                        await raw.publish(
                            Topics().chunk(sha), encode_chunk(sha, 0, total, bytes(forged)), qos=1
                        )
                        await asyncio.sleep(0.01)

                forger = asyncio.create_task(forge())
                unserved = encode_zstd(store.get(v1), full, level=3)
                assert unserved != good
                nobase, wrongbase, bad, tampered, stalled = await asyncio.gather(
                    # a base the device never had
                    offer("nobase", good, base=hashlib.sha256(b"elsewhere").hexdigest()),
                    # a delta built against other bytes, offered for the base it holds
                    offer("wrongbase", encode_zstd(b"some other model" * 100, full)),
                    # a corrupted delta whose (signed) digests describe it as it is
                    offer("corrupt", bytes(corrupt)),
                    offer("tampered", good),
                    # a delta nobody serves (its blob is gone): given up after 10 wants
                    offer("unserved", unserved),
                )
                forger.cancel()
            assert "delta_no_base" in nobase and "delta_failed" not in nobase
            assert "delta_failed" in wrongbase
            assert "delta_failed" in bad
            assert "delta_failed" not in tampered and "delta_no_base" not in tampered
            assert "chunk_digest_mismatch" in tampered  # the forged chunk reached it
            assert "delta_failed" in stalled

    run(main())
