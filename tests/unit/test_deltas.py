"""Model deltas: the ONNX tensor delta and the binary fallbacks rebuild the target
exactly, refuse the wrong base, and garbled bodies fail as DataLoss (never a wrong model)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.cloud.artifacts.local import LocalArtifactStore
from edgefleet.cloud.deltas import DeltaCache, DeltaStore
from edgefleet.cloud.deltas.build import build_delta, candidates, tensor_segments
from edgefleet.cloud.deltas.onnx import initializers
from edgefleet.protos.delta import (
    HEADER_SIZE,
    DeltaFormat,
    Op,
    apply_delta,
    encode_bsdiff4,
    encode_zstd,
    read_header,
    shuffle,
    unshuffle,
)
from edgefleet.protos.errors import DataLoss, InvalidArgument


def onnx_model(weights: dict[str, np.ndarray]) -> bytes:
    """A small real ONNX model: y = x @ w1 @ w2 + b (+ an int8 tensor)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, name) for name, a in weights.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    return bytes(helper.make_model(graph).SerializeToString())


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 0.1, (64, 256)).astype(np.float32),
        "w2": rng.normal(0, 0.1, (256, 10)).astype(np.float32),
        "b": rng.normal(0, 0.1, (10,)).astype(np.float32),
        "q": rng.integers(-128, 127, (4096,)).astype(np.int8),
    }


def test_initializers_are_found_at_their_bytes() -> None:
    w = weights()
    data = onnx_model(w)
    blobs = {t.name: t for t in initializers(data)}
    assert set(blobs) == {"w1", "w2", "b", "q"}
    for name, arr in w.items():
        t = blobs[name]
        assert data[t.offset : t.offset + t.length] == arr.tobytes()
    assert blobs["w1"].width == 4 and blobs["q"].width == 1
    assert initializers(b"not an onnx model at all \xff\xff") == []


def test_head_only_change_sends_only_the_head() -> None:
    base_w = weights()
    new_w = dict(base_w, w2=base_w["w2"] + np.float32(0.01), b=base_w["b"] * 2)
    base, target = onnx_model(base_w), onnx_model(new_w)
    segs = tensor_segments(base, target)
    assert segs is not None
    ops = [s.op for s in segs if s.op != Op.LITERAL]
    assert ops.count(Op.COPY) == 2 and ops.count(Op.ADD) == 2
    built = build_delta(base, target)
    assert built is not None and built.format is DeltaFormat.TENSOR
    assert built.ratio < 0.15
    assert apply_delta(base, built.data) == target


def test_every_weight_nudged_still_rebuilds_exactly_and_int8_uses_add() -> None:
    base_w = weights()
    rng = np.random.default_rng(1)
    new_w = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in base_w.items()}
    new_w["q"] = (base_w["q"].astype(np.int16) + rng.integers(-1, 2, 4096)).clip(-128, 127)
    new_w["q"] = new_w["q"].astype(np.int8)
    base, target = onnx_model(base_w), onnx_model(new_w)
    segs = tensor_segments(base, target)
    assert segs is not None and Op.ADD in {s.op for s in segs}
    for delta in candidates(base, target, level=3):
        assert apply_delta(base, delta) == target


def test_unrelated_models_get_no_delta() -> None:
    base, target = onnx_model(weights(0)), onnx_model(weights(7))
    assert build_delta(base, target) is None


def test_wrong_base_is_refused_before_any_work() -> None:
    base_w = weights()
    base = onnx_model(base_w)
    target = onnx_model(dict(base_w, b=base_w["b"] + 1))
    built = build_delta(base, target)
    assert built is not None
    other = onnx_model(weights(3))
    with pytest.raises(InvalidArgument, match="delta applies to base"):
        apply_delta(other, built.data)


@pytest.mark.parametrize("where", ["body", "header_target"])
def test_a_corrupted_delta_never_yields_a_wrong_model(where: str) -> None:
    base_w = weights()
    base = onnx_model(base_w)
    target = onnx_model(dict(base_w, w2=base_w["w2"] * 1.5))
    built = build_delta(base, target)
    assert built is not None
    bad = bytearray(built.data)
    i = len(bad) // 2 if where == "body" else 4 + 1 + 32 + 3
    bad[i] ^= 0x55
    with pytest.raises((DataLoss, InvalidArgument)):
        apply_delta(base, bytes(bad))


def test_header_names_both_sides() -> None:
    base, target = b"a" * 1000, b"a" * 990 + b"b" * 10
    h = read_header(encode_zstd(base, target))
    assert h.base_sha256 == hashlib.sha256(base).hexdigest()
    assert h.target_sha256 == hashlib.sha256(target).hexdigest()
    assert h.target_size == 1000 and h.format is DeltaFormat.ZSTD
    with pytest.raises(InvalidArgument, match="expected b'EFD1'"):
        read_header(b"XXXX" + bytes(HEADER_SIZE))
    with pytest.raises(InvalidArgument, match="format 9 unknown"):
        read_header(b"EFD1" + bytes([9]) + bytes(HEADER_SIZE - 5))


