"""FleetError ⇄ gRPC status, one table for every gRPC server and client of ours."""

from __future__ import annotations

import grpc

from edgefleet.protos.errors import (
    AlreadyExists,
    Conflict,
    DataLoss,
    FleetError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

# Most specific first: the first class an error is an instance of wins.
STATUS_OF: tuple[tuple[type[FleetError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DataLoss, grpc.StatusCode.DATA_LOSS),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def grpc_status(e: FleetError) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_status(code: grpc.StatusCode, details: str) -> FleetError:
    """The FleetError a status code stands for (FleetError itself for INTERNAL, UNKNOWN …)."""
    for cls, c in STATUS_OF:
        if c == code:
            return cls(details)
    return FleetError(details)
