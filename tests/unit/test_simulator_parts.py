"""Simulator parts that need no broker: profiles, data partitions, chunk corruption,
slowed sessions, drift faults (the agents on a real broker: tests/e2e/test_simulator.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgefleet.agent.capabilities import Capabilities
from edgefleet.agent.config import AgentSettings
from edgefleet.agent.serde import decode_chunk
from edgefleet.models.data import load_dataset
from edgefleet.models.runtime import ModelSession
from edgefleet.protos.errors import InvalidArgument, NotFound
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.manifest import TensorSpec
from edgefleet.simulator.data import label_skew, partition, read_shards, write_shards
from edgefleet.simulator.fleet import SimulatedDevice, _SlowedSession, corrupt_chunk
from edgefleet.simulator.profiles import MIXED, PROFILES, Mix, Profile, parse_profile

# -- profiles ---------------------------------------------------------------------------


def test_parse_profile_knows_the_builtins_and_names_them_when_wrong() -> None:
    for name in ("cpu", "gpu", "npu", "litert", "armv7"):
        p = parse_profile(name)
        assert isinstance(p, Profile)
        assert p.name == name
    assert parse_profile("Mixed") is MIXED
    with pytest.raises(InvalidArgument, match=r"'tpu' is unknown; accepted: mixed, cpu, gpu"):
        parse_profile("tpu")


def test_profiles_claim_what_the_brief_says() -> None:
    gpu = PROFILES["gpu"].caps
    assert gpu.providers[0] == "CUDAExecutionProvider"
    assert gpu.accelerator == "gpu"
    npu = PROFILES["npu"].caps
    assert {"QNNExecutionProvider", "OpenVINOExecutionProvider"} <= set(npu.providers)
    assert PROFILES["litert"].caps.runtimes == ("litert",)
    armv7 = PROFILES["armv7"].caps
    assert armv7.tflite_runtime_legacy is True
    assert armv7.runtimes == ("litert",)
    assert PROFILES["cpu"].caps.runtimes == ("onnxruntime", "litert")
    with pytest.raises(InvalidArgument, match="speed_factor 0.5"):
        Profile("fast", Capabilities("x86_64", ("onnxruntime",), (), "cpu", 1), speed_factor=0.5)


def test_mixed_is_exact_and_deterministic_by_seed() -> None:
    assert MIXED.counts(20) == {"cpu": 10, "gpu": 4, "npu": 3, "litert": 3}
    assert sum(MIXED.counts(7).values()) == 7
    a = [p.name for p in MIXED.assign(100, seed=1)]
    assert a == [p.name for p in MIXED.assign(100, seed=1)]
    assert a != [p.name for p in MIXED.assign(100, seed=2)]
    assert sorted(a) == sorted(p.name for p in MIXED.assign(100, seed=2))
    assert {n: a.count(n) for n in set(a)} == {"cpu": 50, "gpu": 20, "npu": 15, "litert": 15}
    assert PROFILES["gpu"].assign(3) == [PROFILES["gpu"]] * 3
    half = Mix("half", ((PROFILES["cpu"], 1), (PROFILES["armv7"], 1)))
    assert half.counts(5) == {"cpu": 3, "armv7": 2}


# -- data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset("digits")
    return ds.x, ds.y


def test_partition_assigns_every_sample_once_and_every_device_some(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    for n, alpha in ((10, 0.5), (300, 0.1), (1000, 0.5)):
        parts = partition(x, y, n, alpha=alpha, seed=3)
        assert len(parts) == n
        assert all(len(p) >= 1 for p in parts)
        everything = np.concatenate(parts)
        assert len(everything) == len(y)
        assert np.array_equal(np.sort(everything), np.arange(len(y)))
    a, b = partition(x, y, 10, alpha=0.5, seed=3), partition(x, y, 10, alpha=0.5, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    c = partition(x, y, 10, alpha=0.5, seed=4)
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_label_skew_grows_as_alpha_shrinks(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    skew = {a: label_skew(y, partition(x, y, 20, alpha=a, seed=0)) for a in (0.05, 0.5, 100.0)}
    assert skew[0.05] > skew[0.5] > skew[100.0]
    assert skew[0.05] > 0.6
    assert skew[100.0] < 0.15


def test_partition_rejects_impossible_splits(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    with pytest.raises(InvalidArgument, match="5000 devices but only 1797 samples"):
        partition(x, y, 5000, seed=0)
    with pytest.raises(InvalidArgument, match="alpha 0"):
        partition(x, y, 3, alpha=0, seed=0)


def test_shards_round_trip_and_load_as_a_dataset(
    digits: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = digits
    idx = partition(x, y, 4, seed=0)[1]
    paths = write_shards(tmp_path / "d", x[idx], y[idx], rows_per_shard=100)
    assert [p.name for p in paths][:2] == ["shard-0000.npz", "shard-0001.npz"]
    assert len(paths) == -(-len(idx) // 100)
    xs, ys = read_shards(tmp_path / "d")
    assert np.array_equal(xs, x[idx])
    assert np.array_equal(ys, y[idx])
    assert len(load_dataset(str(paths[0]))) == min(100, len(idx))
    with pytest.raises(NotFound, match="no shard"):
        read_shards(tmp_path / "empty")


# -- corruption and speed -----------------------------------------------------------------


def test_corrupt_chunk_flips_one_data_byte_and_keeps_the_framing() -> None:
    data = bytes(range(256)) * 4
    msg = device_pb2.ArtifactChunk(sha256="ab" * 32, index=7, total=9, data=data)
    bad = corrupt_chunk(msg.SerializeToString())
    sha, index, total, got = decode_chunk(bad)
    assert (sha, index, total) == ("ab" * 32, 7, 9)
    diff = [i for i, (a, b) in enumerate(zip(data, got, strict=True)) if a != b]
    assert len(diff) == 1
    empty = device_pb2.ArtifactChunk(sha256="ab" * 32, index=0, total=1).SerializeToString()
    assert corrupt_chunk(empty) == empty


def test_lost_and_corrupted_chunks_go_through_the_updaters_chunk_filter(tmp_path: Path) -> None:
    """The simulator injects chunk faults through `Updater.chunk_filter`, the agent's
    public hook, not by replacing the updater's handler."""
    key = Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    settings = AgentSettings(
        device_id="sim-1",
        state_dir=tmp_path,
        broker_url="mqtt://127.0.0.1:1",  # never started
        public_key_pem=pem,
        listen="",
    )
    dev = SimulatedDevice(settings, PROFILES["cpu"])
    hook = dev.agent.updater.chunk_filter
    assert hook is not None
    chunk = device_pb2.ArtifactChunk(
        sha256="ab" * 32, index=0, total=2, data=bytes(range(256))
    ).SerializeToString()
    dev.lose_next_chunks(1)
    dev.corrupt_next_chunks(1)

    async def three() -> list[bytes | None]:
        return [await hook(chunk) for _ in range(3)]

    lost, corrupted, passed = asyncio.run(three())
    assert lost is None and dev.lost == 1
    assert corrupted == corrupt_chunk(chunk) != chunk and dev.corrupted == 1
    assert passed == chunk


