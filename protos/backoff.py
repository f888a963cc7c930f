"""One backoff for every reconnect and restart loop: capped exponential, full jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Before attempt n (1, 2, …) wait uniform in [0, min(cap, base * 2**(n-1))] seconds."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        upper: float = min(self.cap, self.base * 2 ** min(max(attempt, 1) - 1, 32))
        return (rng or random).uniform(0, upper)
