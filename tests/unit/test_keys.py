"""Key lists: root-signed, forward-only; signatures by revoked, unknown or expired keys
refused with their reason."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.protos.errors import Conflict, InvalidArgument, Unauthenticated
from edgefleet.protos.fleet.v1 import keys_pb2
from edgefleet.protos.keys import (
    KeyList,
    KeyRefused,
    KeyTrust,
    SigningKey,
    sign_key_list,
    verify_manifest_trusted,
)
from edgefleet.protos.manifest import Manifest, TensorSpec, sign_manifest

ROOT = Ed25519PrivateKey.generate()
K1, K2 = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()


def _list(
    version: int, *keys: Ed25519PrivateKey, revoked: tuple[str, ...] = (), not_after: int = 0
) -> KeyList:
    return KeyList(
        version, tuple(SigningKey.of(k.public_key(), not_after_ms=not_after) for k in keys), revoked
    )


def _manifest(key: Ed25519PrivateKey):  # type: ignore[no-untyped-def]
    m = Manifest(
        model="m",
        version=1,
        variant="fp32",
        runtime="onnxruntime",
        sha256="0" * 64,
        size=1,
        inputs=(TensorSpec("x", "float32", (-1, 2)),),
        outputs=(TensorSpec("y", "float32", (-1, 2)),),
        created_at_ms=0,
    )
    return sign_manifest(m, key)


def test_lists_move_forward_only_and_only_from_the_root() -> None:
    trust = KeyTrust.from_root(ROOT.public_key(), sign_key_list(_list(1, K1), ROOT))
    assert trust.update(sign_key_list(_list(1, K1), ROOT)) is None  # the same one again
    assert trust.update(sign_key_list(_list(3, K2, K1), ROOT)) is not None
    with pytest.raises(Conflict, match="version 2 is older than the version 3"):
        trust.update(sign_key_list(_list(2, K2), ROOT))
    with pytest.raises(Unauthenticated, match="only the root key"):
        trust.update(sign_key_list(_list(9, K2), K1))  # signed by an online key
    forged = keys_pb2.SignedKeyList.FromString(sign_key_list(_list(9, K2), ROOT))
    forged.key_list = forged.key_list + b"\x10\x01"  # appended after signing
    with pytest.raises(Unauthenticated, match="does not verify"):
        trust.update(forged.SerializeToString())
    with pytest.raises(InvalidArgument, match="not valid protobuf"):
        trust.update(b"\xff\xff")
    assert trust.keys.version == 3


def test_signatures_by_revoked_unknown_and_expired_keys_are_refused() -> None:
    past = int(time.time() * 1000) - 1000
    trust = KeyTrust(
        root=ROOT.public_key(), keys=_list(2, K2, revoked=(SigningKey.of(K1.public_key()).key_id,))
    )
    assert verify_manifest_trusted(_manifest(K2), trust).model == "m"
    with pytest.raises(KeyRefused, match="revoked") as e:
        verify_manifest_trusted(_manifest(K1), trust)
    assert e.value.reason == "revoked"
    with pytest.raises(KeyRefused) as e:
        verify_manifest_trusted(_manifest(Ed25519PrivateKey.generate()), trust)
    assert e.value.reason == "unknown"
    expired = KeyTrust(root=ROOT.public_key(), keys=_list(2, K2, not_after=past))
    with pytest.raises(KeyRefused) as e:
        verify_manifest_trusted(_manifest(K2), expired)
    assert e.value.reason == "expired"


def test_a_pinned_key_takes_no_lists() -> None:
    trust = KeyTrust.single(K1.public_key())
    assert not trust.rotatable
    with pytest.raises(Unauthenticated, match="no root key"):
        trust.update(sign_key_list(_list(5, K2), ROOT))


def test_entries_must_match_their_key() -> None:
    kl = _list(1, K1)
    bad = KeyList(1, (SigningKey(SigningKey.of(K2.public_key()).key_id, kl.keys[0].public_key),))
    with pytest.raises(InvalidArgument, match="does not match its key"):
        KeyTrust.from_root(ROOT.public_key(), sign_key_list(bad, ROOT))
