"""Drift rows and alerts to and from their FleetService messages."""

from __future__ import annotations

from cloud.drift.alerts import Alert
from cloud.drift.monitor import DriftRow
from protos.fleet.v1 import fleet_pb2


def drift_to_pb(r: DriftRow) -> fleet_pb2.DriftInfo:
    return fleet_pb2.DriftInfo(
        scope=r.scope,
        subject=r.subject,
        model=r.model,
        version=r.version,
        devices=r.devices,
        rows=r.rows,
        inputs=dict(r.inputs),
        predictions=r.predictions,
        threshold=r.threshold,
        min_samples=r.min_samples,
    )


def drift_from_pb(m: fleet_pb2.DriftInfo) -> DriftRow:
    return DriftRow(
        scope=m.scope,
        subject=m.subject,
        model=m.model,
        version=m.version,
        devices=m.devices,
        rows=m.rows,
        inputs=dict(m.inputs),
        predictions=m.predictions,
        threshold=m.threshold,
        min_samples=m.min_samples,
    )


def alert_to_pb(a: Alert) -> fleet_pb2.DriftAlert:
    return fleet_pb2.DriftAlert(
        id=a.id,
        scope=a.scope,
        subject=a.subject,
        model=a.model,
        version=a.version,
        metric=a.metric,
        state=a.state,
        psi=a.psi,
        max_psi=a.max_psi,
        threshold=a.threshold,
        rows=a.rows,
        detail=a.detail,
        first_seen_ms=a.first_seen_ms,
        last_seen_ms=a.last_seen_ms,
        resolved_ms=a.resolved_ms or 0,
    )


def alert_from_pb(m: fleet_pb2.DriftAlert) -> Alert:
    return Alert(
        id=m.id,
        scope=m.scope,
        subject=m.subject,
        model=m.model,
        version=m.version,
        metric=m.metric,
        state=m.state,
        psi=m.psi,
        max_psi=m.max_psi,
        threshold=m.threshold,
        rows=m.rows,
        detail=m.detail,
        first_seen_ms=m.first_seen_ms,
        last_seen_ms=m.last_seen_ms,
        resolved_ms=m.resolved_ms or None,
    )
