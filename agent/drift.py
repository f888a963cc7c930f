"""Drift sketches of live traffic, one telemetry window at a time.

`DriftMonitor` is a `ModelHolder` observer. For each successful prediction it
keeps a reference to the request's inputs and outputs (one lock, one append);
every `FOLD_ROWS` rows, and when the telemetry window closes, the pending rows
are binned in one vectorised pass with the edges of the serving model's
`DriftReference` (shipped in its signed manifest; `models.sketch`). `take()`
returns the window's counts per model and starts a new window; the telemetry
sends them in `Telemetry.drift`.

Models whose manifest carries no reference (imported without evaluation data)
are not sketched. Cost: see docs/agent.md (measured per predict, batch 1).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from edgefleet.agent.inference import ActiveModel, Observation
from edgefleet.agent.serde import ModelRef
from edgefleet.models.sketch import Counts, sketch
from edgefleet.protos.manifest import DriftReference

logger = logging.getLogger(__name__)

#: pending rows binned at once (bounds memory held by references to requests)
FOLD_ROWS = 256


@dataclass(frozen=True)
class DriftWindow:
    """One model's sketch over a telemetry window."""

    model: ModelRef
    counts: Counts


class _Model:
    def __init__(self, model: ActiveModel, ref: DriftReference) -> None:
        self.model = model
        self.ref = ref
        self.counts = Counts.empty(ref)
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.rows = 0

    def fold(self) -> None:
        if not self.inputs:
            return
        try:
            x = np.concatenate(self.inputs) if len(self.inputs) > 1 else self.inputs[0]
            y = np.concatenate(self.outputs) if len(self.outputs) > 1 else self.outputs[0]
            self.counts.add(sketch(self.ref, x, y))
        except ValueError as e:  # rows of different shapes: a bad request slipped through
            logger.warning("drift: %d rows of %s not sketched: %s", self.rows, self.model.ref, e)
        self.inputs, self.outputs, self.rows = [], [], 0


class DriftMonitor:
    """Observer keeping per-model drift counts for the current telemetry window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}  # sha256 -> its window

    def observe(self, obs: Observation) -> None:
        ref = obs.model.manifest.drift
        if ref is None:
            return
        key = obs.model.ref.sha256
        with self._lock:
            m = self._models.get(key)
            if m is None:
                m = self._models[key] = _Model(obs.model, ref)
            m.inputs.append(obs.inputs)
            m.outputs.append(obs.outputs)
            m.rows += len(obs.inputs) if obs.inputs.ndim else 1
            if m.rows >= FOLD_ROWS:
                m.fold()

    def take(self) -> list[DriftWindow]:
        """This window's sketches (models that served at least one row); starts a new window."""
        with self._lock:
            models, self._models = self._models, {}
        out = []
        for m in models.values():
            m.fold()
            if m.counts.rows:
                out.append(DriftWindow(m.model.ref, m.counts))
        return out


__all__ = ["FOLD_ROWS", "DriftMonitor", "DriftWindow"]
