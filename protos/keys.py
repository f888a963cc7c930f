"""Signing keys with a lifecycle: a root-signed list of online keys (keys.proto).

Both sides use this module: the coordinator builds and signs key lists with the
root key (`cloud.keys`); a device holds a `KeyTrust` (the root public key and the
newest list it has seen) and asks it for the key behind every signature. The
rules, in the order a device applies them (docs/protocol.md "Trust"):

1. a key list counts only if the root key signed it and its version is higher
   than the one held (lists only move forward; a replayed old list is refused);
2. a signature counts only if its key id is listed, is not revoked, and the
   key's not-after (if any) has not passed;
3. a revoked key id stays refused, whatever else the list says.

`KeyTrust.single(public_key)` is the pre-key-list mode (one pinned key, no root,
no updates) kept for agents enrolled with a bundle that carries no root key.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from edgefleet.protos.errors import Conflict, InvalidArgument, Unauthenticated
from edgefleet.protos.fleet.v1 import keys_pb2
from edgefleet.protos.manifest import Manifest, SignedManifest, decode_manifest, key_id

MAX_KEYS = 64
MAX_REVOKED = 4096
MAX_KEY_LIST_BYTES = 256 * 1024


class KeyRefused(Unauthenticated):
    """A signature by a key the key list does not accept; `reason` is one of
    ``revoked``, ``unknown``, ``expired``, ``bad_signature``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    public_key: bytes  # raw Ed25519, 32 bytes
    not_after_ms: int = 0  # 0: no expiry
    created_at_ms: int = 0

    @classmethod
    def of(
        cls, key: Ed25519PublicKey, *, not_after_ms: int = 0, created_at_ms: int = 0
    ) -> SigningKey:
        return cls(key_id(key), key.public_bytes_raw(), not_after_ms, created_at_ms)

    def load(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public_key)

    def expired(self, now_ms: int) -> bool:
        return bool(self.not_after_ms) and now_ms > self.not_after_ms


