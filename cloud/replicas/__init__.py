"""Coordinator replicas: several `fleet serve --replica` on one PostgreSQL and one S3
store, one leader (advisory lock + lease with a fencing token) for the parts that must
be single. See `lease` (leadership and fencing), `registry` (who runs, who leads) and
`runtime` (the election loop and what the leader runs)."""

from edgefleet.cloud.replicas.lease import (
    DEFAULT_LEASE_S,
    Fence,
    FencedOut,
    LeaderLease,
    LeaseState,
    read_lease,
    require_postgres,
)
from edgefleet.cloud.replicas.registry import ReplicaInfo, ReplicaStore

__all__ = [
    "DEFAULT_LEASE_S",
    "Fence",
    "FencedOut",
    "LeaderLease",
    "LeaseState",
    "ReplicaInfo",
    "ReplicaStore",
    "read_lease",
    "require_postgres",
]
