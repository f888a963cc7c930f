"""Deployable variants of a version: one builder per entry of the variant catalogue
(`protos.variants.KINDS`; fp32 is the export itself). Heavy libraries (onnx, onnxruntime
quantization, litert-torch) are imported by the builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.cloud.quantize.compact import compact_onnx

Built = tuple[bytes, dict[str, Any]]


@dataclass
class Sources:
    """What builders start from: the fp32 ONNX, calibration inputs and, for variants
    built from the checkpoint, the torch module and its TFLite fp32 (each made once)."""

    base: bytes
    calibration: np.ndarray
    input_shape: tuple[int, ...]
    load_module: Callable[[], Any]
    _module: Any = field(default=None, repr=False)
    _tflite_fp32: Built | None = field(default=None, repr=False)

    def module(self) -> Any:
        if self._module is None:
            self._module = self.load_module()
        return self._module

    def tflite_fp32(self) -> Built:
        from edgefleet.cloud.quantize.tflite_variants import to_tflite_fp32

        if self._tflite_fp32 is None:
            self._tflite_fp32 = to_tflite_fp32(self.module(), self.input_shape)
        return self._tflite_fp32


def _int8(src: Sources) -> Built:
    from edgefleet.cloud.quantize.onnx_variants import quantize_static_int8

    data, config = quantize_static_int8(src.base, src.calibration)
    return compact_onnx(data), config


def _int8_dynamic(src: Sources) -> Built:
    from edgefleet.cloud.quantize.onnx_variants import quantize_dynamic_int8

    return quantize_dynamic_int8(src.base)


def _fp16(src: Sources) -> Built:
    from edgefleet.cloud.quantize.onnx_variants import convert_fp16

    return convert_fp16(src.base)


def _tflite_fp32(src: Sources) -> Built:
    return src.tflite_fp32()


def _tflite_int8(src: Sources) -> Built:
    from edgefleet.cloud.quantize.tflite_variants import to_tflite_int8

    return to_tflite_int8(src.tflite_fp32()[0], src.calibration)


#: variant name -> builder; every catalogue entry but fp32 (tests/unit/test_variants.py)
BUILDERS: dict[str, Callable[[Sources], Built]] = {
    "int8": _int8,
    "int8-dynamic": _int8_dynamic,
    "fp16": _fp16,
    "tflite-fp32": _tflite_fp32,
    "tflite-int8": _tflite_int8,
}
