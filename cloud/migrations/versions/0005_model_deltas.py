"""model_deltas: deltas between artifacts (cloud/deltas), one row per (base, target)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_deltas",
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("target_sha256", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("target_size", sa.BigInteger(), nullable=False),
        sa.Column("build_ms", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("base_sha256", "target_sha256"),
    )
    with op.batch_alter_table("model_deltas", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_deltas_target_sha256"), ["target_sha256"], unique=False
        )


def downgrade() -> None:
    op.drop_table("model_deltas")
