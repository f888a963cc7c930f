"""Which variant a device gets, from the capabilities it reported.

GPU devices get fp16 (then fp32), NPU and CPU devices int8 (static QDQ) first,
devices with only a TFLite runtime get TFLite variants, and a manifest that
requires dynamic-range int8 never goes to a tflite-runtime device (it returns
wrong answers there without any error).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.cloud.devices import Device
from edgefleet.cloud.registry import ModelVersion, Variant
from edgefleet.protos.errors import InvalidArgument

PREFERENCES: dict[str, tuple[str, ...]] = {
    "gpu": ("fp16", "fp32", "int8"),
    "npu": ("int8", "fp16", "fp32"),
    "cpu": ("int8", "fp32", "int8-dynamic"),
}
TFLITE_PREFERENCES = ("tflite-int8", "tflite-fp32")


@dataclass(frozen=True)
class Plan:
    """Which variant each selected device gets; devices left out and why."""

    version: ModelVersion
    targets: list[tuple[Device, Variant]]
    skipped: dict[str, str]


@dataclass(frozen=True)
class DeviceProfile:
    """The parts of a device's reported capabilities that decide its variant."""

    runtimes: tuple[str, ...]
    accelerator: str = "cpu"
    tflite_runtime_legacy: bool = False


def candidates(profile: DeviceProfile) -> list[str]:
    order: list[str] = []
    if "onnxruntime" in profile.runtimes:
        order += PREFERENCES.get(profile.accelerator, PREFERENCES["cpu"])
    if "litert" in profile.runtimes:
        order += TFLITE_PREFERENCES
    return order


def choose_variant(mv: ModelVersion, profile: DeviceProfile) -> Variant:
    """The best deployable variant of `mv` for this device; InvalidArgument naming why none fits."""
    order = candidates(profile)
    if not order:
        raise InvalidArgument(
            f"device reports runtimes {list(profile.runtimes) or 'none'}; "
            f"{mv.ref} needs onnxruntime or litert"
        )
    by_name = {v.name: v for v in mv.variants}
    skipped: list[str] = []
    for name in order:
        v = by_name.get(name)
        if v is None:
            continue
        if not v.deployable:
            skipped.append(f"{name} (not deployable: {v.reason})")
            continue
        if profile.tflite_runtime_legacy and _needs_dynamic_int8(v):
            skipped.append(f"{name} (dynamic-range int8 is wrong on tflite-runtime)")
            continue
        return v
    have = ", ".join(by_name) or "none"
    raise InvalidArgument(
        f"{mv.ref} has no variant for a {profile.accelerator} device with "
        f"{', '.join(profile.runtimes)}: wanted one of {', '.join(order)}; has {have}"
        + (f"; skipped {'; '.join(skipped)}" if skipped else "")
    )


def _needs_dynamic_int8(v: Variant) -> bool:
    return v.runtime == "litert" and v.quantization.get("mode") == "dynamic"
