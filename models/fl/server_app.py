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
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from models.fl import EVENTS_FILE, WEIGHTS_FILE
from models.fl.journal import Journal
from protos.errors import FleetError, InvalidArgument

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["output-dir"]))
    journal = Journal(out / EVENTS_FILE)
    try:
        run(grid, context, out, journal)
    except (FleetError, ValueError, OSError) as e:
        # ValueError: Flower's strategies and DP wrappers reject bad settings with it
        journal.write("failed", reason=f"{type(e).__name__}: {e}", kind=type(e).__name__)
        logger.error("federated run failed: %s", e)


def run(grid: Grid, context: Context, out: Path, journal: Journal) -> None:
    from models.fl.grid import FleetGrid
    from models.fl.strategies import build_strategy
    from models.fl.task import merged_checkpoint, module_from, trainable

    rc = context.run_config
    t0 = time.monotonic()
    base = Path(str(rc["checkpoint"])).read_bytes()
    initial = trainable(module_from(base))
    fleet = FleetGrid(
        grid,
        journal,
        participants=parse_participants(str(rc.get("participants", ""))),
        min_clients=int(rc["min-clients"]),
        join_timeout=float(rc["join-timeout"]),
    )
    found = fleet.discover()
    strategy = build_strategy(rc, len(found))
    rounds = int(rc["num-rounds"])
    config = ConfigRecord(
        {
            "base": base,
            "local-epochs": int(rc["local-epochs"]),
            "lr": float(rc["lr"]),
            "batch-size": int(rc["batch-size"]),
            "seed": int(rc["seed"]),
        }
    )
    result = strategy.start(
        grid=fleet,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in initial.items()}),
        num_rounds=rounds,
        timeout=float(rc["round-timeout"]),
        train_config=config,
        evaluate_config=ConfigRecord(dict(config)),
    )
    final = {k: np.asarray(v.numpy()) for k, v in result.arrays.items()}
    if set(final) != set(initial):
        raise FleetError(f"run ended with arrays {sorted(final)}; expected {sorted(initial)}")
    if not all(np.isfinite(a).all() for a in final.values()):
        raise FleetError("aggregated weights hold NaN or infinite values; nothing written")
    tmp = out / (WEIGHTS_FILE + ".tmp")
    tmp.write_bytes(merged_checkpoint(base, final))
    os.replace(tmp, out / WEIGHTS_FILE)
    journal.write(
        "done",
        rounds=rounds,
        seconds=round(time.monotonic() - t0, 3),
        flower_run_id=context.run_id,
        weights=WEIGHTS_FILE,
    )


def parse_participants(text: str) -> dict[int, str]:
    """``DEVICE=NODE_ID,…`` (what the coordinator passes) as {node id: device id}."""
    out: dict[int, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        device, sep, node = item.rpartition("=")
        if not sep or not node.isdigit():
            raise InvalidArgument(f"participant {item!r}: expected DEVICE=NODE_ID")
        out[int(node)] = device
    return out
