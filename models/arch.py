"""PyTorch architectures by name.

Every architecture takes raw features (float32, the dataset's row shape), normalizes
them with statistics stored as buffers, and returns class logits. Normalization lives
in the graph, so each export (ONNX, TFLite) takes the same raw input as training.

Add one with::

    @register_architecture("wide")
    def wide(cfg: ArchConfig) -> nn.Module: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgefleet.models.checkpoint import ArchConfig, Checkpoint
from edgefleet.protos.errors import InvalidArgument

Builder = Callable[[ArchConfig], nn.Module]
ARCHITECTURES: dict[str, Builder] = {}


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        ARCHITECTURES[name] = fn
        return fn

    return deco


class Normalize(nn.Module):
    """(x - mean) / std over the flattened features; statistics are buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def fit(self, x: np.ndarray) -> None:
        flat = x.reshape(len(x), -1).astype(np.float64)
        self.mean.copy_(torch.from_numpy(flat.mean(0).astype(np.float32)))
        std = flat.std(0)
        # constant features (always-zero pixels): scale 1, else x/tiny explodes at test time
        self.std.copy_(torch.from_numpy(np.where(std < 1e-3, 1.0, std).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(x.shape[0], -1) - self.mean) / self.std


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        n_in = math.prod(cfg.input_shape)
        hidden = [int(h) for h in cfg.options.get("hidden", (128, 64))]
        self.norm = Normalize(n_in)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU()]
            n_in = h
        layers.append(nn.Linear(n_in, cfg.num_classes))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))  # type: ignore[no-any-return]


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) for a CNN: features must be square, (H, W) or (C, H, W)."""
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise InvalidArgument(
                f"arch 'cnn' needs square images; {input_shape[0]} features is not a square "
                "number (give X as (N, H, W) or (N, C, H, W), or use --arch mlp)"
            )
        return (1, side, side)
    if len(input_shape) == 2:
        return (1, input_shape[0], input_shape[1])
    if len(input_shape) == 3:
        return (input_shape[0], input_shape[1], input_shape[2])
    raise InvalidArgument(
        f"arch 'cnn' takes inputs of shape (F,), (H, W) or (C, H, W); got {input_shape}"
    )


class CNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool, two dense layers."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        c, h, w = image_shape(cfg.input_shape)
        if h < 2 or w < 2:
            raise InvalidArgument(f"arch 'cnn' needs images of at least 2x2; got {h}x{w}")
        ch = [int(v) for v in cfg.options.get("channels", (16, 32))]
        self.chw = (c, h, w)
        self.norm = Normalize(c * h * w)
        self.features = nn.Sequential(
            nn.Conv2d(c, ch[0], 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch[0], ch[1], 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = ch[1] * (h // 2) * (w // 2)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, cfg.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.chw
        z = self.norm(x).reshape(-1, c, h, w)
        return self.head(self.features(z))  # type: ignore[no-any-return]


register_architecture("mlp")(MLP)
register_architecture("cnn")(CNN)


def build(cfg: ArchConfig) -> nn.Module:
    try:
        builder = ARCHITECTURES[cfg.arch]
    except KeyError:
        raise InvalidArgument(
            f"architecture {cfg.arch!r} unknown; available: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return builder(cfg)


def to_checkpoint(cfg: ArchConfig, module: nn.Module) -> Checkpoint:
    arrays = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
    return Checkpoint(cfg, arrays)


def from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    module = build(ckpt.config)
    state = module.state_dict()
    missing = sorted(set(state) - set(ckpt.arrays))
    extra = sorted(set(ckpt.arrays) - set(state))
    if missing or extra:
        raise InvalidArgument(
            f"checkpoint does not fit arch {ckpt.config.arch!r}: missing {missing}, unexpected {extra}"
        )
    for k, v in ckpt.arrays.items():
        if tuple(state[k].shape) != v.shape:
            raise InvalidArgument(
                f"checkpoint array {k!r} has shape {v.shape}; arch "
                f"{ckpt.config.arch!r} expects {tuple(state[k].shape)}"
            )
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in ckpt.arrays.items()})
    return module.eval()
