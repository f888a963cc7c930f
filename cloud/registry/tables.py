"""SQLModel tables. Private to cloud.registry: rows never leave the store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite drops the zone on the way back)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None


class ModelRow(SQLModel, table=True):
    __tablename__ = "models"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=63)
    created_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)


class VersionRow(SQLModel, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (sa.UniqueConstraint("model_id", "version", name="uq_model_version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="models.id", index=True)
    version: int
    stage: str = Field(default="none", max_length=16)
    arch: str = Field(max_length=64)
    spec: dict[str, Any] = Field(sa_type=sa.JSON)  # inputs, outputs, classes
    metrics: dict[str, Any] = Field(sa_type=sa.JSON)
    lineage: dict[str, Any] = Field(sa_type=sa.JSON)
    checkpoint_sha256: str | None = Field(default=None, max_length=64)
    evalset_sha256: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)


class VariantRow(SQLModel, table=True):
    __tablename__ = "variants"
    __table_args__ = (sa.UniqueConstraint("version_id", "name", name="uq_version_variant"),)

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="model_versions.id", index=True)
    name: str = Field(max_length=32)
    runtime: str = Field(max_length=32)
    sha256: str = Field(max_length=64, index=True)
    size: int = Field(sa_type=sa.BigInteger)
    accuracy: float | None = None
    latency_ms: dict[str, Any] = Field(sa_type=sa.JSON)
    quantization: dict[str, Any] = Field(sa_type=sa.JSON)
    deployable: bool
    reason: str = ""
    signed_manifest: bytes = Field(sa_type=sa.LargeBinary)
    created_at: datetime = Field(default_factory=_now, sa_type=UtcDateTime)
