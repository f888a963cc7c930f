"""Which replicas run and which one leads, as `fleet status` shows them.

Every replica writes its row (`coordinator_replicas`) at start and every heartbeat
(the database's clock), and deletes it when it stops cleanly; a replica killed
keeps its row, shown with the age of its last heartbeat until `STALE_AFTER_S` has
passed, then removed by the leader. The leader is the lease's holder while the lease
is live.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import sqlalchemy as sa

from edgefleet.cloud.db import DatabaseUser
from edgefleet.cloud.replicas.lease import LEASE_NAME

#: a replica silent this long is forgotten (its row deleted by the leader)
STALE_AFTER_S = 3600.0


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    address: str  # HOST:PORT of its FleetService
    host: str
    pid: int
    heartbeat_age_s: float  # seconds since its last heartbeat (database clock)
    leader: bool
    token: int = 0  # the fencing token of its term when it leads


class ReplicaStore(DatabaseUser):
    what = "replica registry"

    def heartbeat(self, replica_id: str, address: str) -> None:
        """Insert or refresh this replica's row (started_at stays from the first beat)."""
        with self._db.session() as s:
            s.execute(
                sa.text(
                    "INSERT INTO coordinator_replicas "
                    "(replica_id, address, host, pid, started_at, heartbeat_at) "
                    "VALUES (:r, :a, :h, :p, now(), now()) ON CONFLICT (replica_id) DO UPDATE "
                    "SET address = :a, host = :h, pid = :p, heartbeat_at = now()"
                ),
                {"r": replica_id, "a": address, "h": socket.gethostname(), "p": os.getpid()},
            )
            s.commit()

    def remove(self, replica_id: str) -> None:
        with self._db.session() as s:
            s.execute(
                sa.text("DELETE FROM coordinator_replicas WHERE replica_id = :r"), {"r": replica_id}
            )
            s.commit()

    def forget_stale(self, older_than_s: float = STALE_AFTER_S) -> int:
        with self._db.session() as s:
            gone = s.execute(
                sa.text(
                    "DELETE FROM coordinator_replicas "
                    "WHERE heartbeat_at < now() - make_interval(secs => :s) RETURNING replica_id"
                ),
                {"s": older_than_s},
            ).all()
            s.commit()
            return len(gone)

    def list(self) -> list[ReplicaInfo]:
        """Every replica with a row, the leader first, then by id. Empty on a database
        no replica ever used (also SQLite, where replica mode is refused)."""
        if self._db.engine.dialect.name != "postgresql":
            return []
        with self._db.session() as s:
            rows = s.execute(
                sa.text(
                    "SELECT r.replica_id, r.address, r.host, r.pid, "
                    "EXTRACT(EPOCH FROM now() - r.heartbeat_at), "
                    "(l.holder IS NOT NULL AND l.expires_at > now()), COALESCE(l.token, 0) "
                    "FROM coordinator_replicas r LEFT JOIN coordinator_lease l "
                    "ON l.name = :n AND l.holder = r.replica_id"
                ),
                {"n": LEASE_NAME},
            ).all()
        out = [
            ReplicaInfo(
                replica_id=str(r[0]),
                address=str(r[1]),
                host=str(r[2]),
                pid=int(r[3]),
                heartbeat_age_s=max(0.0, float(r[4])),
                leader=bool(r[5]),
                token=int(r[6]) if r[5] else 0,
            )
            for r in rows
        ]
        return sorted(out, key=lambda x: (not x.leader, x.replica_id))


__all__ = ["STALE_AFTER_S", "ReplicaInfo", "ReplicaStore"]
