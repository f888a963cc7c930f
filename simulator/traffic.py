"""Live traffic for simulated devices: predictions through each agent's ModelHolder.

On a real device an application calls the local InferenceService; here a worker
thread calls `agent.holder.predict` directly (the same call the service makes),
one row at a time, a share of them with their label, so the agent's observers (shadow
evaluation with accuracy, drift sketches, latency telemetry) see live inputs; a device
with an injected `InputDrift` gets its rows shifted/scaled first. Devices serving no
model yet are skipped.

This is the one traffic engine: `fleet sim --traffic`, `fleet deploy --dry-run --sim`,
the demo, benches and tests all drive it (through `SimCluster.traffic` in the simulator
worker processes, or directly on a `SimulatedFleet`). Rows come from one shared set, or
from each device's own data partition (`Traffic.from_partitions`)::

    traffic = Traffic(fleet.devices, x, y, rate=20)
    async with traffic:      # runs until the block ends
        ...
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from types import TracebackType

import numpy as np

from edgefleet.protos.errors import FleetError, InvalidArgument
from edgefleet.simulator.fleet import SimulatedDevice

logger = logging.getLogger(__name__)


Rows = tuple[np.ndarray, "np.ndarray | None"]


def _rows(x: np.ndarray, y: np.ndarray | None) -> Rows:
    if len(x) == 0:
        raise InvalidArgument("traffic: no input rows to send")
    if y is not None and len(y) != len(x):
        raise InvalidArgument(f"traffic: {len(x)} inputs but {len(y)} labels")
    return np.ascontiguousarray(x, dtype=np.float32), y


class Traffic:
    """About `rate` predictions per second per device, from rows of `x` (labels `y`), or
    from each device's own rows (`from_partitions`); `labelled` is the share of
    predictions that carry their label (True = all, False = none)."""

    def __init__(
        self,
        devices: Sequence[SimulatedDevice],
        x: np.ndarray,
        y: np.ndarray | None = None,
        *,
        rate: float = 20.0,
        labelled: bool | float = True,
        seed: int = 0,
        per_device: dict[str, Rows] | None = None,
    ) -> None:
        if rate <= 0:
            raise InvalidArgument(f"traffic rate {rate} must be > 0 predictions/s per device")
        share = float(labelled)
        if not 0.0 <= share <= 1.0:
            raise InvalidArgument(f"--labelled {labelled!r}: a share between 0 and 1, e.g. 0.5")
        self.devices = list(devices)
        self.x, self.y = _rows(x, y)
        self._data = per_device or {}
        self.rate = rate
        self.labelled = share
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.predictions = 0
        self.errors = 0

    @classmethod
    def from_partitions(
        cls,
        devices: Sequence[SimulatedDevice],
        parts: dict[str, Rows],
        *,
        rate: float = 20.0,
        labelled: bool | float = True,
        seed: int = 0,
    ) -> Traffic:
        """Each device sends rows of its own partition (`parts[device_id]`)."""
        missing = [d.device_id for d in devices if d.device_id not in parts]
        if missing:
            raise InvalidArgument(f"traffic: no data partition for {', '.join(missing[:3])}")
        checked = {k: _rows(x, y) for k, (x, y) in parts.items()}
        first_x, first_y = next(iter(checked.values()))
        return cls(
            devices,
            first_x,
            first_y,
            rate=rate,
            labelled=labelled,
            seed=seed,
            per_device=checked,
        )

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sim-traffic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    async def __aenter__(self) -> Traffic:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _run(self) -> None:
        interval = 0.05
        per_tick = self.rate * interval
        carry = 0.0
        while not self._stop.wait(interval):
            carry += per_tick
            n, carry = int(carry), carry - int(carry)
            if n == 0:
                continue
            start = time.monotonic()
            for dev in self.devices:
                holder = dev.agent.holder
                if holder.active is None:
                    continue
                drift = dev.input_drift
                xs, ys = self._data.get(dev.device_id, (self.x, self.y))
                for i in self._rng.integers(0, len(xs), size=n):
                    label = ys is not None and (
                        self.labelled >= 1.0 or self._rng.random() < self.labelled
                    )
                    labels = (int(ys[i]),) if label and ys is not None else ()
                    x = xs[i : i + 1] if drift is None else drift.apply(xs[i : i + 1])
                    try:
                        holder.predict(x, labels=labels)
                        self.predictions += 1
                    except FleetError:
                        self.errors += 1
            if time.monotonic() - start > interval * 4:
                logger.debug("traffic falls behind: %d devices", len(self.devices))
