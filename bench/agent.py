"""Agent overhead, footprint and swap under load.

- Predict p50 through the agent in-process (ModelHolder) vs raw onnxruntime
  `session.run`, and over local gRPC vs raw run + a bare gRPC echo of the same
  bytes; same model, same run, interleaved rounds. Target: ≤ 1.3× at p50.
- Idle RSS of an agent process with ONNX Runtime and a model loaded (target ≤ 80 MB),
  and the installed size of `edgefleet[agent]`'s dependency closure.
- Failed requests while a new model is activated under continuous Predict load (target 0).
- Drift sketching per batch-1 predict: observing plus amortised binning (target ≤ 100 µs;
  docs/agent.md quotes it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import numpy as np

from bench._table import Table, ratio

AGENT_DISTS = (
    "paho-mqtt",
    "grpcio",
    "protobuf",
    "typer",
    "pydantic",
    "pydantic-settings",
    "cryptography",
    "numpy",
    "rich",
    "onnxruntime",
    "ai-edge-litert",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("agent")
    g.add_argument("--agent-rounds", type=int, default=7, help="interleaved rounds (default 7)")
    g.add_argument(
        "--agent-calls", type=int, default=400, help="calls per path per round (default 400)"
    )


def _model() -> tuple[Any, bytes, Any]:
    """A trained digits MLP: (manifest, fp32 bytes, eval inputs)."""
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.evaluation import EvalSet
    from edgefleet.protos.manifest import SignedManifest, decode_manifest

    home = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    client = LocalClient(
        load_settings(
            home=home, db_url=f"sqlite:///{home / 'r.db'}", artifact_uri=(home / "a").as_uri()
        )
    )
    client.init()
    mv = client.train(
        "digits", "digits", arch="mlp", epochs=3, seed=0, batch_size=64, lr=3e-3, on_epoch=None
    )
    v = mv.variant("fp32")
    data = client.pipeline.store.get(v.sha256)
    ev = EvalSet.from_bytes(client.pipeline.store.get(mv.evalset_sha256))
    manifest = decode_manifest(SignedManifest.from_bytes(v.signed_manifest).manifest_bytes)
    client.close()
    return manifest, data, ev.x


async def _echo_server() -> tuple[Any, int]:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _overhead(
    manifest: Any, data: bytes, x: np.ndarray, rounds: int, calls: int
) -> dict[str, list[float]]:
    import grpc
    import onnxruntime as ort

    from edgefleet.agent.inference import ModelHolder, load
    from edgefleet.agent.serde import encode_predict_request
    from edgefleet.agent.server import serve
    from edgefleet.protos.fleet.v1 import inference_pb2_grpc

    x1 = np.ascontiguousarray(x[:1])
    raw = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    in_name = raw.get_inputs()[0].name
    holder = ModelHolder()
    holder.swap(load(manifest, data, providers=("CPUExecutionProvider",)))
    server, port = await serve(holder, address="127.0.0.1:0")
    echo_server, echo_port = await _echo_server()
    request = encode_predict_request(x1)
    payload = request.SerializeToString()
    results: dict[str, list[float]] = {k: [] for k in ("raw", "holder", "echo", "grpc")}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as ech,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        echo = ech.unary_unary("/bench.Echo/Echo")
        for _ in range(20):
            await stub.Predict(request)
            await echo(payload)

        def timed_sync(fn: Any) -> float:
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                fn()
                ts.append(time.perf_counter_ns() - t0)
            return statistics.median(ts) / 1e3

        async def timed_async(fn: Any) -> float:
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                await fn()
                ts.append(time.perf_counter_ns() - t0)
            return statistics.median(ts) / 1e3

        for r in range(rounds):
            order = ["raw", "holder", "echo", "grpc"]
            order = order[r % 4 :] + order[: r % 4]
            for k in order:
                if k == "raw":
                    results[k].append(timed_sync(lambda: raw.run(None, {in_name: x1})))
                elif k == "holder":
                    results[k].append(timed_sync(lambda: holder.predict(x1)))
                elif k == "echo":
                    results[k].append(await timed_async(lambda: echo(payload)))
                else:
                    results[k].append(await timed_async(lambda: stub.Predict(request)))
    await server.stop(0)
    await echo_server.stop(0)
    return results


async def _swap_under_load(
    manifest: Any, data: bytes, x: np.ndarray, swaps: int = 20
) -> tuple[int, int, float, float]:
    import grpc

    from edgefleet.agent.inference import ModelHolder, load
    from edgefleet.agent.serde import encode_predict_request
    from edgefleet.agent.server import serve
    from edgefleet.protos.fleet.v1 import inference_pb2_grpc

    holder = ModelHolder()
    models = [load(manifest, data, providers=("CPUExecutionProvider",)) for _ in range(2)]
    holder.swap(models[0])
    server, port = await serve(holder, address="127.0.0.1:0")
    request = encode_predict_request(np.ascontiguousarray(x[:1]))
    ok = failed = 0
    lat: list[float] = []
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal ok, failed
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    await stub.Predict(request)
                    ok += 1
                    lat.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError:
                    failed += 1

    tasks = [asyncio.create_task(client()) for _ in range(4)]
    await asyncio.sleep(0.3)
    for i in range(swaps):
        # what the updater does: load + self-test beside the active model, then swap
        new = await asyncio.to_thread(load, manifest, data, providers=("CPUExecutionProvider",))
        holder.swap(new if i % 2 else models[i % 2])
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks)
    await server.stop(0)
    lat.sort()
    return ok, failed, lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


_RSS_PROBE = r"""
import asyncio, json, sys, gc
from pathlib import Path
from edgefleet.agent.inference import ModelHolder, load
from edgefleet.agent.server import serve
from edgefleet.protos.manifest import SignedManifest, verify_manifest, load_public_key
from edgefleet.protos.manifest import decode_manifest
data = Path(sys.argv[1]).read_bytes()
manifest = decode_manifest(Path(sys.argv[2]).read_bytes())
async def main():
    h = ModelHolder()
    h.swap(load(manifest, data, providers=("CPUExecutionProvider",)))
    server, port = await serve(h, address="127.0.0.1:0")
    gc.collect()
    await asyncio.sleep(0.5)
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    mods = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cloud", "sklearn"))
    print(json.dumps({"rss_kb": rss, "heavy_modules": mods[:5]}))
    await server.stop(0)
