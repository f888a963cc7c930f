"""The project's one error hierarchy (defined in `protos.errors`, shared with the agent)."""

from edgefleet.protos.errors import (
    AlreadyExists,
    Conflict,
    DataLoss,
    FleetError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "Conflict",
    "DataLoss",
    "FleetError",
    "InvalidArgument",
    "NotFound",
    "Unauthenticated",
    "Unavailable",
]
