"""The ClientApp: trains the version's model on this device's shards, never sending data.

Handlers:
- ``train``: load the global parameters over the starting checkpoint, train
  ``local-epochs`` on the local training split, return the parameters and
  ``num-examples`` (FedProx's proximal term when the config carries one);
- ``evaluate``: loss and accuracy on the local held-out split. With run config
  ``evaluate = "on-train"`` there are no evaluate messages: ``train`` scores the
  global model it received on the held-out split before training and adds
  ``eval-loss``/``eval-accuracy`` to its reply (one ClientApp process per round
  instead of two).

An `mlp` checkpoint trains and evaluates with `numpy_task` (torch's semantics, no
torch import: each message is a fresh process, and torch costs it ~1.5 CPU-s);
other architectures (the CNN) with torch (`task`), and a device without torch
answers those with an error saying how to install it.

`build(mods)` makes the same ClientApp with Flower mods around every handler
(the simulator adds its model-poisoning attacker this way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from edgefleet.models.checkpoint import load_checkpoint
from edgefleet.models.fl.numpy_task import NUMPY_ARCHS, FitConfig, check_labels, torch_missing
from edgefleet.models.fl.shards import data_dir_of, local_split, read_shards
from edgefleet.protos.errors import FleetError

logger = logging.getLogger(__name__)


def device_id_of(context: Context) -> str:
    nc = context.node_config
    if nc.get("device-id"):
        return str(nc["device-id"])
    if "partition-id" in nc:
        return f"partition-{int(str(nc['partition-id'])):04d}"
    return f"node-{context.node_id}"


def _local(context: Context, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = read_shards(data_dir_of(context.node_config, context.run_config))
    tr, ho = local_split(len(y), seed=seed)
    return x[tr], y[tr], x[ho], y[ho]


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records["config"]


def _fail(msg: Message, context: Context, e: Exception) -> Message:
    from flwr.app import Error

    reason = f"{device_id_of(context)}: {type(e).__name__}: {e}"
    logger.warning("%s", reason)
    return Message(Error(code=0, reason=reason), reply_to=msg)


@dataclass(frozen=True)
class _Local:
    """The model of a message and the functions that train, score and export it."""

    model: Any
    fit: Callable[[Any, np.ndarray, np.ndarray, FitConfig], tuple[float, float]]
    evaluate: Callable[[Any, np.ndarray, np.ndarray], tuple[float, float]]
    trainable: Callable[[Any], dict[str, np.ndarray]]


def _model(base: bytes, arrays: Mapping[str, np.ndarray]) -> _Local:
    """`arrays` over the checkpoint `base`: numpy for an `mlp`, else torch (when installed)."""
    arch = load_checkpoint(base).config.arch
    if arch in NUMPY_ARCHS:
        from edgefleet.models.fl import numpy_task as nt

        return _Local(nt.mlp_from(base, arrays), nt.fit, nt.evaluate, nt.NumpyMLP.trainable)
    try:
        from edgefleet.models.fl import task
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torch":
            raise
        raise torch_missing(arch) from e
    return _Local(task.module_from(base, arrays), task.fit, task.evaluate, task.trainable)


def train(msg: Message, context: Context) -> Message:
    cfg = _config(msg)
    try:
        seed = int(cfg.get("seed", 0))  # type: ignore[arg-type]
        xtr, ytr, xho, yho = _local(context, seed)
        base = bytes(cfg["base"])  # type: ignore[arg-type]
        local = _model(base, _arrays(msg.content.array_records["arrays"]))
        check_labels(ytr, load_checkpoint(base).config.num_classes, device_id_of(context))
        received: dict[str, float] = {}
        if bool(cfg.get("evaluate-on-train", False)):  # the global model, before training
            eloss, eacc = local.evaluate(local.model, xho, yho)
            received = {"eval-loss": eloss, "eval-accuracy": eacc}
        loss, acc = local.fit(
            local.model,
            xtr,
            ytr,
            FitConfig(
                epochs=int(cfg.get("local-epochs", 1)),  # type: ignore[arg-type]
                lr=float(cfg.get("lr", 3e-3)),  # type: ignore[arg-type]
                batch_size=int(cfg.get("batch-size", 32)),  # type: ignore[arg-type]
                seed=seed + int(cfg.get("server-round", 0)) + context.node_id % 10_000,  # type: ignore[arg-type]
                proximal_mu=float(cfg.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
            ),
        )
    except (FleetError, KeyError, ValueError) as e:
        return _fail(msg, context, e)
    metrics = MetricRecord(
        {"train-loss": loss, "train-accuracy": acc, "num-examples": len(ytr), **received}
    )
    arrays = ArrayRecord({k: _array(v) for k, v in local.trainable(local.model).items()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg = _config(msg)
    try:
        _, _, xho, yho = _local(context, int(cfg.get("seed", 0)))  # type: ignore[arg-type]
        local = _model(bytes(cfg["base"]), _arrays(msg.content.array_records["arrays"]))  # type: ignore[arg-type]
        loss, acc = local.evaluate(local.model, xho, yho)
    except (FleetError, KeyError, ValueError) as e:
        return _fail(msg, context, e)
    metrics = MetricRecord({"eval-loss": loss, "eval-accuracy": acc, "num-examples": len(yho)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _array(a: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(a, dtype=np.float32))


def build(mods: Sequence[Mod] = ()) -> ClientApp:
    """This ClientApp, with `mods` wrapped around every handler."""
    client = ClientApp(mods=list(mods))
    client.train()(train)
    client.evaluate()(evaluate)
    return client


app = build()
