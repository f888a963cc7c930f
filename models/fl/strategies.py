"""Flower strategies by name, with Flower's server-side DP wrapper when asked.

Nothing here aggregates: every strategy is Flower's own class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from edgefleet.models.fl import STRATEGIES
from edgefleet.protos.errors import InvalidArgument

#: "separate": an evaluate message per node per round after training (Flower's default);
#: "on-train": each train message first scores the global model it received
EVALUATE_MODES = ("separate", "on-train")


def build_strategy(rc: Mapping[str, Any], participants: int) -> Strategy:
    """The strategy named by run config `strategy`, sampling among `participants` nodes."""
    name = str(rc.get("strategy", "fedavg")).lower()
    if str(rc.get("evaluate", "separate")) not in EVALUATE_MODES:
        raise InvalidArgument(
            f"evaluate {rc.get('evaluate')!r} unknown; accepted: {', '.join(EVALUATE_MODES)}"
        )
    min_clients = int(rc.get("min-clients", 2))
    common: dict[str, Any] = {
        "fraction_train": float(rc.get("fraction", 1.0)),
        # evaluate = "on-train": the train replies carry the evaluation; no evaluate messages
        "fraction_evaluate": 0.0 if rc.get("evaluate") == "on-train" else 1.0,
        "min_train_nodes": min_clients,
        "min_evaluate_nodes": min_clients,
        "min_available_nodes": min_clients,
    }
    byzantine = float(rc.get("byzantine", 0.2))
    strategy: Strategy
    if name == "fedavg":
        strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=float(rc.get("proximal-mu", 0.01)))
    elif name == "fedavgm":  # server momentum over the averaged update
        strategy = FedAvgM(
            **common,
            server_learning_rate=float(rc.get("server-lr", 1.0)),
            server_momentum=float(rc.get("server-momentum", 0.9)),
        )
    elif name == "fedadam":  # server-side Adam over the averaged update
        strategy = FedAdam(
            **common, eta=float(rc.get("server-eta", 0.01)), eta_l=float(rc.get("lr", 3e-3))
        )
    elif name == "fedmedian":
        strategy = FedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = FedTrimmedAvg(**common, beta=min(0.49, byzantine))
    elif name == "krum":
        strategy = Krum(**common, num_malicious_nodes=max(0, int(byzantine * participants)))
    else:
        raise InvalidArgument(f"strategy {name!r} unknown; accepted: {', '.join(STRATEGIES)}")
    clip, noise = float(rc.get("dp-clip", 0.0)), float(rc.get("dp-noise", 0.0))
    if clip > 0:
        sampled = max(min_clients, int(participants * float(rc.get("fraction", 1.0))))
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=noise, clipping_norm=clip, num_sampled_clients=sampled
        )
    elif noise > 0:
        raise InvalidArgument(f"dp-noise {noise} needs a clipping norm: set dp-clip > 0")
    return strategy
