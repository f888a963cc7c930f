"""FleetClient: what the `fleet` CLI talks to.

`LocalClient` runs everything in this process against the stores named in the
settings. A gRPC client for a remote coordinator implements the same protocol,
so every command works the same in both modes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from cloud.config import CloudSettings, write_config
from cloud.registry import ModelRef, ModelSummary, ModelVersion, RegistryStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitResult:
    home: Path
    created_key: bool
    key_id: str
    registry: str
    artifacts: str
    config: Path


class FleetClient(Protocol):
    def list_models(self) -> list[ModelSummary]: ...
    def list_versions(self, model: str) -> list[ModelVersion]: ...
    def get_version(self, ref: ModelRef) -> ModelVersion: ...
    def train(
        self,
        name: str,
        data: str,
        *,
        arch: str,
        epochs: int,
        seed: int,
        batch_size: int,
        lr: float,
        on_epoch: Callable[[Any], None] | None,
    ) -> ModelVersion: ...
    def quantize(
        self,
        ref: ModelRef,
        variants: Sequence[str],
        *,
        max_drop: float,
        force: bool,
        progress: Callable[[str, int, int], None],
    ) -> ModelVersion: ...
    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion: ...
    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]: ...
    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[Any]]: ...
    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]: ...
    def close(self) -> None: ...


class LocalClient:
    """All of it in-process: SQL registry, artifact store, pipeline, signing key."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings

    @cached_property
    def registry(self) -> RegistryStore:
        from cloud.registry import open_registry

        self._require_init()
        return open_registry(self.settings.registry_url)

    @cached_property
    def pipeline(self) -> Any:
        from cloud.artifacts import open_artifact_store
        from cloud.pipeline import Pipeline
        from cloud.signing import load_private_key

        store = open_artifact_store(
            self.settings.artifacts, s3_endpoint_url=self.settings.s3_endpoint_url
        )
        return Pipeline(
            self.registry, store, lambda: load_private_key(self.settings.signing_key_path)
        )

    def _require_init(self) -> None:
        from protos.errors import NotFound

        if not self.settings.signing_key_path.exists():
            raise NotFound(
                f"{self.settings.home_dir} is not initialised (no signing key): run 'fleet init' first"
            )

    def init(self) -> InitResult:
        from cloud.artifacts import open_artifact_store
        from cloud.registry import open_registry
        from cloud.signing import create_keypair, load_public
        from protos.errors import Unavailable
        from protos.manifest import key_id

        s = self.settings
        try:
            s.home_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"cannot create FLEET_HOME {s.home_dir}: {e.strerror}") from None
        # check the stores before writing anything: a bad URL leaves nothing behind
        open_registry(s.registry_url).close()
        store = open_artifact_store(s.artifacts, s3_endpoint_url=s.s3_endpoint_url)
        store.check()
        created = create_keypair(s.signing_key_path, s.public_key_path)
        cfg = write_config(s)
        return InitResult(
            home=s.home_dir,
            created_key=created,
            key_id=key_id(load_public(s.public_key_path)),
            registry=_redact(s.registry_url),
            artifacts=s.artifacts,
            config=cfg,
        )

    def list_models(self) -> list[ModelSummary]:
        return self.registry.list_models()

    def list_versions(self, model: str) -> list[ModelVersion]:
        return self.registry.list_versions(model)

    def get_version(self, ref: ModelRef) -> ModelVersion:
        return self.registry.get_version(ref)

    def train(self, name: str, data: str, **kw: Any) -> ModelVersion:
        return self.pipeline.train(name, data, **kw)  # type: ignore[no-any-return]

    def quantize(self, ref: ModelRef, variants: Sequence[str], **kw: Any) -> ModelVersion:
        return self.pipeline.quantize(ref, variants, **kw)  # type: ignore[no-any-return]

    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion:
        return self.pipeline.import_model(path, name, eval_data=eval_data)  # type: ignore[no-any-return]

    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]:
        mv = self.registry.get_version(ref)
        return self.registry.set_stage(
            mv.model, mv.version, stage, archive_existing=archive_existing
        )

    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[Any]]:
        from cloud.signing import load_public

        return self.pipeline.verify(ref, load_public(self.settings.public_key_path))  # type: ignore[no-any-return]

    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]:
        return self.pipeline.export(ref, out, variants=variants)  # type: ignore[no-any-return]

    def close(self) -> None:
        if "registry" in self.__dict__:
            self.registry.close()


def _redact(url: str) -> str:
    from cloud.db import normalize_url

    return normalize_url(url).render_as_string(hide_password=True)
