"""Drift monitoring on the coordinator: PSI of live traffic against each version's
reference sketch, per device, group and fleet, and alerts in the database."""

from edgefleet.cloud.drift.alerts import Alert, AlertStore, Finding
from edgefleet.cloud.drift.monitor import DriftMonitor, DriftRow

__all__ = ["Alert", "AlertStore", "DriftMonitor", "DriftRow", "Finding"]
