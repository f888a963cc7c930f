"""Telemetry in the coordinator's database: batched inserts, rollups, retention.

Devices send one `Telemetry` message per window (default 10 s). The coordinator
buffers what arrives and writes it with one multi-row Core INSERT per flush,
never a commit per message (SQLModel ORM at one commit a row does ~1-5k rows/s
here; Core executemany of a few thousand rows ~100k/s). A device's `seq` makes
re-delivered windows (a spool flushed after reconnect, a QoS 1 duplicate) a no-op:
(device_id, seq) is unique and conflicts are ignored.

Raw windows are kept for `raw_retention`; `compact()` folds older ones into one
row per device, model version and hour (counts summed, latency histograms
merged, RSS max), and drops hourly rows after `rollup_retention`.

Latency percentiles per model version come from merged histograms (raw windows
plus hourly rollups), so they survive downsampling.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from edgefleet.cloud.db import Database, DatabaseUser, metadata

logger = logging.getLogger(__name__)

telemetry = sa.Table(
    "telemetry",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("window_start_ms", sa.BigInteger, nullable=False),
    sa.Column("window_end_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("received_ms", sa.BigInteger, nullable=False),
    sa.Column("model", sa.String(63), nullable=False, default=""),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("variant", sa.String(32), nullable=False, default=""),
    sa.Column("predictions", sa.BigInteger, nullable=False, default=0),
    sa.Column("errors", sa.BigInteger, nullable=False, default=0),
    sa.Column("latency_bounds", sa.Text, nullable=False, default="[]"),
    sa.Column("latency_counts", sa.Text, nullable=False, default="[]"),
    sa.Column("latency_sum_us", sa.Float, nullable=False, default=0.0),
    sa.Column("latency_count", sa.BigInteger, nullable=False, default=0),
    sa.Column("rss_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("cpu_percent", sa.Float, nullable=False, default=0.0),
    sa.Column("spooled", sa.Boolean, nullable=False, default=False),
    sa.UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
)

telemetry_hourly = sa.Table(
    "telemetry_hourly",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("hour_ms", sa.BigInteger, primary_key=True),
    sa.Column("model", sa.String(63), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("windows", sa.BigInteger, nullable=False),
    sa.Column("predictions", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("latency_bounds", sa.Text, nullable=False),
    sa.Column("latency_counts", sa.Text, nullable=False),
    sa.Column("latency_sum_us", sa.Float, nullable=False),
    sa.Column("latency_count", sa.BigInteger, nullable=False),
    sa.Column("rss_max", sa.BigInteger, nullable=False),
)

#: One row per (telemetry window, model): live traffic binned with the model's drift
#: reference (models/sketch.py). `counts` is JSON {"inputs": [[…], …], "predictions": […]}.
drift_sketches = sa.Table(
    "drift_sketches",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("window_end_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("model", sa.String(63), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("variant", sa.String(32), nullable=False),
    sa.Column("rows", sa.BigInteger, nullable=False),
    sa.Column("counts", sa.Text, nullable=False),
    sa.UniqueConstraint("device_id", "seq", "model", "version", "variant", name="uq_drift_window"),
)

HOUR_MS = 3_600_000
COLUMNS = tuple(c.name for c in telemetry.columns if c.name != "id")
DRIFT_COLUMNS = tuple(c.name for c in drift_sketches.columns if c.name != "id")


@dataclass(frozen=True)
class SketchRow:
    """Drift counts of one device and model variant, summed over a time window."""

    device_id: str
    model: str
    version: int
    variant: str
    rows: int
    inputs: tuple[tuple[int, ...], ...]
    predictions: tuple[int, ...]


@dataclass(frozen=True)
class Percentiles:
    model: str
    version: int
    count: int
    p50_us: float | None
    p90_us: float | None
    p99_us: float | None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _merge(into: list[int], counts: Sequence[int]) -> list[int]:
    if not into:
        return list(counts)
    if len(into) != len(counts):
        raise ValueError("histograms with different buckets")
    return [a + b for a, b in zip(into, counts, strict=True)]


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The bucket upper bound holding the q-quantile (the overflow bucket: the last
    bound); None for an empty histogram."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank and c:
            return float(bounds[i]) if i < len(bounds) else float(bounds[-1])
    return float(bounds[-1])


class TelemetryStore(DatabaseUser):
    what = "telemetry database"

    def __init__(self, db: Database | str) -> None:
        super().__init__(db)
        self._dialect = self._db.engine.dialect.name

    # -- ingest -------------------------------------------------------------------

    def insert_many(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert telemetry windows (tuples in `COLUMNS` order) in one transaction;
        duplicates of (device_id, seq) are skipped. Returns how many were new (the rest
        were already stored: a window sent again, a QoS 1 redelivery).

        Straight to the driver, no per-row SQLAlchemy work: SQLite gets one
        ``executemany`` of INSERT OR IGNORE; PostgreSQL a COPY into a temporary
        table, then one INSERT … SELECT … ON CONFLICT DO NOTHING.
        """
        if not rows:
            return 0
        cols = ", ".join(COLUMNS)
        with self._db.engine.begin() as conn:
            if self._dialect == "postgresql":
                raw = conn.connection.driver_connection
                assert raw is not None
                with raw.cursor() as cur:
                    cur.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS telemetry_in "
                        "(LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                    )
                    with cur.copy(f"COPY telemetry_in ({cols}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    cur.execute(
                        f"INSERT INTO telemetry ({cols}) SELECT {cols} FROM telemetry_in "
                        "ON CONFLICT ON CONSTRAINT uq_telemetry_device_seq DO NOTHING"
                    )
                    inserted = int(cur.rowcount)
            else:
                marks = ", ".join("?" for _ in COLUMNS)
                res = conn.exec_driver_sql(
                    f"INSERT OR IGNORE INTO telemetry ({cols}) VALUES ({marks})", list(rows)
                )
                inserted = int(res.rowcount)  # executemany: the rows really inserted
        return inserted

    def insert_drift(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert drift sketches (tuples in `DRIFT_COLUMNS` order) in one transaction;
        a re-delivered window is skipped. Returns how many were given."""
        if not rows:
            return 0
        if self._dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        stmt = insert(drift_sketches).on_conflict_do_nothing()
        with self._db.engine.begin() as conn:
            conn.execute(stmt, [dict(zip(DRIFT_COLUMNS, r, strict=True)) for r in rows])
        return len(rows)

    def drift_window(
        self, *, since_ms: int, model: str | None = None, version: int | None = None
    ) -> list[SketchRow]:
        """Drift counts per (device, model, version, variant) over windows ending at or
        after `since_ms`, summed; sketches whose bins disagree with the first one seen
        for their variant are left out."""
        q = sa.select(
            drift_sketches.c.device_id,
            drift_sketches.c.model,
            drift_sketches.c.version,
            drift_sketches.c.variant,
            drift_sketches.c.rows,
            drift_sketches.c.counts,
        ).where(drift_sketches.c.window_end_ms >= since_ms)
        if model is not None:
            q = q.where(drift_sketches.c.model == model)
        if version is not None:
            q = q.where(drift_sketches.c.version == version)
        sums: dict[tuple[str, str, int, str], tuple[int, list[list[int]], list[int]]] = {}
        with self._db.engine.connect() as conn:
            for r in conn.execute(q):
                c = json.loads(r.counts)
                key = (r.device_id, r.model, int(r.version), r.variant)
                have = sums.get(key)
                if have is None:
                    sums[key] = (int(r.rows), c["inputs"], c["predictions"])
                    continue
                try:
                    inputs = [_merge(a, b) for a, b in zip(have[1], c["inputs"], strict=True)]
                    preds = _merge(have[2], c["predictions"])
                except ValueError:
                    continue  # other bins (a sketch definition change): not mixed in
                sums[key] = (have[0] + int(r.rows), inputs, preds)
        return [
            SketchRow(d, m, v, var, n, tuple(tuple(x) for x in inp), tuple(p))
            for (d, m, v, var), (n, inp, p) in sorted(sums.items())
        ]

    # -- queries ------------------------------------------------------------------

    def count(self) -> int:
        with self._db.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(telemetry)).scalar_one())

    def latency_percentiles(self, *, since_ms: int | None = None) -> list[Percentiles]:
        """p50/p90/p99 per (model, version) over raw windows and hourly rollups since
        `since_ms` (default: the last hour)."""
        since = _now_ms() - HOUR_MS if since_ms is None else since_ms
        merged: dict[tuple[str, int], tuple[list[float], list[int]]] = {}
        with self._db.engine.connect() as conn:
            raw = conn.execute(
                sa.select(
                    telemetry.c.model,
                    telemetry.c.version,
                    telemetry.c.latency_bounds,
                    telemetry.c.latency_counts,
                ).where(telemetry.c.window_end_ms >= since, telemetry.c.model != "")
            ).all()
            hourly = conn.execute(
                sa.select(
                    telemetry_hourly.c.model,
                    telemetry_hourly.c.version,
                    telemetry_hourly.c.latency_bounds,
                    telemetry_hourly.c.latency_counts,
                ).where(
                    telemetry_hourly.c.hour_ms + HOUR_MS >= since, telemetry_hourly.c.model != ""
                )
            ).all()
        for model, version, bounds_json, counts_json in [*raw, *hourly]:
            bounds, counts = json.loads(bounds_json), json.loads(counts_json)
            key = (model, int(version))
            have_bounds, have_counts = merged.get(key, (bounds, []))
            if have_bounds != bounds:
                continue  # an agent with other buckets: not mixed in
            merged[key] = (have_bounds, _merge(have_counts, counts))
        out = []
        for (model, version), (bounds, counts) in sorted(merged.items()):
            out.append(
                Percentiles(
                    model,
                    version,
                    sum(counts),
                    quantile(bounds, counts, 0.5),
                    quantile(bounds, counts, 0.9),
                    quantile(bounds, counts, 0.99),
                )
            )
        return out

    # -- retention ----------------------------------------------------------------

    def compact(
        self,
        *,
        raw_retention: timedelta = timedelta(hours=24),
        rollup_retention: timedelta = timedelta(days=30),
        now_ms: int | None = None,
    ) -> tuple[int, int]:
        """Fold raw windows older than `raw_retention` into hourly rows; drop hourly
        rows older than `rollup_retention`. Returns (raw rows folded, hourly dropped)."""
        now = _now_ms() if now_ms is None else now_ms
        cutoff = now - int(raw_retention.total_seconds() * 1000)
        # whole hours only, so an hour is folded once
        cutoff -= cutoff % HOUR_MS
        with self._db.engine.begin() as conn:
            old = conn.execute(
                sa.select(
                    telemetry.c.device_id,
                    telemetry.c.window_end_ms,
                    telemetry.c.model,
                    telemetry.c.version,
                    telemetry.c.predictions,
                    telemetry.c.errors,
                    telemetry.c.latency_bounds,
                    telemetry.c.latency_counts,
                    telemetry.c.latency_sum_us,
                    telemetry.c.latency_count,
                    telemetry.c.rss_bytes,
                ).where(telemetry.c.window_end_ms < cutoff)
            ).all()
            groups: dict[tuple[str, int, str, int], dict[str, Any]] = {}
            for r in old:
                key = (r.device_id, r.window_end_ms - r.window_end_ms % HOUR_MS, r.model, r.version)
                g = groups.setdefault(
                    key,
                    {
                        "windows": 0,
                        "predictions": 0,
                        "errors": 0,
                        "latency_bounds": r.latency_bounds,
                        "counts": [],
                        "latency_sum_us": 0.0,
                        "latency_count": 0,
                        "rss_max": 0,
                    },
                )
                g["windows"] += 1
                g["predictions"] += r.predictions
                g["errors"] += r.errors
                if r.latency_bounds == g["latency_bounds"]:
                    g["counts"] = _merge(g["counts"], json.loads(r.latency_counts))
                    g["latency_sum_us"] += r.latency_sum_us
                    g["latency_count"] += r.latency_count
                g["rss_max"] = max(g["rss_max"], r.rss_bytes)
            for (device_id, hour, model, version), g in groups.items():
                existing = conn.execute(
                    sa.select(telemetry_hourly).where(
                        telemetry_hourly.c.device_id == device_id,
                        telemetry_hourly.c.hour_ms == hour,
                        telemetry_hourly.c.model == model,
                        telemetry_hourly.c.version == version,
                    )
                ).first()
                values = {
                    "windows": g["windows"],
                    "predictions": g["predictions"],
                    "errors": g["errors"],
                    "latency_bounds": g["latency_bounds"],
                    "latency_counts": json.dumps(g["counts"]),
                    "latency_sum_us": g["latency_sum_us"],
                    "latency_count": g["latency_count"],
                    "rss_max": g["rss_max"],
                }
                if existing is None:
                    conn.execute(
                        sa.insert(telemetry_hourly).values(
                            device_id=device_id,
                            hour_ms=hour,
                            model=model,
                            version=version,
                            **values,
                        )
                    )
                else:
                    same = existing.latency_bounds == g["latency_bounds"]
                    counts = (
                        _merge(json.loads(existing.latency_counts), g["counts"])
                        if same
                        else json.loads(existing.latency_counts)
                    )
                    conn.execute(
                        sa.update(telemetry_hourly)
                        .where(
                            telemetry_hourly.c.device_id == device_id,
                            telemetry_hourly.c.hour_ms == hour,
                            telemetry_hourly.c.model == model,
                            telemetry_hourly.c.version == version,
                        )
                        .values(
                            windows=existing.windows + g["windows"],
                            predictions=existing.predictions + g["predictions"],
                            errors=existing.errors + g["errors"],
                            latency_counts=json.dumps(counts),
                            latency_sum_us=existing.latency_sum_us
                            + (g["latency_sum_us"] if same else 0.0),
                            latency_count=existing.latency_count
                            + (g["latency_count"] if same else 0),
                            rss_max=max(existing.rss_max, g["rss_max"]),
                        )
                    )
            conn.execute(sa.delete(telemetry).where(telemetry.c.window_end_ms < cutoff))
            # drift sketches are only read over recent windows: no rollup, same retention
            conn.execute(sa.delete(drift_sketches).where(drift_sketches.c.window_end_ms < cutoff))
            dropped = conn.execute(
                sa.delete(telemetry_hourly).where(
                    telemetry_hourly.c.hour_ms < now - int(rollup_retention.total_seconds() * 1000)
                )
            ).rowcount
        if old:
            logger.info("telemetry: folded %d windows into %d hourly rows", len(old), len(groups))
        return len(old), int(dropped or 0)


__all__ = ["COLUMNS", "DRIFT_COLUMNS", "Percentiles", "SketchRow", "TelemetryStore", "quantile"]
