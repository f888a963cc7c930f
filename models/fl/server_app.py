"""The ServerApp: a federated run from a registry checkpoint to weights.npz.

Reads its run config (see app/pyproject.toml), finds the chosen participants
(`FleetGrid`), runs the named Flower strategy for ``num-rounds`` with the round
deadline ``round-timeout``, and writes ``weights.npz`` then a ``done`` event to
``output-dir``. Any failure ends with a ``failed`` event and no weights file.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from edgefleet.models.fl import EVENTS_FILE, WEIGHTS_FILE
from edgefleet.models.fl.journal import Journal, failures_recorded
from edgefleet.protos.errors import FleetError, InvalidArgument

if TYPE_CHECKING:
    from edgefleet.models.fl.grid import FleetGrid

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["output-dir"]))
    journal = Journal(out / EVENTS_FILE)
    with failures_recorded(journal):
        run(grid, context, out, journal)


def run(grid: Grid, context: Context, out: Path, journal: Journal) -> None:
    from edgefleet.models.fl.grid import FleetGrid

    rc = context.run_config
    t0 = time.monotonic()
    base = Path(str(rc["checkpoint"])).read_bytes()
    fleet = FleetGrid(
        grid,
        journal,
        participants=parse_participants(str(rc.get("participants", ""))),
        min_clients=int(rc["min-clients"]),
        join_timeout=float(rc["join-timeout"]),
        pull_interval=float(rc["pull-interval"]),
    )
    fleet.discover()
    federate(fleet, rc, base, out / WEIGHTS_FILE)
    journal.write(
        "done",
        rounds=int(rc["num-rounds"]),
        seconds=round(time.monotonic() - t0, 3),
        flower_run_id=context.run_id,
        weights=WEIGHTS_FILE,
    )


def federate(
    fleet: FleetGrid,
    rc: Mapping[str, Any],
    base: bytes,
    weights_path: Path,
    *,
    extra_config: Mapping[str, Any] | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
) -> None:
    """Run the strategy named in `rc` over `fleet` from `base`; write weights.npz.

    `extra_config` goes to every ClientApp message; `evaluate_fn` is Flower's
    server-side evaluation hook (the simulator measures a central holdout with it).
    """
    from edgefleet.models.fl.strategies import build_strategy
    from edgefleet.models.fl.task import merged_checkpoint, module_from, trainable

    initial = trainable(module_from(base))
    strategy = build_strategy(rc, len(fleet.devices))
    config = ConfigRecord(
        {
            "base": base,
            "local-epochs": int(rc["local-epochs"]),
            "lr": float(rc["lr"]),
            "batch-size": int(rc["batch-size"]),
            "seed": int(rc["seed"]),
            "evaluate-on-train": str(rc.get("evaluate", "separate")) == "on-train",
            **(extra_config or {}),
        }
    )
    result = strategy.start(
        grid=fleet,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}),
        num_rounds=int(rc["num-rounds"]),
        timeout=float(rc["round-timeout"]),
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=evaluate_fn,
    )
    final = {k: np.asarray(v.numpy()) for k, v in result.arrays.items()}
    if set(final) != set(initial):
        raise FleetError(f"run ended with arrays {sorted(final)}; expected {sorted(initial)}")
    if not all(np.isfinite(a).all() for a in final.values()):
        raise FleetError("aggregated weights hold NaN or infinite values; nothing written")
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    tmp.write_bytes(merged_checkpoint(base, final))
    os.replace(tmp, weights_path)


def parse_participants(text: str) -> dict[int, str]:
    """``DEVICE=NODE_ID,…`` (what the coordinator passes) as {node id: device id}."""
    out: dict[int, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        device, sep, node = item.rpartition("=")
        if not sep or not node.isdigit():
            raise InvalidArgument(f"participant {item!r}: expected DEVICE=NODE_ID")
        out[int(node)] = device
    return out
