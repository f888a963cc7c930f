"""RolloutStore: rollouts and their per-device state, in the coordinator's database.

Two tables beside the registry's and the devices' (SQLite or PostgreSQL, by URL):
``rollouts`` (one row per rollout: policy, state, stages as JSON) and
``rollout_devices`` (one row per targeted device: stage, variant, what it ran
before, the action and generation issued to it, last reported state, reason, last
seen, shadow results). Rows never leave this module; callers get `cloud.rollouts.model`
values.

`issue()` is what makes a restarted coordinator safe: in one transaction it
allocates each device's next desired generation, stores the signed desired state
on the device row, and records action and generation on the rollout's device row.
A device that already has that action recorded keeps its generation and stored
desired state, so issuing a step twice (a coordinator killed between issuing and
saving the stage) never updates a device twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from edgefleet.cloud.db import DatabaseUser
from edgefleet.cloud.devices.store import DeviceRow, Sign, issue_desired
from edgefleet.cloud.devices.values import ServedModel, UpdateState
from edgefleet.cloud.registry.tables import UtcDateTime
from edgefleet.cloud.rollouts.model import (
    FINAL,
    DevicePhase,
    Rollout,
    RolloutDevice,
    RolloutState,
    Stage,
    check_transition,
)
from edgefleet.cloud.rollouts.policy import Policy
from edgefleet.protos.errors import AlreadyExists, Conflict, NotFound

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(dt: datetime | None) -> float:
    return dt.timestamp() if dt is not None else 0.0


def _dt(ts: float) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


class RolloutRow(SQLModel, table=True):
    __tablename__ = "rollouts"

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(index=True, unique=True, max_length=32)
    ref: str = Field(max_length=128)
    model: str = Field(max_length=63)
    version: int
    selector: str = Field(max_length=4096)
    policy: dict[str, Any] = Field(sa_type=sa.JSON)
    state: str = Field(index=True, max_length=16)
    reason: str = ""
    stage: int = 0
    stages: list[Any] = Field(sa_type=sa.JSON)
    skipped: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    created_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)
    updated_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class RolloutDeviceRow(SQLModel, table=True):
    __tablename__ = "rollout_devices"
    __table_args__ = (sa.UniqueConstraint("rollout_id", "device_id", name="uq_rollout_device"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(index=True, max_length=32)
    device_id: str = Field(max_length=64)
    stage: int
    variant: str = Field(max_length=32)
    sha256: str = Field(max_length=64)
    previous: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    phase: str = Field(default="pending", max_length=16)
    action: str = Field(default="", max_length=16)
    generation: int = Field(default=0, sa_type=sa.BigInteger)
    state: str = Field(default="", max_length=16)
    reason: str = Field(default="", max_length=64)
    detail: str = ""
    last_seen: datetime | None = Field(default=None, sa_type=UtcDateTime)
    shadow: dict[str, float] = Field(default_factory=dict, sa_type=sa.JSON)


def _served(d: Mapping[str, Any] | None) -> ServedModel | None:
    if not d or not d.get("model"):
        return None
    return ServedModel(
        str(d["model"]),
        int(d.get("version", 0)),
        str(d.get("variant", "")),
        str(d.get("sha256", "")),
    )


def _served_json(m: ServedModel | None) -> dict[str, Any] | None:
    """The `previous` column: the ModelRef fields (JSON, as release 0.1.0 kept them)."""
    if m is None:
        return None
    return {"model": m.model, "version": m.version, "variant": m.variant, "sha256": m.sha256}


def _column(name: str, value: Any) -> Any:
    """A `RolloutDevice` field's value as its column holds it."""
    if name == "last_seen":
        return _dt(value)
    if name == "previous":
        return _served_json(value)
    if name == "state":
        return str(value) if value else ""
    return value


def _rollout(r: RolloutRow) -> Rollout:
    return Rollout(
        rollout_id=r.rollout_id,
        ref=r.ref,
        model=r.model,
        version=r.version,
        selector=r.selector,
        policy=Policy.from_dict(r.policy),
        state=RolloutState(r.state),
        stages=tuple(Stage.from_dict(s) for s in r.stages),
        stage=r.stage,
        reason=r.reason,
        created_at=_ts(r.created_at),
        updated_at=_ts(r.updated_at),
        finished_at=_ts(r.finished_at),
        skipped=dict(r.skipped),
    )


