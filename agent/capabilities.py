"""What this device can run: runtimes present, execution providers actually available, memory."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from edgefleet.models.runtime import available_runtimes

# execution provider -> accelerator class, best first
PROVIDER_CLASS: dict[str, str] = {
    "TensorrtExecutionProvider": "gpu",
    "CUDAExecutionProvider": "gpu",
    "ROCMExecutionProvider": "gpu",
    "QNNExecutionProvider": "npu",
    "OpenVINOExecutionProvider": "npu",
    "CoreMLExecutionProvider": "npu",
    "NnapiExecutionProvider": "npu",
    "CPUExecutionProvider": "cpu",
}


@dataclass(frozen=True)
class Capabilities:
    machine: str
    runtimes: tuple[str, ...]
    providers: tuple[str, ...]
    accelerator: str  # gpu | npu | cpu
    memory_mb: int
    #: only tflite-runtime (no LiteRT): the coordinator never sends it dynamic-range int8
    tflite_runtime_legacy: bool = False
    #: optional extras, e.g. the federated-learning sidecar's state (`protos.flower.fl_features`)
    features: tuple[str, ...] = ()


def onnx_providers() -> list[str]:
    """ONNX Runtime providers available here, ordered best first, CPU last."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    have = set(ort.get_available_providers())
    return [p for p in PROVIDER_CLASS if p in have]


def detect() -> Capabilities:
    providers = onnx_providers()
    accel = PROVIDER_CLASS.get(providers[0], "cpu") if providers else "cpu"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        mem = 0
    return Capabilities(
        platform.machine(), tuple(available_runtimes()), tuple(providers), accel, int(mem)
    )
