"""Token and audit values <-> fleet.v1 access messages (both directions, one place)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from edgefleet.cloud.access.model import AuditEntry, Token
from edgefleet.protos.fleet.v1 import access_pb2


def _ms(dt: datetime | None) -> int:
    return int(dt.timestamp() * 1000) if dt is not None else 0


def _dt(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc) if ms else None


def token_to_pb(t: Token) -> access_pb2.TokenInfo:
    return access_pb2.TokenInfo(
        name=t.name,
        role=t.role,
        created_at_ms=_ms(t.created_at),
        created_by=t.created_by,
        revoked_at_ms=_ms(t.revoked_at),
        revoked_by=t.revoked_by,
    )


def token_from_pb(m: access_pb2.TokenInfo) -> Token:
    created = _dt(m.created_at_ms) or datetime.fromtimestamp(0, timezone.utc)
    return Token(
        name=m.name,
        role=m.role,
        created_at=created,
        created_by=m.created_by,
        revoked_at=_dt(m.revoked_at_ms),
        revoked_by=m.revoked_by,
    )


def entry_to_pb(e: AuditEntry) -> access_pb2.AuditEntry:
    return access_pb2.AuditEntry(
        seq=e.seq,
        at_ms=_ms(e.at),
        who=e.who,
        role=e.role,
        action=e.action,
        args_json=json.dumps(e.args, sort_keys=True, default=str),
        result=e.result,
        message=e.message,
        peer=e.peer,
    )


def entry_from_pb(m: access_pb2.AuditEntry) -> AuditEntry:
    return AuditEntry(
        who=m.who,
        action=m.action,
        args=json.loads(m.args_json or "{}"),
        result=m.result,
        message=m.message,
        role=m.role,
        peer=m.peer,
        at=_dt(m.at_ms),
        seq=m.seq,
    )