class _Sleepy(ModelSession):
    runtime = "test"

    def __init__(self) -> None:
        self.inputs = (TensorSpec("x", "float32", (-1, 2)),)
        self.outputs = (TensorSpec("y", "float32", (-1, 2)),)
        self.provider = "CPUExecutionProvider"

    def _run(self, x: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return x * 2


def test_slowed_session_runs_the_real_model_speed_factor_times_slower() -> None:
    s = _SlowedSession(_Sleepy(), 4.0)
    start = time.perf_counter()
    y = s.run(np.ones((1, 2), np.float32))
    took = time.perf_counter() - start
    assert np.array_equal(y, np.full((1, 2), 2, np.float32))
    assert took >= 0.075


def test_drift_faults_parse_and_shift_the_input_stream() -> None:
    from edgefleet.simulator.faults import parse_faults
    from edgefleet.simulator.fleet import InputDrift

    plan = parse_faults("drift:25%@30s=4,drift:2=x1.5,drift=2x0.5,drift")
    assert [(f.who, f.at, f.arg, f.scale) for f in plan] == [
        ("2", 0.0, 0.0, 1.5),
        ("1", 0.0, 2.0, 0.5),
        ("1", 0.0, 4.0, 1.0),
        ("25%", 30.0, 4.0, 1.0),
    ]
    with pytest.raises(InvalidArgument, match="drift takes SHIFT, xSCALE or SHIFTxSCALE"):
        parse_faults("drift=up")
    with pytest.raises(InvalidArgument, match="drift scale 0 must be > 0"):
        parse_faults("drift=x0")
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    y = InputDrift(shift=1.0, scale=2.0).apply(x)
    assert y.dtype == np.float32 and y.tolist() == [[3.0, 5.0]]


def test_group_faults_and_profile_mixes() -> None:
    from edgefleet.protos.errors import InvalidArgument
    from edgefleet.simulator.faults import parse_faults
    from edgefleet.simulator.plan import plan
    from edgefleet.simulator.profiles import Mix, parse_profile

    mix = parse_profile("cpu,gpu")
    assert isinstance(mix, Mix) and mix.counts(6) == {"cpu": 3, "gpu": 3}
    fleet = plan(6, "cpu,gpu", seed=0)
    groups = {e.device_id: e.group for e in fleet}
    (f,) = parse_faults("drift:group=gpu@2s=4")
    assert (f.kind, f.who, f.at, f.arg) == ("drift", "group=gpu", 2.0, 4.0)
    hit = f.pick(list(groups), 0, groups=groups)
    assert hit == sorted(d for d, g in groups.items() if g == "gpu") and len(hit) == 3
    (none,) = parse_faults("drift:group=npu=4")
    with pytest.raises(
        InvalidArgument, match="no simulated device in group 'npu'; groups: cpu, gpu"
    ):
        none.pick(list(groups), 0, groups=groups)


def test_partition_traffic_gives_each_device_its_own_rows() -> None:
    import numpy as np

    from edgefleet.simulator.worker import partitions

    ids = ["sim-0000", "sim-0001", "sim-0002"]
    parts = partitions("digits", ids, total=3, alpha=0.1, seed=0)
    again = partitions("digits", ids[1:], total=3, alpha=0.1, seed=0)  # another worker's slice
    assert np.array_equal(parts["sim-0001"][0], again["sim-0001"][0])
    sizes = [len(parts[i][0]) for i in ids]
    assert sum(sizes) == 1797 and all(s > 0 for s in sizes)
    # skewed: a device's label mix differs from another's
    mixes = [np.bincount(parts[i][1], minlength=10) / len(parts[i][1]) for i in ids]
    assert np.abs(mixes[0] - mixes[1]).sum() > 0.5


# -- spreading devices over a cluster's nodes ----------------------------------------------


def test_spread_puts_device_i_on_node_i_mod_k_first_listing_the_others(tmp_path: Path) -> None:
    from edgefleet.simulator.fleet import SimulatedFleet

    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    nodes = ["mqtt://127.0.0.1:1", "mqtt://127.0.0.1:2", "mqtt://127.0.0.1:3"]
    # a worker's share of a cluster: fleet indexes 4 and 5 (of 6)
    fleet = SimulatedFleet(
        2,
        broker_url="mqtt://unused:1",
        public_key_pem=pem,
        state_root=tmp_path,
        first=4,
        total=6,
        spread=nodes,
        mqtt_version="3.1.1",
    )
    got = [(d.settings.broker_url, d.settings.broker_urls) for d in fleet]
    assert got == [(nodes[1], [nodes[2], nodes[0]]), (nodes[2], [nodes[0], nodes[1]])]
    assert {d.settings.mqtt_version for d in fleet} == {"3.1.1"}
    plain = SimulatedFleet(1, broker_url=nodes[0], public_key_pem=pem, state_root=tmp_path)
    (d,) = plain
    assert (d.settings.broker_url, d.settings.broker_urls, d.settings.mqtt_version) == (
        nodes[0],
        [],
        "auto",
    )
