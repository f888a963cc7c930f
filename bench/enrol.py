"""Enrolment rate: one device at a time vs one batch, in FLEET_HOME and through `fleet serve`.

For each N, in fresh FLEET_HOMEs, each measurement in its own process
(`bench/_enrol_worker.py`):

- single: N - SAMPLE devices put in place at once, then SAMPLE more enrolled one at a
  time, first in FLEET_HOME (`LocalClient.enroll_device`), then through a running
  `fleet serve` (`EnrollDevice` over gRPC: each also rewrites the broker's files and
  reloads it). The rate once N devices exist: what the N-th enrolment costs.
- batch: all N in one call, in FLEET_HOME (`enroll_devices`) and through `fleet serve`
  (`EnrollDevices`): one credential write, one transaction, one broker reload.

With `--enrol-baseline CHECKOUT` (e.g. the main branch's working tree) the single
measurements run against that checkout's code too, in the same run: the same-run
baseline (it has no batch path). `python -m bench --only enrol --enrol-baseline ../main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._table import Table, ratio

logger = logging.getLogger("bench.enrol")

HERE = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("_enrol_worker.py")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("enrol")
    g.add_argument("--enrol-sizes", default="1000,10000", help="device counts (default 1000,10000)")
    g.add_argument(
        "--enrol-sample",
        type=int,
        default=100,
        help="single enrolments timed at each size (default 100)",
    )
    g.add_argument(
        "--enrol-baseline",
        type=Path,
        default=None,
        help="another checkout (e.g. main) to measure single enrolment against in this run",
    )


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _work(code: Path, mode: str, n: int, sample: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(code)
    with tempfile.TemporaryDirectory(prefix=f"bench-enrol-{mode}-{n}-") as root:
        r = subprocess.run(
            [sys.executable, str(WORKER), mode, str(n), str(sample), root],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    if r.returncode != 0:
        raise RuntimeError(f"enrol worker ({code}, {mode} {n}) failed: {r.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    logger.info("enrol %s %s %d: %s (load %s)", code.name, mode, n, out, load())
    return out


def run(args: argparse.Namespace) -> list[Table]:
    sizes = [int(x) for x in str(args.enrol_sizes).split(",") if x]
    sample = int(args.enrol_sample)
    codes: list[tuple[str, Path]] = [("this tree", HERE)]
    if args.enrol_baseline is not None:
        codes.insert(0, ("baseline", Path(args.enrol_baseline).resolve()))
    t = Table(
        "enrol: devices enrolled per second, one at a time vs one batch",
        [
            "devices",
            "code",
            "single, FLEET_HOME /s",
            "single, gRPC /s",
            "batch, FLEET_HOME /s",
            "batch, gRPC /s",
            "batch s",
            "load",
        ],
        align="rlrrrrrl",
    )
    rates: dict[tuple[str, int], dict[str, float]] = {}
    for n in sizes:
        for name, code in codes:
            before = load()
            s = _work(code, "single", n, sample)
            r = {"local": sample / s["local_s"], "grpc": sample / s["grpc_s"]}
            cells = ["-", "-", "-"]
            if code == HERE:
                b = _work(code, "batch", n, 0)
                r |= {"batch_local": n / b["local_s"], "batch_grpc": n / b["grpc_s"]}
                cells = [f"{r['batch_local']:.0f}", f"{r['batch_grpc']:.0f}", f"{b['grpc_s']:.1f}"]
            rates[(name, n)] = r
            t.add(
                f"{n:,}",
                name,
                f"{r['local']:.1f}",
                f"{r['grpc']:.1f}",
                *cells,
                f"{before} -> {load()}",
            )
    for n in sizes:
        new = rates[("this tree", n)]
        base = rates.get(("baseline", n))
        if base is not None:
            t.notes.append(
                f"  {n:,}: single vs baseline: FLEET_HOME {ratio(new['local'] / base['local'])}, "
                f"gRPC {ratio(new['grpc'] / base['grpc'])}; batch vs baseline single: "
                f"FLEET_HOME {ratio(new['batch_local'] / base['local'])}, "
                f"gRPC {ratio(new['batch_grpc'] / base['grpc'])}"
            )
    t.notes += [
        f"  single: the rate of {sample} enrolments made one at a time once N-{sample} exist",
        "  batch: all N in one call (one credential write, one transaction, one broker reload)",
        "  batch s: seconds for the whole batch through `fleet serve` (EnrollDevices)",
        "  load: 1-minute load average before -> after the row",
    ]
    if args.enrol_baseline is not None:
        t.notes.append(f"  baseline: {Path(args.enrol_baseline).resolve()}")
    return [t]
