"""train(): fit a `models.arch` architecture on a dataset, report each epoch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgefleet.models.arch import Normalize, build
from edgefleet.models.checkpoint import ArchConfig
from edgefleet.models.data import Dataset
from edgefleet.protos.errors import InvalidArgument

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    arch: str
    epochs: int = 20
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    holdout: float = 0.2
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidArgument(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise InvalidArgument(f"--batch-size {self.batch_size}: must be at least 1")
        if not self.lr > 0:
            raise InvalidArgument(f"--lr {self.lr}: must be positive")

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "epochs": self.epochs,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "holdout": self.holdout,
            "options": dict(self.options),
            "optimizer": "adam",
        }


@dataclass(frozen=True)
class EpochStat:
    epoch: int
    epochs: int
    loss: float
    train_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    module: nn.Module
    arch_config: ArchConfig
    history: list[EpochStat]
    device: str


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train(
    data: Dataset,
    config: TrainConfig,
    *,
    progress: Callable[[EpochStat], None] | None = None,
) -> TrainResult:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    cfg = ArchConfig(config.arch, data.input_shape, data.num_classes, dict(config.options))
    module = build(cfg)
    for m in module.modules():
        if isinstance(m, Normalize):
            m.fit(data.x)
    device = pick_device()
    module.to(device)
    opt = torch.optim.Adam(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    history = []
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        module.train()
        order = rng.permutation(len(data))
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(order), config.batch_size):
            idx = torch.from_numpy(order[start : start + config.batch_size])
            xb, yb = x_all[idx].to(device), y_all[idx].to(device)
            opt.zero_grad()
            logits = module(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        stat = EpochStat(
            epoch, config.epochs, loss_sum / total, correct / total, time.perf_counter() - t0
        )
        history.append(stat)
        logger.debug(
            "epoch %d/%d loss %.4f acc %.4f", epoch, config.epochs, stat.loss, stat.train_accuracy
        )
        if progress:
            progress(stat)
    module.to("cpu").eval()
    return TrainResult(module, cfg, history, device)


def predict(module: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for `x`, in batches, on CPU."""
    module.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            outs.append(module(torch.from_numpy(x[start : start + batch_size])).numpy())
    return np.concatenate(outs)
