"""RegistryStore: the registry's interface. One SQL implementation; swap databases by URL."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from edgefleet.cloud.registry.entities import (
    ModelRef,
    ModelSummary,
    ModelVersion,
    NewVariant,
    NewVersion,
)


class RegistryStore(ABC):
    @abstractmethod
    def create_version(
        self,
        model: str,
        new: NewVersion,
        variants: Callable[[int], Sequence[NewVariant]] | None = None,
    ) -> ModelVersion:
        """Register the next version of `model` (created on first use) with its variants.

        `variants` is called with the allocated version number (manifests name it)
        inside the transaction. Constraints: versions are numbered 1, 2, … per
        model; concurrent callers get distinct numbers; the version and its
        variants appear atomically or not at all. Versions are immutable
        afterwards, except stage and variants.
        """

    @abstractmethod
    def add_variants(
        self, model: str, version: int, variants: Sequence[NewVariant], *, replace: bool = False
    ) -> ModelVersion:
        """Attach variants, all or none. An existing name raises `AlreadyExists`
        unless `replace`."""

    @abstractmethod
    def get_version(self, ref: ModelRef) -> ModelVersion:
        """Resolve NAME, NAME:N or NAME@stage. Unknown: `NotFound` naming what exists."""

    @abstractmethod
    def list_models(self) -> list[ModelSummary]: ...

    @abstractmethod
    def list_versions(self, model: str) -> list[ModelVersion]:
        """Versions of `model`, oldest first; `NotFound` for an unknown model."""

    @abstractmethod
    def set_stage(
        self, model: str, version: int, stage: str, *, archive_existing: bool = True
    ) -> tuple[ModelVersion, list[int]]:
        """Move a version to `stage`. With `archive_existing`, other versions in
        that stage (staging/production) move to archived; returns their numbers."""

    @abstractmethod
    def close(self) -> None: ...
