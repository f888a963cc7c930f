"""A device's local data: ``shard-NNNN.npz`` files (arrays X float32, y class indices).

numpy only. The device's applications (or the simulator) write the shards; the
ClientApp reads them, keeps a fixed held-out share for its own evaluation and
trains on the rest. Labels are class indices of the model being trained
(0 … classes-1, in the order of the version's `classes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgefleet.protos.errors import InvalidArgument, NotFound

SHARD_GLOB = "shard-*.npz"
HOLDOUT = 0.2


def read_shards(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """All shards in `directory`, concatenated in name order."""
    paths = sorted(directory.glob(SHARD_GLOB))
    if not paths:
        raise NotFound(f"no {SHARD_GLOB} shards in {directory}")
    xs, ys = [], []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            xs.append(z["X"])
            ys.append(z["y"])
    return np.concatenate(xs), np.concatenate(ys)


def count_samples(directory: Path) -> int:
    """Rows in the shards of `directory` (0 when there are none)."""
    n = 0
    for p in sorted(directory.glob(SHARD_GLOB)):
        with np.load(p, allow_pickle=False) as z:
            n += int(z["y"].shape[0])
    return n


def local_split(n: int, *, seed: int, holdout: float = HOLDOUT) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices for `n` local samples; the same every round."""
    if n < 2:
        raise InvalidArgument(f"{n} local samples: at least 2 needed to hold one out")
    order = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(n * holdout)))
    return np.sort(order[k:]), np.sort(order[:k])


def data_dir_of(node_config: Mapping[str, object], run_config: Mapping[str, object]) -> Path:
    """The node's `data-dir`; in simulation DATA-ROOT/partition-NNNN for its partition."""
    if node_config.get("data-dir"):
        return Path(str(node_config["data-dir"]))
    root = str(run_config.get("data-root") or "")
    if root and "partition-id" in node_config:
        return Path(root) / partition_name(int(str(node_config["partition-id"])))
    raise InvalidArgument(
        "this SuperNode has no data-dir in its node config "
        "(flower-supernode --node-config 'data-dir=\"PATH\"')"
    )


def partition_name(index: int) -> str:
    return f"partition-{index:04d}"
