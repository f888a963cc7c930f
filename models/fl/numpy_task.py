"""Local training and evaluation of the `mlp` architecture in numpy (no torch).

Each ClientApp message is a fresh process (Flower 1.41), and importing torch costs
it ~1.5 CPU-s, so the ClientApp trains the MLP here: the same forward pass as
`models.arch.MLP` (the buffers' normalization, Linear + ReLU layers, no dropout),
the same loss (cross-entropy, mean over the batch, plus FedProx's proximal term),
the same optimizer (torch's Adam with its defaults), the same batch order
(`np.random.default_rng(seed).permutation`) and the same reported metrics as
`task.fit`/`task.evaluate`, in float32. Architectures other than `mlp` (the CNN)
train with torch (`task.py`); `tests/unit/test_fl_numpy.py` holds the two to parity.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgefleet.models.checkpoint import ArchConfig, Checkpoint, load_checkpoint
from edgefleet.protos.errors import InvalidArgument, Unavailable

#: how a device gets PyTorch without CUDA (PyPI's x86_64 torch pulls GBs of CUDA libraries;
#: on aarch64 PyPI's torch is the CPU build already)
TORCH_CPU = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
#: the architectures this module trains; the rest need torch on the device
NUMPY_ARCHS = frozenset({"mlp"})
#: torch.optim.Adam's defaults
BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 1
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0
    proximal_mu: float = 0.0


def check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InvalidArgument(
            f"{where}: labels span {int(y.min())}..{int(y.max())}; the model has "
            f"{num_classes} classes, so y must be class indices 0..{num_classes - 1}"
        )


def torch_missing(arch: str) -> Unavailable:
    """The error for a checkpoint that needs torch on a device without it."""
    return Unavailable(
        f"arch {arch!r} trains with PyTorch, which is not installed on this device "
        f"(only {', '.join(sorted(NUMPY_ARCHS))} trains without it): {TORCH_CPU}"
    )


def mlp_shapes(cfg: ArchConfig) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of `models.arch.MLP(cfg)`, in its order."""
    n_in = math.prod(cfg.input_shape)
    shapes: dict[str, tuple[int, ...]] = {"norm.mean": (n_in,), "norm.std": (n_in,)}
    dims = [n_in, *(int(h) for h in cfg.options.get("hidden", (128, 64))), cfg.num_classes]
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        shapes[f"body.{2 * i}.weight"] = (b, a)
        shapes[f"body.{2 * i}.bias"] = (b,)
    return shapes


