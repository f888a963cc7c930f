"""The fleet's signing keys on disk: a root key, the online key, the signed key list.

Layout under ``FLEET_HOME/keys`` (docs/operators.md "Keys"):

- ``root.key``    the root private key (PKCS#8 PEM; encrypted when a passphrase was
                  given). Only `fleet keys rotate|revoke` read it; keep it offline with
                  ``--root-key PATH`` and it need not be here at all.
- ``root.pub``    the root public key: enrolment bundles carry it.
- ``signing.key`` the online key: signs manifests and desired states.
- ``signing.pub`` its public key.
- ``keylist.pb``  the current `SignedKeyList` (root-signed): which online keys
                  devices accept, and which are revoked. `fleet serve` publishes it
                  retained on ``{prefix}/keys``.
- ``retired/``    public keys of earlier online keys (`fleet models verify` of
                  variants they signed).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.cloud.signing import create_keypair, load_private_key, load_public
from edgefleet.protos.errors import Conflict, InvalidArgument, NotFound
from edgefleet.protos.keys import KeyList, KeyTrust, SigningKey, sign_key_list, verify_key_list
from edgefleet.protos.manifest import key_id

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class KeyInfo:
    """One row of `fleet keys ls`."""

    key_id: str
    role: str  # root | signing (signs now) | listed (still accepted) | revoked | retired
    created_at_ms: int = 0
    not_after_ms: int = 0


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pub_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class KeyRing:
    def __init__(self, keys_dir: Path, *, root_key: Path | None = None) -> None:
        self.dir = keys_dir
        self.root_key_path = root_key or keys_dir / "root.key"
        self.root_pub_path = keys_dir / "root.pub"
        self.signing_key_path = keys_dir / "signing.key"
        self.signing_pub_path = keys_dir / "signing.pub"
        self.key_list_path = keys_dir / "keylist.pb"
        self.retired_dir = keys_dir / "retired"

    # -- setup ----------------------------------------------------------------------

    def ensure(self, *, passphrase: bytes | None = None) -> bool:
        """Create the online key, the root key and key list version 1 where missing
        (`fleet init`; also upgrades a FLEET_HOME made before key lists). Returns
        whether a root key was created."""
        create_keypair(self.signing_key_path, self.signing_pub_path)
        if self.key_list_path.exists():
            return False
        created = False
        if not self.root_pub_path.exists():
            if self.root_key_path.exists():
                root = self._root(passphrase)
            else:
                root = Ed25519PrivateKey.generate()
                enc: serialization.KeySerializationEncryption = (
                    serialization.BestAvailableEncryption(passphrase)
                    if passphrase
                    else serialization.NoEncryption()
                )
                pem = root.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
                )
                _write(self.root_key_path, pem, 0o600)
                created = True
            _write(self.root_pub_path, _pub_pem(root.public_key()))
        else:
            root = self._root(passphrase)
        online = load_public(self.signing_pub_path)
        first = KeyList(1, (SigningKey.of(online, created_at_ms=_now_ms()),), (), _now_ms())
        _write(self.key_list_path, sign_key_list(first, root))
        return created

    # -- reading ----------------------------------------------------------------------

    def root_public(self) -> Ed25519PublicKey:
        return load_public(self.root_pub_path)

    def key_list_bytes(self) -> bytes:
        try:
            return self.key_list_path.read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"key list {self.key_list_path} missing: run 'fleet init' (it creates the root "
                "key and the first key list)"
            ) from None

    def key_list(self) -> KeyList:
        return verify_key_list(self.key_list_bytes(), self.root_public())

    def trust(self) -> KeyTrust:
        return KeyTrust(root=self.root_public(), keys=self.key_list())

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every public key this home knows: listed, current, retired."""
        out = {k.key_id: k.load() for k in self.key_list().keys}
        if self.retired_dir.is_dir():
            for p in sorted(self.retired_dir.glob("*.pub")):
                out.setdefault(p.stem, load_public(p))
        return out

    def ls(self) -> list[KeyInfo]:
        kl = self.key_list()
        rows = [KeyInfo(key_id(self.root_public()), "root")]
        for i, k in enumerate(kl.keys):
            rows.append(
                KeyInfo(
                    k.key_id, "signing" if i == 0 else "listed", k.created_at_ms, k.not_after_ms
                )
            )
        rows += [KeyInfo(kid, "revoked") for kid in kl.revoked]
        listed = {r.key_id for r in rows}
        if self.retired_dir.is_dir():
            rows += [
                KeyInfo(p.stem, "retired")
                for p in sorted(self.retired_dir.glob("*.pub"))
                if p.stem not in listed
            ]
        return rows

    # -- changes (need the root key) -----------------------------------------------------

    def _root(self, passphrase: bytes | None) -> Ed25519PrivateKey:
        try:
            return load_private_key(self.root_key_path, passphrase=passphrase, what="root key")
        except NotFound:
            raise NotFound(
                f"root key {self.root_key_path} not found: pass --root-key PATH where you keep it"
            ) from None

    def rotate(
        self, *, passphrase: bytes | None = None, expires_days: float = 0.0
    ) -> tuple[KeyList, str]:
        """A new online key signs from now on; the old one stays listed (variants it
        signed keep verifying) until revoked. Returns (new key list, new key id)."""
        return self._change(passphrase=passphrase, rotate=True, expires_days=expires_days)

    def revoke(self, kid: str, *, passphrase: bytes | None = None) -> tuple[KeyList, str]:
        """Devices refuse anything signed by `kid` once they have this list. Revoking
        the key signing now rotates to a new one in the same list. Returns (new key
        list, key id signing now)."""
        kl = self.key_list()
        if kid in kl.revoked:
            raise Conflict(f"key {kid} is already revoked (key list version {kl.version})")
        if kl.get(kid) is None:
            listed = ", ".join(k.key_id for k in kl.keys)
            raise NotFound(f"key {kid!r} is not in key list version {kl.version}; listed: {listed}")
        current = kl.current
        return self._change(
            passphrase=passphrase,
            rotate=current is not None and current.key_id == kid,
            revoke=(kid,),
        )

    def _change(
        self,
        *,
        passphrase: bytes | None,
        rotate: bool,
        revoke: tuple[str, ...] = (),
        expires_days: float = 0.0,
    ) -> tuple[KeyList, str]:
        if expires_days < 0:
            raise InvalidArgument(f"--expires-days {expires_days:g}: use 0 (never) or more")
        root = self._root(passphrase)
        if key_id(root.public_key()) != key_id(self.root_public()):
            raise InvalidArgument(
                f"root key {self.root_key_path} is not the root of this fleet "
                f"({key_id(self.root_public())})"
            )
        kl = self.key_list()
        now = _now_ms()
        new_key: Ed25519PrivateKey | None = None
        entry = None
        if rotate:
            new_key = Ed25519PrivateKey.generate()
            entry = SigningKey.of(
                new_key.public_key(),
                created_at_ms=now,
                not_after_ms=int(now + expires_days * DAY_MS) if expires_days else 0,
            )
        nxt = kl.successor(new=entry, revoke=revoke, now_ms=now)
        if new_key is not None:
            old = load_public(self.signing_pub_path)
            _write(self.retired_dir / f"{key_id(old)}.pub", _pub_pem(old))
            pem = new_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # the list first: if we stop between, the old key still signs and is listed
            _write(self.key_list_path, sign_key_list(nxt, root))
            _write(self.signing_key_path, pem, 0o600)
            _write(self.signing_pub_path, _pub_pem(new_key.public_key()))
        else:
            _write(self.key_list_path, sign_key_list(nxt, root))
        current = nxt.current
        return nxt, current.key_id if current else ""


__all__ = ["KeyInfo", "KeyRing"]
