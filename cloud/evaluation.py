"""Evaluate a variant in its real runtime: accuracy on the holdout, latency at batch 1 and 64."""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass

import numpy as np

from edgefleet.models.runtime import ModelSession, open_session
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.manifest import TensorSpec


@dataclass(frozen=True)
class EvalSet:
    """Holdout (x, y) and calibration inputs, stored with each version as an artifact."""

    x: np.ndarray
    y: np.ndarray | None
    calibration: np.ndarray

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {"x": self.x, "calibration": self.calibration}
        if self.y is not None:
            arrays["y"] = self.y
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> EvalSet:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["x"], z["y"] if "y" in z.files else None, z["calibration"])


@dataclass(frozen=True)
class Evaluation:
    accuracy: float | None
    latency_ms: dict[str, float]
    outputs: np.ndarray  # first output on the holdout, for agreement checks
    first_output: np.ndarray  # output for the first holdout row alone (batch 1): the golden sample
    inputs: tuple[TensorSpec, ...]
    output_specs: tuple[TensorSpec, ...]


def predictions(outputs: np.ndarray) -> np.ndarray:
    """Class indices from a classifier's first output: logits/probabilities or labels."""
    if outputs.ndim == 2:
        return np.asarray(outputs.argmax(axis=1))
    if outputs.ndim == 1:
        return outputs.astype(np.int64)
    raise InvalidArgument(
        f"cannot read classes from an output of shape {outputs.shape}; expected (N, classes) or (N,)"
    )


def median_latency_ms(session: ModelSession, x: np.ndarray, *, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        session.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def batch_of(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n]) if reps > 1 else x[:n]


def evaluate(
    model: bytes, runtime: str, evalset: EvalSet, *, latency_runs: int = 100
) -> Evaluation:
    session = open_session(model, runtime, threads=1)
    outputs = session.run(evalset.x)
    accuracy = None
    if evalset.y is not None:
        accuracy = float((predictions(outputs) == evalset.y).mean())
    latency = {
        "b1": median_latency_ms(session, batch_of(evalset.x, 1), runs=latency_runs),
        "b64": median_latency_ms(session, batch_of(evalset.x, 64), runs=max(10, latency_runs // 4)),
    }
    first = session.run(np.ascontiguousarray(evalset.x[:1]))
    return Evaluation(accuracy, latency, outputs, first, session.inputs, session.outputs)
