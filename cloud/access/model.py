"""Values for operator access: roles, tokens, the caller of a call, audit entries.

A token's secret is 32 random bytes (urlsafe base64, what `fleet init` always wrote to
FLEET_HOME/keys/token). Only its SHA-256 is stored; the secret is shown once, when made.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgefleet.protos.errors import InvalidArgument

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
#: weakest first: a role may do what every role before it may
ROLES = (VIEWER, OPERATOR, ADMIN)

ADMIN_TOKEN_NAME = "admin"  # the token `fleet init` writes to FLEET_HOME/keys/token
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_role(role: str) -> str:
    r = role.strip().lower()
    if r not in ROLES:
        raise InvalidArgument(f"role {role!r} is not known; accepted: {', '.join(ROLES)}")
    return r


def role_allows(have: str, need: str) -> bool:
    return ROLES.index(have) >= ROLES.index(need)


def check_token_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"token name {name[:80]!r} is not valid; accepted: 1-63 characters of a-z, 0-9, "
            "'.', '_', '-', starting with a letter or digit (e.g. ci-viewer)"
        )
    return name


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    created_at: datetime
    created_by: str = ""
    revoked_at: datetime | None = None
    revoked_by: str = ""

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Caller:
    """Who makes a call: a token's name and role, or `local:<user>` for in-process CLI use."""

    who: str
    role: str
    peer: str = ""


@dataclass(frozen=True)
class AuditEntry:
    who: str  # token name, local:<user>, or "(no token)" / "(unknown token)" when refused
    action: str  # the FleetService / FederatedService / AccessService method, e.g. Deploy
    args: dict[str, Any] = field(default_factory=dict)  # secrets left out
    result: str = "ok"  # ok, or the error's gRPC status name (PERMISSION_DENIED, NOT_FOUND…)
    message: str = ""
    role: str = ""
    peer: str = ""
    at: datetime | None = None  # set by the store
    seq: int = 0  # set by the store: order of recording

    @property
    def ok(self) -> bool:
        return self.result == "ok"


@dataclass(frozen=True)
class AuditFilter:
    since: datetime | None = None
    who: str = ""
    action: str = ""  # case-insensitive
    limit: int = 1000


#: argument names whose values never reach the audit log
SECRET_KEYS = frozenset(
    {"password", "secret", "token", "private_key", "passphrase", "key_pem", "authorization"}
)


def redact(value: Any) -> Any:
    """`value` with every mapping entry whose key names a secret replaced by "(secret)"."""
    if isinstance(value, dict):
        return {
            k: "(secret)" if str(k).lower() in SECRET_KEYS else redact(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value
