"""`ReplicaInfo` <-> `fleet.v1.ReplicaStatus` (the replicas in StatusResponse)."""

from __future__ import annotations

from edgefleet.cloud.replicas.registry import ReplicaInfo
from edgefleet.protos.fleet.v1 import fleet_pb2


def replica_to_pb(r: ReplicaInfo) -> fleet_pb2.ReplicaStatus:
    return fleet_pb2.ReplicaStatus(
        replica_id=r.replica_id,
        address=r.address,
        host=r.host,
        pid=r.pid,
        heartbeat_age_s=r.heartbeat_age_s,
        leader=r.leader,
        token=r.token,
    )


def replica_from_pb(m: fleet_pb2.ReplicaStatus) -> ReplicaInfo:
    return ReplicaInfo(
        replica_id=m.replica_id,
        address=m.address,
        host=m.host,
        pid=m.pid,
        heartbeat_age_s=m.heartbeat_age_s,
        leader=m.leader,
        token=m.token,
    )


__all__ = ["replica_from_pb", "replica_to_pb"]
