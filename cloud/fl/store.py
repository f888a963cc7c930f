"""FlStore: devices enrolled for federated learning and federated runs, in the registry DB.

A run's row is written when it is accepted and updated as it goes: status,
participants, one entry per round, then the version it registered (or why it
failed). `fleet fl ls|show` read it; a restarted coordinator marks runs it
was driving as failed (their ServerApp died with the old SuperLink).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, col, select

from edgefleet.cloud.db import DatabaseUser
from edgefleet.cloud.registry.tables import UtcDateTime
from edgefleet.protos.errors import AlreadyExists, NotFound

RUN_STATES = ("pending", "running", "registering", "deploying", "succeeded", "failed")
FINAL_RUN_STATES = ("succeeded", "failed")


def _now() -> datetime:
    return datetime.now(UTC)


class FlNodeRow(SQLModel, table=True):
    __tablename__ = "fl_nodes"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, unique=True, max_length=64)
    public_key: str
    node_id: str = Field(default="", max_length=20)  # Flower's uint64, as text
    enrolled_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)


class FlRunRow(SQLModel, table=True):
    __tablename__ = "fl_runs"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True, unique=True, max_length=32)
    model: str = Field(max_length=63)
    parent_version: int
    strategy: str = Field(max_length=32)
    rounds: int
    config: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    status: str = Field(default="pending", max_length=16)
    reason: str = ""
    participants: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    skipped: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    history: list[dict[str, Any]] = Field(default_factory=list, sa_type=sa.JSON)
    flower_run_id: str = Field(default="", max_length=20)  # uint64, as text
    result_version: int | None = None
    deploy: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    created_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


@dataclass(frozen=True)
class FlNode:
    device_id: str
    public_key: str
    node_id: int | None
    enrolled_at: datetime


@dataclass(frozen=True)
class FlRun:
    run_id: str
    model: str
    parent_version: int
    strategy: str
    rounds: int
    config: Mapping[str, Any]
    status: str
    reason: str = ""
    participants: tuple[str, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)
    history: tuple[Mapping[str, Any], ...] = ()
    flower_run_id: int | None = None
    result_version: int | None = None
    deploy: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=_now)
    finished_at: datetime | None = None

    @property
    def parent(self) -> str:
        return f"{self.model}:{self.parent_version}"

    @property
    def result(self) -> str:
        return f"{self.model}:{self.result_version}" if self.result_version else ""

    @property
    def final(self) -> bool:
        return self.status in FINAL_RUN_STATES


def _node(r: FlNodeRow) -> FlNode:
    return FlNode(r.device_id, r.public_key, int(r.node_id) if r.node_id else None, r.enrolled_at)


def _run(r: FlRunRow) -> FlRun:
    return FlRun(
        run_id=r.run_id,
        model=r.model,
        parent_version=r.parent_version,
        strategy=r.strategy,
        rounds=r.rounds,
        config=dict(r.config),
        status=r.status,
        reason=r.reason,
        participants=tuple(r.participants),
        skipped=dict(r.skipped),
        history=tuple(r.history),
        flower_run_id=int(r.flower_run_id) if r.flower_run_id else None,
        result_version=r.result_version,
        deploy=dict(r.deploy),
        created_at=r.created_at,
        finished_at=r.finished_at,
    )


class FlStore(DatabaseUser):
    what = "federated-learning database"

    def _session(self) -> AbstractContextManager[Session]:
        return self._db.session()

    # -- nodes
    def add_node(self, device_id: str, public_key: str) -> FlNode:
        with self._session() as s:
            row = FlNodeRow(device_id=device_id, public_key=public_key)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise AlreadyExists(
                    f"device {device_id!r} is already enrolled for federated learning"
                ) from None
            return _node(row)

    def set_node_id(self, device_id: str, node_id: int) -> None:
        with self._session() as s:
            s.execute(
                sa.update(FlNodeRow)
                .where(col(FlNodeRow.device_id) == device_id)
                .values(node_id=str(node_id))
            )
            s.commit()

    def nodes(self, device_ids: Sequence[str] | None = None) -> list[FlNode]:
        with self._session() as s:
            q = select(FlNodeRow).order_by(col(FlNodeRow.device_id))
            if device_ids is not None:
                q = q.where(col(FlNodeRow.device_id).in_(list(device_ids)))
            return [_node(r) for r in s.exec(q).all()]

    # -- runs
    def create_run(self, run: FlRun) -> FlRun:
        with self._session() as s:
            row = FlRunRow(
                run_id=run.run_id,
                model=run.model,
                parent_version=run.parent_version,
                strategy=run.strategy,
                rounds=run.rounds,
                config=dict(run.config),
                status=run.status,
                participants=list(run.participants),
                skipped=dict(run.skipped),
            )
            s.add(row)
            s.commit()
            return _run(row)

    def _run_row(self, s: Session, run_id: str) -> FlRunRow:
        row = s.exec(select(FlRunRow).where(FlRunRow.run_id == run_id)).first()
        if row is None:
            raise NotFound(f"federated run {run_id!r} not found (fleet fl ls lists runs)")
        return row

    def get_run(self, run_id: str) -> FlRun:
        with self._session() as s:
            return _run(self._run_row(s, run_id))

    def list_runs(self, *, model: str | None = None, limit: int = 50) -> list[FlRun]:
        with self._session() as s:
            q = select(FlRunRow).order_by(col(FlRunRow.id).desc()).limit(limit)
            if model:
                q = q.where(FlRunRow.model == model)
            return [_run(r) for r in s.exec(q).all()]

    def update_run(self, run_id: str, **values: Any) -> FlRun:
        """Set fields of a run; `history_append` adds one round entry."""
        with self._session() as s:
            row = self._run_row(s, run_id)
            extra = values.pop("history_append", None)
            for k, v in values.items():
                setattr(row, k, v)
            if extra is not None:
                row.history = [*row.history, dict(extra)]
            if row.status in FINAL_RUN_STATES and row.finished_at is None:
                row.finished_at = _now()
            s.add(row)
            s.commit()
            return _run(row)

    def fail_unfinished(self, reason: str) -> list[str]:
        """Mark every run not in a final state failed (coordinator restart); their ids."""
        with self._session() as s:
            rows = s.exec(
                select(FlRunRow).where(col(FlRunRow.status).not_in(list(FINAL_RUN_STATES)))
            ).all()
            for r in rows:
                r.status, r.reason, r.finished_at = "failed", reason, _now()
                s.add(r)
            s.commit()
            return [r.run_id for r in rows]
