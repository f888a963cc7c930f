"""Shadow evaluation: a candidate model runs beside the active one on sampled live inputs.

While a rollout stage bakes, the coordinator sends ``ACTION_SHADOW``: the updater
downloads, verifies, loads and self-tests the candidate exactly as for an
activation, but instead of swapping it in hands it to a `ShadowEvaluator`. The
evaluator registers one observer on the `ModelHolder`; after a successful
prediction the observer keeps the request (inputs, the active model's outputs,
optional labels) with probability `sample_rate`, at most `max_per_second`, in a
small bounded queue, so the request path pays one random draw and an append.

`step()` (the agent's ticker calls it) drains the queue in a worker thread: each
sample runs on both models back to back, in alternating order, and is timed, so
the latency comparison is between the two models on the same device, on the
same inputs, under the same load. It counts argmax agreement with the active
model and, where the request carried labels, each model's correct answers. The
cumulative `ShadowReport` is published (retained) on ``dev/{id}/shadow`` at most
every `report_interval` seconds when it changed.

Memory: each model's `memory_bytes` is the growth of the agent's resident memory
while it was loaded (`agent.inference.load`); `rss_bytes` is the agent's resident
memory with both loaded. Several simulated agents in one process share one RSS,
so there these figures are approximate.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np

from edgefleet.agent.inference import ActiveModel, ModelHolder, Observation
from edgefleet.agent.resources import rss_bytes
from edgefleet.agent.serde import ShadowSettings, ShadowStats, encode_shadow_report
from edgefleet.protos.errors import FleetError

logger = logging.getLogger(__name__)

Publish = Callable[[bytes], Awaitable[None]]

#: samples kept waiting for evaluation; more are dropped (and counted)
QUEUE_LIMIT = 256
#: latencies kept per model for the percentiles
LATENCY_WINDOW = 4096
#: samples evaluated per worker-thread hop
BATCH = 64


class _Side:
    """One model's running totals."""

    def __init__(self, model: ActiveModel) -> None:
        self.model = model
        self.latency_us: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.correct = 0

    def stats(self) -> ShadowStats:
        lat = np.fromiter(self.latency_us, dtype=np.float64) if self.latency_us else None
        return ShadowStats(
            model=self.model.ref,
            latency_p50_us=float(np.percentile(lat, 50)) if lat is not None else 0.0,
            latency_p95_us=float(np.percentile(lat, 95)) if lat is not None else 0.0,
            latency_mean_us=float(lat.mean()) if lat is not None else 0.0,
            memory_bytes=self.model.memory_bytes,
            correct=self.correct,
        )


