"""Drift rows and alerts to and from their FleetService messages (same field names)."""

from __future__ import annotations

import dataclasses
from typing import Any

from edgefleet.cloud.drift.alerts import Alert
from edgefleet.cloud.drift.monitor import DriftRow
from edgefleet.protos.fleet.v1 import fleet_pb2


def _fields(value: Any) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def _from(cls: Any, msg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(msg, f.name)
        out[f.name] = dict(v) if f.name == "inputs" else v
    return out


def drift_to_pb(r: DriftRow) -> fleet_pb2.DriftInfo:
    return fleet_pb2.DriftInfo(**{**_fields(r), "inputs": dict(r.inputs)})


def drift_from_pb(m: fleet_pb2.DriftInfo) -> DriftRow:
    return DriftRow(**_from(DriftRow, m))


def alert_to_pb(a: Alert) -> fleet_pb2.DriftAlert:
    return fleet_pb2.DriftAlert(**{**_fields(a), "resolved_ms": a.resolved_ms or 0})


def alert_from_pb(m: fleet_pb2.DriftAlert) -> Alert:
    return Alert(**{**_from(Alert, m), "resolved_ms": m.resolved_ms or None})
