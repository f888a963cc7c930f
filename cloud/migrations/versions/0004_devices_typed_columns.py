"""devices: capabilities, served model and reported state in typed columns (were JSON)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

The JSON columns ``capabilities``, ``active`` and ``reported`` become one column per
field (`cloud.devices.values`); every row's JSON is read and written into them, then
the JSON columns are dropped. Release 0.1.0 wrote enum names with their protobuf
prefix (``UPDATE_STATE_ACTIVE``); they are stored as the enum's value (``active``).
A value this release does not know becomes ``unspecified`` (state, reason) or ``cpu``
(accelerator). The downgrade writes the JSON back from the columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATES = frozenset(
    [
        "unspecified",
        "idle",
        "downloading",
        "verifying",
        "loading",
        "self_test",
        "active",
        "failed",
        "rolled_back",
        "shadowing",
    ]
)
_ACCELERATORS = frozenset({"cpu", "gpu", "npu"})


def _columns() -> list[sa.Column[Any]]:
    def s(name: str, n: int) -> sa.Column[Any]:
        return sa.Column(name, sa.String(length=n), nullable=False, server_default="")

    def big(name: str) -> sa.Column[Any]:
        return sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")

    def names(name: str) -> sa.Column[Any]:
        return sa.Column(name, sa.JSON(), nullable=False, server_default="[]")

    return [
        s("machine", 128),
        names("runtimes"),
        names("providers"),
        s("accelerator", 8),
        big("memory_mb"),
        sa.Column("tflite_runtime_legacy", sa.Boolean(), nullable=False, server_default=sa.false()),
        names("features"),
        s("active_model", 128),
        big("active_version"),
        s("active_variant", 128),
        s("active_sha256", 64),
        s("update_state", 16),
        s("update_reason", 32),
        big("reported_generation"),
        sa.Column("detail", sa.Text(), nullable=False, server_default=""),
        s("lkg_model", 128),
        big("lkg_version"),
        s("lkg_variant", 128),
        s("lkg_sha256", 64),
        big("chunks_have"),
        big("chunks_total"),
        s("provider", 128),
        big("reported_ms"),
    ]


def _load(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        value = json.loads(value or "{}")
    return dict(value) if isinstance(value, Mapping) else {}


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _enum_value(value: Any, prefix: str) -> str:
    """``UPDATE_STATE_ACTIVE`` (0.1.0) or ``active`` -> ``active``."""
    text = str(value or "unspecified").lower()
    return text[len(prefix) :] if text.startswith(prefix) else text


def _names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else []


def _ref(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if not d or not d.get("model"):
        return {}
    return {
        f"{prefix}_model": str(d["model"])[:128],
        f"{prefix}_version": _int(d.get("version")),
        f"{prefix}_variant": str(d.get("variant", ""))[:128],
        f"{prefix}_sha256": str(d.get("sha256", ""))[:64],
    }


def typed(
    caps: Mapping[str, Any], active: Mapping[str, Any], rep: Mapping[str, Any]
) -> dict[str, Any]:
    """The new columns' values for one row's 0.1.0 JSON (only those not at their default)."""
    out: dict[str, Any] = {}
    if caps:
        accel = str(caps.get("accelerator", "cpu"))
        out.update(
            machine=str(caps.get("machine", ""))[:128],
            runtimes=_names(caps.get("runtimes")),
            providers=_names(caps.get("providers")),
            accelerator=accel if accel in _ACCELERATORS else "cpu",
            memory_mb=_int(caps.get("memory_mb")),
            tflite_runtime_legacy=bool(caps.get("tflite_runtime_legacy", False)),
            features=_names(caps.get("features")),
        )
    out.update(_ref(active, "active"))
    if rep:
        state = _enum_value(rep.get("state"), "update_state_")
        out.update(
            update_state=state if state in _STATES else "unspecified",
            update_reason=_enum_value(rep.get("reason"), "reason_code_")[:32],
            reported_generation=_int(rep.get("generation")),
            detail=str(rep.get("detail", "")),
            chunks_have=_int(rep.get("chunks_have")),
            chunks_total=_int(rep.get("chunks_total")),
            provider=str(rep.get("provider", ""))[:128],
            reported_ms=_int(rep.get("timestamp_ms")),
        )
        out.update(_ref(rep.get("active") or {}, "active"))
        out.update(_ref(rep.get("last_known_good") or {}, "lkg"))
    return out


def _devices() -> sa.TableClause:
    """The devices table as the data migration sees it: the JSON and the typed columns."""
    return sa.table(
        "devices",
        sa.column("id", sa.Integer()),
        sa.column("capabilities", sa.JSON()),
        sa.column("active", sa.JSON()),
        sa.column("reported", sa.JSON()),
        *(sa.column(c.name, c.type) for c in _columns()),
    )


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        for c in _columns():
            batch_op.add_column(c)
    conn = op.get_bind()
    devices = _devices()
    rows = conn.execute(
        sa.select(devices.c.id, devices.c.capabilities, devices.c.active, devices.c.reported)
    ).all()
    for row_id, caps, active, rep in rows:
        values = typed(_load(caps), _load(active), _load(rep))
        if values:
            conn.execute(sa.update(devices).where(devices.c.id == row_id).values(**values))
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("capabilities")
        batch_op.drop_column("active")
        batch_op.drop_column("reported")


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        for name in ("capabilities", "active", "reported"):
            batch_op.add_column(
                sa.Column(name, sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
            )
    conn = op.get_bind()
    devices = _devices()
    for r in conn.execute(sa.select(devices)).mappings().all():
        caps: dict[str, Any] = {}
        if r["accelerator"]:
            caps = {
                k: r[k]
                for k in (
                    "machine",
                    "runtimes",
                    "providers",
                    "accelerator",
                    "memory_mb",
                    "tflite_runtime_legacy",
                    "features",
                )
            }
        active: dict[str, Any] = {}
        if r["active_model"]:
            active = {k: r[f"active_{k}"] for k in ("model", "version", "variant", "sha256")}
        rep: dict[str, Any] = {}
        if r["update_state"]:
            rep = {
                "generation": r["reported_generation"],
                "state": r["update_state"],
                "reason": r["update_reason"],
            }
            for k, c in (("detail", "detail"), ("provider", "provider")):
                if r[c]:
                    rep[k] = r[c]
            for k, c in (
                ("chunks_have", "chunks_have"),
                ("chunks_total", "chunks_total"),
                ("timestamp_ms", "reported_ms"),
            ):
                if r[c]:
                    rep[k] = r[c]
            if active:
                rep["active"] = active
            if r["lkg_model"]:
                rep["last_known_good"] = {
                    k: r[f"lkg_{k}"] for k in ("model", "version", "variant", "sha256")
                }
        conn.execute(
            sa.update(devices)
            .where(devices.c.id == r["id"])
            .values(capabilities=caps, active=active, reported=rep)
        )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        for col in _columns():
            batch_op.drop_column(col.name)
