"""Architectures, checkpoints, and running model bytes in their real runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.models.checkpoint import ArchConfig, dump_checkpoint, load_checkpoint
from edgefleet.protos.errors import InvalidArgument


def test_checkpoint_roundtrip_rebuilds_the_same_function() -> None:
    import torch

    from edgefleet.models.arch import build, from_checkpoint, to_checkpoint

    torch.manual_seed(0)
    cfg = ArchConfig("cnn", (64,), 10)
    m = build(cfg).eval()
    x = torch.randn(5, 64)
    again = from_checkpoint(load_checkpoint(dump_checkpoint(to_checkpoint(cfg, m))))
    assert torch.allclose(m(x), again(x))


def test_checkpoint_that_does_not_fit_is_named() -> None:
    from edgefleet.models.arch import build, from_checkpoint, to_checkpoint

    ck = to_checkpoint(ArchConfig("mlp", (64,), 10), build(ArchConfig("mlp", (64,), 10)))
    wrong = load_checkpoint(dump_checkpoint(ck))
    bent = type(wrong)(ArchConfig("mlp", (64,), 3), wrong.arrays)
    with pytest.raises(InvalidArgument, match="expects"):
        from_checkpoint(bent)
    with pytest.raises(InvalidArgument, match="not a readable weights.npz"):
        load_checkpoint(b"garbage")


def test_unknown_arch_and_non_square_cnn() -> None:
    from edgefleet.models.arch import build

    with pytest.raises(InvalidArgument, match="available: cnn, mlp"):
        build(ArchConfig("resnet", (64,), 10))
    with pytest.raises(InvalidArgument, match="not a square"):
        build(ArchConfig("cnn", (10,), 2))


@pytest.fixture(scope="module")
def tiny_onnx() -> bytes:
    import torch

    from edgefleet.cloud.training.export import export_onnx
    from edgefleet.models.arch import build

    torch.manual_seed(0)
    return export_onnx(build(ArchConfig("mlp", (64,), 10)), (64,))


def test_onnx_session_dynamic_batch_and_shape_errors(tiny_onnx: bytes) -> None:
    from edgefleet.models.runtime import open_session

    s = open_session(tiny_onnx, "onnxruntime")
    assert s.inputs[0].shape == (-1, 64) and s.provider == "CPUExecutionProvider"
    for n in (1, 7, 64):
        assert s.run(np.zeros((n, 64), np.float32)).shape == (n, 10)
    with pytest.raises(
        InvalidArgument, match=r"input shape \(2, 63\) does not fit input: float32\[N,64\]"
    ):
        s.run(np.zeros((2, 63), np.float32))
    with pytest.raises(InvalidArgument, match="send float32"):
        s.run(np.array([["a"] * 64]))
    with pytest.raises(InvalidArgument, match="ONNX Runtime cannot load"):
        open_session(tiny_onnx[: len(tiny_onnx) // 2], "onnxruntime")
    with pytest.raises(InvalidArgument, match="supported: onnxruntime, litert"):
        open_session(tiny_onnx, "tensorrt")
