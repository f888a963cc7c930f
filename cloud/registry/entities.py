"""Registry values handed out by `RegistryStore`; the SQL rows never leave the store."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgefleet.protos.errors import InvalidArgument, NotFound
from edgefleet.protos.manifest import TensorSpec

STAGES = ("none", "staging", "production", "archived")
SOURCES = ("train", "import", "federated")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"model name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise InvalidArgument(f"stage {stage!r} unknown; accepted: {', '.join(STAGES)}")
    return stage


@dataclass(frozen=True)
class ModelRef:
    """`NAME`, `NAME:VERSION`, `NAME:latest` or `NAME@STAGE` as typed by an operator."""

    name: str
    version: int | None = None
    stage: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        text = text.strip()
        if "@" in text:
            name, _, stage = text.partition("@")
            return cls(check_model_name(name), stage=check_stage(stage))
        name, sep, ver = text.partition(":")
        check_model_name(name)
        if not sep or ver == "latest":
            return cls(name)
        if not ver.isdigit() or int(ver) < 1:
            raise InvalidArgument(
                f"model reference {text!r}: version {ver!r} is not a positive number; "
                "accepted: NAME, NAME:N, NAME:latest, NAME@stage"
            )
        return cls(name, int(ver))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.stage:
            return f"{self.name}@{self.stage}"
        return f"{self.name}:latest"


@dataclass(frozen=True)
class Lineage:
    source: str  # train | import | federated
    parent_version: int | None = None
    dataset_name: str = ""
    dataset_digest: str = ""
    training_config: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""
    federated: Mapping[str, Any] | None = None
    origin: Mapping[str, Any] = field(default_factory=dict)  # imports: file name, digest, format

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "parent_version": self.parent_version,
            "dataset_name": self.dataset_name,
            "dataset_digest": self.dataset_digest,
            "training_config": dict(self.training_config),
            "code_version": self.code_version,
            "federated": dict(self.federated) if self.federated is not None else None,
            "origin": dict(self.origin),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Lineage:
        return cls(
            source=d["source"],
            parent_version=d.get("parent_version"),
            dataset_name=d.get("dataset_name", ""),
            dataset_digest=d.get("dataset_digest", ""),
            training_config=d.get("training_config") or {},
            code_version=d.get("code_version", ""),
            federated=d.get("federated"),
            origin=d.get("origin") or {},
        )


@dataclass(frozen=True)
class NewVariant:
    name: str
    runtime: str
    sha256: str
    size: int
    accuracy: float | None
    latency_ms: Mapping[str, float]  # {"b1": p50 ms, "b64": p50 ms}
    quantization: Mapping[str, Any]
    deployable: bool
    reason: str
    signed_manifest: bytes


@dataclass(frozen=True)
class Variant(NewVariant):
    created_at: datetime = field(default_factory=datetime.now)


@dataclass(frozen=True)
class NewVersion:
    arch: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    classes: tuple[str, ...]
    metrics: Mapping[str, float]
    lineage: Lineage
    checkpoint_sha256: str | None  # weights.npz; None for imported models
    evalset_sha256: str | None  # holdout + calibration arrays


@dataclass(frozen=True)
class ModelVersion(NewVersion):
    model: str = ""
    version: int = 0
    stage: str = "none"
    created_at: datetime = field(default_factory=datetime.now)
    variants: tuple[Variant, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.version}"

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v

        have = ", ".join(v.name for v in self.variants) or "none"
        raise NotFound(f"{self.ref} has no variant {name!r}; variants: {have}")


@dataclass(frozen=True)
class ModelSummary:
    name: str
    created_at: datetime
    versions: int
    latest_version: int | None
    production_version: int | None