def _device(r: RolloutDeviceRow) -> RolloutDevice:
    return RolloutDevice(
        rollout_id=r.rollout_id,
        device_id=r.device_id,
        stage=r.stage,
        variant=r.variant,
        sha256=r.sha256,
        previous=_served(r.previous),
        phase=DevicePhase(r.phase),
        action=r.action,
        generation=r.generation,
        state=UpdateState(r.state) if r.state else None,
        reason=r.reason,
        detail=r.detail,
        last_seen=_ts(r.last_seen),
        shadow=dict(r.shadow),
    )


#: fields of a rollout device that `update_devices` may change
DEVICE_FIELDS = ("phase", "state", "reason", "detail", "last_seen", "shadow", "previous")


class RolloutStore(DatabaseUser):
    what = "rollout database"

    #: run first in every transaction of `save`, `update_devices` and `issue`: a replica
    #: that leads sets its term's fence (`cloud.replicas.lease.Fence.check`), which
    #: refuses the transaction once another replica took over
    fence: Callable[[Session], None] | None = None
    #: `save` refuses (`Conflict`) a rollout read before the stored row last changed:
    #: coordinator replicas write rollouts from several processes (the leader's
    #: controller, any replica's pause/resume/abort), without a lock they share
    optimistic: bool = False

    def _fenced(self, s: Session) -> None:
        if self.fence is not None:
            self.fence(s)

    def _row(self, s: Session, rollout_id: str) -> RolloutRow:
        row = s.exec(select(RolloutRow).where(RolloutRow.rollout_id == rollout_id)).first()
        if row is None:
            raise NotFound(f"rollout {rollout_id!r} not found; 'fleet rollouts ls' lists them")
        return row

    # -- create and read -------------------------------------------------------------

    def create(self, rollout: Rollout, devices: Sequence[RolloutDevice]) -> Rollout:
        with self._db.session() as s:
            row = RolloutRow(
                rollout_id=rollout.rollout_id,
                ref=rollout.ref,
                model=rollout.model,
                version=rollout.version,
                selector=rollout.selector,
                policy=rollout.policy.to_dict(),
                state=rollout.state,
                reason=rollout.reason,
                stage=rollout.stage,
                stages=[st.to_dict() for st in rollout.stages],
                skipped=dict(rollout.skipped),
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError:
                raise AlreadyExists(f"rollout {rollout.rollout_id!r} exists") from None
            table: sa.Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
            if devices:
                s.execute(
                    sa.insert(table),
                    [
                        {
                            "rollout_id": rollout.rollout_id,
                            "device_id": d.device_id,
                            "stage": d.stage,
                            "variant": d.variant,
                            "sha256": d.sha256,
                            "previous": _served_json(d.previous),
                            "phase": d.phase,
                            "action": d.action,
                            "generation": d.generation,
                            "state": str(d.state) if d.state else "",
                            "reason": d.reason,
                            "detail": d.detail,
                            "last_seen": _dt(d.last_seen),
                            "shadow": dict(d.shadow),
                        }
                        for d in devices
                    ],
                )
            s.commit()
            return _rollout(row)

    def get(self, rollout_id: str) -> Rollout:
        with self._db.session() as s:
            return _rollout(self._row(s, rollout_id))

    def find(self, *, active_only: bool = False, limit: int = 100) -> list[Rollout]:
        with self._db.session() as s:
            q = select(RolloutRow).order_by(col(RolloutRow.id).desc()).limit(limit)
            if active_only:
                q = q.where(col(RolloutRow.state).not_in(sorted(FINAL)))
            return [_rollout(r) for r in s.exec(q).all()]

    def devices(
        self, rollout_id: str, *, stages: Iterable[int] | None = None
    ) -> list[RolloutDevice]:
        with self._db.session() as s:
            q = (
                select(RolloutDeviceRow)
                .where(RolloutDeviceRow.rollout_id == rollout_id)
                .order_by(col(RolloutDeviceRow.stage), col(RolloutDeviceRow.device_id))
            )
            if stages is not None:
                q = q.where(col(RolloutDeviceRow.stage).in_(list(stages)))
            return [_device(r) for r in s.exec(q).all()]

    # -- change ----------------------------------------------------------------------

    def save(self, rollout: Rollout, *, expect_state: RolloutState | None = None) -> Rollout:
        """Store state, reason, stage index and stages. A state change must be a legal move
        from the state in the database (`Conflict` otherwise); `expect_state` also
        refuses the write when someone else changed the state meanwhile."""
        with self._db.session() as s:
            self._fenced(s)
            row = self._row(s, rollout.rollout_id)
            if expect_state is not None and row.state != expect_state:
                raise Conflict(
                    f"rollout {rollout.rollout_id} is {row.state} now, not {expect_state}"
                )
            if self.optimistic and rollout.updated_at and _ts(row.updated_at) != rollout.updated_at:
                raise Conflict(
                    f"rollout {rollout.rollout_id} changed meanwhile (now {row.state}): "
                    "read it again and retry"
                )
            if rollout.state != row.state:
                check_transition(rollout.rollout_id, RolloutState(row.state), rollout.state)
            row.state = rollout.state
            row.reason = rollout.reason
            row.stage = rollout.stage
            row.stages = [st.to_dict() for st in rollout.stages]
            row.updated_at = _now()
            if rollout.state in FINAL and row.finished_at is None:
                row.finished_at = _dt(rollout.finished_at) or row.updated_at
            s.add(row)
            s.commit()
            return _rollout(row)

    def close_device(self, device_id: str, *, reason: str, detail: str) -> list[str]:
        """Close the device's open states (pending or shadowing) in rollouts that are not
        final: phase skipped with `reason`. Returns the rollouts touched."""
        with self._db.session() as s:
            open_ids = [
                r.rollout_id
                for r in s.exec(select(RolloutRow).where(col(RolloutRow.state).not_in(FINAL)))
            ]
            rows = s.exec(
                select(RolloutDeviceRow)
                .where(RolloutDeviceRow.device_id == device_id)
                .where(col(RolloutDeviceRow.rollout_id).in_(open_ids))
                .where(col(RolloutDeviceRow.phase).in_([DevicePhase.PENDING, DevicePhase.SHADOW]))
            ).all()
            for row in rows:
                row.phase = DevicePhase.SKIPPED
                row.reason = reason[:64]
                row.detail = detail
                s.add(row)
            s.commit()
            return sorted({r.rollout_id for r in rows})

    def update_devices(self, rollout_id: str, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """Per device id, new values for some of `DEVICE_FIELDS` (one statement per field set)."""
        if not changes:
            return
        table: sa.Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for device_id, values in changes.items():
            bad = set(values) - set(DEVICE_FIELDS)
            if bad:
                raise ValueError(f"rollout device fields {sorted(bad)} cannot be updated")
            row = {f"v_{k}": _column(k, v) for k, v in values.items()}
            row["b_id"] = device_id
            groups.setdefault(tuple(sorted(values)), []).append(row)
        with self._db.session() as s:
            self._fenced(s)
            for keys, rows in groups.items():
                s.execute(
                    sa.update(table)
                    .where(table.c.rollout_id == rollout_id)
                    .where(table.c.device_id == sa.bindparam("b_id"))
                    .values({k: sa.bindparam(f"v_{k}") for k in keys}),
                    rows,
                )
            s.commit()

    def issue(
        self,
        rollout_id: str,
        device_ids: Sequence[str],
        action: str,
        sign: Sign,
        *,
        phase: DevicePhase,
    ) -> dict[str, tuple[int, bytes]]:
        """Give these devices a desired state for `action`, once: {device: (generation, signed)}.

        Devices whose rollout row already records `action` keep their generation and
        the desired state stored on their device row (nothing new is signed for them).
        """
        table: sa.Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
        dev_table: sa.Table = DeviceRow.__table__  # type: ignore[attr-defined]
        with self._db.session() as s:
            self._fenced(s)
            rows = s.execute(
                sa.select(table.c.device_id, table.c.action, table.c.generation).where(
                    table.c.rollout_id == rollout_id,
                    table.c.device_id.in_(list(device_ids)),
                )
            ).all()
            known = {str(r[0]): (str(r[1]), int(r[2])) for r in rows}
            missing = [d for d in device_ids if d not in known]
            if missing:
                raise NotFound(f"device {missing[0]!r} is not part of rollout {rollout_id}")
            done = [d for d in device_ids if known[d][0] == action and known[d][1] > 0]
            todo = [d for d in device_ids if d not in set(done)]
            out: dict[str, tuple[int, bytes]] = {}
            if done:
                stored = s.execute(
                    sa.select(dev_table.c.device_id, dev_table.c.desired).where(
                        dev_table.c.device_id.in_(done)
                    )
                ).all()
                for dev, desired in stored:
                    out[str(dev)] = (known[str(dev)][1], bytes(desired or b""))
            fresh = issue_desired(s, todo, sign, rollout_id=rollout_id) if todo else {}
            if fresh:
                s.execute(
                    sa.update(table)
                    .where(table.c.rollout_id == rollout_id)
                    .where(table.c.device_id == sa.bindparam("b_id"))
                    .values(
                        action=action,
                        generation=sa.bindparam("b_gen"),
                        phase=phase,
                        state="",
                        reason="",
                        detail="",
                    ),
                    [{"b_id": d, "b_gen": g} for d, (g, _p) in fresh.items()],
                )
            s.commit()
            out.update(fresh)
            return out
