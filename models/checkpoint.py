"""The trainable checkpoint, `weights.npz`: named float arrays plus the architecture.

numpy only, so an agent can read and write it without torch installed; federated
rounds start from it and end by writing one.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.protos.errors import InvalidArgument

_META = "__edgefleet_meta__"


@dataclass(frozen=True)
class ArchConfig:
    """What is needed to rebuild a module before loading weights into it."""

    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchConfig:
        return cls(
            arch=str(d["arch"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),
            num_classes=int(d["num_classes"]),
            options=dict(d.get("options", {})),
        )


@dataclass(frozen=True)
class Checkpoint:
    config: ArchConfig
    arrays: Mapping[str, np.ndarray]


def dump_checkpoint(ckpt: Checkpoint) -> bytes:
    buf = io.BytesIO()
    meta = np.array(json.dumps(ckpt.config.to_dict(), sort_keys=True))
    np.savez(buf, **{_META: meta}, **{k: np.asarray(v) for k, v in ckpt.arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def load_checkpoint(data: bytes) -> Checkpoint:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if _META not in z.files:
                raise InvalidArgument(
                    "checkpoint has no architecture record; expected a weights.npz written by edgefleet"
                )
            config = ArchConfig.from_dict(json.loads(str(z[_META])))
            arrays = {k: np.array(z[k]) for k in z.files if k != _META}
    except (ValueError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise InvalidArgument(
            f"checkpoint ({len(data)} bytes) is not a readable weights.npz: {e}"
        ) from e
    return Checkpoint(config, arrays)