@dataclass(frozen=True)
class KeyList:
    version: int
    keys: tuple[SigningKey, ...]  # the first signs now
    revoked: tuple[str, ...] = ()
    issued_at_ms: int = 0

    @property
    def current(self) -> SigningKey | None:
        return self.keys[0] if self.keys else None

    def get(self, kid: str) -> SigningKey | None:
        return next((k for k in self.keys if k.key_id == kid), None)

    def successor(
        self,
        *,
        new: SigningKey | None = None,
        revoke: Sequence[str] = (),
        now_ms: int | None = None,
    ) -> KeyList:
        """The next version: `new` first (the key signing from now on), the keys still
        listed after it, minus the ones revoked now."""
        revoked = tuple(dict.fromkeys((*self.revoked, *revoke)))
        keys = tuple(k for k in ((new,) if new else ()) + self.keys if k.key_id not in revoked)
        return replace(
            self,
            version=self.version + 1,
            keys=keys,
            revoked=revoked,
            issued_at_ms=_now_ms() if now_ms is None else now_ms,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- wire ------------------------------------------------------------------------------


def encode_key_list(kl: KeyList) -> bytes:
    msg = keys_pb2.KeyList(
        version=kl.version, revoked=list(kl.revoked), issued_at_ms=kl.issued_at_ms
    )
    for k in kl.keys:
        msg.keys.add(
            key_id=k.key_id,
            public_key=k.public_key,
            not_after_ms=k.not_after_ms,
            created_at_ms=k.created_at_ms,
        )
    return msg.SerializeToString(deterministic=True)


def sign_key_list(kl: KeyList, root: Ed25519PrivateKey) -> bytes:
    """A serialized `SignedKeyList`, ready to publish."""
    body = encode_key_list(kl)
    signed = keys_pb2.SignedKeyList(
        key_list=body, signature=root.sign(body), root_key_id=key_id(root.public_key())
    )
    return signed.SerializeToString(deterministic=True)


def decode_key_list(body: bytes) -> KeyList:
    """A `KeyList` body, bounded and checked (every key id matches its key)."""
    msg = keys_pb2.KeyList()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidArgument(f"key list ({len(body)} bytes) is not valid protobuf: {e}") from None
    if len(msg.keys) > MAX_KEYS or len(msg.revoked) > MAX_REVOKED:
        raise InvalidArgument(
            f"key list has {len(msg.keys)} keys and {len(msg.revoked)} revoked ids; "
            f"at most {MAX_KEYS} and {MAX_REVOKED} accepted"
        )
    if msg.version >= 2**63:
        raise InvalidArgument(f"key list version {msg.version} is past 2^63")
    keys = []
    for k in msg.keys:
        try:
            pub = Ed25519PublicKey.from_public_bytes(k.public_key)
        except ValueError:
            raise InvalidArgument(
                f"key list entry {k.key_id[:40]!r}: {len(k.public_key)} bytes is not a raw "
                "Ed25519 public key (32 bytes)"
            ) from None
        if key_id(pub) != k.key_id:
            raise InvalidArgument(
                f"key list entry {k.key_id[:40]!r} does not match its key ({key_id(pub)})"
            )
        keys.append(SigningKey(k.key_id, bytes(k.public_key), k.not_after_ms, k.created_at_ms))
    return KeyList(int(msg.version), tuple(keys), tuple(msg.revoked), int(msg.issued_at_ms))


def verify_key_list(data: bytes, root: Ed25519PublicKey) -> KeyList:
    """The list in a `SignedKeyList`, if the root key signed it; `Unauthenticated`
    (other key, altered) or `InvalidArgument` (garbled) otherwise."""
    if len(data) > MAX_KEY_LIST_BYTES:
        raise InvalidArgument(f"key list is {len(data)} bytes; at most {MAX_KEY_LIST_BYTES}")
    msg = keys_pb2.SignedKeyList()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InvalidArgument(
            f"signed key list ({len(data)} bytes) is not valid protobuf: {e}"
        ) from None
    root_id = key_id(root)
    if msg.root_key_id != root_id:
        raise Unauthenticated(
            f"key list signed by key {msg.root_key_id[:40] or '(none)'}; only the root key "
            f"{root_id} may sign key lists"
        )
    try:
        root.verify(msg.signature, msg.key_list)
    except InvalidSignature:
        raise Unauthenticated(
            f"key list signature does not verify with the root key {root_id}: altered or forged"
        ) from None
    return decode_key_list(msg.key_list)


# -- the device's view -------------------------------------------------------------------


class KeyTrust:
    """The keys a device accepts signatures from (see the module docstring)."""

    def __init__(self, *, root: Ed25519PublicKey | None, keys: KeyList) -> None:
        self.root = root
        self.keys = keys

    @classmethod
    def single(cls, public_key: Ed25519PublicKey) -> KeyTrust:
        """One pinned key, no root: nothing can change it."""
        return cls(root=None, keys=KeyList(0, (SigningKey.of(public_key),)))

    @classmethod
    def from_root(cls, root: Ed25519PublicKey, signed_key_list: bytes) -> KeyTrust:
        return cls(root=root, keys=verify_key_list(signed_key_list, root))

    @property
    def rotatable(self) -> bool:
        return self.root is not None

    def update(self, signed_key_list: bytes) -> KeyList | None:
        """Move to a newer root-signed list and return it; None for the list already
        held (a retained list seen again); `Unauthenticated` if the root did not sign
        it, `Conflict` if it is older than the one held."""
        if self.root is None:
            raise Unauthenticated(
                "this device pins one signing key and has no root key: "
                "key lists cannot change what it trusts"
            )
        new = verify_key_list(signed_key_list, self.root)
        if new.version == self.keys.version:
            return None
        if new.version < self.keys.version:
            raise Conflict(
                f"key list version {new.version} is older than the version "
                f"{self.keys.version} this device holds; lists only move forward"
            )
        self.keys = new
        return new

    def public_key(self, kid: str, *, now_ms: int | None = None) -> Ed25519PublicKey:
        """The key behind `kid`, if signatures by it are accepted now; `KeyRefused`
        saying why not."""
        if kid in self.keys.revoked:
            raise KeyRefused(
                "revoked", f"key {kid} was revoked (key list version {self.keys.version})"
            )
        k = self.keys.get(kid)
        if k is None:
            listed = ", ".join(x.key_id for x in self.keys.keys) or "none"
            raise KeyRefused(
                "unknown",
                f"key {kid[:40] or '(none)'} is not in key list version {self.keys.version} "
                f"(accepted: {listed})",
            )
        now = _now_ms() if now_ms is None else now_ms
        if k.expired(now):
            raise KeyRefused("expired", f"key {kid} expired at {k.not_after_ms} (now {now})")
        return k.load()

    def verify(self, data: bytes, signature: bytes, kid: str, *, what: str) -> None:
        """Raise `KeyRefused` unless `signature` is a valid signature of `data` by an
        accepted key `kid`."""
        key = self.public_key(kid)
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise KeyRefused(
                "bad_signature",
                f"{what} signature does not verify with key {kid}: altered or forged",
            ) from None


def verify_manifest_trusted(signed: SignedManifest, trust: KeyTrust) -> Manifest:
    """`manifest.verify_manifest` against a key list: the signing key must be accepted
    now (`KeyRefused` says why not), then the signature must check."""
    trust.verify(signed.manifest_bytes, signed.signature, signed.key_id, what="manifest")
    return decode_manifest(signed.manifest_bytes)
