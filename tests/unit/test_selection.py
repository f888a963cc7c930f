from __future__ import annotations

from typing import Any

import pytest

from edgefleet.cloud.registry import Lineage, ModelVersion, Variant
from edgefleet.cloud.selection import DeviceProfile, choose_variant
from edgefleet.protos.errors import InvalidArgument


def variant(
    name: str, runtime: str, *, deployable: bool = True, mode: str = "static", **kw: Any
) -> Variant:
    return Variant(
        name=name,
        runtime=runtime,
        sha256=name.encode().hex().ljust(64, "0")[:64],
        size=1,
        accuracy=0.9,
        latency_ms={},
        quantization={"mode": mode},
        deployable=deployable,
        reason="" if deployable else "accuracy 80% is 10 points below fp32",
        signed_manifest=b"",
    )


def version(*variants: Variant) -> ModelVersion:
    return ModelVersion(
        arch="cnn",
        inputs=(),
        outputs=(),
        classes=(),
        metrics={},
        lineage=Lineage("train"),
        checkpoint_sha256=None,
        evalset_sha256=None,
        model="digits",
        version=2,
        variants=variants,
    )


FULL = version(
    variant("fp32", "onnxruntime"),
    variant("int8", "onnxruntime"),
    variant("fp16", "onnxruntime"),
    variant("tflite-fp32", "litert"),
    variant("tflite-int8", "litert"),
)


@pytest.mark.parametrize(
    ("profile", "want"),
    [
        (DeviceProfile(("onnxruntime",), "gpu"), "fp16"),
        (DeviceProfile(("onnxruntime",), "npu"), "int8"),
        (DeviceProfile(("onnxruntime", "litert"), "cpu"), "int8"),
        (DeviceProfile(("litert",), "cpu"), "tflite-int8"),
    ],
)
def test_best_variant_per_profile(profile: DeviceProfile, want: str) -> None:
    assert choose_variant(FULL, profile).name == want


def test_not_deployable_is_skipped_with_reason() -> None:
    mv = version(variant("int8", "onnxruntime", deployable=False), variant("fp32", "onnxruntime"))
    assert choose_variant(mv, DeviceProfile(("onnxruntime",))).name == "fp32"
    only_bad = version(variant("int8", "onnxruntime", deployable=False))
    with pytest.raises(InvalidArgument, match=r"skipped int8 \(not deployable: accuracy 80%"):
        choose_variant(only_bad, DeviceProfile(("onnxruntime",)))


def test_dynamic_int8_tflite_never_goes_to_tflite_runtime() -> None:
    mv = version(variant("tflite-int8", "litert", mode="dynamic"), variant("tflite-fp32", "litert"))
    legacy = DeviceProfile(("litert",), tflite_runtime_legacy=True)
    assert choose_variant(mv, legacy).name == "tflite-fp32"
    assert choose_variant(mv, DeviceProfile(("litert",))).name == "tflite-int8"


def test_no_runtime_or_no_fit_is_named() -> None:
    with pytest.raises(InvalidArgument, match="needs onnxruntime or litert"):
        choose_variant(FULL, DeviceProfile(()))
    onnx_only = version(variant("fp32", "onnxruntime"))
    with pytest.raises(InvalidArgument, match="wanted one of tflite-int8, tflite-fp32; has fp32"):
        choose_variant(onnx_only, DeviceProfile(("litert",)))
