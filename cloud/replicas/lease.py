"""Leadership among coordinator replicas: a PostgreSQL advisory lock plus a lease row
with a fencing token.

- The **advisory lock** is held on a connection of its own (`LeaderLease` opens it
  outside the pool). PostgreSQL drops it the moment that session ends: a leader killed
  with SIGKILL frees it at once, and a replica that finds it free takes the lead on its
  next poll.
- The **lease row** (`coordinator_lease`) names the holder and carries a **token** that
  grows by one at every change of holder, and an expiry the holder renews every
  `lease_s / 3` on its lock connection (so a renewal also proves the lock is still
  held). A leader whose session PostgreSQL still keeps (the leader paused, or cut off
  from the database while its TCP connection lingers) stops renewing: once its lease is
  past expiry a candidate ends that session (`pg_terminate_backend`), which frees the
  lock for the candidate's next poll. Worst case: about `4/3 × lease_s` after the last
  renewal.
- **Fencing**: every write of the leader's rollout controller runs `Fence.check` in
  its own transaction first: it reads the lease row `FOR SHARE` and refuses the
  transaction unless the row still holds this leader's token. A taking-over replica's
  token bump waits for such a transaction to end, and every fenced transaction after
  the bump is refused: a leader that was paused and wakes up after another took over
  cannot change a rollout, even for the one write it had in flight.
- A leader also stops itself: it steps down when a renewal fails or when `lease_s` has
  passed on its own clock since the last renewal it started (`LeaderLease.valid`).

All times the lease compares come from the database's clock (`now()`), never from
the replicas'. Only PostgreSQL has advisory locks; replica mode refuses SQLite.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from edgefleet.cloud.db import Database, reason
from edgefleet.protos.errors import Conflict, InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

#: first half of the advisory lock key ("EF" + 1); the second is a hash of the lease name
LOCK_CLASS = 0x45460001
DEFAULT_LEASE_S = 10.0
LEASE_NAME = "leader"


def require_postgres(db_url: str) -> None:
    """Replica mode needs PostgreSQL (advisory locks, one database for every replica)."""
    from edgefleet.cloud.db import normalize_url

    u = normalize_url(db_url)
    if u.get_backend_name() != "postgresql":
        raise InvalidArgument(
            f"--replica needs a shared database: {u.get_backend_name()} "
            f"({u.render_as_string(hide_password=True)}) is not accepted; accepted: PostgreSQL "
            "(--db-url postgresql://USER@HOST:PORT/DB)"
        )


class FencedOut(Conflict):
    """A write by a leader whose term has ended (another replica holds a newer token)."""


@dataclass(frozen=True)
class LeaseState:
    """The lease row as the database has it now."""

    name: str
    holder: str
    token: int
    acquired_at: datetime
    expires_at: datetime
    live: bool  # expires_at is in the future (database clock)


def _lock_key(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def read_lease(conn: sa.Connection, name: str = LEASE_NAME) -> LeaseState | None:
    row = conn.execute(
        sa.text(
            "SELECT holder, token, acquired_at, expires_at, expires_at > now() "
            "FROM coordinator_lease WHERE name = :n"
        ),
        {"n": name},
    ).first()
    if row is None:
        return None
    return LeaseState(name, str(row[0]), int(row[1]), row[2], row[3], bool(row[4]))


class Fence:
    """The check a leader's write transactions run first (see the module docstring)."""

    def __init__(
        self,
        replica_id: str,
        token: int,
        *,
        name: str = LEASE_NAME,
        on_fenced: Callable[[], None] | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.token = token
        self.name = name
        self.on_fenced = on_fenced

    def check(self, session: Any) -> None:
        """Lock the lease row for share in `session`'s transaction; `FencedOut` unless it
        still holds this term's token."""
        row = session.execute(
            sa.text("SELECT holder, token FROM coordinator_lease WHERE name = :n FOR SHARE"),
            {"n": self.name},
        ).first()
        if row is not None and str(row[0]) == self.replica_id and int(row[1]) == self.token:
            return
        if self.on_fenced is not None:
            self.on_fenced()
        now = f"{row[0]} holds token {row[1]}" if row is not None else "nobody holds it"
        raise FencedOut(
            f"replica {self.replica_id}: leader term {self.token} is over ({now}); "
            "the write was refused"
        )


class LeaderLease:
    """One replica's side of the lease (blocking; `cloud.replicas.runtime` calls it from a
    thread). `try_acquire()` → token or None; `renew()` → still leading; `release()`."""

    def __init__(
        self,
        db: Database,
        replica_id: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        name: str = LEASE_NAME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.5 <= lease_s <= 3600:
            raise InvalidArgument(f"--lease {lease_s:g}s: accepted 0.5 to 3600 seconds")
        self.db = db
        self.replica_id = replica_id
        self.lease_s = lease_s
        self.name = name
        self.key = _lock_key(name)
        self.clock = clock
        self.token: int | None = None
        self._valid_until = 0.0
        self._engine = sa.create_engine(
            db.engine.url,
            poolclass=NullPool,
            connect_args={
                "connect_timeout": max(2, int(lease_s / 2)),
                "keepalives": 1,
                "keepalives_idle": max(1, int(lease_s / 2)),
                "keepalives_interval": 1,
                "keepalives_count": 3,
                "application_name": f"edgefleet-lease-{replica_id}"[:63],
            },
        )
        self._conn: sa.Connection | None = None

    # -- the lock connection --------------------------------------------------------------

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            ms = max(100, int(self.lease_s * 1000 / 3))
            conn.execute(sa.text(f"SET statement_timeout = {ms}"))
            conn.execute(sa.text(f"SET lock_timeout = {ms}"))
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        """Close the lock connection (which ends the session and frees the lock)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # already broken: nothing more to free
                logger.debug("closing the lease connection", exc_info=True)

    # -- leading -------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.token is not None and self.valid()

    def valid(self) -> bool:
        """Whether this replica may still act as leader by its own clock."""
        return self.token is not None and self.clock() < self._valid_until

    def try_acquire(self) -> int | None:
        """Take the lead if the lock is free: the new fencing token, or None. When another
        replica holds the lock but let its lease expire, end that replica's session so the
        next try can take it."""
        started = self.clock()
        try:
            conn = self._connection()
            got = bool(
                conn.execute(
                    sa.text("SELECT pg_try_advisory_lock(:c, :k)"),
                    {"c": LOCK_CLASS, "k": self.key},
                ).scalar()
            )
            if not got:
                self._evict_expired(conn)
                return None
            token = int(
                conn.execute(
                    sa.text(
                        "INSERT INTO coordinator_lease (name, holder, token, acquired_at, "
                        "expires_at) VALUES (:n, :me, 1, now(), now() + make_interval(secs => :s)) "
                        "ON CONFLICT (name) DO UPDATE SET holder = :me, "
                        "token = coordinator_lease.token + 1, acquired_at = now(), "
                        "expires_at = now() + make_interval(secs => :s) RETURNING token"
                    ),
                    {"n": self.name, "me": self.replica_id, "s": self.lease_s},
                ).scalar_one()
            )
        except sa.exc.DBAPIError as e:
            logger.warning("lease %s: cannot try to lead (%s)", self.name, reason(e))
            self._drop()
            return None
        self.token = token
        self._valid_until = started + self.lease_s
        return token

    def _evict_expired(self, conn: sa.Connection) -> None:
        lease = read_lease(conn, self.name)
        if lease is None or lease.live:
            return
        ended = conn.execute(
            sa.text(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid = :c AND objid = :k AND objsubid = 2 AND granted "
                "AND pid <> pg_backend_pid()"
            ),
            {"c": LOCK_CLASS, "k": self.key},
        ).all()
        if ended:
            logger.warning(
                "lease %s: %s (token %d) let it expire at %s but its session kept the lock; "
                "ended session(s) %s",
                self.name,
                lease.holder,
                lease.token,
                lease.expires_at.isoformat(),
                ", ".join(str(r[0]) for r in ended),
            )

    def renew(self) -> bool:
        """Extend the lease (on the lock connection); False, and no longer leading, when
        the lock or the lease is gone."""
        if self.token is None:
            return False
        started = self.clock()
        try:
            row = (
                self._connection()
                .execute(
                    sa.text(
                        "UPDATE coordinator_lease SET expires_at = now() + make_interval(secs => :s) "
                        "WHERE name = :n AND holder = :me AND token = :t RETURNING token"
                    ),
                    {"n": self.name, "me": self.replica_id, "t": self.token, "s": self.lease_s},
                )
                .first()
            )
        except sa.exc.DBAPIError as e:
            logger.warning("lease %s: renewal failed (%s); stepping down", self.name, reason(e))
            self.lose()
            return False
        if row is None:
            logger.warning(
                "lease %s: token %s was taken over; stepping down", self.name, self.token
            )
            self.lose()
            return False
        self._valid_until = started + self.lease_s
        return True

    def lose(self) -> None:
        """Stop leading: forget the token and end the lock session."""
        self.token = None
        self._valid_until = 0.0
        self._drop()

    def release(self) -> None:
        """Step down cleanly (shutdown): expire the lease now so another replica takes
        over on its next poll, then end the lock session."""
        if self.token is not None and self._conn is not None:
            try:
                self._conn.execute(
                    sa.text(
                        "UPDATE coordinator_lease SET expires_at = now() "
                        "WHERE name = :n AND holder = :me AND token = :t"
                    ),
                    {"n": self.name, "me": self.replica_id, "t": self.token},
                )
            except sa.exc.DBAPIError as e:
                logger.info("lease %s: not released cleanly (%s)", self.name, reason(e))
        self.lose()

    def fence(self, on_fenced: Callable[[], None] | None = None) -> Fence:
        if self.token is None:
            raise Unavailable(f"replica {self.replica_id} does not lead")
        return Fence(self.replica_id, self.token, name=self.name, on_fenced=on_fenced)

    def close(self) -> None:
        self.lose()
        self._engine.dispose()


__all__ = [
    "DEFAULT_LEASE_S",
    "LEASE_NAME",
    "Fence",
    "FencedOut",
    "LeaderLease",
    "LeaseState",
    "read_lease",
    "require_postgres",
]
