"""Staged rollouts: policy, state in the database, gates, and the controller that runs them."""

from edgefleet.cloud.rollouts.model import FINAL, GateResult, Rollout, RolloutDevice, Stage
from edgefleet.cloud.rollouts.policy import Policy, parse_policy
from edgefleet.cloud.rollouts.store import RolloutStore

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
