"""What the console shows, read from the coordinator's database in few, aggregated queries.

Device counts are grouped in SQL (`GROUP BY` over JSON fields, both SQLite and
PostgreSQL) and the device list is paged in SQL, so a page costs a handful of queries
whatever the fleet's size. Everything here is blocking: the app calls it through
`asyncio.to_thread`. Values handed out are plain dataclasses and dicts for templates.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import col

from edgefleet.cloud.db import Database, metadata
from edgefleet.cloud.devices.store import DeviceRow
from edgefleet.cloud.drift.alerts import drift_alerts
from edgefleet.cloud.rollouts.store import RolloutDeviceRow, RolloutRow
from edgefleet.cloud.telemetry.store import quantile
from edgefleet.cloud.telemetry.store import telemetry as telemetry_table

#: rows per page of the device list (the largest a request may ask for: MAX_PAGE)
PAGE = 50
MAX_PAGE = 500
#: the fleet activity chart: minutes back, one point a minute
ACTIVITY_MINUTES = 60
#: minutes of telemetry that may still arrive late (a spooled window); older ones are kept
SETTLE_MINUTES = 3
#: the recent minutes are counted again at most this often
RECENT_TTL_S = 5.0
#: the device list's filter choices are looked up again at most this often
OPTIONS_TTL_S = 30.0


@dataclass(frozen=True)
class Overview:
    total: int
    online: int
    revoked: int
    by_version: list[tuple[str, int]]  # ("digits:1", n), "(none)" for no model yet
    by_variant: list[tuple[str, int]]
    by_state: list[tuple[str, int]]
    by_group: list[tuple[str, int, int]]  # (group, devices, online)
    activity: dict[str, list[float]]  # minute (epoch s), devices reporting, predictions
    open_alerts: int
    active_rollouts: int

    @property
    def offline(self) -> int:
        return self.total - self.online - self.revoked


@dataclass(frozen=True)
class DeviceFilter:
    q: str = ""  # device id contains
    group: str = ""
    online: bool | None = None
    state: str = ""  # reported update state (idle, active, failed…)
    model: str = ""  # NAME or NAME:VERSION the device runs
    page: int = 1
    per_page: int = PAGE

    def query(self, **changes: Any) -> str:
        """The URL query string of this filter with `changes` (for paging links)."""
        from urllib.parse import urlencode

        values = {
            "q": self.q,
            "group": self.group,
            "online": "" if self.online is None else ("yes" if self.online else "no"),
            "state": self.state,
            "model": self.model,
            "page": self.page,
            "per_page": "" if self.per_page == PAGE else self.per_page,
        }
        values.update(changes)
        return urlencode({k: v for k, v in values.items() if v not in ("", None)})


@dataclass(frozen=True)
class DeviceLine:
    device_id: str
    group: str
    online: bool
    last_seen: datetime | None
    agent_version: str
    model: str  # "digits:1" or ""
    variant: str
    state: str
    reason: str
    rollout_id: str
    revoked: bool


@dataclass(frozen=True)
class DevicePage:
    rows: list[DeviceLine]
    total: int
    filter: DeviceFilter
    groups: list[str]
    states: list[str]

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.filter.per_page))


@dataclass(frozen=True)
class UpdateLine:
    rollout_id: str
    ref: str
    stage: int
    variant: str
    phase: str
    state: str
    reason: str
    detail: str
    last_seen: datetime | None
    rollout_state: str
    created_at: datetime | None


@dataclass(frozen=True)
class TelemetryLine:
    window_end_ms: int
    model: str
    variant: str
    predictions: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    rss_mb: float
    cpu_percent: float


@dataclass(frozen=True)
class DeviceDetail:
    line: DeviceLine
    enrolled_at: datetime | None
    tags: Mapping[str, str]
    capabilities: Mapping[str, Any]
    active: Mapping[str, Any]
    reported: Mapping[str, Any]
    updates: list[UpdateLine]
    telemetry: list[TelemetryLine] = field(default_factory=list)


# the tables of these SQLModel classes (their `__table__` is typed as Any)
_DEV = metadata.tables[DeviceRow.__tablename__]
_RD = metadata.tables[RolloutDeviceRow.__tablename__]
_RO = metadata.tables[RolloutRow.__tablename__]
_TELEMETRY = telemetry_table
_ALERTS = drift_alerts


class ConsoleQueries:
    """Read-only queries over `db` (the coordinator's one database)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._settled: dict[int, tuple[int, int]] = {}  # minute -> (devices, predictions)
        self._recent: dict[int, tuple[int, int]] = {}
        self._recent_at = 0.0
        self._recent_end = 0
        self._options_cache: tuple[list[str], list[str]] | None = None
        self._options_at = 0.0

    def _rows(self, stmt: Any) -> list[Any]:
        with self.db.session() as s:
            return list(s.execute(stmt).all())

    # -- fleet overview ---------------------------------------------------------------

    def overview(self, *, now: float | None = None) -> Overview:
        now = time.time() if now is None else now
        d = _DEV.c
        model, version, variant = d.active_model, d.active_version, d.active_variant
        state = d.update_state  # "" until the device has reported
        # one pass over the devices, counted in SQL
        # (at most versions x variants x states x groups rows come back)
        keys = (model, version, variant, state, d.group, d.online, d.revoked_at.is_not(None))
        with self.db.session() as s:
            grouped = s.execute(sa.select(*keys, sa.func.count()).group_by(*keys)).all()
            open_alerts = s.execute(
                sa.select(sa.func.count()).select_from(_ALERTS).where(_ALERTS.c.state == "open")
            ).scalar_one()
            active_rollouts = s.execute(
                sa.select(sa.func.count())
                .select_from(_RO)
                .where(_RO.c.state.not_in(("done", "rolled_back", "aborted")))
            ).scalar_one()
        total = online = revoked = 0
        versions: Counter[tuple[str, int]] = Counter()
        variants: Counter[str] = Counter()
        states: Counter[str] = Counter()
        groups: Counter[str] = Counter()
        groups_online: Counter[str] = Counter()
        for m, v, var, st, group, is_online, is_revoked, n in grouped:
            total += n
            if is_revoked:
                revoked += n
                continue
            online += n if is_online else 0
            versions[(m or "", int(v or 0))] += n
            variants[var or "(none)"] += n
            states[st or "enrolled"] += n
            groups[group or "(no group)"] += n
            groups_online[group or "(no group)"] += n if is_online else 0
        return Overview(
            total=total,
            online=online,
            revoked=revoked,
            by_version=[
                (f"{m}:{v}" if m else "(none)", n) for (m, v), n in sorted(versions.items())
            ],
            by_variant=sorted(variants.items()),
            by_state=sorted(states.items()),
            by_group=[(g, n, groups_online[g]) for g, n in sorted(groups.items())],
            activity=self.activity(now=now),
            open_alerts=int(open_alerts),
            active_rollouts=int(active_rollouts),
        )

    def activity(self, *, now: float, minutes: int = ACTIVITY_MINUTES) -> dict[str, list[float]]:
        """Per minute of the last `minutes`: devices that sent telemetry, predictions made.

        With 10,000 devices an hour of raw telemetry is millions of rows, so minutes
        older than `SETTLE_MINUTES` are counted once and kept; the recent ones are
        counted again at most every `RECENT_TTL_S` seconds."""
        end_min = int(now // 60)
        first = end_min - minutes + 1
        settled = end_min - SETTLE_MINUTES  # minutes before this one no longer change
        with self._lock:
            missing = [m for m in range(first, settled) if m not in self._settled]
            recent_fresh = now - self._recent_at < RECENT_TTL_S and self._recent_end == end_min
            if missing or not recent_fresh:
                start = min(missing) if missing else settled
                got = self._count_minutes(start)
                for m in missing:
                    self._settled[m] = got.get(m, (0, 0))
                self._recent = {m: got.get(m, (0, 0)) for m in range(settled, end_min + 1)}
                self._recent_at, self._recent_end = now, end_min
            for m in [m for m in self._settled if m < first]:
                del self._settled[m]
            counts = {**self._settled, **self._recent}
        xs = list(range(first, end_min + 1))
        return {
            "minute": [float(m * 60) for m in xs],
            "devices": [float(counts.get(m, (0, 0))[0]) for m in xs],
            "predictions": [float(counts.get(m, (0, 0))[1]) for m in xs],
        }

    def _count_minutes(self, start_min: int) -> dict[int, tuple[int, int]]:
        t = _TELEMETRY.c
        minute = sa.func.floor(t.window_end_ms / 60_000.0)
        rows = self._rows(
            sa.select(minute, sa.func.count(sa.distinct(t.device_id)), sa.func.sum(t.predictions))
            .where(t.window_end_ms >= start_min * 60_000)
            .group_by(minute)
        )
        return {int(m): (int(n), int(p or 0)) for m, n, p in rows}

    # -- devices ----------------------------------------------------------------------

    def _where(self, f: DeviceFilter) -> list[Any]:
        d = _DEV.c
        where: list[Any] = []
        if f.q:
            where.append(d.device_id.contains(f.q, autoescape=True))
        if f.group:
            where.append(d.group == ("" if f.group == "(no group)" else f.group))
        if f.online is not None:
            where.append(sa.and_(d.online == f.online, d.revoked_at.is_(None)))
        if f.state == "revoked":
            where.append(d.revoked_at.is_not(None))
        elif f.state == "enrolled":
            where.append(d.update_state == "")
        elif f.state:
            where.append(d.update_state == f.state)
        if f.model:
            name, _, ver = f.model.partition(":")
            where.append(d.active_model == name)
            if ver.isdigit():
                where.append(d.active_version == int(ver))
        return where

    def devices(self, f: DeviceFilter) -> DevicePage:
        d = _DEV.c
        where = self._where(f)
        per = max(1, min(f.per_page, MAX_PAGE))
        page = max(1, f.page)
        cols = (
            d.device_id,
            d.group,
            d.online,
            d.last_seen,
            d.agent_version,
            d.active_model,
            d.active_version,
            d.active_variant,
            d.update_state,
            d.update_reason,
            d.rollout_id,
            d.revoked_at,
        )
        # the page's rows by primary key first: the columns are read for 50 rows, not for
        # every row an OFFSET skips
        page_ids = (
            sa.select(d.id).where(*where).order_by(d.device_id).limit(per).offset((page - 1) * per)
        ).scalar_subquery()
        with self.db.session() as s:
            total = s.execute(sa.select(sa.func.count()).select_from(_DEV).where(*where)).scalar()
            rows = s.execute(sa.select(*cols).where(d.id.in_(page_ids)).order_by(d.device_id)).all()
        groups, states = self._options()
        return DevicePage(
            rows=[_line(r) for r in rows],
            total=int(total or 0),
            filter=f,
            groups=groups,
            states=states,
        )

    def _options(self, *, now: float | None = None) -> tuple[list[str], list[str]]:
        """The device list's filter choices (groups, update states), counted at most every
        `OPTIONS_TTL_S` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._options_cache is not None and now - self._options_at < OPTIONS_TTL_S:
                return self._options_cache
        d = _DEV.c
        with self.db.session() as s:
            groups = s.execute(sa.select(d.group).distinct().order_by(d.group)).scalars().all()
            states = s.execute(sa.select(d.update_state).distinct()).scalars().all()
        found = (
            [g or "(no group)" for g in groups],
            sorted({st or "enrolled" for st in states} | {"revoked"}),
        )
        with self._lock:
            self._options_cache, self._options_at = found, now
        return found

    def device(self, device_id: str, *, telemetry: int = 60) -> DeviceDetail | None:
        d = _DEV.c
        with self.db.session() as s:
            row = s.execute(sa.select(_DEV).where(d.device_id == device_id)).mappings().first()
            if row is None:
                return None
            updates = s.execute(
                sa.select(
                    _RD.c.rollout_id,
                    _RO.c.ref,
                    _RD.c.stage,
                    _RD.c.variant,
                    _RD.c.phase,
                    _RD.c.state,
                    _RD.c.reason,
                    _RD.c.detail,
                    _RD.c.last_seen,
                    _RO.c.state,
                    _RO.c.created_at,
                )
                .join(_RO, _RO.c.rollout_id == _RD.c.rollout_id)
                .where(_RD.c.device_id == device_id)
                .order_by(col(_RO.c.created_at).desc())
                .limit(100)
            ).all()
            t = _TELEMETRY.c
            windows = s.execute(
                sa.select(
                    t.window_end_ms,
                    t.model,
                    t.version,
                    t.variant,
                    t.predictions,
                    t.errors,
                    t.latency_bounds,
                    t.latency_counts,
                    t.rss_bytes,
                    t.cpu_percent,
                )
                .where(t.device_id == device_id)
                .order_by(t.window_end_ms.desc())
                .limit(telemetry)
            ).all()
        active: dict[str, Any] = (
            {
                "model": row["active_model"],
                "version": row["active_version"],
                "variant": row["active_variant"],
                "sha256": row["active_sha256"],
            }
            if row["active_model"]
            else {}
        )
        reported: dict[str, Any] = (
            {
                "state": row["update_state"],
                "reason": row["update_reason"],
                "generation": row["reported_generation"],
                "detail": row["detail"],
            }
            if row["update_state"]
            else {}
        )
        capabilities: dict[str, Any] = (
            {
                "machine": row["machine"],
                "accelerator": row["accelerator"],
                "memory_mb": row["memory_mb"],
                "runtimes": ", ".join(row["runtimes"] or ()),
                "providers": ", ".join(row["providers"] or ()),
                "features": ", ".join(row["features"] or ()),
                "tflite_runtime_legacy": row["tflite_runtime_legacy"],
            }
            if row["accelerator"]
            else {}
        )
        line = DeviceLine(
            device_id=row["device_id"],
            group=row["group"],
            online=bool(row["online"]),
            last_seen=row["last_seen"],
            agent_version=row["agent_version"],
            model=f"{active['model']}:{active.get('version')}" if active.get("model") else "",
            variant=str(active.get("variant", "")),
            state=str(reported.get("state", "enrolled")),
            reason=str(reported.get("reason", "")),
            rollout_id=row["rollout_id"],
            revoked=row["revoked_at"] is not None,
        )
        return DeviceDetail(
            line=line,
            enrolled_at=row["enrolled_at"],
            tags=dict(row["tags"] or {}),
            capabilities=capabilities,
            active=active,
            reported=reported,
            updates=[UpdateLine(*u) for u in updates],
            telemetry=[_window(w) for w in reversed(windows)],
        )

    def latency(
        self, model: str, version: int, *, now: float | None = None, minutes: int = 10
    ) -> dict[str, tuple[list[float], list[int]]]:
        """Latency histogram per variant of `model:version` over the last `minutes` of
        telemetry: {variant: (bucket upper bounds in ms, counts)}."""
        now = time.time() if now is None else now
        t = _TELEMETRY.c
        rows = self._rows(
            sa.select(t.variant, t.latency_bounds, t.latency_counts).where(
                t.model == model,
                t.version == version,
                t.window_end_ms >= int((now - minutes * 60) * 1000),
            )
        )
        out: dict[str, tuple[list[float], list[int]]] = {}
        for variant, bounds_json, counts_json in rows:
            bounds, counts = _floats(bounds_json), _ints(counts_json)
            have_bounds, have = out.get(variant, (bounds, [0] * len(counts)))
            if have_bounds != bounds or len(have) != len(counts):
                continue  # an agent with other buckets: not mixed in
            out[variant] = (have_bounds, [a + b for a, b in zip(have, counts, strict=True)])
        return {v: ([b / 1000.0 for b in bs], cs) for v, (bs, cs) in sorted(out.items())}

    # -- rollouts ---------------------------------------------------------------------

    def rollout_counts(self, rollout_id: str) -> list[tuple[int, str, int]]:
        """(stage, device state, devices) of one rollout, counted in SQL."""
        rd = _RD.c
        state = sa.func.coalesce(sa.func.nullif(rd.state, ""), rd.phase)
        rows = self._rows(
            sa.select(rd.stage, state, sa.func.count())
            .where(rd.rollout_id == rollout_id)
            .group_by(rd.stage, state)
            .order_by(rd.stage, state)
        )
        return [(int(st), str(s), int(n)) for st, s, n in rows]


def _line(r: Sequence[Any]) -> DeviceLine:
    (dev, group, online, seen, agent, model, version, variant, state, reason, rid, rev) = r
    return DeviceLine(
        device_id=dev,
        group=group,
        online=bool(online),
        last_seen=seen,
        agent_version=agent,
        model=f"{model}:{version}" if model else "",
        variant=variant or "",
        state="revoked" if rev is not None else (state or "enrolled"),
        reason=reason or "",
        rollout_id=rid,
        revoked=rev is not None,
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in json.loads(text or "[]")]


def _floats(text: str) -> list[float]:
    return [float(x) for x in json.loads(text or "[]")]


def _window(w: Sequence[Any]) -> TelemetryLine:
    end, model, version, variant, preds, errors, bounds, counts, rss, cpu = w
    b, c = _floats(bounds), _ints(counts)
    p50, p95 = quantile(b, c, 0.5), quantile(b, c, 0.95)
    return TelemetryLine(
        window_end_ms=int(end),
        model=f"{model}:{version}",
        variant=variant,
        predictions=int(preds),
        errors=int(errors),
        p50_ms=p50 / 1000.0 if p50 is not None else None,
        p95_ms=p95 / 1000.0 if p95 is not None else None,
        rss_mb=int(rss) / 2**20,
        cpu_percent=float(cpu),
    )
