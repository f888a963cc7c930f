"""The project's one error hierarchy (defined in `protos.errors`, shared with the agent),
and the translation of the operating system's storage errors into it."""

import errno

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

#: errors that mean "this storage cannot take writes now", not "you asked wrong"
_UNAVAILABLE = {
    errno.ENOSPC,  # no space left on device
    errno.EDQUOT,  # disk quota exceeded
    errno.EFBIG,  # file too large (RLIMIT_FSIZE, filesystem limit)
    errno.EROFS,  # read-only file system
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
}


def storage_error(e: OSError, what: str) -> FleetError | None:
    """`Unavailable` naming `what` and the reason in lower case ("… : no space left on
    device") for a full, read-only or failing disk; None for other errors."""
    if e.errno not in _UNAVAILABLE:
        return None
    why = (e.strerror or type(e).__name__).lower()
    return Unavailable(f"{what}: {why}" + (f" ({e.filename})" if e.filename else ""))


def find_storage_error(e: BaseException, what: str) -> FleetError | None:
    """`storage_error` for the first OSError in `e`'s cause/context chain (libraries such
    as torch wrap it in their own exception types)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and (found := storage_error(cur, what)) is not None:
            return found
        cur = cur.__cause__ or cur.__context__
    return None


__all__ = [
    "AlreadyExists",
    "Conflict",
    "DataLoss",
    "FleetError",
    "InvalidArgument",
    "NotFound",
    "Unauthenticated",
    "Unavailable",
    "find_storage_error",
    "storage_error",
]
