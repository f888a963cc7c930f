"""Every table of the coordinator's database, on one `MetaData` (alembic's target).

The tables live beside their stores; importing this module registers all of them.
"""

from __future__ import annotations

from edgefleet.cloud.access import store as _access
from edgefleet.cloud.db import metadata
from edgefleet.cloud.deltas import store as _deltas
from edgefleet.cloud.devices import store as _devices
from edgefleet.cloud.drift import alerts as _alerts
from edgefleet.cloud.fl import store as _fl
from edgefleet.cloud.registry import tables as _registry
from edgefleet.cloud.replicas import tables as _replicas
from edgefleet.cloud.rollouts import store as _rollouts
from edgefleet.cloud.telemetry import store as _telemetry

__all__ = ["TABLE_MODULES", "metadata"]

#: the modules that declare tables (a new table goes in one of them, or a new one here)
TABLE_MODULES = (
    _registry,
    _devices,
    _rollouts,
    _telemetry,
    _alerts,
    _fl,
    _access,
    _deltas,
    _replicas,
)
