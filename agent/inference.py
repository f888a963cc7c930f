"""The serving model: load and self-test a variant, swap it in atomically, count.

Swapping without failing a request
----------------------------------
`ModelHolder` keeps one reference, `_active`, to an immutable `ActiveModel`. A
request reads that reference once, at its start, and runs entirely on the model it
got: the session it ran on is the one named in its answer. `swap()` only rebinds
the reference (under a lock, so concurrent swaps each get the right "old" back);
it never waits for requests, and requests never wait for it.

The old model is not closed explicitly: neither ONNX Runtime nor LiteRT has a
close call, and a request in flight still holds a strong reference to it. When the
last such request returns and the caller of `swap()` drops the returned model, its
reference count reaches zero and CPython frees the session (and its arena) right
then; no finaliser or GC cycle is involved. So a swap costs, for a moment, the
memory of two loaded models, which the updater has to allow for anyway since the
new one is loaded and self-tested while the old one serves.

Execution providers
-------------------
`load()` passes a preference list to `models.runtime.open_session`, which keeps the
providers this ONNX Runtime really has (CPU always last); the session's first
provider is the one that was chosen, recorded on the `ActiveModel`, logged and
reported in telemetry.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgefleet.agent.capabilities import PROVIDER_CLASS
from edgefleet.agent.resources import rss_bytes
from edgefleet.agent.selftest import self_test
from edgefleet.agent.serde import ModelRef
from edgefleet.models.runtime import ModelSession, OnnxSession, open_session
from edgefleet.protos.errors import FleetError, InvalidArgument, SelfTestFailed, Unavailable
from edgefleet.protos.manifest import Manifest

logger = logging.getLogger(__name__)

#: Execution providers in order of preference (GPU, then NPU, then CPU).
DEFAULT_PROVIDERS: tuple[str, ...] = tuple(PROVIDER_CLASS)

#: Upper bounds (inclusive) of the latency histogram's buckets, in microseconds.
LATENCY_BOUNDS_US: tuple[int, ...] = (
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
)

NO_MODEL = "no model active yet; the device is waiting for its first deployment"

# Sessions whose `run` may be called from several threads at once. ONNX Runtime's
# InferenceSession.run is thread-safe; a LiteRT interpreter is not (its tensors are
# shared state), so other sessions run one call at a time.
_CONCURRENT_SESSIONS: tuple[type[ModelSession], ...] = (OnnxSession,)


@dataclass(frozen=True, eq=False)
class ActiveModel:
    """A loaded, self-tested model. Immutable; compared by identity."""

    manifest: Manifest
    session: ModelSession
    provider: str
    self_test_diff: float = 0.0
    memory_bytes: int = 0  # resident memory the process grew by while loading it
    ref: ModelRef = field(init=False)
    _guard: AbstractContextManager[object] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", ModelRef.from_manifest(self.manifest))
        guard: AbstractContextManager[object] = (
            nullcontext() if isinstance(self.session, _CONCURRENT_SESSIONS) else threading.Lock()
        )
        object.__setattr__(self, "_guard", guard)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Check `x` against the input spec and run it; runtime errors become `FleetError`."""
        with self._guard:
            try:
                return self.session.run(x)
            except FleetError:
                raise
            except Exception as e:  # runtimes raise their own untyped errors
                raise FleetError(
                    f"model {self.manifest.ref} on {self.provider} failed on input "
                    f"{x.dtype}{list(x.shape)}: {_first_line(e)}"
                ) from e


class SessionOpener(Protocol):
    """Opens a runtime session on model bytes (`models.runtime.open_session`'s signature)."""

    def __call__(
        self,
        model: bytes,
        runtime: str,
        *,
        providers: Sequence[str] | None = ...,
        threads: int = ...,
    ) -> ModelSession: ...


class ModelLoader(Protocol):
    """What the updater calls to turn verified bytes into a self-tested `ActiveModel`
    (`load`'s signature). A seam for the simulator, which may share one session among
    devices that load the same bytes (`simulator.sessions`); agents use `load`."""

    def __call__(
        self, manifest: Manifest, model: bytes, *, providers: Sequence[str], threads: int
    ) -> ActiveModel: ...


def load(
    manifest: Manifest,
    model: bytes,
    *,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    threads: int = 0,
    opener: SessionOpener = open_session,
) -> ActiveModel:
    """Open `model` (already verified against `manifest`) and self-test it.

    Blocking (seconds on a large model): call it through `asyncio.to_thread`.
    Raises the `FleetError` of the step that failed: `InvalidArgument` when the
    runtime cannot load the bytes, `SelfTestFailed` when the golden sample does not match,
    `Unavailable` when the manifest's runtime is not installed. `opener` opens the
    session (the runtime's own by default); the self-test always runs on what it returns.
    """
    rss_before = rss_bytes()
    session = opener(model, manifest.runtime, providers=providers, threads=threads)
    try:
        diff = self_test(manifest, model, session)
    except FleetError:
        raise
    except Exception as e:  # runtimes raise their own untyped errors; bad golden bytes
        raise SelfTestFailed(f"self-test of {manifest.ref} could not run: {_first_line(e)}") from e
    logger.info(
        "loaded %s (%s) on %s; self-test max |Δ| %.2e",
        manifest.ref,
        manifest.runtime,
        session.provider,
        diff,
    )
    memory = max(0, rss_bytes() - rss_before)
    return ActiveModel(manifest, session, session.provider, diff, memory)


