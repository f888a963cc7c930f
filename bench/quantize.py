"""Quantization benchmark: every variant against fp32 of the same version, MLP and CNN on digits.

Uses the real pipeline (`LocalClient` over a throw-away FLEET_HOME): `train`, then
`quantize` with every variant, int8-dynamic for the MLP only (the pipeline refuses
it for convolutions; the refusal is checked and shown). Sizes and accuracies come
from the registry and are cross-checked against the stored bytes; latencies are
re-measured here with more runs than the registry's, variants interleaved so that
machine noise hits them alike, and reported as medians and ratios to fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._sizes import breakdown
from bench._table import Table, micros, ratio

logger = logging.getLogger("bench.quantize")

DATA = "digits"
ARCHS = ("mlp", "cnn")
ALL_VARIANTS = ("int8", "int8-dynamic", "fp16", "tflite-fp32", "tflite-int8")
INT8 = ("int8", "int8-dynamic", "tflite-int8")
CONV_REFUSED = "int8-dynamic"
BATCHES = (1, 64)

# targets from the issue
MAX_SIZE_RATIO = 1 / 3
MAX_DROP_POINTS = 0.5
MAX_CNN_INT8_B64_RATIO = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantize")
    g.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds (default 9)")
    g.add_argument(
        "--b1-runs", type=int, default=1000, help="timed batch-1 calls per round (default 1000)"
    )
    g.add_argument(
        "--b64-runs", type=int, default=200, help="timed batch-64 calls per round (default 200)"
    )
    g.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the pipeline's)"
    )
    g.add_argument("--seed", type=int, default=None, help="training seed (default: the pipeline's)")
    g.add_argument(
        "--keep-home", action="store_true", help="keep the temporary FLEET_HOME and print it"
    )


@dataclass
class VariantResult:
    name: str
    runtime: str
    size: int
    accuracy: float
    deployable: bool
    reason: str
    data: bytes
    registry_ms: dict[str, float]  # latency_ms as the pipeline stored it (fleet models show)
    # per timing round, median seconds per call, by batch size
    rounds: dict[int, list[float]] = field(default_factory=lambda: {b: [] for b in BATCHES})


@dataclass
class ModelResult:
    arch: str
    ref: str
    holdout: int
    weights: int
    train_s: float
    quantize_s: float
    variants: dict[str, VariantResult]
    x: Any = None  # holdout inputs, for the timed batches
    refusal: str | None = None  # int8-dynamic refusal message (CNN)
    refusal_left_registry: bool = True
    findings: list[str] = field(default_factory=list)

    def latency(self, name: str, batch: int) -> float:
        return statistics.median(self.variants[name].rounds[batch])

    def ratios(self, name: str, batch: int) -> list[float]:
        base = self.variants["fp32"].rounds[batch]
        return [v / b for v, b in zip(self.variants[name].rounds[batch], base, strict=True)]

    def ratio(self, name: str, batch: int) -> float:
        return statistics.median(self.ratios(name, batch))

    def drop(self, name: str) -> float:
        """Accuracy points lost against fp32 (negative: gained)."""
        return (self.variants["fp32"].accuracy - self.variants[name].accuracy) * 100.0


def run(args: argparse.Namespace) -> list[Table]:
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings

    with _fleet_home(args.keep_home) as home:
        settings = load_settings(
            home=home,
            # explicit, so FLEET_DB_URL / FLEET_ARTIFACT_URI in the environment are never touched
            db_url=f"sqlite:///{home / 'registry.db'}",
            artifact_uri=(home / "artifacts").as_uri(),
        )
        client = LocalClient(settings)
        client.init()
        try:
            results = [_build(client, arch, args) for arch in ARCHS]
        finally:
            client.close()
    for r in results:
        logger.info(
            "timing %s: %d rounds x %d b1 / %d b64 calls per variant",
            r.ref,
            args.repeats,
            args.b1_runs,
            args.b64_runs,
        )
        _time(r, repeats=args.repeats, runs={1: args.b1_runs, 64: args.b64_runs})
    tables = [_model_table(r, args) for r in results]
    tables.append(_registry_table(results))
    tables.append(_size_table(results))
    tables.append(_targets(results))
    return tables


@contextlib.contextmanager
def _fleet_home(keep: bool) -> Iterator[Path]:
    if keep:
        home = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
        logger.info("FLEET_HOME kept at %s", home)
        yield home
        return
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        yield Path(tmp)


def _build(client: Any, arch: str, args: argparse.Namespace) -> ModelResult:
    from edgefleet.cloud.evaluation import EvalSet, predictions
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.models.runtime import open_session
    from edgefleet.protos.errors import InvalidArgument

    name = f"{DATA}-{arch}"
    kw = {k: getattr(args, k) for k in ("epochs", "seed") if getattr(args, k) is not None}
    t0 = time.perf_counter()
    mv = client.train(name, DATA, arch=arch, **kw)
    train_s = time.perf_counter() - t0
    logger.info("trained %s (%s) in %.1f s", mv.ref, arch, train_s)
    ref = ModelRef(mv.model, mv.version)
    wanted = [v for v in ALL_VARIANTS if arch == "mlp" or v != CONV_REFUSED]
    t0 = time.perf_counter()
    mv = client.quantize(ref, wanted, max_drop=_default_max_drop(), force=False, progress=_progress)
    quantize_s = time.perf_counter() - t0
    logger.info("quantized %s (%s) in %.1f s", mv.ref, ", ".join(wanted), quantize_s)

    result = ModelResult(arch, mv.ref, 0, 0, train_s, quantize_s, {})
    if arch != "mlp":
        before = [(v.name, v.sha256) for v in mv.variants]
        try:
            client.quantize(
                ref, [CONV_REFUSED], max_drop=_default_max_drop(), force=False, progress=_progress
            )
        except InvalidArgument as e:
            result.refusal = str(e)
        after = [(v.name, v.sha256) for v in client.get_version(ref).variants]
        result.refusal_left_registry = before == after
        if result.refusal is None:
            result.findings.append(f"{CONV_REFUSED} was NOT refused for {mv.ref}")
        if not result.refusal_left_registry:
            result.findings.append(f"the refused {CONV_REFUSED} call changed {mv.ref}'s variants")

    store = client.pipeline.store
    if not mv.evalset_sha256:
        raise RuntimeError(f"{mv.ref} has no evaluation set in the registry")
    evalset = EvalSet.from_bytes(store.get(mv.evalset_sha256))
    assert evalset.y is not None
    result.holdout = len(evalset.y)
    result.x = evalset.x
    for v in mv.variants:
        data = store.get(v.sha256)
        if v.accuracy is None:
            raise RuntimeError(f"{mv.ref}/{v.name} has no accuracy in the registry")
        # the registry's figure must be what the stored bytes give on the stored holdout
        session = open_session(data, v.runtime, threads=1)
        acc = float((predictions(session.run(evalset.x)) == evalset.y).mean())
        if abs(acc - v.accuracy) > 1e-9:
            result.findings.append(
                f"{mv.ref}/{v.name}: registry accuracy {v.accuracy:.4%} but the stored bytes give {acc:.4%}"
            )
        if v.size != len(data):
            result.findings.append(
                f"{mv.ref}/{v.name}: registry size {v.size} but the artifact has {len(data)} bytes"
            )
        result.variants[v.name] = VariantResult(
            v.name,
            v.runtime,
            len(data),
            v.accuracy,
            v.deployable,
            v.reason,
            data,
            dict(v.latency_ms),
        )
    result.weights = _float_weights(result.variants["fp32"].data)
    return result


def _default_max_drop() -> float:
    from edgefleet.cloud.variants import DEFAULT_MAX_DROP

    return DEFAULT_MAX_DROP


def _progress(what: str, done: int, total: int) -> None:
    logger.debug("  %s (%d/%d)", what, done, total)


def _float_weights(fp32_onnx: bytes) -> int:
    import math

    import onnx

    g = onnx.load_from_string(fp32_onnx).graph
    return sum(math.prod(t.dims) for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT)


def _time(result: ModelResult, *, repeats: int, runs: dict[int, int]) -> None:
    from edgefleet.cloud.evaluation import batch_of
    from edgefleet.models.runtime import open_session

    names = list(result.variants)
    sessions = {n: open_session(v.data, v.runtime, threads=1) for n, v in result.variants.items()}
    inputs = {b: batch_of(result.x, b) for b in BATCHES}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
            for b in BATCHES:
                for n in order:
                    result.variants[n].rounds[b].append(
                        _median_call(sessions[n], inputs[b], runs[b])
                    )
    finally:
        if gc_was:
            gc.enable()


def _median_call(session: Any, x: Any, runs: int, warmup: int = 10) -> float:
    call = session.run
    for _ in range(warmup):
        call(x)
    clock = time.perf_counter
    times = []
    for _ in range(runs):
        t0 = clock()
        call(x)
        times.append(clock() - t0)
    return statistics.median(times)


# -- tables -------------------------------------------------------------------------


def _model_table(r: ModelResult, args: argparse.Namespace) -> Table:
    t = Table(
        f"{r.ref}  ({r.arch}, {r.weights:,} float32 weights; holdout {r.holdout} samples, "
        f"1 sample = {100 / r.holdout:.2f} pt)",
        [
            "variant",
            "runtime",
            "bytes",
            "size/fp32",
            "acc %",
            "acc d pt",
            "b1 us",
            "b1/fp32",
            "b64 us",
            "b64/fp32",
            "b64/fp32 range",
            "gate",
        ],
        align="llrrrrrrrrrl",
    )
    for name, v in r.variants.items():
        lo, hi = min(r.ratios(name, 64)), max(r.ratios(name, 64))
        t.add(
            name,
            v.runtime,
            f"{v.size:,}",
            f"{v.size / r.variants['fp32'].size:.3f}",
            f"{v.accuracy * 100:.2f}",
            f"{0.0 - r.drop(name) + 0.0:+.2f}" if name != "fp32" else "",
            micros(r.latency(name, 1)),
            ratio(r.ratio(name, 1)) if name != "fp32" else "",
            micros(r.latency(name, 64)),
            ratio(r.ratio(name, 64)) if name != "fp32" else "",
            f"{lo:.2f}-{hi:.2f}" if name != "fp32" else "",
            "deployable" if v.deployable else f"blocked: {v.reason}",
        )
    t.notes.append(
        f"  trained in {r.train_s:.1f} s, variants built in {r.quantize_s:.1f} s; latency: median of "
        f"{args.repeats} interleaved rounds of {args.b1_runs} b1 / {args.b64_runs} b64 calls, "
        "ORT/LiteRT threads=1; ratios are per-round ratios to fp32, median (range = min-max over rounds)"
    )
    t.notes.append(
        f"  gate: the pipeline's accuracy gate (max drop {_default_max_drop():g} pt), "
        f"not this benchmark's {MAX_DROP_POINTS:g}-pt target"
    )
    if r.arch != "mlp":
        if r.refusal is not None:
            t.notes.append(f"  {CONV_REFUSED}: refused by the pipeline: {r.refusal}")
        else:
            t.notes.append(
                f"  {CONV_REFUSED}: NOT refused (expected a refusal for a convolutional graph)"
            )
    for f in r.findings:
        t.notes.append(f"  FINDING: {f}")
    return t


def _registry_table(results: Sequence[ModelResult]) -> Table:
    t = Table(
        "registry latency (pipeline, at build time) vs this run",
        [
            "model",
            "variant",
            "reg b1 us",
            "reg b1/fp32",
            "bench b1/fp32",
            "reg b64 us",
            "reg b64/fp32",
            "bench b64/fp32",
        ],
        align="llrrrrrr",
    )
    for r in results:
        base = r.variants["fp32"].registry_ms
        for name, v in r.variants.items():
            reg = v.registry_ms
            t.add(
                r.ref,
                name,
                micros(reg["b1"] / 1000),
                ratio(reg["b1"] / base["b1"]),
                ratio(r.ratio(name, 1)),
                micros(reg["b64"] / 1000),
                ratio(reg["b64"] / base["b64"]),
                ratio(r.ratio(name, 64)),
            )
    t.notes.append(
        "  registry: one median per variant (100 b1 / 25 b64 calls, 5 warm-up), fp32 measured during"
    )
    t.notes.append(
        "  `train`, the others during `quantize`, so its ratios mix two moments of a shared machine."
    )
    return t


def _size_table(results: Sequence[ModelResult]) -> Table:
    t = Table(
        "where the bytes go (approximate)",
        [
            "model",
            "variant",
            "bytes",
            "tensor data",
            "scales+zps",
            "graph+names",
            "of which debug",
            "size/fp32",
            "size/fp32 w/o debug",
        ],
        align="llrrrrrrr",
    )
    for r in results:
        base = breakdown(r.variants["fp32"].data, "onnxruntime")
        for name, v in r.variants.items():
            b = breakdown(v.data, v.runtime)
            if b is None or base is None:
                t.add(r.ref, name, f"{v.size:,}", "?", "?", "?", "?", "?", "?")
                continue
            t.add(
                r.ref,
                name,
                f"{b.total:,}",
                f"{b.tensor_data:,}",
                f"{b.quant_params:,}",
                f"{b.graph:,}",
                f"{b.debug:,}",
                f"{b.total / base.total:.3f}",
                f"{(b.total - b.debug) / (base.total - base.debug):.3f}",
            )
    t.notes += [
        "  tensor data: weights and biases as stored (int8 variants keep biases as int32);",
        "  scales+zps: quantization scales and zero points (per output channel for weights);",
        "  debug: ONNX node metadata_props (torch exporter stack traces, module paths), read by no runtime.",
    ]
    return t


def _targets(results: Sequence[ModelResult]) -> Table:
    t = Table(
        "targets",
        ["target", "model", "variant", "measured", "limit", "result"],
        align="llllll",
    )

    def check(target: str, r: ModelResult, name: str, measured: str, limit: str, ok: bool) -> None:
        t.add(target, r.ref, name, measured, limit, "PASS" if ok else "MISS")
        if not ok:
            t.misses += 1

    for r in results:
        fp32 = r.variants["fp32"].size
        for name in INT8:
            if name in r.variants:
                q = r.variants[name].size / fp32
                check("int8 size <= 1/3 fp32", r, name, f"{q:.3f}", "<= 0.333", q <= MAX_SIZE_RATIO)
    for r in results:
        for name in r.variants:
            if name != "fp32":
                d = r.drop(name)
                check(
                    "accuracy drop <= 0.5 pt",
                    r,
                    name,
                    f"{d:+.2f} pt",
                    "<= +0.50 pt",
                    d <= MAX_DROP_POINTS + 1e-9,
                )
    for r in results:
        if r.arch == "cnn" and "int8" in r.variants:
            rs = r.ratios("int8", 64)
            q = r.ratio("int8", 64)
            check(
                "static int8 CNN b64 no slower than fp32 (ORT)",
                r,
                "int8",
                f"{q:.2f}x (rounds {min(rs):.2f}-{max(rs):.2f})",
                "<= 1.00x",
                q <= MAX_CNN_INT8_B64_RATIO,
            )
        if r.arch == "cnn":
            ok = r.refusal is not None and r.refusal_left_registry
            check(
                f"{CONV_REFUSED} refused for convolutions",
                r,
                CONV_REFUSED,
                "refused, registry unchanged" if ok else "not refused or registry changed",
                "refused",
                ok,
            )
    t.notes.append(f"  {t.misses} target(s) missed" if t.misses else "  all targets met")
    return t
