"""One way to open the coordinator's database (SQLite or PostgreSQL) and translate its errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DataError, DBAPIError, OperationalError
from sqlmodel import Session

from edgefleet.protos.errors import InvalidArgument, Unavailable

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
    """An engine plus error translation; `what` names it in messages ("registry database")."""

    def __init__(self, url: str, *, what: str, tables: list[sa.Table]) -> None:
        u = normalize_url(url)
        self.url = u.render_as_string(hide_password=True)
        self.what = what
        sqlite = u.get_backend_name() == "sqlite"
        args: dict[str, Any] = {"timeout": 30} if sqlite else {"connect_timeout": 5}
        self.engine = sa.create_engine(u, pool_pre_ping=True, connect_args=args)
        if sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            tables[0].metadata.create_all(self.engine, tables=tables)
        except OperationalError as e:
            raise Unavailable(f"{what} {self.url} unreachable: {reason(e)}") from None

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                yield s
        except OperationalError as e:
            raise Unavailable(f"{self.what} {self.url} unreachable: {reason(e)}") from None
        except (
            DataError
        ) as e:  # a value the column cannot hold: callers' checks should catch it first
            raise InvalidArgument(f"{self.what} {self.url} refused a value: {reason(e)}") from None

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