@dataclass(frozen=True)
class Observation:
    """One successful prediction, as observers see it.

    `inputs` and `outputs` are the request's arrays (do not modify them); `labels`
    is the ground truth the caller sent with the request, one class index per row,
    or empty.
    """

    inputs: np.ndarray
    outputs: np.ndarray
    model: ActiveModel
    labels: tuple[int, ...] = ()


Observer = Callable[[Observation], None]


@dataclass(frozen=True)
class LatencyHistogram:
    """Counts per bucket; `counts[i]` holds latencies ≤ `bounds_us[i]`, the last one the rest."""

    bounds_us: tuple[float, ...]
    counts: tuple[int, ...]
    sum_us: float
    count: int


@dataclass(frozen=True)
class InferenceStats:
    """One telemetry window. `errors` is included in `predictions`; latency covers successes."""

    predictions: int
    errors: int
    latency: LatencyHistogram


class ModelHolder:
    """Holds the serving model; `predict` may be called from any thread."""

    def __init__(
        self,
        *,
        bounds_us: Sequence[int] = LATENCY_BOUNDS_US,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        if list(bounds_us) != sorted(set(bounds_us)) or not bounds_us:
            raise InvalidArgument(
                f"latency bounds {list(bounds_us)} must be non-empty and strictly increasing"
            )
        self._bounds = tuple(float(b) for b in bounds_us)
        self._clock_ns = clock_ns
        self._active: ActiveModel | None = None
        self._observers: tuple[Observer, ...] = ()
        self._swap_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._reset()

    @property
    def active(self) -> ActiveModel | None:
        return self._active

    def add_observer(self, fn: Observer) -> Callable[[], None]:
        """Call `fn(Observation)` after every successful prediction; returns its remover.

        Observers run in the predicting thread, after the latency was recorded, so
        they must be quick (hand work to a queue) and must not raise: an exception
        is logged and the request still succeeds.
        """
        with self._swap_lock:
            self._observers = (*self._observers, fn)

        def remove() -> None:
            with self._swap_lock:
                self._observers = tuple(o for o in self._observers if o is not fn)

        return remove

    def predict(
        self, x: np.ndarray, *, labels: Sequence[int] = ()
    ) -> tuple[np.ndarray, ActiveModel]:
        """Run `x` on the current model; return the output and the model that computed it.

        `labels` (optional ground truth, one class per row) only reaches observers.
        Raises `Unavailable` before the first deployment, `InvalidArgument` when `x`
        does not fit the model's input spec, `FleetError` when the runtime fails.
        """
        active = self._active  # one read: the whole request runs on this model
        if active is None:
            self._count(error=True)
            raise Unavailable(NO_MODEL)
        start = self._clock_ns()
        try:
            y = active.run(x)
        except FleetError:
            self._count(error=True)
            raise
        self._count(latency_us=(self._clock_ns() - start) / 1000)
        observers = self._observers  # one read; empty in the common case
        if observers:
            self._notify(observers, Observation(x, y, active, tuple(labels)))
        return y, active

    @staticmethod
    def _notify(observers: tuple[Observer, ...], obs: Observation) -> None:
        for fn in observers:
            try:
                fn(obs)
            except Exception:  # an observer's bug must not fail the request
                logger.exception("prediction observer %r failed", fn)

    def prepare(self, model: ActiveModel) -> ActiveModel:
        """How this holder runs `model` (identity here; the simulator slows it down).

        Whatever runs beside the served model (a shadowed candidate) goes through
        this too, so both run under the same conditions.
        """
        return model

    def swap(self, new: ActiveModel) -> ActiveModel | None:
        """Serve `new` from now on; return the model it replaced.

        Requests already running finish on the old model; none fails or waits.
        """
        with self._swap_lock:
            old, self._active = self._active, new
        logger.info(
            "serving %s on %s (replaced %s)",
            new.manifest.ref,
            new.provider,
            old.manifest.ref if old else "nothing",
        )
        return old

    def snapshot_and_reset(self) -> InferenceStats:
        """Counters and latency since the last call (telemetry window), then zero them."""
        with self._stats_lock:
            stats = InferenceStats(
                predictions=self._predictions,
                errors=self._errors,
                latency=LatencyHistogram(
                    bounds_us=self._bounds,
                    counts=tuple(self._counts),
                    sum_us=self._sum_us,
                    count=self._latency_count,
                ),
            )
            self._reset()
        return stats

    #: exponentially weighted recent latency of successful predictions, µs
    recent_latency_us: float = 0.0

    def _reset(self) -> None:
        self._predictions = 0
        self._errors = 0
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum_us = 0.0
        self._latency_count = 0

    def _count(self, *, error: bool = False, latency_us: float | None = None) -> None:
        with self._stats_lock:
            self._predictions += 1
            if error:
                self._errors += 1
            if latency_us is not None:
                # recent typical latency (EWMA), for the server's inline-or-thread choice
                self.recent_latency_us += 0.1 * (latency_us - self.recent_latency_us)
                self._counts[bisect.bisect_left(self._bounds, latency_us)] += 1
                self._sum_us += latency_us
                self._latency_count += 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
