"""Schema migrations on SQLite and PostgreSQL: a release-0.1.0 registry upgrades without
losing a row, new databases are made by the migrations, old or unknown schemas are refused.

The 0.1.0 databases are tests/fixtures/legacy-0.1.0.db and .pg.sql, made by
tests/fixtures/make_legacy_db.py with the code of commit bb1a5a9 (create_all, no
version table): rows in every table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from edgefleet.cloud import migrations
from edgefleet.cloud.db import Database
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.devices.values import (
    Accelerator,
    Capabilities,
    ReasonCode,
    Reported,
    ServedModel,
    UpdateState,
)
from edgefleet.cloud.drift import AlertStore
from edgefleet.cloud.fl.store import FlStore
from edgefleet.cloud.migrations import SchemaOutdated
from edgefleet.cloud.migrations.legacy import LEGACY_TABLES
from edgefleet.cloud.registry import open_registry
from edgefleet.cloud.rollouts import RolloutStore
from edgefleet.cloud.schema import metadata
from edgefleet.cloud.telemetry import TelemetryStore
from tests.conftest import Cli
from tests.contract.conftest import _psycopg_url
from tests.support.postgres import pg_bindir

FIXTURES = Path(__file__).parent.parent / "fixtures"
ROWS = {
    "models": 1,
    "model_versions": 2,
    "variants": 6,
    "devices": 3,
    "rollouts": 1,
    "rollout_devices": 2,
    "telemetry": 12,
    "telemetry_hourly": 2,
    "drift_sketches": 3,
    "drift_alerts": 2,
    "fl_nodes": 2,
    "fl_runs": 1,
}
#: 0.1.0 JSON columns a later revision moved into typed columns (0004: devices); the
#: snapshots leave them out and the test checks the typed values read back instead
MOVED = {"devices": frozenset({"capabilities", "active", "reported"})}


def load_legacy(url: str) -> None:
    """Put release 0.1.0's database at `url` (an empty SQLite path or PostgreSQL db)."""
    u = sa.make_url(url)
    if u.get_backend_name() == "sqlite":
        assert u.database
        shutil.copy(FIXTURES / "legacy-0.1.0.db", u.database)
        return
    bindir = pg_bindir()
    assert bindir is not None
    dump = FIXTURES / "legacy-0.1.0.pg.sql"
    subprocess.run(
        [
            str(bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            _psycopg_url(url),
            "-f",
            str(dump),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every 0.1.0 table (its 0.1.0 columns but the `MOVED` ones), in
    primary-key order."""
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine, only=sorted(LEGACY_TABLES))
        out = {}
        with engine.connect() as conn:
            for name, table in meta.tables.items():
                order = list(table.primary_key.columns)
                legacy = LEGACY_TABLES[name] - MOVED.get(name, frozenset())
                cols = sorted((c for c in table.columns if c.name in legacy), key=lambda c: c.name)
                out[name] = [tuple(r) for r in conn.execute(sa.select(*cols).order_by(*order))]
        return out
    finally:
        engine.dispose()


def schema_diff(db: Database) -> list[Any]:
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


@pytest.fixture
def legacy_url(registry_url: str) -> str:
    load_legacy(registry_url)
    return registry_url


def test_release_0_1_0_database_upgrades_without_losing_a_row(legacy_url: str) -> None:
    before = snapshot(legacy_url)
    assert {t: len(rows) for t, rows in before.items()} == ROWS
    db = Database(legacy_url, check=False)
    try:
        st = db.schema()
        assert (st.revision, st.legacy) == ("0001", True)
        assert set(st.tables) == set(LEGACY_TABLES)
        was, now = db.upgrade()
        assert was.legacy and now == migrations.head()
        assert db.schema() == migrations.SchemaState(now, tables=tuple(sorted(LEGACY_TABLES)))
        assert schema_diff(db) == []  # the upgraded schema is exactly the models'
        # upgrading again changes nothing
        assert db.upgrade()[0].revision == now
    finally:
        db.close()
    assert snapshot(legacy_url) == before  # count and content, table by table

    # and the stores read what 0.1.0 wrote
    reg = open_registry(legacy_url)
    try:
        (v1, v2) = reg.list_versions("digits")
        assert v1.stage == "production" and v2.lineage.parent_version == 1
        assert v2.variant("int8").signed_manifest == "manifest 2 int8\x00\xff".encode()
    finally:
        reg.close()
    devices, rollouts = DeviceStore(legacy_url), RolloutStore(legacy_url)
    try:
        assert [d.device_id for d in devices.find()] == ["dev-0", "dev-1", "dev-2"]
        assert devices.desired("dev-1") == b"\x01signed desired\x00"
        # the JSON 0.1.0 kept, now typed: no accelerator said is cpu, an unknown key
        # ("arch") is dropped, UPDATE_STATE_ACTIVE is active
        d0, d1, d2 = devices.find()
        caps = Capabilities("", ("onnxruntime",), (), Accelerator.CPU, 512)
        served = ServedModel("digits", 1, "fp32", "a" * 64)
        report = Reported("dev-0", 3, UpdateState.ACTIVE, ReasonCode.UNSPECIFIED, active=served)
        assert (d0.capabilities, d0.active, d0.reported, d0.state) == (
            caps,
            served,
            report,
            "active",
        )
        assert (d1.capabilities, d1.active, d1.reported, d1.state) == (
            caps,
            served,
            None,
            "enrolled",
        )
        assert (d2.capabilities, d2.active, d2.reported, d2.state) == (None, None, None, "enrolled")
        assert [d.previous for d in rollouts.devices("r-legacy")] == [served, None]
        assert [d.device_id for d in rollouts.devices("r-legacy")] == ["dev-0", "dev-1"]
    finally:
        devices.close()
        rollouts.close()
    tel, alerts, fl = TelemetryStore(legacy_url), AlertStore(legacy_url), FlStore(legacy_url)
    try:
        assert tel.count() == 12
        assert len(alerts.find(open_only=False)) == 2
        run = fl.get_run("fl-legacy")
        assert run.status == "succeeded" and run.flower_run_id == 12345678901234567890
        assert fl.nodes(["dev-0"])[0].node_id == 18_446_744_073_709_551_615
    finally:
        tel.close()
        alerts.close()
        fl.close()


def test_0004_downgrade_writes_the_device_json_back(legacy_url: str) -> None:
    """Upgrade, downgrade to 0003 (typed columns -> JSON), upgrade again: the devices
    read the same, and the JSON the downgrade wrote says what the columns said."""

    def typed() -> list[tuple[Any, ...]]:
        store = DeviceStore(legacy_url)
        try:
            return [(d.capabilities, d.active, d.reported) for d in store.find()]
        finally:
            store.close()

    db = Database(legacy_url, check=False)
    try:
        db.upgrade()
        first = typed()
        with db.engine.begin() as conn:
            command.downgrade(migrations.config(conn), "0003")
            rows = conn.execute(
                sa.text("SELECT capabilities, active, reported FROM devices ORDER BY id")
            ).all()
        db.upgrade()
    finally:
        db.close()
    assert typed() == first
    load = [tuple(json.loads(v) if isinstance(v, str) else v for v in r) for r in rows]
    caps, served = load[0][0], load[0][1]
    assert caps["runtimes"] == ["onnxruntime"] and caps["accelerator"] == "cpu"
    assert served == {"model": "digits", "version": 1, "variant": "fp32", "sha256": "a" * 64}
    assert load[0][2] == {
        "generation": 3,
        "state": "active",
        "reason": "unspecified",
        "active": served,
    }
    assert load[1][2] == {} and load[2] == ({}, {}, {})


def test_opening_a_0_1_0_database_adopts_it_while_0001_is_head(legacy_url: str) -> None:
    """While 0001 is head, opening stamps it (no schema change); later, opening refuses."""
    before = snapshot(legacy_url)
    if migrations.head() != "0001":
        with pytest.raises(SchemaOutdated, match="is at schema 0001 .*run `fleet db upgrade`"):
            DeviceStore(legacy_url)
        return
    store = DeviceStore(legacy_url)  # what `fleet serve` / any command does on open
    try:
        assert store._db.schema() == migrations.SchemaState(
            "0001", tables=tuple(sorted(LEGACY_TABLES))
        )
    finally:
        store.close()
    assert snapshot(legacy_url) == before


def test_new_database_is_made_by_the_migrations(registry_url: str) -> None:
    db = Database(registry_url)
    try:
        assert db.schema().revision == migrations.head()
        assert schema_diff(db) == []
    finally:
        db.close()


def test_legacy_catalogue_is_what_revision_0001_creates(registry_url: str) -> None:
    db = Database(registry_url, check=False)
    try:
        migrations.upgrade(db.engine, what="db", to="0001")
        insp = sa.inspect(db.engine)
        got = {
            t: frozenset(c["name"] for c in insp.get_columns(t))
            for t in insp.get_table_names()
            if t != migrations.VERSION_TABLE
        }
    finally:
        db.close()
    assert got == LEGACY_TABLES


# -- a later release: a copy of the shipped scripts plus one revision ------------------

NEXT = "9001"  # a revision of a later release, on top of the shipped head (test only)
REVISION_NEXT = '''"""add model_versions.note (test only)"""
import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as b:
        b.add_column(sa.Column("note", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as b:
        b.drop_column("note")
'''


@pytest.fixture
def scripts_0002(tmp_path: Path) -> Iterator[Path]:
    """The shipped migrations plus a later revision that rebuilds a referenced table on
    SQLite (batch mode: copy, drop, rename) with the variants pointing at it."""
    where = tmp_path / "migrations"
    shutil.copytree(
        migrations.HERE, where, ignore=shutil.ignore_patterns("__pycache__", "__init__.py")
    )
    (where / "versions" / "9001_note.py").write_text(
        REVISION_NEXT.replace("{head}", migrations.head())
    )
    yield where


def test_older_schema_is_refused_then_upgraded_keeping_rows(
    legacy_url: str, scripts_0002: Path
) -> None:
    before = snapshot(legacy_url)
    db = Database(legacy_url, check=False)
    try:
        name = db.name
        shipped = migrations.head()
        for at in ("0001", shipped):  # as made by 0.1.0, then upgraded to the shipped head
            with pytest.raises(SchemaOutdated) as ei:
                migrations.ensure(db.engine, what=name, location=scripts_0002)
            msg = str(ei.value)
            assert "\n" not in msg
            assert msg.startswith(f"{name} is at schema {at}")
            assert msg.endswith(f"this fleet needs {NEXT}: run `fleet db upgrade`")
            db.upgrade()  # to the shipped head
        was, now = migrations.upgrade(db.engine, what=name, location=scripts_0002)
        assert (was.revision, now) == (shipped, NEXT)
        migrations.ensure(db.engine, what=name, location=scripts_0002)  # now accepted
        with pytest.raises(SchemaOutdated, match=rf"at schema {NEXT}, which this fleet does not"):
            migrations.ensure(db.engine, what=name)  # the shipped scripts stop before it
    finally:
        db.close()
    after = snapshot(legacy_url)
    for table, rows in before.items():
        if table != "model_versions":
            assert after[table] == rows, table
    # the rebuilt table: same rows (its 0.1.0 columns), and the new column filled in
    assert after["model_versions"] == before["model_versions"]
    engine = sa.create_engine(legacy_url)
    try:
        with engine.connect() as conn:
            notes = conn.exec_driver_sql("SELECT note FROM model_versions").scalars().all()
    finally:
        engine.dispose()
    assert notes == [""] * len(before["model_versions"])


def test_0_1_0_table_with_other_columns_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE models (id INTEGER PRIMARY KEY, name TEXT, color TEXT)")
    engine.dispose()
    with pytest.raises(SchemaOutdated) as ei:
        Database(url)
    assert str(ei.value) == (
        f"registry database {url} has no schema version and its table 'models' is not "
        "release 0.1.0's (extra columns ['color'], missing ['created_at']): cannot migrate it"
    )


def test_cli_refuses_a_schema_it_does_not_know_and_db_status_tells(
    cli: Cli, fleet_home: Path
) -> None:
    assert cli("init").code == 0
    url = f"sqlite:///{fleet_home / 'registry.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()
    r = cli("devices", "ls")
    assert r.code == 1
    assert (
        r.err.strip()
        .splitlines()[-1]
        .endswith(
            f"registry database {url} is at schema 0099, which this fleet does not know (it "
            f"needs {migrations.head()}): the database was upgraded by a newer edgefleet; "
            "upgrade edgefleet"
        )
    )
    r = cli("db", "current")
    assert (r.code, r.out.strip()) == (0, "0099")
    r = cli("db", "upgrade")
    assert r.code == 1 and "is at schema 0099, which this fleet does not know" in r.err


def test_cli_db_commands(cli: Cli, fleet_home: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    load_legacy(url)
    r = cli("--db-url", url, "db", "status")
    assert r.code == 0
    assert "current   0001 (made before migrations)" in r.out
    assert r.out.strip().endswith("run `fleet db upgrade`")
    r = cli("--db-url", url, "db", "upgrade")
    assert (r.code, r.out.strip()) == (
        0,
        f"registry database {url}: schema 0001 (made before migrations) -> {migrations.head()}",
    )
    r = cli("--db-url", url, "db", "upgrade")
    assert r.out.strip() == f"registry database {url}: already at schema {migrations.head()}"
    r = cli("--db-url", url, "db", "status", "--json")
    assert '"pending": []' in r.out and '"legacy": false' in r.out
    # `fleet init` makes a new database through the migrations, stamped at head
    assert cli("init").code == 0
    r = cli("db", "current")
    assert r.out.strip() == migrations.head()
