"""One way to open the coordinator's database (SQLite or PostgreSQL) and translate its errors.

All stores share one database (one URL, one `Database`, one engine) whose tables are
declared on one `metadata` (`cloud.schema` imports them all). Opening a `Database`
checks its schema against the migrations shipped in the package (`cloud.migrations`):
an empty database gets the current schema; an older one is refused with what to run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


class Database:
    """An engine plus error translation; `what` names it in messages ("registry database").

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
            raise Unavailable(f"{self.name} unreachable: {reason(e)}") from None
        except DataError as e:  # a value the column cannot hold: callers should catch it first
            raise InvalidArgument(f"{self.name} refused a value: {reason(e)}") from None

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

    def close(self) -> None:
        if self._owned:
            self._db.close()
