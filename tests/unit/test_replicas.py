"""Replica mode's edges that need no database: the settings it refuses (one line naming
what is accepted), the replicas in `fleet status` (proto round trip, JSON, text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cloud.api.convert import replica_from_pb, replica_to_pb
from edgefleet.cloud.cli.output import status_json
from edgefleet.cloud.client import FleetStatus
from edgefleet.cloud.config import CloudSettings
from edgefleet.cloud.replicas import ReplicaInfo
from edgefleet.cloud.replicas.runtime import check_replica_settings
from edgefleet.protos.errors import InvalidArgument

PG = "postgresql://fleet@db.internal:5432/fleet"


def settings(tmp_path: Path, **kw: str) -> CloudSettings:
    base = {"db_url": PG, "artifact_uri": "s3://fleet/a", "broker": "mqtts://mq:8883"}
    return CloudSettings(home=tmp_path, **{**base, **kw})


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"db_url": ""}, ["shared database: sqlite", "accepted: PostgreSQL"]),
        ({"artifact_uri": ""}, ["file://", "accepted: s3://"]),
        ({"broker": ""}, ["external MQTT broker", "--broker mqtt://HOST:PORT"]),
    ],
)
def test_replica_mode_refuses_what_replicas_cannot_share(
    tmp_path: Path, change: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as ei:
        check_replica_settings(settings(tmp_path, **change))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("--replica needs")
    for w in words:
        assert w in msg, msg


def test_replica_mode_accepts_postgres_s3_and_an_external_broker(tmp_path: Path) -> None:
    check_replica_settings(settings(tmp_path))


REPLICAS = (
    ReplicaInfo("b", "10.0.0.2:7443", "node-b", 42, 0.25, True, 7),
    ReplicaInfo("a", "10.0.0.1:7443", "node-a", 41, 12.5, False, 0),
)


def test_replicas_round_trip_through_the_status_message() -> None:
    assert tuple(replica_from_pb(replica_to_pb(r)) for r in REPLICAS) == REPLICAS


def test_status_json_names_the_replicas_and_the_leader() -> None:
    st = FleetStatus("10.0.0.1:7443", "1.0", "mqtts://mq:8883", 3, 2, {"active": 3}, REPLICAS)
    doc = status_json(st)
    assert doc["leader"] == "b"
    assert doc["replicas"][0] == {
        "replica_id": "b",
        "address": "10.0.0.2:7443",
        "host": "node-b",
        "pid": 42,
        "last_heartbeat_s": 0.25,
        "leader": True,
        "token": 7,
    }
    assert doc["replicas"][1]["leader"] is False and doc["replicas"][1]["token"] is None
    alone = status_json(FleetStatus("", "1.0", "", 0, 0, {}))
    assert alone["replicas"] == [] and alone["leader"] is None
