"""Drift sketches: a small, fixed summary of a model's inputs and predictions.

Shared by the coordinator (which builds a version's *reference* from its holdout
set when the version is trained, imported or quantized) and the agent (which
bins live traffic with the reference's own bin edges); numpy only.

What is summarised
------------------
Inputs of any shape are reduced per sample (per row) to four numbers:

- ``mean`` and ``std`` of the row's values: a shift or a rescaling of the
  features (sensor offset, gain, a new camera's exposure) moves them;
- ``halves``: mean of the first half of the values minus mean of the second half,
  and ``alternation``: mean of even-indexed values minus odd-indexed ones. Two
  fixed ±1 projections, with no random matrix, so the agent and the coordinator
  compute the same thing on any numpy, and a change in *where* the signal sits
  (a rotated or cropped image, swapped channels) moves them while mean and std
  stay put.

Each feature is binned at the reference's deciles (interior quantiles of the
holdout, duplicates dropped), so under no drift every bin holds about a tenth of
the traffic. Predictions are a histogram of the predicted class (argmax of the
first output). A window's sketch is therefore a few dozen integers, whatever the
input size, and sketches from many devices and windows add up.

Population stability index
--------------------------
``PSI = Σ (a_i - e_i) · ln(a_i / e_i)`` over the bins, with ``a`` the live and
``e`` the reference proportions. Both get additive smoothing (``SMOOTHING``
pseudo-counts per bin) so an empty bin costs a finite amount instead of
infinity. Usual reading: < 0.1 stable, 0.1-0.2 moderate, > 0.2 significant
(the default alert threshold). Small samples inflate PSI (about ``(bins - 1) /
n`` on average with no drift at all), hence a minimum sample count before a
verdict (`MIN_SAMPLES`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.manifest import DriftReference

#: Version of this sketch definition, carried in every reference.
SCHEME = 1
FEATURES: tuple[str, ...] = ("mean", "std", "halves", "alternation")
BINS = 10
SMOOTHING = 0.5
#: Rows a window needs before its PSI counts (below it, no alert opens or resolves).
MIN_SAMPLES = 200
#: Holdout rows a reference needs; with fewer, a version ships without one.
MIN_REFERENCE_ROWS = 50


@lru_cache(maxsize=16)
def _weights(d: int) -> np.ndarray:
    """(d, 3) float32: mean, halves and alternation as one matrix product."""
    w = np.zeros((d, 3), dtype=np.float32)
    w[:, 0] = 1.0 / d
    half = d // 2
    if half:
        w[:half, 1] = 1.0 / half
        w[half : 2 * half, 1] = -1.0 / half
        w[0 : 2 * half : 2, 2] = 1.0 / half
        w[1 : 2 * half : 2, 2] = -1.0 / half
    w.setflags(write=False)
    return w


def features(x: np.ndarray) -> np.ndarray:
    """(rows, len(FEATURES)) float64 summary of a batch (first axis: rows)."""
    rows = np.asarray(x)
    rows = rows.reshape(rows.shape[0], -1) if rows.ndim > 1 else rows.reshape(-1, 1)
    if rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    d = rows.shape[1]
    proj = rows @ _weights(d)  # mean, halves, alternation
    mean_sq = np.square(rows).sum(axis=1) / d
    out = np.empty((rows.shape[0], len(FEATURES)), dtype=np.float64)
    out[:, 0] = proj[:, 0]
    out[:, 1] = np.sqrt(np.maximum(mean_sq - np.square(proj[:, 0]), 0.0))
    out[:, 2] = proj[:, 1]
    out[:, 3] = proj[:, 2]
    return out


def classes(outputs: np.ndarray) -> np.ndarray:
    """Predicted class per row: argmax of logits/probabilities, or the value itself."""
    y = np.asarray(outputs)
    if y.ndim >= 2:
        return np.asarray(y.reshape(y.shape[0], -1).argmax(axis=1))
    return y.reshape(-1).astype(np.int64)


def build_reference(x: np.ndarray, predicted: np.ndarray, n_classes: int) -> DriftReference:
    """The reference of a version: bin edges at the holdout's deciles, and the share of
    holdout rows per bin and per predicted class."""
    if len(x) < MIN_REFERENCE_ROWS:
        raise InvalidArgument(
            f"drift reference needs at least {MIN_REFERENCE_ROWS} holdout rows; got {len(x)}"
        )
    if n_classes < 1:
        raise InvalidArgument(f"drift reference: n_classes {n_classes} must be >= 1")
    f = features(x)
    qs = np.linspace(0.0, 1.0, BINS + 1)[1:-1]
    edges = tuple(
        tuple(float(e) for e in np.unique(np.quantile(f[:, j], qs))) for j in range(f.shape[1])
    )
    n = len(f)
    inputs = tuple(tuple(float(c) / n for c in _bin(f[:, j], e)) for j, e in enumerate(edges))
    preds = np.bincount(np.clip(predicted, 0, n_classes - 1), minlength=n_classes)
    return DriftReference(
        scheme=SCHEME,
        features=FEATURES,
        edges=edges,
        inputs=inputs,
        predictions=tuple(float(c) / n for c in preds),
        samples=n,
    )


def _bin(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    return np.bincount(
        np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1
    )


@dataclass
class Counts:
    """One window's sketch: rows seen, counts per input-feature bin, counts per class."""

    rows: int
    inputs: list[np.ndarray]
    predictions: np.ndarray

    @classmethod
    def empty(cls, ref: DriftReference) -> Counts:
        return cls(
            0,
            [np.zeros(len(e) + 1, dtype=np.int64) for e in ref.edges],
            np.zeros(len(ref.predictions), dtype=np.int64),
        )

    def add(self, other: Counts) -> None:
        if (
            len(other.inputs) != len(self.inputs)
            or any(len(a) != len(b) for a, b in zip(self.inputs, other.inputs, strict=True))
            or len(other.predictions) != len(self.predictions)
        ):
            raise InvalidArgument("drift sketches with different bins cannot be added")
        self.rows += other.rows
        for a, b in zip(self.inputs, other.inputs, strict=True):
            a += b
        self.predictions += other.predictions

    def fits(self, ref: DriftReference) -> bool:
        """Whether these counts have the reference's bins (same edges count, same classes)."""
        return (
            len(self.inputs) == len(ref.edges)
            and all(len(c) == len(e) + 1 for c, e in zip(self.inputs, ref.edges, strict=True))
            and len(self.predictions) == len(ref.predictions)
        )


