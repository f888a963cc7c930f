"""Export a trained module to ONNX (fp32, dynamic batch axis)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from edgefleet.cloud.errors import find_storage_error
from edgefleet.cloud.quiet import captured_output
from edgefleet.protos.errors import InvalidArgument

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 18


def export_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """fp32 ONNX with a dynamic batch axis named N, via the dynamo exporter."""
    from torch.export import Dim

    module = module.eval().cpu()
    sample = torch.zeros((2, *input_shape), dtype=torch.float32)
    arg = next(iter(_forward_arg_names(module)))
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                module,
                (sample,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={arg: {0: Dim("N", min=1, max=1 << 16)}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # torch raises many unrelated types here
            disk = find_storage_error(e, f"ONNX export of {type(module).__name__} to {tmp}")
            if disk is not None:  # the disk, not the model
                raise disk from None
            raise InvalidArgument(f"ONNX export failed for {type(module).__name__}: {e}") from e
        data = path.read_bytes()
    _check_batch_dynamic(data)
    return data


def _forward_arg_names(module: nn.Module) -> list[str]:
    import inspect

    params = list(inspect.signature(module.forward).parameters)
    return params or ["x"]


def _check_batch_dynamic(data: bytes) -> None:
    import onnx

    model = onnx.load_from_string(data)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise InvalidArgument("exported ONNX has a fixed batch size; expected a dynamic axis")


def _quiet() -> contextlib.AbstractContextManager[None]:
    """The exporter prints progress and warnings to stdout/stderr; keep them in the log."""
    os.environ.setdefault("TORCH_LOGS", "-all")
    return captured_output("torch.onnx", silence=("torch.onnx",))
