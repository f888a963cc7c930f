"""Device telemetry in the coordinator: decode, buffer, batch-insert, roll up."""

from edgefleet.cloud.telemetry.ingest import TelemetryIngest, TelemetrySubscriber, decode_row
from edgefleet.cloud.telemetry.store import Percentiles, TelemetryStore, quantile

__all__ = [
    "Percentiles",
    "TelemetryIngest",
    "TelemetryStore",
    "TelemetrySubscriber",
    "decode_row",
    "quantile",
]
