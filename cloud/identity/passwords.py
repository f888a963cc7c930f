"""Mosquitto 2.0 password-file entries: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt.

The `$7$` format (what `mosquitto_passwd` writes) is
``username:$7$ITERATIONS$BASE64(salt)$BASE64(hash)``; written here so `fleet` needs no
Mosquitto tools to produce the file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from edgefleet.protos.errors import InvalidArgument

ITERATIONS = 101  # mosquitto_passwd's default (PW_DEFAULT_ITERATIONS)
SALT_BYTES = 12


def new_password() -> str:
    """A strong random password (32 bytes, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The `$7$…` hash of `password` for a Mosquitto password file."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


#: bcrypt cost for the NATS copy of a password (`identity.nats`): passwords are 32 random
#: bytes, so the hash need not be slow (as with the 101 PBKDF2 rounds above), and NATS
#: checks it on every CONNECT (a reconnect storm is thousands of them)
BCRYPT_COST = 4


def bcrypt_hash(password: str, *, cost: int = BCRYPT_COST) -> str:
    """The bcrypt (`$2b$`) hash of `password`, as NATS config files take them."""
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def verify_password(password: str, hashed: str) -> bool:
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        raise InvalidArgument(f"password hash {hashed[:12]!r}… is not a Mosquitto $7$ hash")
    salt = base64.b64decode(parts[3])
    want = base64.b64decode(parts[4])
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(got, want)


def password_file(entries: dict[str, str]) -> str:
    """A Mosquitto password file from {username: $7$ hash}."""
    for user in entries:
        if not user or ":" in user or "\n" in user:
            raise InvalidArgument(f"MQTT username {user!r} cannot go in a password file")
    return "".join(f"{u}:{h}\n" for u, h in sorted(entries.items()))
