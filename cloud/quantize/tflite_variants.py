"""TFLite variants without TensorFlow: fp32 via litert-torch, static int8 via ai-edge-quantizer.

litert-torch cannot export a dynamic batch axis (0.10: the lowering fails even for
one Linear), and a CNN's reshapes pin the batch, so each file carries one signature
per batch size (`b1`, `b64`) sharing the weights; `models.runtime.LiteRtSession`
picks the signature, or runs other batch sizes in chunks.
Needs the `tflite` extra (litert-torch); imported only when a TFLite variant is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.cloud.quiet import captured_output
from edgefleet.models.runtime import quiet_native_banners
from edgefleet.protos.errors import Unavailable

logger = logging.getLogger(__name__)

BATCHES = (1, 64)


def _quiet() -> contextlib.AbstractContextManager[None]:
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    return captured_output(
        "litert",
        silence=("torchao", "torch.utils._pytree", "absl", "litert_torch", "ai_edge_quantizer"),
    )


def _import_litert_torch() -> Any:
    try:
        with _quiet():
            import litert_torch
    except ImportError:
        raise Unavailable(
            "TFLite variants need litert-torch: pip install 'edgefleet[tflite]'"
        ) from None
    return litert_torch


def to_tflite_fp32(
    module: Any, input_shape: tuple[int, ...], batches: Sequence[int] = BATCHES
) -> tuple[bytes, dict[str, Any]]:
    import torch

    litert_torch = _import_litert_torch()
    module = module.eval().cpu()
    with _quiet():
        conv = litert_torch._convert.interface.Converter()
        for b in batches:
            conv.signature(f"b{b}", module, (torch.zeros((b, *input_shape), dtype=torch.float32),))
        edge = conv.convert()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fp32.tflite"
            edge.export(str(path))
            data = path.read_bytes()
    return data, {"mode": "fp32", "converter": "litert-torch", "batch_signatures": list(batches)}


def to_tflite_int8(fp32: bytes, calibration: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """Static int8 (int8 weights and activations, float32 I/O), calibrated per signature."""
    _import_litert_torch()
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer import quantizer as aeq_quantizer
    from ai_edge_quantizer import recipe as aeq_recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    x = calibration.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, dst = Path(tmp) / "fp32.tflite", Path(tmp) / "int8.tflite"
        src.write_bytes(fp32)
        qt = aeq_quantizer.Quantizer(str(src), aeq_recipe.static_wi8_ai8())
        # float32 I/O, and the input normalization (SUB, then MUL or DIV by 1/std)
        # kept in float: quantizing raw features before normalizing them costs accuracy
        for op in (
            qtyping.TFLOperationName.INPUT,
            qtyping.TFLOperationName.OUTPUT,
            qtyping.TFLOperationName.SUB,
            qtyping.TFLOperationName.MUL,
            qtyping.TFLOperationName.DIV,
        ):
            qt.update_quantization_recipe(".*", op, algorithm_key=AlgorithmName.NO_QUANTIZE)
        interp = Interpreter(model_content=fp32)
        calib: dict[str, list[dict[str, np.ndarray]]] = {}
        for key, sig in interp.get_signature_list().items():
            name = sig["inputs"][0]
            b = int(interp.get_signature_runner(key).get_input_details()[name]["shape"][0])
            batches = [{name: x[i : i + b]} for i in range(0, len(x) - b + 1, b)]
            if not batches:  # fewer samples than the batch: repeat them
                reps = -(-b // len(x))
                batches = [{name: np.concatenate([x] * reps)[:b]}]
            calib[key] = batches
        with quiet_native_banners():
            result = qt.calibrate(calib)
        qt.quantize(result, enable_progress_report=False).export_model(str(dst), overwrite=True)
        data = dst.read_bytes()
    return data, {
        "mode": "static",
        "weights": "int8",
        "activations": "int8",
        "io": "float32",
        "quantizer": "ai-edge-quantizer static_wi8_ai8",
        "calibration_samples": len(x),
        "batch_signatures": list(BATCHES),
    }
