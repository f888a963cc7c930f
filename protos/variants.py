"""The variant catalogue both sides read: every deployable variant a version may have.

The coordinator builds, gates and signs them (`cloud.variants`, builders in
`cloud.quantize`); the agent accepts exactly these names and stores each as the file
type of its runtime. A new variant is one entry here plus its builder.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.protos.errors import InvalidArgument


@dataclass(frozen=True)
class VariantKind:
    name: str
    runtime: str  # a manifest runtime (protos.manifest.RUNTIMES)
    extension: str
    needs_checkpoint: bool  # built from the training checkpoint, not from the fp32 ONNX
    golden_tolerance: float  # fraction of the output's magnitude a device may differ by
    summary: str


KINDS: dict[str, VariantKind] = {
    k.name: k
    for k in (
        VariantKind("fp32", "onnxruntime", "onnx", False, 0.01, "ONNX float32 (export)"),
        VariantKind("int8", "onnxruntime", "onnx", False, 0.1, "ONNX static int8 QDQ, calibrated"),
        VariantKind(
            "int8-dynamic", "onnxruntime", "onnx", False, 0.1, "ONNX dynamic int8 (no convolutions)"
        ),
        VariantKind(
            "fp16", "onnxruntime", "onnx", False, 0.05, "ONNX float16, float32 I/O (GPU/NPU)"
        ),
        VariantKind("tflite-fp32", "litert", "tflite", True, 0.01, "TFLite float32 (LiteRT)"),
        VariantKind(
            "tflite-int8", "litert", "tflite", True, 0.1, "TFLite static int8, float32 I/O"
        ),
    )
}
#: every variant name, catalogue order
NAMES: tuple[str, ...] = tuple(KINDS)
#: manifest runtime -> artifact file extension
EXTENSIONS: dict[str, str] = {k.runtime: k.extension for k in KINDS.values()}


def kind(name: str) -> VariantKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidArgument(f"variant {name!r} unknown; accepted: {', '.join(NAMES)}") from None
