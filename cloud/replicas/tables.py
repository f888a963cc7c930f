"""The two tables replicas share: who runs (`coordinator_replicas`) and who leads
(`coordinator_lease`, one row per lease name with its fencing token)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from edgefleet.cloud.registry.tables import UtcDateTime


class ReplicaRow(SQLModel, table=True):
    __tablename__ = "coordinator_replicas"

    replica_id: str = Field(primary_key=True, max_length=64)
    address: str = Field(default="", max_length=255)
    host: str = Field(default="", max_length=255)
    pid: int = 0
    started_at: datetime = Field(sa_type=UtcDateTime)
    heartbeat_at: datetime = Field(sa_type=UtcDateTime)


class LeaseRow(SQLModel, table=True):
    __tablename__ = "coordinator_lease"

    name: str = Field(primary_key=True, max_length=32)
    holder: str = Field(default="", max_length=64)
    #: grows by one at every change of holder: the fencing token leader writes check
    token: int = Field(default=0, sa_type=sa.BigInteger)
    acquired_at: datetime = Field(sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime)


__all__ = ["LeaseRow", "ReplicaRow"]
