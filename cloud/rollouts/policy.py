"""A staged rollout's policy, and parsing it from what operators type.

``--canary 10% --waves 25%,50%,100% --bake 60s --max-failure-rate 2%
--max-latency-regression 20% --max-memory 64 --min-agreement 0.95 --min-accuracy 0.9``

Fractions accept ``10%`` or ``0.1``; durations ``90``, ``90s``, ``500ms``, ``5m``,
``1h``. Every error names the flag, the bad value and what is accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgefleet.protos.errors import InvalidArgument

ON_FAILURE = ("rollback", "pause")
DEFAULT_CANARY = 0.10
DEFAULT_WAVES = (0.25, 0.50, 1.0)
DEFAULT_BAKE_S = 60.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class Policy:
    """Stages (cumulative fractions of the targets: canary, then waves), bake time, gates."""

    canary: float = DEFAULT_CANARY
    waves: tuple[float, ...] = DEFAULT_WAVES
    bake_s: float = DEFAULT_BAKE_S
    max_failure_rate: float = 0.02
    max_latency_regression: float | None = None
    max_memory_mb: float | None = None
    min_agreement: float | None = None
    min_accuracy: float | None = None
    on_failure: str = "rollback"
    min_samples: int = 20
    stage_timeout_s: float = 300.0
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        check_fraction("--canary", self.canary)
        if self.canary == 1.0:
            if self.waves:
                raise InvalidArgument(
                    "--canary 100% reaches every device at once: leave out --waves, "
                    "or give a smaller canary, e.g. 10%"
                )
        else:
            check_waves(self.canary, self.waves)
        if not (self.bake_s >= 0 and math.isfinite(self.bake_s)):
            raise InvalidArgument(f"--bake {self.bake_s!r}: must be a duration >= 0, e.g. 60s")
        check_fraction("--max-failure-rate", self.max_failure_rate, allow_zero=True)
        if self.max_latency_regression is not None and not (0 <= self.max_latency_regression < 100):
            raise InvalidArgument(
                f"--max-latency-regression {self.max_latency_regression!r}: must be >= 0, "
                "e.g. 20% (candidate p50 at most 1.2x the previous model's)"
            )
        if self.max_memory_mb is not None and not (self.max_memory_mb > 0):
            raise InvalidArgument(
                f"--max-memory {self.max_memory_mb!r}: must be a number of MB > 0, e.g. 64"
            )
        for flag, v in (
            ("--min-agreement", self.min_agreement),
            ("--min-accuracy", self.min_accuracy),
        ):
            if v is not None:
                check_fraction(flag, v, allow_zero=True)
        if self.on_failure not in ON_FAILURE:
            raise InvalidArgument(
                f"--on-failure {self.on_failure!r}: accepted: {', '.join(ON_FAILURE)}"
            )
        if self.min_samples < 1:
            raise InvalidArgument(f"--min-samples {self.min_samples}: must be >= 1")
        if not self.stage_timeout_s > 0:
            raise InvalidArgument(
                f"--stage-timeout {self.stage_timeout_s!r}: must be a duration > 0, e.g. 5m"
            )
        check_fraction("--sample-rate", self.sample_rate)

    @classmethod
    def all_at_once(cls) -> Policy:
        """One stage with every device, no bake, no gate that can stop it (a plain deploy)."""
        return cls(canary=1.0, waves=(), bake_s=0.0, max_failure_rate=1.0)

    @property
    def direct(self) -> bool:
        """A plain deploy: one stage, nothing to bake or gate, so devices activate the
        version at once (no shadow phase first), and devices offline now do not hold the
        others up: their desired state is kept and they update when they reconnect."""
        return (
            len(self.stages) == 1
            and self.bake_s == 0
            and not self.quality_gates
            and self.max_failure_rate >= 1.0
        )

    @property
    def stages(self) -> tuple[float, ...]:
        """Cumulative fractions, canary first."""
        return (self.canary, *self.waves)

    @property
    def quality_gates(self) -> bool:
        """Whether any gate needs shadow samples."""
        return any(
            v is not None
            for v in (
                self.max_latency_regression,
                self.max_memory_mb,
                self.min_agreement,
                self.min_accuracy,
            )
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["waves"] = list(self.waves)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "waves" in known:
            known["waves"] = tuple(float(w) for w in known["waves"])
        return cls(**known)

    def with_changes(self, **changes: Any) -> Policy:
        return replace(self, **changes)

    def describe(self) -> str:
        stages = ", ".join(f"{f:.0%}" for f in self.stages)
        gates = [f"failure rate <= {self.max_failure_rate:.1%}", "self-test"]
        if self.max_latency_regression is not None:
            gates.append(f"latency +{self.max_latency_regression:.0%}")
        if self.max_memory_mb is not None:
            gates.append(f"memory <= {self.max_memory_mb:g} MB")
        if self.min_agreement is not None:
            gates.append(f"agreement >= {self.min_agreement:.1%}")
        if self.min_accuracy is not None:
            gates.append(f"accuracy >= {self.min_accuracy:.1%}")
        return (
            f"stages {stages}; bake {format_duration(self.bake_s)}; gates {', '.join(gates)}; "
            f"on failure {self.on_failure}"
        )


# -- checks ---------------------------------------------------------------------------


def check_fraction(
    flag: str,
    value: float,
    *,
    allow_zero: bool = False,
    allow_one: bool = True,
    shown: str | None = None,
) -> float:
    """`value` if it is a valid share for `flag`; else InvalidArgument naming `shown`
    (what the operator typed) or the value."""
    low_ok = value >= 0 if allow_zero else value > 0
    high_ok = value <= 1 if allow_one else value < 1
    if not (math.isfinite(value) and low_ok and high_ok):
        lo = "0%" if allow_zero else "more than 0%"
        hi = "100%" if allow_one else "less than 100%"
        what = repr(shown) if shown is not None else f"{value:g}"
        raise InvalidArgument(f"{flag} {what}: must be from {lo} to {hi}, e.g. 10% or 0.1")
    return value


def check_waves(canary: float, waves: Sequence[float]) -> None:
    if not waves:
        raise InvalidArgument("--waves is empty: give cumulative percentages ending at 100%")
    shown = ",".join(f"{w:.0%}" for w in waves)
    prev = canary
    for w in waves:
        check_fraction("--waves", w)
        if w <= prev:
            raise InvalidArgument(
                f"--waves {shown}: each wave is a cumulative share of the devices and must "
                f"exceed the one before (canary {canary:.0%}), e.g. 25%,50%,100%"
            )
        prev = w
    if waves[-1] != 1.0:
        raise InvalidArgument(
            f"--waves {shown}: the last wave must be 100% so every targeted device is reached"
        )


# -- parsing what operators type --------------------------------------------------------


def parse_fraction(
    flag: str, text: str, *, allow_zero: bool = False, allow_one: bool = True
) -> float:
    t = text.strip()
    try:
        if t.endswith("%"):
            value = float(t[:-1]) / 100
        else:
            value = float(t)
            if value > 1:
                raise InvalidArgument(
                    f"{flag} {text!r}: a bare number is a fraction from 0 to 1; "
                    f"for percent write {t}%"
                )
    except ValueError:
        raise InvalidArgument(f"{flag} {text!r}: not a percentage; e.g. 10% or 0.1") from None
    return check_fraction(flag, value, allow_zero=allow_zero, allow_one=allow_one, shown=text)


def parse_waves(text: str) -> tuple[float, ...]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise InvalidArgument(f"--waves {text!r}: give cumulative percentages, e.g. 25%,50%,100%")
    return tuple(parse_fraction("--waves", p) for p in parts)


def parse_duration(flag: str, text: str) -> float:
    m = _DURATION.match(text)
    if m is None:
        raise InvalidArgument(f"{flag} {text!r}: not a duration; accepted: 90, 90s, 500ms, 5m, 1h")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_megabytes(flag: str, text: str) -> float:
    t = text.strip().upper().removesuffix("MB").removesuffix("M").strip()
    try:
        value = float(t)
    except ValueError:
        raise InvalidArgument(f"{flag} {text!r}: not a number of MB; e.g. 64 or 64MB") from None
    if not (value > 0 and math.isfinite(value)):
        raise InvalidArgument(f"{flag} {text!r}: must be more than 0 MB")
    return value


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.0f}s" if seconds == int(seconds) else f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def parse_policy(
    *,
    canary: str | None = None,
    waves: str | None = None,
    bake: str | None = None,
    max_failure_rate: str | None = None,
    max_latency_regression: str | None = None,
    max_memory: str | None = None,
    min_agreement: str | None = None,
    min_accuracy: str | None = None,
    on_failure: str | None = None,
    min_samples: int | None = None,
    stage_timeout: str | None = None,
    sample_rate: str | None = None,
) -> Policy | None:
    """The policy the flags describe, or None when no policy flag was given (all at once)."""
    given = {k: v for k, v in locals().items() if v is not None}
    if not given:
        return None
    kw: dict[str, Any] = {}
    if canary is not None:
        kw["canary"] = parse_fraction("--canary", canary)
        if kw["canary"] == 1.0 and waves is None:
            kw["waves"] = ()
    if waves is not None:
        kw["waves"] = parse_waves(waves)
    if bake is not None:
        kw["bake_s"] = parse_duration("--bake", bake)
    if max_failure_rate is not None:
        kw["max_failure_rate"] = parse_fraction(
            "--max-failure-rate", max_failure_rate, allow_zero=True
        )
    if max_latency_regression is not None:
        kw["max_latency_regression"] = _parse_regression(max_latency_regression)
    if max_memory is not None:
        kw["max_memory_mb"] = parse_megabytes("--max-memory", max_memory)
    if min_agreement is not None:
        kw["min_agreement"] = parse_fraction("--min-agreement", min_agreement, allow_zero=True)
    if min_accuracy is not None:
        kw["min_accuracy"] = parse_fraction("--min-accuracy", min_accuracy, allow_zero=True)
    if on_failure is not None:
        kw["on_failure"] = on_failure.strip().lower()
    if min_samples is not None:
        kw["min_samples"] = min_samples
    if stage_timeout is not None:
        kw["stage_timeout_s"] = parse_duration("--stage-timeout", stage_timeout)
    if sample_rate is not None:
        kw["sample_rate"] = parse_fraction("--sample-rate", sample_rate)
    return Policy(**kw)


def _parse_regression(text: str) -> float:
    """20% or 0.2: the candidate's p50 latency may be at most that much above the previous."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise InvalidArgument(
            f"--max-latency-regression {text!r}: not a percentage; e.g. 20% or 0.2"
        ) from None
    if not (0 <= value < 100 and math.isfinite(value)):
        raise InvalidArgument(
            f"--max-latency-regression {text!r}: must be >= 0%, e.g. 20% (at most 1.2x as slow)"
        )
    return value
