"""ONNX variants: static int8 QDQ (calibrated), dynamic int8 (no convolutions), fp16."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.protos.errors import InvalidArgument

logger = logging.getLogger(__name__)

CONV_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"}


def op_types(model: bytes) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load_from_string(model).graph.node}


class _Calibration:
    """ONNX Runtime CalibrationDataReader over an array, one batch at a time."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [x[i : i + batch] for i in range(0, len(x), batch)]
        )
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._batches, None)
        return None if b is None else {self._name: b}

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax
        pass


def quantize_static_int8(
    model: bytes, calibration: np.ndarray, *, per_channel: bool = True
) -> tuple[bytes, dict[str, Any]]:
    """Static QDQ int8: weights and activations int8, ranges from calibration data."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise InvalidArgument("static int8 needs calibration samples; the calibration set is empty")
    input_name = onnx.load_from_string(model).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(model)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            _Calibration(input_name, calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        data = dst.read_bytes()
    config = {
        "mode": "static",
        "format": "QDQ",
        "weights": "int8",
        "activations": "int8",
        "per_channel": per_channel,
        "calibration": "minmax",
        "calibration_samples": len(calibration),
    }
    return data, config


def quantize_dynamic_int8(model: bytes) -> tuple[bytes, dict[str, Any]]:
    """Dynamic int8 (weights only, activations quantized at run time). Refuses
    convolutional graphs: ONNX Runtime runs dynamic int8 convolutions 4-8x slower."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    convs = sorted(op_types(model) & CONV_OPS)
    if convs:
        raise InvalidArgument(
            f"int8-dynamic refused: the model has {', '.join(convs)} ops, which dynamic int8 "
            "makes 4-8x slower; use the static 'int8' variant"
        )
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8d.onnx"
        src.write_bytes(model)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        data = dst.read_bytes()
    return data, {"mode": "dynamic", "weights": "int8", "activations": "float32 (int8 at run time)"}


def convert_fp16(model: bytes) -> tuple[bytes, dict[str, Any]]:
    """fp16 weights and compute, float32 inputs/outputs (for GPUs and NPUs)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load_from_string(model)
    m16 = convert_float_to_float16(m, keep_io_types=True, disable_shape_infer=False)
    return m16.SerializeToString(), {"mode": "fp16", "weights": "float16", "io": "float32"}
