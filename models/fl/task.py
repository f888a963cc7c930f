"""Local training and evaluation of a `models.arch` module (torch).

The ClientApp trains `mlp` checkpoints with `numpy_task` (same semantics, no torch
import) and every other architecture with this module; the ServerApp merges with it.

Only the module's parameters travel between the SuperLink and the devices; its
buffers (the input normalization statistics fitted in central training) come
from the starting checkpoint and stay fixed, so aggregation, clipping and DP
noise never touch them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from edgefleet.models.arch import from_checkpoint, to_checkpoint
from edgefleet.models.checkpoint import dump_checkpoint, load_checkpoint
from edgefleet.models.fl.numpy_task import FitConfig, check_labels, with_params
from edgefleet.protos.errors import InvalidArgument

__all__ = [
    "FitConfig",
    "check_labels",
    "evaluate",
    "fit",
    "merged_checkpoint",
    "module_from",
    "trainable",
]


def trainable(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's parameters (not buffers) as float32 arrays, by state-dict name."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.named_parameters()}


def module_from(base: bytes, params: Mapping[str, np.ndarray] | None = None) -> nn.Module:
    """The checkpoint `base` (arch + buffers + parameters) with `params` loaded over it."""
    return from_checkpoint(with_params(base, params))


def merged_checkpoint(base: bytes, params: Mapping[str, np.ndarray]) -> bytes:
    """weights.npz: `base` with `params` replaced (what a federated run ends with)."""
    module = module_from(base, params)
    return dump_checkpoint(to_checkpoint(load_checkpoint(base).config, module))


def fit(module: nn.Module, x: np.ndarray, y: np.ndarray, cfg: FitConfig) -> tuple[float, float]:
    """Train in place for `cfg.epochs`; (mean loss, accuracy) of the last epoch."""
    if len(x) == 0:
        raise InvalidArgument("no local training samples")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    anchor = [p.detach().clone() for p in module.parameters()] if cfg.proximal_mu > 0 else []
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    loss_sum, correct = 0.0, 0
    for _ in range(max(1, cfg.epochs)):
        module.train()
        order = rng.permutation(len(x))
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            logits = module(xt[idx])
            loss = loss_fn(logits, yt[idx])
            if anchor:  # FedProx: keep the local model near the global one
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * cfg.proximal_mu * prox
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.item()) * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
    module.eval()
    return loss_sum / len(x), correct / len(x)


def evaluate(module: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on `x`, `y`."""
    if len(x) == 0:
        raise InvalidArgument("no local held-out samples")
    module.eval()
    with torch.no_grad():
        logits = module(torch.from_numpy(x.astype(np.float32)))
        yt = torch.from_numpy(y.astype(np.int64))
        loss = float(nn.functional.cross_entropy(logits, yt).item())
        acc = float((logits.argmax(1) == yt).float().mean().item())
    return loss, acc
