"""Model deltas: bytes on the wire and device apply time for real version pairs.

Every pair is made by the real pipeline over a throw-away FLEET_HOME (`train`,
`quantize`, `register_federated`), from one trained MLP (digits, hidden 512x448, the
fan-out benchmark's ~1 MB model), v1:

- (a) a federated round: 3 clients with non-IID shards (by label) each train one local
  epoch from v1's weights; their weights are averaged by sample count (FedAvg) and
  registered as v2 (fp32 and int8) — every weight changes a little;
- (b) a head-only fine-tune: only the output layer trained for one epoch, registered as v3;
- (c) a re-quantization of v1's weights: the pipeline's int8 builder again with a
  different calibration sample (what a refreshed calibration set does).

For each pair: the full artifact, what the coordinator would send (`build_delta`: the
smallest of its formats), each format on its own (tensor, zstd with the base as
dictionary, bsdiff4), and xdelta3 (`xdelta3 -e -9 -s BASE`, when the CLI is installed).
Apply time is what the agent does to rebuild (`apply_delta`, including the sha256 check
of the result); the baseline is verifying the full file once (sha256 + size, what the
agent does with a downloaded artifact). Medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench._table import Table

logger = logging.getLogger("bench.deltas")

# targets from issue 16
MAX_HEAD_ONLY = 0.15  # (b) delta / full
MAX_FEDERATED = 0.60  # (a) delta / full
MAX_APPLY_VS_VERIFY = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deltas")
    g.add_argument("--delta-epochs", type=int, default=2, help="v1 training epochs (default 2)")
    g.add_argument(
        "--delta-runs", type=int, default=15, help="timed apply/verify runs (default 15)"
    )


@dataclass(frozen=True)
class Pair:
    label: str
    kind: str  # federated | head | requant
    base: bytes
    target: bytes


def _train(module: Any, x: np.ndarray, y: np.ndarray, *, params: Any = None, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else module.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    module.train()
    perm = torch.randperm(len(xs))
    for i in range(0, len(xs), 64):
        idx = perm[i : i + 64]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(xs[idx]), ys[idx])
        loss.backward()
        opt.step()
    module.eval()


def _make_pairs(home: Path, epochs: int) -> list[Pair]:
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.evaluation import EvalSet
    from edgefleet.cloud.quantize import BUILDERS, Sources
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.models.arch import from_checkpoint, to_checkpoint
    from edgefleet.models.checkpoint import dump_checkpoint, load_checkpoint
    from edgefleet.models.data import load_dataset, split

    client = LocalClient(load_settings(home=home))
    client.init()
    noop: Any = lambda *_: None  # noqa: E731
    v1 = client.pipeline.train(
        "big", "digits", arch="mlp", epochs=epochs, options={"hidden": [512, 448]}
    )
    ref1 = ModelRef("big", v1.version)
    client.quantize(ref1, ["int8"], max_drop=100.0, force=False, progress=noop)
    store = client.pipeline.store
    ckpt = load_checkpoint(store.get(v1.checkpoint_sha256))
    train_ds, _hold = split(load_dataset("digits"), holdout=0.2, seed=0)

    # (a) one FedAvg round over 3 non-IID clients
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for c in range(3):
        mask = train_ds.y % 3 == c
        module = from_checkpoint(ckpt)
        _train(module, train_ds.x[mask], train_ds.y[mask], seed=c)
        n = int(mask.sum())
        total += n
        for k, v in to_checkpoint(ckpt.config, module).arrays.items():
            arrays[k] = arrays.get(k, 0) + v.astype(np.float64) * n
    fed = {k: (v / total).astype(ckpt.arrays[k].dtype) for k, v in arrays.items()}
    v2 = client.pipeline.register_federated(
        ref1,
        dump_checkpoint(type(ckpt)(ckpt.config, fed)),
        federated={"strategy": "FedAvg", "rounds": 1, "clients": 3},
        training_config={"local_epochs": 1},
    )
    client.quantize(
        ModelRef("big", v2.version), ["int8"], max_drop=100.0, force=False, progress=noop
    )
    v2 = client.get_version(ModelRef("big", v2.version))

    # (b) head-only fine-tune
    module = from_checkpoint(ckpt)
    head = list(module.parameters())[-2:]
    _train(module, train_ds.x, train_ds.y, params=head, seed=7)
    v3 = client.pipeline.register_federated(
        ref1,
        dump_checkpoint(to_checkpoint(ckpt.config, module)),
        federated={"strategy": "fine-tune", "rounds": 1},
        training_config={"head_only": True, "epochs": 1},
    )

    # (c) the int8 builder again on v1's weights with another calibration sample
    v1 = client.get_version(ref1)
    evalset = EvalSet.from_bytes(store.get(v1.evalset_sha256))
    rng = np.random.default_rng(1)
    calib = train_ds.x[
        np.sort(rng.choice(len(train_ds), size=len(evalset.calibration), replace=False))
    ]
    fp32_1 = store.get(v1.variant("fp32").sha256)
    requant, _cfg = BUILDERS["int8"](Sources(fp32_1, calib, v1.inputs[0].shape[1:], lambda: None))

    def art(mv: Any, variant: str) -> bytes:
        return store.get(mv.variant(variant).sha256)

    pairs = [
        Pair("(a) federated round, fp32", "federated", fp32_1, art(v2, "fp32")),
        Pair("(a) federated round, int8", "federated", art(v1, "int8"), art(v2, "int8")),
        Pair("(b) head-only fine-tune, fp32", "head", fp32_1, art(v3, "fp32")),
        Pair("(c) re-quantization, int8", "requant", art(v1, "int8"), bytes(requant)),
    ]
    client.close()
    return pairs


def _xdelta3(base: bytes, target: bytes, tmp: Path) -> int | None:
    exe = shutil.which("xdelta3")
    if exe is None:
        return None
    (tmp / "base").write_bytes(base)
    (tmp / "target").write_bytes(target)
    out = tmp / "out.vcdiff"
    subprocess.run(
        [exe, "-f", "-e", "-9", "-s", str(tmp / "base"), str(tmp / "target"), str(out)], check=True
    )
    return out.stat().st_size


def _timings(p: Pair, delta: bytes, runs: int) -> tuple[float, float]:
    """Median seconds to verify the full target (sha256) and to apply the delta as the
    agent does, interleaved so that machine noise hits both alike."""
    from edgefleet.protos.delta import apply_delta

    base_sha = hashlib.sha256(p.base).hexdigest()
    verify: list[float] = []
    apply: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        hashlib.sha256(p.target).hexdigest()
        t1 = time.perf_counter()
        apply_delta(p.base, delta, base_sha256=base_sha)
        t2 = time.perf_counter()
        verify.append(t1 - t0)
        apply.append(t2 - t1)
    return statistics.median(verify), statistics.median(apply)


def run(args: argparse.Namespace) -> list[Table]:
    from edgefleet.cloud.deltas.build import build_delta, tensor_segments
    from edgefleet.protos.delta import encode_bsdiff4, encode_tensor, encode_zstd

    runs = max(3, int(getattr(args, "delta_runs", 15)))
    with tempfile.TemporaryDirectory(prefix="bench-deltas-") as d:
        tmp = Path(d)
        pairs = _make_pairs(tmp / "home", int(getattr(args, "delta_epochs", 2)))
        sizes = Table(
            "Model deltas: bytes on the wire per pair (share of the full artifact)",
            [
                "pair",
                "full",
                "sent (format)",
                "tensor",
                "zstd dict",
                "bsdiff4",
                "xdelta3",
                "target",
            ],
        )
        speed = Table(
            "Model deltas: device apply time vs verifying the full file (median)",
            ["pair", "verify full", "apply delta", "apply / verify", "target"],
        )
        for p in pairs:
            full = len(p.target)

            def pct(n: int | None, full: int = full) -> str:
                return "-" if n is None else f"{n:,} ({100 * n / full:.1f}%)"

            segs = tensor_segments(p.base, p.target)
            tensor = len(encode_tensor(p.base, p.target, segs)) if segs is not None else None
            zstd_d = len(encode_zstd(p.base, p.target))
            bsd = len(encode_bsdiff4(p.base, p.target))
            xd = _xdelta3(p.base, p.target, tmp)
            built = build_delta(p.base, p.target, keep_ratio=1.0)
            assert built is not None
            sent = len(built.data)
            ratio = sent / full
            limit = {"federated": MAX_FEDERATED, "head": MAX_HEAD_ONLY}.get(p.kind)
            verdict = "-"
            if limit is not None:
                ok = ratio <= limit
                verdict = f"{'PASS' if ok else 'MISS'} (<= {limit:.0%})"
                sizes.misses += 0 if ok else 1
            shown = f"{pct(sent)} {built.format.label}" + (
                "" if ratio < 0.7 else " [full sent: >= 70%]"
            )
            sizes.add(
                p.label, f"{full:,}", shown, pct(tensor), pct(zstd_d), pct(bsd), pct(xd), verdict
            )

            v, a = _timings(p, built.data, runs)
            ok = a <= MAX_APPLY_VS_VERIFY * v
            speed.misses += 0 if ok else 1
            speed.add(
                p.label,
                f"{v * 1e3:.2f} ms",
                f"{a * 1e3:.2f} ms ({built.format.label})",
                f"{a / v:.2f}x",
                f"{'PASS' if ok else 'MISS'} (<= {MAX_APPLY_VS_VERIFY:.0f}x)",
            )
        sizes.notes.append(
            "sent: the smallest format that rebuilds the target exactly (the coordinator keeps "
            "it only under 70% of full); tensor = per-initializer COPY/XOR/ADD, zstd framed "
            "with the base as dictionary; xdelta3 -e -9 -s BASE"
        )
        speed.notes.append(
            "verify: sha256 of the full artifact in memory; apply: apply_delta as the agent "
            f"runs it (decode + rebuild + sha256 of the result); {runs} interleaved runs"
        )
        return [sizes, speed]