class NumpyMLP:
    """`models.arch.MLP` as float32 arrays: buffers fixed, parameters trained."""

    def __init__(self, config: ArchConfig, arrays: Mapping[str, np.ndarray]) -> None:
        if config.arch not in NUMPY_ARCHS:
            raise torch_missing(config.arch)
        shapes = mlp_shapes(config)
        missing = sorted(set(shapes) - set(arrays))
        extra = sorted(set(arrays) - set(shapes))
        if missing or extra:
            raise InvalidArgument(
                f"checkpoint does not fit arch {config.arch!r}: missing {missing}, "
                f"unexpected {extra}"
            )
        for k, shape in shapes.items():
            if tuple(np.shape(arrays[k])) != shape:
                raise InvalidArgument(
                    f"checkpoint array {k!r} has shape {np.shape(arrays[k])}; arch "
                    f"{config.arch!r} expects {shape}"
                )
        self.config = config
        self.mean = np.asarray(arrays["norm.mean"], np.float32)
        self.std = np.asarray(arrays["norm.std"], np.float32)
        #: parameters (not buffers) by state-dict name, in `named_parameters()` order
        self.params = {
            k: np.array(arrays[k], dtype=np.float32) for k in shapes if k.startswith("body.")
        }

    @property
    def layers(self) -> int:
        return len(self.params) // 2

    def _wb(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.params[f"body.{2 * i}.weight"], self.params[f"body.{2 * i}.bias"]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, np.float32).reshape(len(x), -1)
        return (flat - self.mean) / self.std

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits, and each layer's input (for the backward pass)."""
        h = self.normalize(x)
        inputs = []
        for i in range(self.layers):
            w, b = self._wb(i)
            inputs.append(h)
            h = h @ w.T + b
            if i < self.layers - 1:
                h = np.maximum(h, np.float32(0))
        return h, inputs

    def backward(self, dlogits: np.ndarray, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        grads: dict[str, np.ndarray] = {}
        g = dlogits
        for i in reversed(range(self.layers)):
            w, _ = self._wb(i)
            grads[f"body.{2 * i}.weight"] = g.T @ inputs[i]
            grads[f"body.{2 * i}.bias"] = g.sum(0)
            if i > 0:
                g = (g @ w) * (inputs[i] > 0)  # ReLU's input > 0 iff its output > 0
        return grads

    def trainable(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.params.items()}


def with_params(base: bytes, params: Mapping[str, np.ndarray] | None = None) -> Checkpoint:
    """The checkpoint `base` (arch + buffers + parameters) with `params` loaded over it
    (both trainers start from this). InvalidArgument names arrays it does not have."""
    ckpt = load_checkpoint(base)
    if not params:
        return ckpt
    unknown = sorted(set(params) - set(ckpt.arrays))
    if unknown:
        raise InvalidArgument(
            f"arrays {unknown} are not in the {ckpt.config.arch!r} checkpoint; "
            f"expected some of {sorted(ckpt.arrays)}"
        )
    return Checkpoint(ckpt.config, {**ckpt.arrays, **{k: np.asarray(v) for k, v in params.items()}})


def mlp_from(base: bytes, params: Mapping[str, np.ndarray] | None = None) -> NumpyMLP:
    """Like `task.module_from`: the checkpoint `base` with `params` loaded over it."""
    ckpt = with_params(base, params)
    return NumpyMLP(ckpt.config, ckpt.arrays)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))  # type: ignore[no-any-return]


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    logp = _log_softmax(logits)
    rows = np.arange(len(y))
    loss = float(-logp[rows, y].mean())
    grad = np.exp(logp)
    grad[rows, y] -= 1
    return loss, (grad / np.float32(len(y))).astype(np.float32)


def fit(model: NumpyMLP, x: np.ndarray, y: np.ndarray, cfg: FitConfig) -> tuple[float, float]:
    """Train in place for `cfg.epochs`; (mean loss, accuracy) of the last epoch."""
    if len(x) == 0:
        raise InvalidArgument("no local training samples")
    rng = np.random.default_rng(cfg.seed)
    params = model.params
    anchor = {k: v.copy() for k, v in params.items()} if cfg.proximal_mu > 0 else {}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    b1, b2 = BETAS
    lr, mu = cfg.lr, np.float32(cfg.proximal_mu)
    x32, y64 = np.asarray(x, np.float32), np.asarray(y, np.int64)
    step = 0
    loss_sum, correct = 0.0, 0
    for _ in range(max(1, cfg.epochs)):
        order = rng.permutation(len(x))
        loss_sum, correct = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits, inputs = model.forward(x32[idx])
            loss, dlogits = cross_entropy(logits, y64[idx])
            grads = model.backward(dlogits, inputs)
            if anchor:  # FedProx: keep the local model near the global one
                prox = sum(float(((params[k] - a) ** 2).sum()) for k, a in anchor.items())
                loss += 0.5 * cfg.proximal_mu * prox
                for k, a in anchor.items():
                    grads[k] = grads[k] + mu * (params[k] - a)
            step += 1
            bc1, bc2 = 1 - b1**step, 1 - b2**step
            for k, p in params.items():  # torch.optim.Adam, weight_decay 0, amsgrad off
                g = grads[k]
                m[k] += (g - m[k]) * np.float32(1 - b1)
                v2[k] = v2[k] * np.float32(b2) + g * g * np.float32(1 - b2)
                denom = np.sqrt(v2[k]) / np.float32(math.sqrt(bc2)) + np.float32(EPS)
                p -= np.float32(lr / bc1) * m[k] / denom
            loss_sum += loss * len(idx)
            correct += int((logits.argmax(1) == y64[idx]).sum())
    return loss_sum / len(x), correct / len(x)


def evaluate(model: NumpyMLP, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on `x`, `y`."""
    if len(x) == 0:
        raise InvalidArgument("no local held-out samples")
    logits, _ = model.forward(x)
    yi = np.asarray(y, np.int64)
    loss = float(-_log_softmax(logits)[np.arange(len(yi)), yi].mean())
    return loss, float((logits.argmax(1) == yi).mean())
