"""Flower components of the simulator (imported by Flower's simulation runtime).

- `client`: the fleet's ClientApp (`models.fl.client_app`) with `poison_mod`
  around it: simulated devices named in run config ``attackers`` (partition ids)
  send model-poisoning updates when the message's (or run's) ``attack`` is
  ``signflip`` (w_global - scale * update) or ``boost`` (w_global + scale * update).
- `server`: runs the strategies listed in run config ``compare``
  (``STRATEGY:ATTACK,…``) one after another over the same simulated devices (one
  simulation, one Ray start), measuring each round's global model on the central
  holdout in run config ``holdout`` (Flower's server-side ``evaluate_fn``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from edgefleet.models.fl import EVENTS_FILE
from edgefleet.models.fl.client_app import build
from edgefleet.models.fl.journal import Journal, failures_recorded
from edgefleet.protos.errors import InvalidArgument

logger = logging.getLogger(__name__)

ATTACKS = ("none", "signflip", "boost")


def poisoned(
    sent: dict[str, np.ndarray], trained: dict[str, np.ndarray], kind: str, scale: float
) -> dict[str, np.ndarray]:
    """What an attacker sends instead of `trained` (the honest result of training `sent`)."""
    if kind not in ATTACKS:
        raise InvalidArgument(f"attack {kind!r} unknown; accepted: {', '.join(ATTACKS)}")
    sign = {"none": 0.0, "signflip": -scale, "boost": scale}[kind]
    if kind == "none":
        return trained
    return {k: (sent[k] + sign * (trained[k] - sent[k])).astype(np.float32) for k in trained}


def _attackers(context: Context) -> set[int]:
    text = str(context.run_config.get("attackers", ""))
    return {int(p) for p in text.split(",") if p.strip().isdigit()}


def poison_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    cfg = msg.content.config_records.get("config")
    kind = str(cfg["attack"]) if cfg is not None and "attack" in cfg else "none"
    if kind == "none" or int(str(context.node_config.get("partition-id", -1))) not in _attackers(
        context
    ):
        return reply
    scale = float(str(context.run_config.get("attack-scale", 10.0)))
    sent = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    trained = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
    bad = poisoned(sent, trained, kind, scale)
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in bad.items()})
    return reply


client = build(mods=[poison_mod])

server = ServerApp()


@server.main()
def compare(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = Path(str(rc["output-dir"]))
    journal = Journal(out / EVENTS_FILE)
    with failures_recorded(journal):
        _compare(grid, rc, out, journal)


def _compare(grid: Grid, rc: Mapping[str, Any], out: Path, journal: Journal) -> None:
    from edgefleet.models.fl.grid import FleetGrid
    from edgefleet.models.fl.server_app import federate
    from edgefleet.models.fl.task import evaluate, module_from

    t0 = time.monotonic()
    base = Path(str(rc["checkpoint"])).read_bytes()
    with np.load(str(rc["holdout"]), allow_pickle=False) as z:
        hx, hy = z["X"], z["y"]
    fleet = FleetGrid(
        grid,
        journal,
        participants={},
        min_clients=int(str(rc["min-clients"])),
        join_timeout=float(str(rc["join-timeout"])),
        pull_interval=float(str(rc["pull-interval"])),
    )
    fleet.discover()
    for item in filter(None, (p.strip() for p in str(rc["compare"]).split(","))):
        name, _, attack = item.partition(":")
        attack = attack or "none"
        if attack not in ATTACKS:
            raise InvalidArgument(f"compare {item!r}: attack {attack!r}; accepted {ATTACKS}")
        fleet.label = item
        started = time.monotonic()

        def central(rnd: int, arrays: ArrayRecord, label: str = item) -> MetricRecord:
            params = {k: v.numpy() for k, v in arrays.items()}
            loss, acc = evaluate(module_from(base, params), hx, hy)
            journal.write("central", label=label, round=rnd, accuracy=acc, loss=loss)
            return MetricRecord({"accuracy": acc, "loss": loss})

        federate(
            fleet,
            {**rc, "strategy": name},
            base,
            out / f"{re.sub(r'[^a-z0-9]+', '-', item.lower())}.npz",
            extra_config={"attack": attack},
            evaluate_fn=central,
        )
        journal.write("result", label=item, seconds=round(time.monotonic() - started, 3))
    journal.write("done", seconds=round(time.monotonic() - t0, 3))
