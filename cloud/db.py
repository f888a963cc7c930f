"""One way to open the coordinator's database (SQLite or PostgreSQL) and translate its errors.

All stores share one database (one URL, one `Database`, one engine) whose tables are
declared on one `metadata` (`cloud.schema` imports them all). Opening a `Database`
checks its schema against the migrations shipped in the package (`cloud.migrations`):
an empty database gets the current schema; an older one is refused with what to run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DataError, DBAPIError, OperationalError
from sqlmodel import Session, SQLModel

from edgefleet.cloud import migrations
from edgefleet.protos.errors import InvalidArgument, Unavailable

#: the one MetaData every table of the coordinator's database is declared on
metadata = SQLModel.metadata

_DRIVERS = {
    "sqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
}


def normalize_url(url: str) -> sa.URL:
    try:
        u = make_url(url)
    except ArgumentError:
        raise InvalidArgument(
            f"database URL {url!r} is not a URL; expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        ) from None
    backend = u.get_backend_name()
    if backend not in _DRIVERS:
        raise InvalidArgument(
            f"database URL {u.render_as_string(hide_password=True)!r}: backend {backend!r} not "
            "supported; accepted: sqlite, postgresql"
        )
    if "+" not in u.drivername:
        u = u.set(drivername=_DRIVERS[backend])
    return u


def _read_only_file(u: sa.URL) -> Path | None:
    """The SQLite file when it exists on storage this process cannot write (a read-only
    mount, a folder without write permission): it is then opened read-only."""
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    path = Path(u.database)
    if not path.is_file():
        return None
    folder = path.parent
    try:
        ro = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        ro = False
    return path if ro or not os.access(folder, os.W_OK) or not os.access(path, os.W_OK) else None


class Database:
    """An engine plus error translation; `what` names it in messages ("registry database").

    A SQLite file on read-only storage is opened read-only (`immutable`): reads work,
    and every write is refused with one line saying why. A full disk is `Unavailable`
    with "no space left on device".

    With `check` (the default) the schema is checked on open: an empty database is
    migrated to the current revision, an older one raises `SchemaOutdated`.
    `fleet db` opens it with `check=False` to look at or upgrade the schema.
    """

    def __init__(self, url: str, *, what: str = "registry database", check: bool = True) -> None:
        u = normalize_url(url)
        self.url = u.render_as_string(hide_password=True)
        self.what = what
        sqlite = u.get_backend_name() == "sqlite"
        args: dict[str, Any] = {"timeout": 30} if sqlite else {"connect_timeout": 5}
        self._folder = (
            Path(u.database).parent if sqlite and u.database not in (None, "", ":memory:") else None
        )
        ro = _read_only_file(u)
        self.read_only = ro is not None
        if ro is not None:
            # WAL needs its -shm file beside the database: read it as an immutable file
            u = u.set(database=f"file:{ro}", query={"mode": "ro", "immutable": "1", "uri": "true"})
            self.engine = sa.create_engine(u, connect_args=args)
            return
        self.engine = sa.create_engine(u, pool_pre_ping=True, connect_args=args)
        if sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if check:
            try:
                with self._errors():
                    migrations.ensure(self.engine, what=self.name)
            except BaseException:
                self.engine.dispose()
                raise

    @property
    def name(self) -> str:
        """What and where, for messages: "registry database sqlite:///…"."""
        return f"{self.what} {self.url}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as e:
            raise self._error(e) from None
        except DataError as e:  # a value the column cannot hold: callers should catch it first
            raise InvalidArgument(f"{self.name} refused a value: {reason(e)}") from None

    def _disk_full(self) -> bool:
        """SQLite says "disk I/O error" when it cannot even create its WAL files."""
        if self._folder is None:
            return False
        try:
            st = os.statvfs(self._folder)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 64 * 1024

    def _error(self, e: DBAPIError) -> Unavailable:
        why = reason(e)
        low = why.lower()
        if self.read_only or "readonly" in low or "read-only" in low:
            return Unavailable(
                f"{self.name} is read-only ({why}): write commands are refused, "
                "read commands still work"
            )
        if "disk is full" in low or "no space left" in low or self._disk_full():
            return Unavailable(f"{self.name}: no space left on device ({why})")
        return Unavailable(f"{self.name} unreachable: {why}")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._errors(), Session(self.engine, expire_on_commit=False) as s:
            yield s

    def schema(self) -> migrations.SchemaState:
        """Where the schema stands (`fleet db status`)."""
        with self._errors(), self.engine.connect() as conn:
            return migrations.state(conn)

    def upgrade(self) -> tuple[migrations.SchemaState, str]:
        """Migrate to head (`fleet db upgrade`); returns (where it was, where it is)."""
        with self._errors():
            return migrations.upgrade(self.engine, what=self.name)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def reason(e: DBAPIError) -> str:
    text = str(e.orig).strip() if e.orig is not None else str(e)
    return text.splitlines()[0] if text else type(e).__name__


class DatabaseUser:
    """A store over the shared database: given a `Database` it borrows it (the owner
    closes it), given a URL it opens and owns its own (tests, tools)."""

    what = "registry database"

    def __init__(self, db: Database | str) -> None:
        self._owned = isinstance(db, str)
        self._db = Database(db, what=self.what) if isinstance(db, str) else db
        self.url = self._db.url

    @property
    def database(self) -> Database:
        """The shared database, for another store to borrow (its URL hides the password)."""
        return self._db

    def close(self) -> None:
        if self._owned:
            self._db.close()
