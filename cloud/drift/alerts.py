"""Drift alerts in the coordinator's database (SQLite or PostgreSQL).

One row per episode: an alert opens when a subject's PSI for a model version
goes above the threshold, is refreshed (PSI, peak, last seen) while it stays
above, and is resolved when it falls back to or below it. At most one open
alert per (scope, subject, model, version, metric).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from edgefleet.cloud.db import DatabaseUser, metadata
from edgefleet.protos.errors import InvalidArgument

logger = logging.getLogger(__name__)

SCOPES = ("device", "group")
METRICS = ("inputs", "predictions")

drift_alerts = sa.Table(
    "drift_alerts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("scope", sa.String(16), nullable=False),  # device | group
    sa.Column("subject", sa.String(64), nullable=False),  # device id or group name
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("metric", sa.String(32), nullable=False),  # inputs | predictions
    sa.Column("state", sa.String(16), nullable=False, index=True),  # open | resolved
    sa.Column("psi", sa.Float, nullable=False),  # latest
    sa.Column("max_psi", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),  # samples behind the latest PSI
    sa.Column("detail", sa.Text, nullable=False, default=""),
    sa.Column("first_seen_ms", sa.BigInteger, nullable=False),
    sa.Column("last_seen_ms", sa.BigInteger, nullable=False),
    sa.Column("resolved_ms", sa.BigInteger, nullable=True),
)


@dataclass(frozen=True)
class Finding:
    """One PSI measurement: `subject`'s traffic on `model:version` for `metric`."""

    scope: str
    subject: str
    model: str
    version: int
    metric: str
    psi: float
    rows: int
    detail: str = ""


@dataclass(frozen=True)
class Alert:
    id: int
    scope: str
    subject: str
    model: str
    version: int
    metric: str
    state: str
    psi: float
    max_psi: float
    threshold: float
    rows: int
    detail: str
    first_seen_ms: int
    last_seen_ms: int
    resolved_ms: int | None

    @property
    def open(self) -> bool:
        return self.state == "open"


def check_threshold(threshold: float) -> float:
    if not threshold > 0:
        raise InvalidArgument(f"drift threshold {threshold} must be > 0 (PSI; default 0.2)")
    return threshold


class AlertStore(DatabaseUser):
    what = "alert database"

    def apply(
        self, findings: Sequence[Finding], *, threshold: float, now_ms: int | None = None
    ) -> tuple[list[Alert], list[Alert]]:
        """Open, refresh or resolve alerts from these findings, in one transaction.
        Returns (opened, resolved)."""
        check_threshold(threshold)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        opened: list[Alert] = []
        resolved: list[Alert] = []
        t = drift_alerts
        with self._db.engine.begin() as conn:
            current = {
                (r.scope, r.subject, r.model, r.version, r.metric): r
                for r in conn.execute(sa.select(t).where(t.c.state == "open"))
            }
            for f in findings:
                if f.scope not in SCOPES or f.metric not in METRICS:
                    raise InvalidArgument(
                        f"drift finding {f.scope}/{f.metric}: scope must be one of "
                        f"{', '.join(SCOPES)} and metric one of {', '.join(METRICS)}"
                    )
                key = (f.scope, f.subject, f.model, f.version, f.metric)
                row = current.get(key)
                if f.psi > threshold:
                    if row is None:
                        new_id = conn.execute(
                            sa.insert(t).values(
                                scope=f.scope,
                                subject=f.subject,
                                model=f.model,
                                version=f.version,
                                metric=f.metric,
                                state="open",
                                psi=f.psi,
                                max_psi=f.psi,
                                threshold=threshold,
                                rows=f.rows,
                                detail=f.detail,
                                first_seen_ms=now,
                                last_seen_ms=now,
                                resolved_ms=None,
                            )
                        ).inserted_primary_key
                        assert new_id is not None
                        opened.append(self._get(conn, int(new_id[0])))
                    else:
                        conn.execute(
                            sa.update(t)
                            .where(t.c.id == row.id)
                            .values(
                                psi=f.psi,
                                max_psi=max(row.max_psi, f.psi),
                                threshold=threshold,
                                rows=f.rows,
                                detail=f.detail,
                                last_seen_ms=now,
                            )
                        )
                elif row is not None:
                    conn.execute(
                        sa.update(t)
                        .where(t.c.id == row.id)
                        .values(
                            state="resolved",
                            psi=f.psi,
                            rows=f.rows,
                            last_seen_ms=now,
                            resolved_ms=now,
                        )
                    )
                    resolved.append(self._get(conn, int(row.id)))
        for a in opened:
            logger.warning(
                "drift alert: %s %s on %s:%d, %s PSI %.3f > %.3f (%s)",
                a.scope,
                a.subject,
                a.model,
                a.version,
                a.metric,
                a.psi,
                threshold,
                a.detail,
            )
        for a in resolved:
            logger.info(
                "drift resolved: %s %s on %s:%d, %s PSI %.3f",
                a.scope,
                a.subject,
                a.model,
                a.version,
                a.metric,
                a.psi,
            )
        return opened, resolved

    @staticmethod
    def _get(conn: sa.Connection, alert_id: int) -> Alert:
        r = conn.execute(sa.select(drift_alerts).where(drift_alerts.c.id == alert_id)).one()
        return _alert(r)

    def find(self, *, open_only: bool = True, limit: int = 1000) -> list[Alert]:
        """Alerts, open ones first, most recently seen first."""
        t = drift_alerts
        q = sa.select(t)
        if open_only:
            q = q.where(t.c.state == "open")
        q = q.order_by(
            sa.case((t.c.state == "open", 0), else_=1), t.c.last_seen_ms.desc(), t.c.id.desc()
        ).limit(limit)
        with self._db.engine.connect() as conn:
            return [_alert(r) for r in conn.execute(q)]


def _alert(r: Any) -> Alert:
    """A `drift_alerts` row (columns named as the fields) as an `Alert`."""
    return Alert(**dict(r._mapping))


__all__ = ["METRICS", "SCOPES", "Alert", "AlertStore", "Finding", "check_threshold"]
