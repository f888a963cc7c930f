"""Ed25519 key files: the coordinator's online signing key (`fleet init`) and, through
`cloud.keys`, the root key."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.protos.errors import InvalidArgument, NotFound
from edgefleet.protos.manifest import load_public_key


def create_keypair(private_path: Path, public_path: Path) -> bool:
    """Write a new key pair unless one exists; returns whether it created one."""
    if private_path.exists():
        return False
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
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


def load_private_key(
    path: Path, *, passphrase: bytes | None = None, what: str = "signing key"
) -> Ed25519PrivateKey:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path} missing: run 'fleet init' first") from None
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase or None)
    except TypeError:
        raise InvalidArgument(
            f"{what} {path} is encrypted: give its passphrase (--root-passphrase or "
            "FLEET_ROOT_PASSPHRASE)"
            if not passphrase
            else f"{what} {path} is not encrypted: give no passphrase"
        ) from None
    except ValueError as e:
        raise InvalidArgument(
            f"{what} {path} cannot be read (a PEM private key; wrong passphrase?): {e}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{what} {path} is {type(key).__name__}; expected Ed25519")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        return load_public_key(path.read_bytes())
    except FileNotFoundError:
        raise NotFound(f"public key {path} missing: run 'fleet init' first") from None
