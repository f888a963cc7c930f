"""DeltaStore: which deltas exist between artifacts, in the coordinator's database.

One row per (base sha256, target sha256) pair the fleet needed: the delta's format, its
own sha256 and size (its bytes are a blob in the artifact store, beside the versions'),
or format ``none`` when no delta was worth sending (not built again)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel, col, select

from edgefleet.cloud.db import DatabaseUser
from edgefleet.cloud.registry.tables import UtcDateTime

NONE = "none"


def _now() -> datetime:
    return datetime.now(UTC)


class DeltaRow(SQLModel, table=True):
    __tablename__ = "model_deltas"

    base_sha256: str = Field(primary_key=True, max_length=64)
    target_sha256: str = Field(primary_key=True, max_length=64, index=True)
    format: str = Field(max_length=16)  # tensor | bsdiff4 | zstd | none
    sha256: str = Field(default="", max_length=64)
    size: int = Field(default=0, sa_type=sa.BigInteger)
    target_size: int = Field(default=0, sa_type=sa.BigInteger)
    build_ms: int = 0
    created_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)


@dataclass(frozen=True)
class DeltaRecord:
    base_sha256: str
    target_sha256: str
    format: str
    sha256: str
    size: int
    target_size: int
    build_ms: int = 0

    @property
    def usable(self) -> bool:
        return self.format != NONE

    @property
    def ratio(self) -> float:
        return self.size / max(1, self.target_size)


def _record(r: DeltaRow) -> DeltaRecord:
    return DeltaRecord(
        r.base_sha256, r.target_sha256, r.format, r.sha256, r.size, r.target_size, r.build_ms
    )


class DeltaStore(DatabaseUser):
    """Constraints: at most one record per (base, target); `put` replaces it."""

    def get(self, base_sha256: str, target_sha256: str) -> DeltaRecord | None:
        with self._db.session() as s:
            row = s.get(DeltaRow, (base_sha256, target_sha256))
            return _record(row) if row is not None else None

    def put(self, rec: DeltaRecord) -> None:
        with self._db.session() as s:
            row = s.get(DeltaRow, (rec.base_sha256, rec.target_sha256))
            if row is None:
                row = DeltaRow(
                    base_sha256=rec.base_sha256, target_sha256=rec.target_sha256, format=rec.format
                )
            row.format, row.sha256, row.size = rec.format, rec.sha256, rec.size
            row.target_size, row.build_ms = rec.target_size, rec.build_ms
            s.add(row)
            s.commit()

    def forget(self, base_sha256: str, target_sha256: str) -> None:
        with self._db.session() as s:
            row = s.get(DeltaRow, (base_sha256, target_sha256))
            if row is not None:
                s.delete(row)
                s.commit()

    def for_targets(self, target_sha256s: Sequence[str]) -> list[DeltaRecord]:
        """Every record whose target is one of these artifacts."""
        if not target_sha256s:
            return []
        with self._db.session() as s:
            rows = s.exec(
                select(DeltaRow)
                .where(col(DeltaRow.target_sha256).in_(list(target_sha256s)))
                .order_by(col(DeltaRow.target_sha256), col(DeltaRow.size))
            ).all()
            return [_record(r) for r in rows]
