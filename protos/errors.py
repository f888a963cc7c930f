"""One error hierarchy for the whole project, keyed by `fleet.v1.ErrorCode`.

Messages name the object, the bad value and what is accepted::

    raise NotFound("model 'digits' has no version 99; versions: 1, 2")
"""

from __future__ import annotations

from typing import ClassVar

from edgefleet.protos.fleet.v1 import errors_pb2

ErrorCode = errors_pb2.ErrorCode


class FleetError(Exception):
    """Base of every error edgefleet raises on purpose."""

    code: ClassVar[int] = errors_pb2.ERROR_CODE_INTERNAL
    #: short name used in CLI output and reason codes
    kind: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @staticmethod
    def from_code(code: int, message: str) -> FleetError:
        """Rebuild the right subclass from a code received over the wire."""
        return _BY_CODE.get(code, FleetError)(message)


class InvalidArgument(FleetError):
    code = errors_pb2.ERROR_CODE_INVALID_ARGUMENT
    kind = "invalid-argument"


class NotFound(FleetError):
    code = errors_pb2.ERROR_CODE_NOT_FOUND
    kind = "not-found"


class AlreadyExists(FleetError):
    code = errors_pb2.ERROR_CODE_ALREADY_EXISTS
    kind = "already-exists"


class Conflict(FleetError):
    code = errors_pb2.ERROR_CODE_CONFLICT
    kind = "conflict"


class Unavailable(FleetError):
    code = errors_pb2.ERROR_CODE_UNAVAILABLE
    kind = "unavailable"


class DataLoss(FleetError):
    """Bytes that do not match their digest: truncated, corrupted or tampered."""

    code = errors_pb2.ERROR_CODE_DATA_LOSS
    kind = "data-loss"


class Unauthenticated(FleetError):
    """A signature, key or token that does not check out."""

    code = errors_pb2.ERROR_CODE_UNAUTHENTICATED
    kind = "unauthenticated"


class PermissionDenied(FleetError):
    """A known caller whose role may not do this (e.g. a viewer token calling Deploy)."""

    code = errors_pb2.ERROR_CODE_PERMISSION_DENIED
    kind = "permission-denied"


class SelfTestFailed(InvalidArgument):
    """A model that loaded but does not reproduce its manifest's golden output (or has no
    golden sample to check against): the device reports ``self_test_failed``."""


_BY_CODE: dict[int, type[FleetError]] = {
    cls.code: cls
    for cls in (
        FleetError,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Conflict,
        Unavailable,
        DataLoss,
        Unauthenticated,
        PermissionDenied,
    )
}

__all__ = [
    "AlreadyExists",
    "Conflict",
    "DataLoss",
    "ErrorCode",
    "FleetError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "SelfTestFailed",
    "Unauthenticated",
    "Unavailable",
]
