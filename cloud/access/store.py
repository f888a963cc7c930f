"""AccessStore: operator tokens and the audit log, in the coordinator's database.

Two tables beside the registry's (SQLite or PostgreSQL, by URL): ``api_tokens``
(name, role, SHA-256 of the secret, who made and who revoked it; rows are never
deleted, so the audit log's names always resolve) and ``audit_log`` (append-only:
the store has no way to change or delete an entry). Rows never leave this module.
"""

from __future__ import annotations

import abc
import hmac
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from edgefleet.cloud.access.model import (
    AuditEntry,
    AuditFilter,
    Token,
    check_role,
    check_token_name,
    hash_token,
    new_secret,
    redact,
)
from edgefleet.cloud.db import Database, DatabaseUser
from edgefleet.cloud.registry.tables import UtcDateTime
from edgefleet.protos.errors import AlreadyExists, Conflict, NotFound

MAX_AUDIT_TEXT = 2000  # characters of an error message kept in the log


def _now() -> datetime:
    return datetime.now(timezone.utc)


class TokenRow(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=63)
    role: str = Field(max_length=16)
    secret_sha256: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)
    created_by: str = Field(default="", max_length=128)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    revoked_by: str = Field(default="", max_length=128)


class AuditRow(SQLModel, table=True):
    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=_now, sa_type=UtcDateTime, index=True)
    who: str = Field(index=True, max_length=128)
    role: str = Field(default="", max_length=16)
    action: str = Field(index=True, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    result: str = Field(default="ok", max_length=32)
    message: str = ""
    peer: str = Field(default="", max_length=128)


def _token(r: TokenRow) -> Token:
    return Token(
        name=r.name,
        role=r.role,
        created_at=r.created_at,
        created_by=r.created_by,
        revoked_at=r.revoked_at,
        revoked_by=r.revoked_by,
    )


def _entry(r: AuditRow) -> AuditEntry:
    return AuditEntry(
        who=r.who,
        action=r.action,
        args=dict(r.args),
        result=r.result,
        message=r.message,
        role=r.role,
        peer=r.peer,
        at=r.at,
        seq=r.id or 0,
    )


class AccessStore(abc.ABC):
    """Operator tokens (by name, secret stored hashed) and the append-only audit log."""

    @abc.abstractmethod
    def create_token(self, name: str, role: str, *, created_by: str) -> tuple[Token, str]:
        """A new token and its secret (shown once; only its hash is kept).

        Constraints: `name` matches `check_token_name`; `role` is one of ROLES;
        AlreadyExists if a token of that name exists, revoked or not.
        """

    @abc.abstractmethod
    def ensure_token(self, name: str, role: str, secret: str, *, created_by: str) -> bool:
        """Store `secret` as token `name` unless a token of that name exists (revoked or not);
        whether it stored it. How FLEET_HOME/keys/token becomes the token `admin`."""

    @abc.abstractmethod
    def authenticate(self, secret: str) -> Token | None:
        """The token whose secret this is (revoked ones too: callers check `active`), or None."""

    @abc.abstractmethod
    def list_tokens(self) -> list[Token]:
        """Every token, by name (revoked ones included)."""

    @abc.abstractmethod
    def revoke_token(self, name: str, *, by: str) -> Token:
        """Revoke `name`: its secret stops working at once. NotFound; Conflict if revoked."""

    @abc.abstractmethod
    def record(self, entry: AuditEntry) -> AuditEntry:
        """Append `entry` (secrets in `args` redacted); the stored entry, with time and seq."""

    @abc.abstractmethod
    def audit(self, where: AuditFilter = AuditFilter()) -> list[AuditEntry]:
        """Entries in the order they were recorded, oldest first (the last `where.limit`)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SqlAccessStore(DatabaseUser, AccessStore):
    what = "access database"

    def _session(self) -> AbstractContextManager[Session]:
        return self._db.session()

    def _row(self, s: Session, name: str) -> TokenRow:
        row = s.exec(select(TokenRow).where(TokenRow.name == name)).first()
        if row is None:
            raise NotFound(f"token {name!r} not found; 'fleet tokens ls' lists them")
        return row

    def _insert(self, name: str, role: str, secret: str, created_by: str) -> Token:
        row = TokenRow(
            name=check_token_name(name),
            role=check_role(role),
            secret_sha256=hash_token(secret),
            created_by=created_by[:128],
        )
        with self._session() as s:
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise AlreadyExists(
                    f"token {name!r} exists; names are never reused (revoked ones included)"
                ) from None
            return _token(row)

    def create_token(self, name: str, role: str, *, created_by: str) -> tuple[Token, str]:
        secret = new_secret()
        return self._insert(name, role, secret, created_by), secret

    def ensure_token(self, name: str, role: str, secret: str, *, created_by: str) -> bool:
        with self._session() as s:
            if s.exec(select(TokenRow).where(TokenRow.name == name)).first() is not None:
                return False
        try:
            self._insert(name, role, secret, created_by)
        except AlreadyExists:
            return False  # made by a concurrent process in between
        return True

    def authenticate(self, secret: str) -> Token | None:
        digest = hash_token(secret)
        with self._session() as s:
            row = s.exec(select(TokenRow).where(TokenRow.secret_sha256 == digest)).first()
            if row is None or not hmac.compare_digest(row.secret_sha256, digest):
                return None
            return _token(row)

    def list_tokens(self) -> list[Token]:
        with self._session() as s:
            return [_token(r) for r in s.exec(select(TokenRow).order_by(col(TokenRow.name)))]

    def revoke_token(self, name: str, *, by: str) -> Token:
        with self._session() as s:
            row = self._row(s, name)
            if row.revoked_at is not None:
                raise Conflict(
                    f"token {name!r} was already revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S}Z"
                )
            row.revoked_at = _now()
            row.revoked_by = by[:128]
            s.add(row)
            s.commit()
            return _token(row)

    def record(self, entry: AuditEntry) -> AuditEntry:
        row = AuditRow(
            who=entry.who[:128],
            role=entry.role[:16],
            action=entry.action[:64],
            args=redact(dict(entry.args)),
            result=entry.result[:32],
            message=entry.message[:MAX_AUDIT_TEXT],
            peer=entry.peer[:128],
        )
        with self._session() as s:
            s.add(row)
            s.commit()
            return _entry(row)

    def audit(self, where: AuditFilter = AuditFilter()) -> list[AuditEntry]:
        q = select(AuditRow)
        if where.since is not None:
            q = q.where(AuditRow.at >= where.since)
        if where.who:
            q = q.where(AuditRow.who == where.who)
        if where.action:
            q = q.where(sa.func.lower(AuditRow.action) == where.action.lower())
        q = q.order_by(col(AuditRow.id).desc()).limit(max(1, where.limit))
        with self._session() as s:
            return [_entry(r) for r in reversed(list(s.exec(q)))]


def open_access_store(db: Database | str) -> AccessStore:
    return SqlAccessStore(db)