class ShadowEvaluator:
    """Evaluate `candidate` beside whatever `holder` serves, until `stop()`."""

    def __init__(
        self,
        *,
        device_id: str,
        holder: ModelHolder,
        candidate: ActiveModel,
        generation: int,
        rollout_id: str,
        settings: ShadowSettings,
        publish: Publish,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.generation = generation
        self.rollout_id = rollout_id
        self.settings = settings
        self.candidate = candidate
        self._holder = holder
        self._publish = publish
        self._rng = rng or random.Random()
        self._clock = clock
        self._queue: collections.deque[Observation] = collections.deque()
        self._lock = threading.Lock()
        self._remove: Callable[[], None] | None = None
        self._window_start = clock()
        self._window_taken = 0
        self._sides: dict[str, _Side] = {}  # active sha256 -> its side (the active may change)
        self._cand = _Side(candidate)
        self._turn = 0
        self.samples = 0
        self.agreed = 0
        self.labelled = 0
        self.errors = 0
        self.dropped = 0
        self._started_ms = int(time.time() * 1000)
        self._last_report = float("-inf")
        self._reported_samples = -1

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._remove is None:
            self._remove = self._holder.add_observer(self._observe)
            logger.info(
                "%s: shadowing %s (sample rate %g)",
                self.device_id,
                self.candidate.ref,
                self.settings.sample_rate,
            )

    def stop(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
        with self._lock:
            self._queue.clear()

    @property
    def running(self) -> bool:
        return self._remove is not None

    # -- request path ---------------------------------------------------------------

    def _observe(self, obs: Observation) -> None:
        s = self.settings
        if s.sample_rate < 1.0 and self._rng.random() >= s.sample_rate:
            return
        with self._lock:
            if s.max_per_second:
                now = self._clock()
                if now - self._window_start >= 1.0:
                    self._window_start, self._window_taken = now, 0
                if self._window_taken >= s.max_per_second:
                    self.dropped += 1
                    return
                self._window_taken += 1
            if len(self._queue) >= QUEUE_LIMIT:
                self.dropped += 1
                return
            self._queue.append(obs)

    # -- evaluation -----------------------------------------------------------------

    async def step(self) -> None:
        """Evaluate what was sampled since the last step; publish the report when due."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
        if batch:
            await asyncio.to_thread(self._evaluate, batch)
        if (
            self.samples != self._reported_samples
            and self._clock() - self._last_report >= self.settings.report_interval
        ):
            await self.publish_report()

    def _evaluate(self, batch: list[Observation]) -> None:
        for obs in batch:
            active = obs.model
            side = self._sides.get(active.ref.sha256)
            if side is None:
                side = self._sides[active.ref.sha256] = _Side(active)
            # both models timed back to back; the order alternates so neither gets the
            # warm caches every time
            self._turn += 1
            order = (side, self._cand) if self._turn % 2 else (self._cand, side)
            outputs: dict[int, np.ndarray] = {}
            for s in order:
                start = time.perf_counter_ns()
                try:
                    y = s.model.run(obs.inputs)
                except FleetError as e:
                    logger.debug("%s: %s failed on a sample: %s", self.device_id, s.model.ref, e)
                    break
                s.latency_us.append((time.perf_counter_ns() - start) / 1000)
                outputs[id(s)] = y
            rows = int(obs.inputs.shape[0]) if obs.inputs.ndim else 1
            if id(self._cand) not in outputs:
                self.errors += rows
                continue
            if id(side) not in outputs:
                continue  # the active model failed: nothing to compare with
            a = _classes(outputs[id(side)])
            c = _classes(outputs[id(self._cand)])
            self.samples += rows
            self.agreed += int((a == c).sum())
            if obs.labels and len(obs.labels) == len(a):
                y_true = np.asarray(obs.labels)
                self.labelled += len(y_true)
                side.correct += int((a == y_true).sum())
                self._cand.correct += int((c == y_true).sum())

    def report(self) -> bytes:
        active = self._holder.active
        side = self._sides.get(active.ref.sha256) if active else None
        if side is None and active is not None:
            side = _Side(active)
        return encode_shadow_report(
            device_id=self.device_id,
            generation=self.generation,
            rollout_id=self.rollout_id,
            active=side.stats() if side else None,
            candidate=self._cand.stats(),
            samples=self.samples,
            agreed=self.agreed,
            labelled=self.labelled,
            errors=self.errors,
            dropped=self.dropped,
            rss_bytes=rss_bytes(),
            started_ms=self._started_ms,
            timestamp_ms=int(time.time() * 1000),
        )

    async def publish_report(self) -> None:
        payload = self.report()
        try:
            await self._publish(payload)
        except FleetError as e:
            logger.debug("%s: shadow report not sent (%s)", self.device_id, e)
            return
        self._last_report = self._clock()
        self._reported_samples = self.samples


def _classes(y: np.ndarray) -> np.ndarray:
    """Predicted class per row: argmax of logits/probabilities, or the value itself."""
    y = np.asarray(y)
    if y.ndim >= 2:
        return np.asarray(y.reshape(y.shape[0], -1).argmax(axis=1))
    return y.reshape(-1)
