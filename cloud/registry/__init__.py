"""The model registry: models, immutable versions, variants, stages, lineage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.cloud.registry.entities import (
    STAGES,
    Lineage,
    ModelRef,
    ModelSummary,
    ModelVersion,
    NewVariant,
    NewVersion,
    Variant,
)
from edgefleet.cloud.registry.store import RegistryStore

if TYPE_CHECKING:
    from edgefleet.cloud.db import Database


def open_registry(db: Database | str) -> RegistryStore:
    """The registry in `db` (the shared `Database`, or a URL: then it owns its own)."""
    from edgefleet.cloud.registry.sql import SqlRegistryStore

    return SqlRegistryStore(db)


__all__ = [
    "STAGES",
    "Lineage",
    "ModelRef",
    "ModelSummary",
    "ModelVersion",
    "NewVariant",
    "NewVersion",
    "RegistryStore",
    "Variant",
    "open_registry",
]