asyncio.run(main())
"""


def _idle_rss(manifest: Any, data: bytes) -> dict[str, Any]:
    from edgefleet.protos.manifest import encode_manifest

    d = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    (d / "m.onnx").write_bytes(data)
    (d / "m.manifest").write_bytes(encode_manifest(manifest))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(d / "m.onnx"), str(d / "m.manifest")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _install_size() -> tuple[int, list[str]]:
    """Bytes on disk of the agent's dependency closure, from each installed dist's RECORD."""
    seen: set[str] = set()
    todo = ["edgefleet", *AGENT_DISTS]
    total, missing = 0, []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            missing.append(name)
            continue
        for f in dist.files or []:
            with contextlib.suppress(OSError):
                total += f.locate().stat().st_size
        if name in AGENT_DISTS or name == "edgefleet":
            for req in dist.requires or []:
                if "extra ==" in req:
                    continue
                dep = req.split(";")[0].split("[")[0]
                for sep in "<>=!~ (":
                    dep = dep.split(sep)[0]
                if dep.strip():
                    todo.append(dep.strip())
    return total, missing


def _sketch_cost(manifest: Any, data: bytes, x: Any, predicts: int = 1000) -> float:
    """µs per batch-1 predict the agent spends on drift sketches (observe + take)."""
    from edgefleet.agent.drift import DriftMonitor
    from edgefleet.agent.inference import ModelHolder, Observation, load
    from edgefleet.models.sketch import build_reference, classes

    if manifest.drift is None:
        out = load(manifest, data).run(x)
        ref = build_reference(x, classes(out), int(out.shape[1]))
        manifest = dataclasses.replace(manifest, drift=ref)
    holder = ModelHolder()
    holder.swap(load(manifest, data))
    seen: list[Observation] = []
    holder.add_observer(seen.append)
    for i in range(predicts):
        holder.predict(x[i % len(x) : i % len(x) + 1])
    monitor = DriftMonitor()
    start = time.perf_counter()
    for _ in range(5):
        for o in seen:
            monitor.observe(o)
        monitor.take()
    return (time.perf_counter() - start) / (5 * len(seen)) * 1e6


def run(args: argparse.Namespace) -> list[Table]:
    manifest, data, x = _model()
    res = asyncio.run(_overhead(manifest, data, x, args.agent_rounds, args.agent_calls))
    med = {k: statistics.median(v) for k, v in res.items()}
    r_in = statistics.median(h / r for h, r in zip(res["holder"], res["raw"], strict=True))
    r_grpc = statistics.median(
        g / (r + e) for g, r, e in zip(res["grpc"], res["raw"], res["echo"], strict=True)
    )
    t = Table(
        "agent overhead: Predict p50 at batch 1 (digits MLP fp32, µs)",
        ["path", "p50 µs", "baseline", "ratio", "target", "result"],
    )
    t.add("raw onnxruntime session.run", f"{med['raw']:.1f}", "-", "-", "-", "")
    t.add(
        "agent in-process (ModelHolder)",
        f"{med['holder']:.1f}",
        "raw run",
        ratio(r_in),
        "<= 1.30x",
        "PASS" if r_in <= 1.3 else "MISS",
    )
    t.add("bare gRPC echo (same bytes)", f"{med['echo']:.0f}", "-", "-", "-", "")
    t.add(
        "agent over local gRPC",
        f"{med['grpc']:.0f}",
        "raw + echo",
        ratio(r_grpc),
        "<= 1.30x",
        "PASS" if r_grpc <= 1.3 else "MISS",
    )
    t.misses = int(r_in > 1.3) + int(r_grpc > 1.3)
    t.notes.append(
        f"  {args.agent_rounds} interleaved rounds x {args.agent_calls} calls per path; ratios are medians of per-round ratios"
    )

    rss = _idle_rss(manifest, data)
    size, missing = _install_size()
    f = Table("agent footprint", ["what", "measured", "target", "result"])
    rss_mb = rss["rss_kb"] / 1024
    f.add(
        "idle RSS, ONNX Runtime + model + gRPC server",
        f"{rss_mb:.1f} MB",
        "<= 80 MB",
        "PASS" if rss_mb <= 80 else "MISS",
    )
    f.add("installed size of edgefleet[agent] closure", f"{size / 1e6:.0f} MB", "-", "")
    sketch_us = _sketch_cost(manifest, data, x)
    f.add(
        "drift sketch per batch-1 predict",
        f"{sketch_us:.1f} µs",
        "<= 100 µs",
        "PASS" if sketch_us <= 100 else "MISS",
    )
    f.misses = int(rss_mb > 80) + int(sketch_us > 100)
    f.notes.append(
        f"  heavy modules imported by the agent process: {rss['heavy_modules'] or 'none (no torch, no cloud)'}"
    )
    if missing:
        f.notes.append(f"  not installed here (not counted): {', '.join(missing)}")

    ok, failed, p50, p99 = asyncio.run(_swap_under_load(manifest, data, x))
    s = Table(
        "swap under load: 20 activations under 4 continuous gRPC clients",
        ["requests ok", "failed", "p50 µs", "p99 µs", "target", "result"],
    )
    s.add(ok, failed, f"{p50:.0f}", f"{p99:.0f}", "0 failed", "PASS" if failed == 0 else "MISS")
    s.misses = int(failed > 0)
    return [t, f, s]