def sketch(ref: DriftReference, x: np.ndarray, outputs: np.ndarray) -> Counts:
    """Counts for a batch of inputs and the outputs the model gave for them."""
    f = features(x)
    n_classes = len(ref.predictions)
    cls = np.clip(classes(outputs), 0, n_classes - 1)
    return Counts(
        rows=len(f),
        inputs=[_bin(f[:, j], e) for j, e in enumerate(ref.edges)],
        predictions=np.bincount(cls, minlength=n_classes),
    )


def psi(expected: Sequence[float], counts: np.ndarray, *, reference_samples: int) -> float:
    """PSI of `counts` (live) against `expected` proportions, both smoothed."""
    c = np.asarray(counts, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if len(c) != len(e):
        raise InvalidArgument(f"PSI over {len(c)} live bins against {len(e)} reference bins")
    b = len(c)
    a = (c + SMOOTHING) / (c.sum() + SMOOTHING * b)
    n_ref = max(reference_samples, 1)
    e = (e * n_ref + SMOOTHING) / (n_ref + SMOOTHING * b)
    return float(np.sum((a - e) * np.log(a / e)))


class WorstInput:
    """For values with `inputs` (PSI per input feature): the worst feature and its PSI."""

    inputs: Mapping[str, float]

    @property
    def input_psi(self) -> float:
        return max(self.inputs.values(), default=0.0)

    @property
    def worst_feature(self) -> str:
        return max(self.inputs, key=lambda k: self.inputs[k]) if self.inputs else ""


@dataclass(frozen=True)
class Score(WorstInput):
    """PSI of one window of counts: per input feature, and of the predictions."""

    rows: int
    inputs: Mapping[str, float]
    predictions: float


def score(ref: DriftReference, counts: Counts) -> Score:
    if not counts.fits(ref):
        raise InvalidArgument(
            "drift counts do not have the reference's bins (a sketch for another version?)"
        )
    n = ref.samples
    return Score(
        rows=counts.rows,
        inputs={
            name: psi(p, c, reference_samples=n)
            for name, p, c in zip(ref.features, ref.inputs, counts.inputs, strict=True)
        },
        predictions=psi(ref.predictions, counts.predictions, reference_samples=n),
    )


__all__ = [
    "BINS",
    "FEATURES",
    "MIN_SAMPLES",
    "SCHEME",
    "Counts",
    "Score",
    "WorstInput",
    "build_reference",
    "classes",
    "features",
    "psi",
    "score",
    "sketch",
]
