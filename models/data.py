"""Datasets: the digits set scikit-learn ships, or a user's own `.npz` / CSV."""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.protos.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

BUILTIN = ("digits",)
MIN_SAMPLES = 10


@dataclass(frozen=True)
class Dataset:
    """Features `x` (float32, one row per sample) and class indices `y` (int64)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(str(self.x.shape).encode())
        h.update(np.ascontiguousarray(self.x).tobytes())
        h.update(np.ascontiguousarray(self.y).tobytes())
        h.update("\x00".join(self.classes).encode())
        return h.hexdigest()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: np.ndarray, name: str | None = None) -> Dataset:
        return Dataset(name or self.name, self.x[idx], self.y[idx], self.classes)


def load_dataset(source: str) -> Dataset:
    """`digits`, or a path to `.npz` (arrays X and y) or `.csv` (label in the last column)."""
    if source in BUILTIN:
        return _digits()
    path = Path(source).expanduser()
    if not path.exists():
        raise NotFound(
            f"dataset {source!r}: no such file; give a built-in name ({', '.join(BUILTIN)}) "
            "or a path to a .npz (X, y) or .csv file"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x, y = _read_npz(path)
    elif suffix == ".csv":
        x, y = _read_csv(path)
    else:
        raise InvalidArgument(
            f"dataset {source!r}: format {suffix or '(no extension)'!r} not supported; "
            "accepted: .npz with arrays X and y, .csv with the label in the last column"
        )
    return from_arrays(path.name, x, y)


def from_arrays(name: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    """Validate raw arrays and map labels to contiguous class indices."""
    if x.ndim < 2:
        raise InvalidArgument(
            f"dataset {name!r}: X has shape {x.shape}; expected (samples, features...) with 2+ dims"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise InvalidArgument(
            f"dataset {name!r}: y has shape {y.shape}; expected ({len(x)},), one label per row of X"
        )
    if len(x) < MIN_SAMPLES:
        raise InvalidArgument(f"dataset {name!r}: {len(x)} samples; at least {MIN_SAMPLES} needed")
    if not np.issubdtype(x.dtype, np.number):
        raise InvalidArgument(f"dataset {name!r}: X has dtype {x.dtype}; expected numbers")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidArgument(f"dataset {name!r}: X holds NaN or infinite values")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise InvalidArgument(
                f"dataset {name!r}: y holds non-integer values such as {y[np.mod(y, 1) != 0][0]!r}; "
                "expected class labels"
            )
        y = y.astype(np.int64)
    values, indices = np.unique(y, return_inverse=True)
    if len(values) < 2:
        raise InvalidArgument(f"dataset {name!r}: y has {len(values)} class; at least 2 needed")
    return Dataset(name, x, indices.astype(np.int64), tuple(str(v) for v in values))


def split(ds: Dataset, *, holdout: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified train/holdout split, reproducible from the seed."""
    if not 0.0 < holdout < 1.0:
        raise InvalidArgument(f"holdout fraction {holdout}: expected a number between 0 and 1")
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    hold_idx: list[np.ndarray] = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.y == c)
        rng.shuffle(idx)
        n_hold = max(1, round(len(idx) * holdout)) if len(idx) > 1 else 0
        hold_idx.append(idx[:n_hold])
        train_idx.append(idx[n_hold:])
    tr = np.sort(np.concatenate(train_idx))
    ho = np.sort(np.concatenate(hold_idx))
    return ds.subset(tr, f"{ds.name}/train"), ds.subset(ho, f"{ds.name}/holdout")


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    return from_arrays("digits", d.data.astype(np.float32), d.target.astype(np.int64))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            xk = next((k for k in ("X", "x") if k in keys), None)
            yk = next((k for k in ("y", "Y") if k in keys), None)
            if xk is None or yk is None:
                raise InvalidArgument(
                    f"dataset {path.name!r}: arrays {sorted(keys)}; expected 'X' and 'y'"
                )
            return np.asarray(z[xk]), np.asarray(z[yk])
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InvalidArgument(f"dataset {path.name!r} is not a readable .npz file: {e}") from e


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = [r for r in text if r.strip()]
    if not rows:
        raise InvalidArgument(f"dataset {path.name!r}: the CSV file is empty")
    first = rows[0].split(",")
    try:
        [float(v) for v in first]
        start = 0
    except ValueError:
        start = 1  # a header line
    try:
        data = np.array([[float(v) for v in r.split(",")] for r in rows[start:]], dtype=np.float64)
    except ValueError as e:
        raise InvalidArgument(
            f"dataset {path.name!r}: {e}; expected numbers, label in the last column"
        ) from e
    if data.ndim != 2 or data.shape[1] < 2:
        raise InvalidArgument(
            f"dataset {path.name!r}: rows of unequal length or fewer than 2 columns; "
            "expected features then a label on each row"
        )
    return data[:, :-1].astype(np.float32), data[:, -1]
