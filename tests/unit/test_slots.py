"""Installed models on the device: active and last-known-good (agent.slots.ModelSlots)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.download import PartialDownload
from edgefleet.agent.slots import InstalledModel, ModelSlots
from edgefleet.protos.errors import Conflict, DataLoss, InvalidArgument, NotFound
from edgefleet.protos.manifest import Manifest, SignedManifest, TensorSpec, sign_manifest

KEY = Ed25519PrivateKey.generate()


def release(version: int, *, runtime: str = "onnxruntime", size: int = 3000) -> tuple[bytes, bytes]:
    """(artifact bytes, signed manifest bytes) for a made-up model version."""
    data = bytes([version]) * size
    m = Manifest(
        model="digits",
        version=version,
        variant="int8",
        runtime=runtime,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        inputs=(TensorSpec("input", "float32", (-1, 64)),),
        outputs=(TensorSpec("logits", "float32", (-1, 10)),),
        created_at_ms=1_700_000_000_000,
    )
    return data, sign_manifest(m, KEY).to_bytes()


def install(slots: ModelSlots, tmp_path: Path, version: int, **kw: str) -> InstalledModel:
    runtime = kw.get("runtime", "onnxruntime")
    data, manifest = release(version, runtime=runtime)
    src = tmp_path / f"incoming-{version}"
    src.write_bytes(data)
    ext = "onnx" if runtime == "onnxruntime" else "tflite"
    return slots.install(manifest, src, extension=ext)


def sha(version: int) -> str:
    return hashlib.sha256(bytes([version]) * 3000).hexdigest()


@pytest.fixture
def slots(tmp_path: Path) -> ModelSlots:
    return ModelSlots(tmp_path / "agent")


def test_fresh_device_has_no_model(slots: ModelSlots) -> None:
    assert slots.active() is None
    assert slots.last_known_good() is None
    assert slots.generation == 0
    assert not slots.has(sha(1))
    with pytest.raises(NotFound, match="no last-known-good model"):
        slots.rollback()


def test_install_moves_file_into_place_without_activating(
    slots: ModelSlots, tmp_path: Path
) -> None:
    data, manifest = release(1)
    src = tmp_path / "incoming.onnx"
    src.write_bytes(data)
    model = slots.install(manifest, src, extension="onnx")
    assert model == InstalledModel(sha(1), slots.root / "models" / f"{sha(1)}.onnx", manifest)
    assert not src.exists()
    assert model.path.read_bytes() == data
    assert (slots.root / "models" / f"{sha(1)}.manifest").read_bytes() == manifest
    assert SignedManifest.from_bytes(model.manifest_bytes).manifest_bytes
    assert slots.has(sha(1))
    assert slots.active() is None


def test_install_tflite(slots: ModelSlots, tmp_path: Path) -> None:
    model = install(slots, tmp_path, 1, runtime="litert")
    assert model.path.name == f"{sha(1)}.tflite"
    slots.activate(sha(1), 1)
    active = slots.active()
    assert active is not None and active.path == model.path


def test_install_rejects_bad_input(slots: ModelSlots, tmp_path: Path) -> None:
    data, manifest = release(1)
    src = tmp_path / "in"
    src.write_bytes(data)
    with pytest.raises(
        InvalidArgument, match="extension 'tflite' does not fit runtime onnxruntime"
    ):
        slots.install(manifest, src, extension="tflite")
    with pytest.raises(InvalidArgument, match="extension 'pt' is not supported; supported: onnx"):
        slots.install(manifest, src, extension="pt")
    with pytest.raises(InvalidArgument, match="cannot install: signed manifest"):
        slots.install(b"\xff\xff garbage", src, extension="onnx")
    with pytest.raises(NotFound, match="no artifact file"):
        slots.install(manifest, tmp_path / "absent", extension="onnx")
    src.write_bytes(data[:-1])
    with pytest.raises(DataLoss, match="is 2999 bytes; manifest says 3000"):
        slots.install(manifest, src, extension="onnx")
    assert not slots.has(sha(1))


def test_activate_keeps_previous_as_last_known_good(slots: ModelSlots, tmp_path: Path) -> None:
    install(slots, tmp_path, 1)
    install(slots, tmp_path, 2)
    slots.activate(sha(1), 5)
    assert slots.last_known_good() is None
    got = slots.activate(sha(2), 6)
    assert got.sha256 == sha(2)
    active, lkg = slots.active(), slots.last_known_good()
    assert active is not None and active.sha256 == sha(2)
    assert lkg is not None and lkg.sha256 == sha(1)
    assert slots.generation == 6
    # re-activating the active model records the generation, keeps last-known-good
    slots.activate(sha(2), 7)
    lkg = slots.last_known_good()
    assert lkg is not None and lkg.sha256 == sha(1)
    assert slots.generation == 7


def test_activate_refuses_unknown_model_and_old_generation(
    slots: ModelSlots, tmp_path: Path
) -> None:
    with pytest.raises(NotFound, match=f"model {sha(1)[:16]}… is not installed"):
        slots.activate(sha(1), 1)
    install(slots, tmp_path, 1)
    slots.activate(sha(1), 5)
    with pytest.raises(Conflict, match="generation 4 is older than the recorded generation 5"):
        slots.activate(sha(1), 4)
    with pytest.raises(InvalidArgument, match="'nothex' is not 64 lowercase hex"):
        slots.activate("nothex", 6)


def test_rollback_reactivates_last_known_good(slots: ModelSlots, tmp_path: Path) -> None:
    v1 = install(slots, tmp_path, 1)
    install(slots, tmp_path, 2)
    slots.activate(sha(1), 1)
    slots.activate(sha(2), 2)
    back = slots.rollback(generation=3)
    assert back == v1
    assert slots.active() == v1
    assert slots.last_known_good() is None  # the model rolled back from is not "good"
    assert slots.generation == 3
    with pytest.raises(NotFound, match="no last-known-good model"):
        slots.rollback()


def test_rollback_without_files_is_not_found(slots: ModelSlots, tmp_path: Path) -> None:
    v1 = install(slots, tmp_path, 1)
    install(slots, tmp_path, 2)
    slots.activate(sha(1), 1)
    slots.activate(sha(2), 2)
    v1.path.unlink()
    assert slots.last_known_good() is None
    with pytest.raises(NotFound, match=f"no last-known-good model: {sha(1)[:16]}… is missing"):
        slots.rollback()
    active = slots.active()
    assert active is not None and active.sha256 == sha(2)


def test_gc_keeps_only_active_and_last_known_good(slots: ModelSlots, tmp_path: Path) -> None:
    for v in (1, 2, 3):
        install(slots, tmp_path, v)
    slots.activate(sha(1), 1)
    slots.activate(sha(2), 2)
    models = slots.root / "models"
    (models / f"{sha(1)}.manifest.tmp").write_bytes(b"left over")
    removed = slots.gc()
    assert {p.name for p in removed} == {
        f"{sha(3)}.onnx",
        f"{sha(3)}.manifest",
        f"{sha(1)}.manifest.tmp",
    }
    assert sorted(p.name for p in models.iterdir()) == sorted(
        f"{sha(v)}.{ext}" for v in (1, 2) for ext in ("onnx", "manifest")
    )
    slots.rollback()
    assert {p.name for p in slots.gc()} == {f"{sha(2)}.onnx", f"{sha(2)}.manifest"}
    assert slots.has(sha(1)) and not slots.has(sha(2))


def test_state_survives_restart(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    first = ModelSlots(root)
    install(first, tmp_path, 1)
    install(first, tmp_path, 2)
    first.activate(sha(1), 10)
    first.activate(sha(2), 11)

    second = ModelSlots(root)
    assert second.active() == first.active()
    assert second.last_known_good() == first.last_known_good()
    assert second.generation == 11
    doc = json.loads((root / "slots.json").read_text())
    assert doc == {"active": sha(2), "last_known_good": sha(1), "generation": 11}
    assert (root / "slots.json.bak").read_bytes() == (root / "slots.json").read_bytes()


@pytest.mark.parametrize(
    "damage",
    [b"", b'{"active": "', b'{"active": "nothex", "last_known_good": null, "generation": 1}'],
)
def test_damaged_state_falls_back_to_backup_and_repairs(tmp_path: Path, damage: bytes) -> None:
    root = tmp_path / "agent"
    first = ModelSlots(root)
    install(first, tmp_path, 1)
    first.activate(sha(1), 4)
    (root / "slots.json").write_bytes(damage)

    second = ModelSlots(root)
    active = second.active()
    assert active is not None and active.sha256 == sha(1)
    assert second.generation == 4
    assert json.loads((root / "slots.json").read_text())["active"] == sha(1)  # repaired


def test_both_copies_damaged_is_data_loss(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    first = ModelSlots(root)
    install(first, tmp_path, 1)
    first.activate(sha(1), 4)
    (root / "slots.json").write_bytes(b"\x00\x00")
    (root / "slots.json.bak").write_bytes(b"[]")
    with pytest.raises(DataLoss, match=r"unreadable and so is its backup .*top level is list"):
        ModelSlots(root)


def test_download_finishes_straight_into_slot(slots: ModelSlots, tmp_path: Path) -> None:
    data, manifest = release(1, size=40_000)
    digest = hashlib.sha256(data).hexdigest()
    pd = PartialDownload.open(
        tmp_path / "downloads",
        sha256=digest,
        size=len(data),
        chunk_size=16_384,
        chunk_digests=[
            hashlib.sha256(data[i : i + 16_384]).digest() for i in range(0, len(data), 16_384)
        ],
    )
    for i in range(pd.chunks_total):
        pd.add(i, data[i * 16_384 : (i + 1) * 16_384])
    path = pd.finish(slots.artifact_path(digest, extension="onnx"))
    model = slots.install(manifest, path, extension="onnx")
    assert model.path == path and path.read_bytes() == data
    assert slots.activate(digest, 1).sha256 == digest
