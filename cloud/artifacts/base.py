"""ArtifactStore: content-addressed blobs, keyed by their sha256."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from edgefleet.protos.errors import DataLoss, InvalidArgument

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(sha256: str) -> str:
    if not _HEX64.match(sha256):
        raise InvalidArgument(f"blob id {sha256!r} is not a sha256 hex digest (64 lowercase hex)")
    return sha256


class ArtifactStore(ABC):
    """Blobs addressed by sha256. Constraints, for every backend:

    - `put` is idempotent: the same bytes give the same ref and are stored once.
    - `get` returns the bytes only if they still hash to the id; otherwise it
      raises `DataLoss` (never serves corrupted bytes). Unknown id: `NotFound`.
    - An unreachable backend raises `Unavailable` naming the endpoint.
    """

    uri: str

    def put(self, data: bytes) -> BlobRef:
        ref = BlobRef(digest(data), len(data))
        if not self.exists(ref.sha256):
            self._write(ref.sha256, data)
        return ref

    def get(self, sha256: str) -> bytes:
        data = self._read(check_digest(sha256))
        actual = digest(data)
        if actual != sha256:
            raise DataLoss(
                f"blob {sha256[:16]}… in {self.uri} now hashes to {actual[:16]}… "
                f"({len(data)} bytes): corrupted or tampered, refusing to serve it"
            )
        return data

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def _write(self, sha256: str, data: bytes) -> None: ...

    @abstractmethod
    def _read(self, sha256: str) -> bytes:
        """Raw bytes of the blob, or `NotFound`."""

    @abstractmethod
    def delete(self, sha256: str) -> None: ...

    def check(self) -> None:  # noqa: B027 - optional hook; local stores have nothing to check
        """Raise `Unavailable` if the backend cannot be reached (used at startup)."""
