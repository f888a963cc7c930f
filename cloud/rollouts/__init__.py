"""Staged rollouts: policy, state in the database, gates, and the controller that runs them."""

from cloud.rollouts.model import FINAL, GateResult, Rollout, RolloutDevice, Stage
from cloud.rollouts.policy import Policy, parse_policy
from cloud.rollouts.store import RolloutStore

__all__ = [
    "FINAL",
    "GateResult",
    "Policy",
    "Rollout",
    "RolloutDevice",
    "RolloutStore",
    "Stage",
    "parse_policy",
]
