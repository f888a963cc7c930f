"""Hardware profiles for simulated devices: what each one claims it can run, and how fast.

A profile decides the capabilities a simulated agent reports (runtimes, execution
providers, accelerator class, memory) and hence which variant the coordinator sends
it. The claims are honest about one thing only: the real model still runs here.
A "gpu" or "npu" device *claims* CUDA / QNN / OpenVINO providers; its ONNX Runtime
session falls back to the providers this machine really has (CPU last, as
`models.runtime.open_session` does for any device), and the serving provider it
reports is the real one. `speed_factor` makes inference that many times slower
than on this machine: after each model call the device sleeps
``(speed_factor - 1) x`` the measured time, so latencies scale while the outputs
stay the real model's.

``parse_profile("mixed")`` gives a `Mix`, which assigns profiles to N devices
deterministically from a seed; a single profile assigns itself to every device.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from edgefleet.agent.capabilities import Capabilities
from edgefleet.protos.errors import InvalidArgument


@dataclass(frozen=True)
class Profile:
    """One kind of simulated hardware: the agent's own `Capabilities` it claims, and how
    much slower than this machine it runs."""

    name: str
    caps: Capabilities
    speed_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.speed_factor < 1.0:
            raise InvalidArgument(
                f"profile {self.name!r}: speed_factor {self.speed_factor} must be >= 1 "
                "(a simulated device is never faster than the machine running it)"
            )
        if not self.caps.runtimes:
            raise InvalidArgument(f"profile {self.name!r} names no runtime")

    def assign(self, n: int, *, seed: int = 0) -> list[Profile]:
        """This profile for each of `n` devices (`seed` is unused; same shape as `Mix.assign`)."""
        _check_count(n)
        return [self] * n


CPU = Profile(
    "cpu",
    Capabilities(
        machine="x86_64",
        runtimes=("onnxruntime", "litert"),
        providers=("CPUExecutionProvider",),
        accelerator="cpu",
        memory_mb=2048,
    ),
    speed_factor=3.0,
)
GPU = Profile(
    "gpu",
    Capabilities(
        machine="aarch64",
        runtimes=("onnxruntime",),
        # claimed: the session falls back to CPU where CUDA is not installed
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        accelerator="gpu",
        memory_mb=8192,
    ),
    speed_factor=1.0,
)
NPU = Profile(
    "npu",
    Capabilities(
        machine="aarch64",
        runtimes=("onnxruntime",),
        # claimed: the session falls back to CPU where neither is installed
        providers=("QNNExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"),
        accelerator="npu",
        memory_mb=4096,
    ),
    speed_factor=1.5,
)
LITERT = Profile(
    "litert",
    Capabilities(
        machine="aarch64", runtimes=("litert",), providers=(), accelerator="cpu", memory_mb=1024
    ),
    speed_factor=5.0,
)
ARMV7 = Profile(
    "armv7",
    Capabilities(
        machine="armv7l",
        runtimes=("litert",),
        providers=(),
        accelerator="cpu",
        memory_mb=512,
        tflite_runtime_legacy=True,
    ),
    speed_factor=10.0,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (CPU, GPU, NPU, LITERT, ARMV7)}


@dataclass(frozen=True)
class Mix:
    """Profiles in fixed proportions. `assign(n, seed=s)` is the same list for the same n and s.

    Counts are exact (largest remainder: 50% of 20 devices is 10), then the order is
    shuffled from the seed so the kinds are spread over the device ids.
    """

    name: str
    weights: tuple[tuple[Profile, float], ...]

    def __post_init__(self) -> None:
        if not self.weights or any(w < 0 for _, w in self.weights):
            raise InvalidArgument(f"mix {self.name!r}: weights must be non-empty and >= 0")
        if sum(w for _, w in self.weights) <= 0:
            raise InvalidArgument(f"mix {self.name!r}: weights sum to 0")

    def counts(self, n: int) -> dict[str, int]:
        """How many devices of each profile `assign(n)` gives."""
        _check_count(n)
        total = sum(w for _, w in self.weights)
        shares = [n * w / total for _, w in self.weights]
        counts = [int(s) for s in shares]
        # hand the devices left over to the largest remainders, ties to the earlier profile
        order = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
        for i in order[: n - sum(counts)]:
            counts[i] += 1
        return {p.name: c for (p, _), c in zip(self.weights, counts, strict=True)}

    def assign(self, n: int, *, seed: int = 0) -> list[Profile]:
        by_name = {p.name: p for p, _ in self.weights}
        out = [by_name[name] for name, c in self.counts(n).items() for _ in range(c)]
        random.Random(seed).shuffle(out)
        return out


MIXED = Mix("mixed", ((CPU, 0.50), (GPU, 0.20), (NPU, 0.15), (LITERT, 0.15)))
MIXES: dict[str, Mix] = {MIXED.name: MIXED}


def parse_profile(spec: str | Profile | Mix) -> Profile | Mix:
    """A built-in profile or mix by name ("cpu", "gpu", "npu", "litert", "armv7", "mixed"),
    or built-in profiles in equal shares ("cpu,gpu")."""
    if isinstance(spec, (Profile, Mix)):
        return spec
    key = spec.strip().lower()
    if key in PROFILES:
        return PROFILES[key]
    if key in MIXES:
        return MIXES[key]
    names = [n.strip() for n in key.split(",")]
    if len(names) > 1 and all(n in PROFILES for n in names) and len(set(names)) == len(names):
        # "cpu,gpu": those profiles in equal shares
        return Mix(",".join(names), tuple((PROFILES[n], 1.0) for n in names))
    raise InvalidArgument(
        f"device profile {spec!r} is unknown; accepted: {', '.join(accepted_profiles())}"
    )


def accepted_profiles() -> Sequence[str]:
    return [*MIXES, *PROFILES, "P1,P2,… (equal shares)"]


def _check_count(n: int) -> None:
    if n < 0:
        raise InvalidArgument(f"device count {n} must be >= 0")


__all__ = [
    "ARMV7",
    "CPU",
    "GPU",
    "LITERT",
    "MIXED",
    "NPU",
    "PROFILES",
    "Mix",
    "Profile",
    "accepted_profiles",
    "parse_profile",
]
