"""Live traffic for simulated devices: predictions through each agent's ModelHolder.

On a real device an application calls the local InferenceService; here a worker
thread calls `agent.holder.predict` directly (the same call the service makes),
one row at a time, optionally with its label, so the agent's observers (shadow
evaluation, drift sketches) see live inputs; a device with an injected
`InputDrift` gets its rows shifted/scaled first. Devices serving no model yet are skipped.

::

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


class Traffic:
    """About `rate` predictions per second per device, from rows of `x` (labels `y`)."""

    def __init__(
        self,
        devices: Sequence[SimulatedDevice],
        x: np.ndarray,
        y: np.ndarray | None = None,
        *,
        rate: float = 20.0,
        labelled: bool = True,
        seed: int = 0,
    ) -> None:
        if rate <= 0:
            raise InvalidArgument(f"traffic rate {rate} must be > 0 predictions/s per device")
        if y is not None and len(y) != len(x):
            raise InvalidArgument(f"traffic: {len(x)} inputs but {len(y)} labels")
        self.devices = list(devices)
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = y
        self.rate = rate
        self.labelled = labelled and y is not None
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.predictions = 0
        self.errors = 0

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
                for i in self._rng.integers(0, len(self.x), size=n):
                    labels = (int(self.y[i]),) if self.labelled and self.y is not None else ()
                    x = self.x[i : i + 1] if drift is None else drift.apply(self.x[i : i + 1])
                    try:
                        holder.predict(x, labels=labels)
                        self.predictions += 1
                    except FleetError:
                        self.errors += 1
            if time.monotonic() - start > interval * 4:
                logger.debug("traffic falls behind: %d devices", len(self.devices))
