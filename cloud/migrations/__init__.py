"""Schema migrations of the coordinator's database: alembic, shipped inside the package.

The revisions live in `versions/` (0001 = the schema of release 0.1.0, which made its
tables with `create_all`). No alembic.ini is needed: `config()` points alembic here.

- `ensure` runs whenever a store opens the database: an empty database is migrated to
  head; one at an older revision is refused (`SchemaOutdated`, "run `fleet db
  upgrade`"); a release-0.1.0 database (our tables, no `alembic_version`) counts as
  revision 0001 and is adopted (missing tables created, stamped) when 0001 is head.
- `upgrade` (`fleet db upgrade`) brings any of those to head.

To add a table or a column: change the model, then
`alembic -c cloud/migrations/alembic.ini revision --autogenerate -m WHAT -x url=sqlite:///tmp.db`
on a database at head (docs/architecture.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from edgefleet.cloud.migrations.legacy import BASELINE, LEGACY_TABLES
from edgefleet.protos.errors import Conflict

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
VERSION_TABLE = "alembic_version"
#: pg_advisory_xact_lock key held while migrating (two coordinators starting at once)
_LOCK_KEY = 0x6564_6765_666C_6565 & 0x7FFF_FFFF_FFFF_FFFF


class SchemaOutdated(Conflict):
    """The database's schema is not the one this release needs."""


def config(connection: sa.Connection | None = None, *, location: Path = HERE) -> Config:
    """Alembic's config without an .ini: the scripts at `location` (the shipped ones)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@cache
def _scripts(location: Path) -> ScriptDirectory:
    return ScriptDirectory.from_config(config(location=location))


def head(location: Path = HERE) -> str:
    rev = _scripts(location).get_current_head()
    assert rev is not None, "no migrations shipped"
    return rev


def revisions(location: Path = HERE) -> list[tuple[str, str]]:
    """(revision, first line of its message), oldest first."""
    scripts = _scripts(location).walk_revisions()
    return [(s.revision, (s.doc or "").splitlines()[0]) for s in scripts][::-1]


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: `revision` is None for an empty database; `legacy` marks
    one made by release 0.1.0 (our tables, no version table; its revision is 0001)."""

    revision: str | None
    legacy: bool = False
    tables: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.revision is None:
            return "empty"
        return f"{self.revision} (made before migrations)" if self.legacy else self.revision


def state(conn: sa.Connection) -> SchemaState:
    names = set(sa.inspect(conn).get_table_names())
    ours = tuple(sorted(names & LEGACY_TABLES.keys()))
    if VERSION_TABLE in names:
        rev = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        if rev is not None:
            return SchemaState(str(rev), tables=ours)
    if not ours:
        return SchemaState(None)
    return SchemaState(BASELINE, legacy=True, tables=ours)


def check_legacy(conn: sa.Connection, what: str) -> None:
    """A release-0.1.0 database must hold 0.1.0's columns, nothing else, to count as 0001."""
    insp = sa.inspect(conn)
    for table in sorted(set(insp.get_table_names()) & LEGACY_TABLES.keys()):
        got = {c["name"] for c in insp.get_columns(table)}
        want = LEGACY_TABLES[table]
        if got != want:
            extra, missing = sorted(got - want), sorted(want - got)
            raise SchemaOutdated(
                f"{what} has no schema version and its table {table!r} is not release "
                f"0.1.0's (extra columns {extra}, missing {missing}): cannot migrate it"
            )


def _outdated(what: str, st: SchemaState, location: Path) -> SchemaOutdated:
    target = head(location)
    known = {r for r, _ in revisions(location)}
    if st.revision not in known:
        return SchemaOutdated(
            f"{what} is at schema {st.revision}, which this fleet does not know (it needs "
            f"{target}): the database was upgraded by a newer edgefleet; upgrade edgefleet"
        )
    return SchemaOutdated(
        f"{what} is at schema {st.describe()}, this fleet needs {target}: run `fleet db upgrade`"
    )


def ensure(engine: sa.Engine, *, what: str, location: Path = HERE) -> None:
    """Check the schema on open: create an empty database at head, adopt a 0.1.0 one when
    that needs no change beyond missing tables, refuse anything older or unknown."""
    target = head(location)
    with engine.connect() as conn:
        st = state(conn)
    if st.revision == target and not st.legacy:
        return
    if st.revision is None or (st.legacy and st.revision == target):
        try:
            upgrade(engine, what=what, location=location)
        except (OperationalError, ProgrammingError, IntegrityError):
            # another process created the schema at the same moment: fine if it is there now
            with engine.connect() as conn:
                now = state(conn)
            if now.revision != target or now.legacy:
                raise
        return
    if st.legacy:  # a table 0.1.0 did not make is named before any upgrade is suggested
        with engine.connect() as conn:
            check_legacy(conn, what)
    raise _outdated(what, st, location)


def upgrade(
    engine: sa.Engine, *, what: str, to: str = "head", location: Path = HERE
) -> tuple[SchemaState, str]:
    """Migrate to `to` (head by default) in one transaction where the backend allows;
    returns (where it was, where it is now).

    On SQLite, foreign keys are off while migrating: batch mode rebuilds a table by
    copying it, and dropping a referenced table with them on would fail or lose rows.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                if not sqlite:
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
                before = state(conn)
                if before.legacy:
                    check_legacy(conn, what)
                elif before.revision is not None and before.revision not in dict(
                    revisions(location)
                ):
                    raise _outdated(what, before, location)
                command.upgrade(config(conn, location=location), to)
                after = MigrationContext.configure(conn).get_current_revision()
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
    assert after is not None
    if before.revision != after or before.legacy:
        logger.info("%s: schema %s -> %s", what, before.describe(), after)
    return before, after
