"""Ed25519 key files: the coordinator's online signing key (`fleet init`) and, through
`cloud.keys`, the root key."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.protos.errors import InvalidArgument, NotFound, Unauthenticated
from edgefleet.protos.manifest import load_public_key


def create_keypair(
    private_path: Path, public_path: Path, *, passphrase: bytes | None = None
) -> bool:
    """Write a new key pair unless one exists (the private key encrypted with `passphrase`
    when given); returns whether it created one."""
    if private_path.exists():
        return False
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return True


def is_encrypted(path: Path) -> bool:
    """Whether the PEM at `path` is a passphrase-encrypted private key."""
    try:
        return b"ENCRYPTED PRIVATE KEY" in path.read_bytes()[:64]
    except FileNotFoundError:
        return False


#: where each key's passphrase comes from, for messages
_PASSPHRASE_FROM = {
    "signing key": "FLEET_SIGNING_PASSPHRASE, or run 'fleet serve' in a terminal to be asked",
    "root key": "--root-passphrase or FLEET_ROOT_PASSPHRASE",
}


def load_private_key(
    path: Path, *, passphrase: bytes | None = None, what: str = "signing key"
) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path} missing: run 'fleet init' first") from None
    encrypted = b"ENCRYPTED PRIVATE KEY" in pem[:64]
    source = _PASSPHRASE_FROM.get(what, "its passphrase")
    if encrypted and not passphrase:
        raise Unauthenticated(f"{what} {path} is encrypted: set {source}")
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase if encrypted else None)
    except ValueError as e:
        if encrypted:
            raise Unauthenticated(
                f"{what} {path}: the passphrase does not open it (wrong passphrase? {source})"
            ) from None
        raise InvalidArgument(f"{what} {path} is not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{what} {path} is {type(key).__name__}; expected Ed25519")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        return load_public_key(path.read_bytes())
    except FileNotFoundError:
        raise NotFound(f"public key {path} missing: run 'fleet init' first") from None
