"""AccessStore against SQLite and PostgreSQL: tokens (hashed, revocable) and the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from edgefleet.cloud.access import AuditEntry, AuditFilter, SqlAccessStore, hash_token
from edgefleet.protos.errors import AlreadyExists, Conflict, InvalidArgument, NotFound


@pytest.fixture
def access(registry_url: str) -> Iterator[SqlAccessStore]:
    store = SqlAccessStore(registry_url)
    yield store
    store.close()


def test_tokens_are_stored_hashed_and_found_by_secret(
    access: SqlAccessStore, registry_url: str
) -> None:
    token, secret = access.create_token("ci-viewer", "viewer", created_by="admin")
    assert (token.name, token.role, token.created_by, token.active) == (
        "ci-viewer",
        "viewer",
        "admin",
        True,
    )
    assert len(secret) >= 43  # 32 random bytes, urlsafe base64
    found = access.authenticate(secret)
    assert found is not None and found.name == "ci-viewer"
    assert access.authenticate(secret + "x") is None
    assert access.authenticate("") is None
    # only the hash is in the database
    engine = sa.create_engine(registry_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT name, secret_sha256 FROM api_tokens")).all()
    engine.dispose()
    assert rows == [("ci-viewer", hash_token(secret))]
    assert secret not in str(rows)


def test_names_roles_and_duplicates(access: SqlAccessStore) -> None:
    with pytest.raises(InvalidArgument, match="role 'god' is not known; accepted: viewer"):
        access.create_token("x", "god", created_by="t")
    with pytest.raises(InvalidArgument, match="token name 'Bad Name' is not valid"):
        access.create_token("Bad Name", "viewer", created_by="t")
    access.create_token("ops", "operator", created_by="t")
    with pytest.raises(AlreadyExists, match="token 'ops' exists"):
        access.create_token("ops", "admin", created_by="t")
    assert [t.name for t in access.list_tokens()] == ["ops"]


def test_revoked_token_stays_listed_and_is_flagged(access: SqlAccessStore) -> None:
    _, secret = access.create_token("ops", "operator", created_by="admin")
    revoked = access.revoke_token("ops", by="admin")
    assert not revoked.active and revoked.revoked_by == "admin"
    found = access.authenticate(secret)
    assert found is not None and not found.active
    with pytest.raises(Conflict, match="token 'ops' was already revoked"):
        access.revoke_token("ops", by="admin")
    with pytest.raises(NotFound, match="token 'nope' not found"):
        access.revoke_token("nope", by="admin")
    with pytest.raises(AlreadyExists):  # names are never reused
        access.create_token("ops", "operator", created_by="admin")


def test_ensure_token_adopts_an_existing_secret_once(access: SqlAccessStore) -> None:
    assert access.ensure_token("admin", "admin", "s3cret-from-file", created_by="fleet init")
    assert not access.ensure_token("admin", "admin", "other", created_by="fleet init")
    found = access.authenticate("s3cret-from-file")
    assert found is not None and (found.name, found.role) == ("admin", "admin")
    access.revoke_token("admin", by="root")
    # a revoked admin token is not brought back by the next `fleet serve`
    assert not access.ensure_token("admin", "admin", "s3cret-from-file", created_by="fleet init")
    found = access.authenticate("s3cret-from-file")
    assert found is not None and not found.active


def test_audit_is_appended_in_order_filtered_and_redacted(access: SqlAccessStore) -> None:
    first = access.record(
        AuditEntry(who="ops", role="operator", action="Deploy", args={"ref": "digits:2"})
    )
    access.record(
        AuditEntry(
            who="ci-viewer",
            role="viewer",
            action="Deploy",
            args={"ref": "digits:2"},
            result="PERMISSION_DENIED",
            message="token 'ci-viewer' (viewer) may not call Deploy; needs operator",
            peer="ipv4:127.0.0.1:5555",
        )
    )
    access.record(
        AuditEntry(
            who="admin",
            role="admin",
            action="EnrollDevice",
            args={"device_id": "d1", "password": "hunter2", "nested": {"private_key": "k"}},
        )
    )
    everything = access.audit()
    assert [e.action for e in everything] == ["Deploy", "Deploy", "EnrollDevice"]
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)
    assert first.at is not None and first.seq == everything[0].seq
    assert everything[2].args == {
        "device_id": "d1",
        "password": "(secret)",
        "nested": {"private_key": "(secret)"},
    }
    refused = access.audit(AuditFilter(who="ci-viewer"))
    assert [(e.result, e.peer) for e in refused] == [("PERMISSION_DENIED", "ipv4:127.0.0.1:5555")]
    assert not refused[0].ok
    assert [e.who for e in access.audit(AuditFilter(action="deploy"))] == ["ops", "ci-viewer"]
    assert [e.action for e in access.audit(AuditFilter(limit=1))] == ["EnrollDevice"]
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert access.audit(AuditFilter(since=future)) == []
    assert len(access.audit(AuditFilter(since=future - timedelta(hours=2)))) == 3


def test_the_store_has_no_way_to_change_the_audit_log(access: SqlAccessStore) -> None:
    public = {n for n in dir(access) if not n.startswith("_")}
    assert {n for n in public if "audit" in n} == {"audit"}
    assert not {n for n in public if n.startswith(("delete", "update", "remove", "clear"))}