@settings(max_examples=40, deadline=None)
@given(
    base=st.binary(min_size=0, max_size=4096),
    edits=st.lists(st.tuples(st.integers(0, 4096), st.binary(max_size=64)), max_size=8),
)
def test_binary_fallbacks_round_trip(base: bytes, edits: list[tuple[int, bytes]]) -> None:
    target = bytearray(base)
    for pos, data in edits:
        p = min(pos, len(target))
        target[p : p + len(data)] = data
    t = bytes(target)
    for delta in (encode_zstd(base, t, level=3), encode_bsdiff4(base, t)):
        assert apply_delta(base, delta) == t


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=512), width=st.sampled_from([1, 2, 4, 8]))
def test_byte_planes_round_trip(data: bytes, width: int) -> None:
    assert unshuffle(shuffle(data, width), width) == data


def test_cache_keeps_worthwhile_deltas_and_forgets_altered_ones(tmp_path: Path) -> None:
    store = LocalArtifactStore(str(tmp_path / "artifacts"))
    records = DeltaStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    cache = DeltaCache(store, records)
    base_w = weights()
    base = store.put(onnx_model(base_w)).sha256
    target = store.put(onnx_model(dict(base_w, b=base_w["b"] + 1))).sha256
    unrelated = store.put(onnx_model(weights(5))).sha256
    rec = cache.get_or_build(base, target)
    assert rec is not None and rec.usable and rec.ratio < 0.15
    assert records.for_targets([target]) == [rec]
    assert cache.get_or_build(base, target) == rec  # cached, not rebuilt
    assert cache.get_or_build(unrelated, target) is None  # not worth it: remembered as such
    assert records.get(unrelated, target) is not None
    assert cache.get_or_build("0" * 64, target) is None  # base not in the store
    # a delta altered in the store is refused and forgotten, and built again next time
    path = next((tmp_path / "artifacts").rglob(rec.sha256 + "*"))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataLoss):
        cache.load(rec)
    assert records.get(base, target) is None
    path.unlink()
    again = cache.get_or_build(base, target)
    assert again is not None and apply_delta(store.get(base), cache.load(again)) == store.get(
        target
    )
    records.close()


def test_wire_summary_counts_one_stream_per_group(tmp_path: Path) -> None:
    from edgefleet.cloud.deltas.offers import wire_summary
    from edgefleet.cloud.deltas.store import DeltaRecord

    records = DeltaStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    a, b, t = "a" * 64, "b" * 64, "f" * 64
    records.put(DeltaRecord(a, t, "tensor", "d" * 64, 100, 1000))
    records.put(DeltaRecord(b, t, "none", "", 0, 1000))
    summary = wire_summary(records, [(a, t, 1000), (a, t, 1000), (b, t, 1000), ("", t, 1000)])
    records.close()
    # one delta stream for both devices on `a`, one full stream for `b` and the new device
    assert (summary.wire_bytes, summary.full_bytes, summary.via_delta) == (1100, 1000, 2)
    assert "1,100 vs 1,000 full" in summary.describe()
    assert "2 of 4 devices via deltas" in summary.describe()


def test_offers_go_to_delta_capable_devices_on_their_active_or_last_known_good(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime

    from edgefleet.cloud.deltas.offers import plan_offers
    from edgefleet.cloud.devices import Device
    from edgefleet.cloud.devices.values import (
        Accelerator,
        Capabilities,
        ReasonCode,
        Reported,
        ServedModel,
        UpdateState,
    )

    store = LocalArtifactStore(str(tmp_path / "artifacts"))
    records = DeltaStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    cache = DeltaCache(store, records)
    base_w = weights()
    v1 = store.put(onnx_model(base_w)).sha256
    v2 = store.put(onnx_model(dict(base_w, b=base_w["b"] + 1))).sha256
    other = store.put(onnx_model(weights(9))).sha256

    def device(
        name: str, active: str, lkg: str = "", features: tuple[str, ...] = ("delta",)
    ) -> Device:
        return Device(
            device_id=name,
            group="",
            tags={},
            enrolled_at=datetime.now(UTC),
            online=True,
            last_seen=None,
            agent_version="0.1.0",
            capabilities=Capabilities(
                machine="x86_64",
                runtimes=("onnxruntime",),
                providers=("CPUExecutionProvider",),
                accelerator=Accelerator.CPU,
                memory_mb=512,
                features=features,
            ),
            active=ServedModel("m", 1, "fp32", active) if active else None,
            reported=Reported(
                device_id=name,
                generation=1,
                state=UpdateState.ACTIVE,
                reason=ReasonCode.OK,
                last_known_good=ServedModel("m", 1, "fp32", lkg),
            )
            if lkg
            else None,
            desired_generation=0,
            rollout_id="",
        )

    devices = [
        device("on-v1", v1),
        device("lkg-v1", other, lkg=v1),  # its active model has no worthwhile delta
        device("old-agent", v1, features=()),
        device("fresh", ""),
        device("done", v2),
    ]
    offers = plan_offers(cache, devices, {d.device_id: v2 for d in devices})
    records.close()
    assert set(offers) == {"on-v1", "lkg-v1"}
    assert offers["on-v1"] == offers["lkg-v1"]  # one delta (base -> target) group
    assert offers["on-v1"].base_sha256 == v1
