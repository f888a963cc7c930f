"""`python -m bench [--only NAME ...]`: run the registered benchmarks, print their tables."""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import platform
import sys
import time
from types import ModuleType

# before any runtime is imported: keep TensorFlow/LiteRT and Flower quiet, as `make` does
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from bench._table import Table

# name -> module exposing run(args) -> list[Table] and optionally add_arguments(parser);
# run in this order. Add fan-out, telemetry, ... here.
BENCHMARKS: dict[str, str] = {
    "quantize": "bench.quantize",
    "agent": "bench.agent",
    "footprint": "bench.footprint",
    "fanout": "bench.fanout",
    "telemetry": "bench.telemetry",
    "persistence": "bench.persistence",
    "rollout": "bench.rollout",
    "fl": "bench.fl",
    "deltas": "bench.deltas",
    "console": "bench.console",
    "scale": "bench.scale",
    "enrol": "bench.enrol",
}

logger = logging.getLogger("bench")


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(path) for name, path in BENCHMARKS.items()}


def _parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(modules),
        metavar="NAME",
        help=f"run only this benchmark (repeatable); available: {', '.join(modules)}",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for mod in modules.values():
        add = getattr(mod, "add_arguments", None)
        if add is not None:
            add(p)
    return p


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    versions = []
    for dist in ("onnxruntime", "ai-edge-litert", "torch", "numpy"):
        try:
            from importlib.metadata import version

            versions.append(f"{dist} {version(dist)}")
        except Exception:  # not installed: say so rather than fail
            versions.append(f"{dist} -")
    from edgefleet.cloud.pipeline import code_version

    return [
        f"date:    {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu}, "
        f"{platform.system()} {platform.machine()}",
        f"python:  {platform.python_version()}; {', '.join(versions)}",
        f"code:    edgefleet {code_version()}",
    ]


def main(argv: list[str] | None = None) -> int:
    modules = _modules()
    args = _parser(modules).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("bench").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    chosen = args.only or list(modules)
    started = time.perf_counter()
    print("edgefleet benchmarks")
    print("\n".join(machine()))
    misses = 0
    for name in chosen:
        t0 = time.perf_counter()
        logger.info("running %s", name)
        tables: list[Table] = modules[name].run(args)
        for table in tables:
            print()
            print(table.render())
            misses += table.misses
        print(f"\n[{name}: {time.perf_counter() - t0:.1f} s]")
    print(f"\ntotal {time.perf_counter() - started:.1f} s; {misses} target(s) missed")
    return 1 if args.strict and misses else 0


if __name__ == "__main__":
    sys.exit(main())
