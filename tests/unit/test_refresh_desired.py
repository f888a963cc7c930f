"""A re-asserted desired state is re-signed when it is near its expiry or was signed by a
key rotated out since, and is otherwise published exactly as stored."""

from __future__ import annotations

import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.serde import encode_desired, refresh_desired
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.manifest import SignedManifest, key_id

DAY = 24 * 3600.0
MANIFEST = SignedManifest(b"manifest bytes", b"sig", "k0")


def _signed(key: Ed25519PrivateKey, ttl_s: float) -> bytes:
    return encode_desired(
        device_id="d1",
        generation=7,
        rollout_id="r1",
        manifest=MANIFEST,
        chunk_size=4096,
        chunk_digests=[b"\x01" * 32, b"\x02" * 32],
        action="activate",
        key=key,
        ttl_s=ttl_s,
    )


def _open(data: bytes) -> tuple[device_pb2.SignedDesiredState, device_pb2.DesiredState]:
    env = device_pb2.SignedDesiredState()
    env.ParseFromString(data)
    desired = device_pb2.DesiredState()
    desired.ParseFromString(env.desired)
    return env, desired


def test_a_state_with_time_left_goes_out_as_stored() -> None:
    key = Ed25519PrivateKey.generate()
    stored = _signed(key, 30 * DAY)
    assert refresh_desired(stored, key, ttl_s=30 * DAY) == stored


def test_a_state_past_its_expiry_is_re_signed_with_the_same_content() -> None:
    key = Ed25519PrivateKey.generate()
    stored = _signed(key, 30 * DAY)
    later = int(time.time() * 1000) + int(31 * DAY * 1000)  # the device was away 31 days
    fresh = refresh_desired(stored, key, ttl_s=30 * DAY, now_ms=later)
    env, desired = _open(fresh)
    _, before = _open(stored)
    assert desired.not_after_ms == later + int(30 * DAY * 1000)
    key.public_key().verify(env.signature, env.desired)  # raises if the signature is wrong
    for field in ("device_id", "generation", "rollout_id", "chunk_size", "action"):
        assert getattr(desired, field) == getattr(before, field), field
    assert list(desired.chunk_sha256) == list(before.chunk_sha256)
    assert desired.manifest == before.manifest


def test_a_state_signed_by_a_rotated_key_is_re_signed_by_the_current_one() -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    stored = _signed(old, 30 * DAY)
    env, _ = _open(refresh_desired(stored, new, ttl_s=30 * DAY))
    assert env.key_id == key_id(new.public_key()) != key_id(old.public_key())
    new.public_key().verify(env.signature, env.desired)
