"""Local data for simulated devices: non-IID partitions of a real dataset, as `.npz` shards.

Real fleets never see IID data: a camera in one shop sees mostly some classes. The
standard way to simulate that is Dirichlet label skew (Hsu et al., 2019): for each
class, the share of its samples that goes to each device is drawn from
Dir(alpha). Small alpha (0.1) gives devices that hold one or two classes; large
alpha (100) approaches an even, IID split.

A device's shards live in its data directory as ``shard-0000.npz`` … with arrays
``X`` (float32) and ``y`` (int64), the format `models.data.load_dataset` reads, so
federated learning on the device side can read them with `read_shards`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgefleet.models.fl.shards import SHARD_GLOB, read_shards
from edgefleet.protos.errors import InvalidArgument

logger = logging.getLogger(__name__)


def partition(
    x: np.ndarray, y: np.ndarray, n_devices: int, *, alpha: float = 0.5, seed: int
) -> list[np.ndarray]:
    """Split sample indices over `n_devices` with Dirichlet(alpha) label skew.

    Returns one sorted int64 index array per device. Every sample goes to exactly
    one device and every device gets at least one sample (when a draw leaves a
    device empty, it takes one sample from the device holding the most).
    Reproducible from `seed`.
    """
    if len(x) != len(y):
        raise InvalidArgument(f"partition: X has {len(x)} rows but y has {len(y)} labels")
    if n_devices < 1:
        raise InvalidArgument(f"partition: {n_devices} devices; need at least 1")
    if n_devices > len(y):
        raise InvalidArgument(
            f"partition: {n_devices} devices but only {len(y)} samples; "
            "every device needs at least one"
        )
    if not alpha > 0:
        raise InvalidArgument(f"partition: alpha {alpha} must be > 0 (0.1 skewed … 100 even)")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_devices)]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for dev, chunk in enumerate(np.split(idx, cuts)):
            parts[dev].extend(int(i) for i in chunk)
    sizes = np.array([len(p) for p in parts])
    for empty in (int(e) for e in np.flatnonzero(sizes == 0)):
        donor = int(np.argmax(sizes))
        k = int(rng.integers(len(parts[donor])))
        parts[empty].append(parts[donor].pop(k))
        sizes[donor] -= 1
        sizes[empty] += 1
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each device's label mix and the global one.

    0 for a perfectly even split, close to 1 when each device holds one class.
    """
    classes = np.unique(y)
    overall = np.array([(y == c).mean() for c in classes])
    dists = []
    for idx in parts:
        local = y[idx]
        mix = np.array([(local == c).mean() for c in classes])
        dists.append(0.5 * float(np.abs(mix - overall).sum()))
    return float(np.mean(dists))


def write_shards(
    directory: Path, x: np.ndarray, y: np.ndarray, *, rows_per_shard: int = 256
) -> list[Path]:
    """Write `x`, `y` as ``shard-NNNN.npz`` files (arrays X, y) into `directory`.

    Replaces shards already there. Returns the paths written, in order.
    """
    if len(x) != len(y):
        raise InvalidArgument(f"write_shards: X has {len(x)} rows but y has {len(y)} labels")
    if rows_per_shard < 1:
        raise InvalidArgument(f"write_shards: rows_per_shard {rows_per_shard} must be >= 1")
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(SHARD_GLOB):
        old.unlink()
    paths = []
    for n, start in enumerate(range(0, len(x), rows_per_shard)):
        path = directory / f"shard-{n:04d}.npz"
        np.savez(
            path,
            X=np.asarray(x[start : start + rows_per_shard], dtype=np.float32),
            y=np.asarray(y[start : start + rows_per_shard], dtype=np.int64),
        )
        paths.append(path)
    return paths


def write_partitions(
    root: Path,
    device_ids: list[str],
    *,
    dataset: str = "digits",
    alpha: float = 0.5,
    seed: int = 0,
    subdir: str = "data",
) -> dict[str, Path]:
    """Partition `dataset` over the devices and write each one's shards to ``root/<id>/<subdir>``."""
    from edgefleet.models.data import load_dataset

    ds = load_dataset(dataset)
    parts = partition(ds.x, ds.y, len(device_ids), alpha=alpha, seed=seed)
    out: dict[str, Path] = {}
    for dev, idx in zip(device_ids, parts, strict=True):
        d = root / dev / subdir
        write_shards(d, ds.x[idx], ds.y[idx])
        out[dev] = d
    logger.info(
        "wrote %s partitions for %d devices (alpha %g, skew %.2f)",
        ds.name,
        len(device_ids),
        alpha,
        label_skew(ds.y, parts),
    )
    return out


__all__ = ["label_skew", "partition", "read_shards", "write_partitions", "write_shards"]
