"""Operators: named API tokens with roles, the method->role table, and the audit trail.

- `model`: roles, `Token`, `Caller`, `AuditEntry` values and the token format.
- `store`: `AccessStore` (ABC) and `SqlAccessStore` (tokens + append-only audit log,
  SQLite or PostgreSQL by URL).
- `roles`: the one table that says which role each gRPC method needs and whether
  it is audited.
- `interceptor`: the gRPC server interceptor that authenticates, authorises and
  audits every FleetService / FederatedService / AccessService call.
"""

from edgefleet.cloud.access.model import (
    ROLES,
    AuditEntry,
    AuditFilter,
    Caller,
    Token,
    check_role,
    check_token_name,
    hash_token,
    new_secret,
)
from edgefleet.cloud.access.store import AccessStore, SqlAccessStore, open_access_store

__all__ = [
    "ROLES",
    "AccessStore",
    "AuditEntry",
    "AuditFilter",
    "Caller",
    "SqlAccessStore",
    "Token",
    "check_role",
    "check_token_name",
    "hash_token",
    "new_secret",
    "open_access_store",
]
