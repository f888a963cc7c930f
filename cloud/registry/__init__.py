"""The model registry: models, immutable versions, variants, stages, lineage."""

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


def open_registry(url: str) -> RegistryStore:
    from edgefleet.cloud.registry.sql import SqlRegistryStore

    return SqlRegistryStore(url)


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
