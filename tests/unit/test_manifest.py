"""Manifest encoding, Ed25519 signatures and artifact checks (protos.manifest)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.protos.errors import DataLoss, InvalidArgument, Unauthenticated
from edgefleet.protos.manifest import (
    GoldenSample,
    Manifest,
    SignedManifest,
    TensorSpec,
    check_artifact,
    decode_manifest,
    encode_manifest,
    sign_manifest,
    verify_manifest,
)

ARTIFACT = b"\x08\x07model-bytes" * 100


def manifest(**kw: object) -> Manifest:
    base: dict[str, object] = dict(
        model="digits",
        version=3,
        variant="int8",
        runtime="onnxruntime",
        sha256=hashlib.sha256(ARTIFACT).hexdigest(),
        size=len(ARTIFACT),
        inputs=(TensorSpec("input", "float32", (-1, 64)),),
        outputs=(TensorSpec("logits", "float32", (-1, 10)),),
        created_at_ms=1_700_000_000_000,
        labels={"classes": "[0,1]"},
        golden=GoldenSample(b"\x00" * 256, (1, 64), b"\x00" * 40, (1, 10), 0.5),
    )
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


def test_roundtrip_keeps_every_field() -> None:
    m = manifest()
    assert decode_manifest(encode_manifest(m)) == m


def test_signature_verifies_and_parses() -> None:
    key = Ed25519PrivateKey.generate()
    signed = SignedManifest.from_bytes(sign_manifest(manifest(), key).to_bytes())
    assert verify_manifest(signed, key.public_key()) == manifest()


def test_flipped_manifest_byte_is_unauthenticated() -> None:
    key = Ed25519PrivateKey.generate()
    s = sign_manifest(manifest(), key)
    tampered = bytearray(s.manifest_bytes)
    tampered[10] ^= 0x01
    with pytest.raises(Unauthenticated, match="signature does not verify"):
        verify_manifest(SignedManifest(bytes(tampered), s.signature, s.key_id), key.public_key())


def test_other_key_is_named() -> None:
    s = sign_manifest(manifest(), Ed25519PrivateKey.generate())
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(Unauthenticated, match=f"signed by key {s.key_id}"):
        verify_manifest(s, other)


def test_forged_key_id_still_fails_on_signature() -> None:
    trusted = Ed25519PrivateKey.generate()
    forger = Ed25519PrivateKey.generate()
    s = sign_manifest(manifest(), forger)
    trusted_id = sign_manifest(manifest(), trusted).key_id
    with pytest.raises(Unauthenticated):
        verify_manifest(
            SignedManifest(s.manifest_bytes, s.signature, trusted_id), trusted.public_key()
        )


def test_garbage_signed_manifest_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="not valid protobuf"):
        SignedManifest.from_bytes(b"\xff\xff\xff\xff")


def test_truncated_artifact_is_data_loss() -> None:
    with pytest.raises(DataLoss, match="truncated"):
        check_artifact(manifest(), ARTIFACT[:-1])


def test_same_size_tampered_artifact_is_data_loss() -> None:
    bad = bytearray(ARTIFACT)
    bad[0] ^= 0xFF
    with pytest.raises(DataLoss, match="tampered"):
        check_artifact(manifest(), bytes(bad))
    check_artifact(manifest(), ARTIFACT)  # the real bytes pass


def test_unknown_runtime_and_dtype_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="supported: onnxruntime, litert"):
        encode_manifest(manifest(runtime="tensorflow"))
    with pytest.raises(InvalidArgument, match="dtype 'float64' is not supported"):
        TensorSpec("x", "float64", (1,))


def test_public_keys_load_from_pem_and_others_are_named() -> None:
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    from edgefleet.protos.manifest import key_id, load_public_key

    key = Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    for form in (pem, b"\n  " + pem.replace(b"\n", b"\r\n")):
        assert load_public_key(form).public_bytes_raw() == key.public_bytes_raw()
    assert key_id(load_public_key(pem)) == key_id(key)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidArgument, match="ECPublicKey; only Ed25519"):
        load_public_key(other.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    cut = pem.replace(pem.splitlines()[1], pem.splitlines()[1][:-8])
    with pytest.raises(InvalidArgument, match="not a PEM Ed25519 key"):
        load_public_key(cut)
