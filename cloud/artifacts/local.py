"""file:// artifact store: blobs under ROOT/ab/abcdef…, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from edgefleet.cloud.artifacts.base import ArtifactStore, check_digest
from edgefleet.cloud.errors import storage_error
from edgefleet.protos.errors import NotFound, Unavailable


class LocalArtifactStore(ArtifactStore):
    def __init__(self, uri: str, **_: object) -> None:
        parsed = urlparse(uri)
        self.root = Path(unquote(parsed.path) if parsed.scheme else uri).expanduser()
        self.uri = self.root.as_uri() if self.root.is_absolute() else uri
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(
                f"artifact store {self.uri}: cannot create {self.root}: {e.strerror}"
            ) from e

    def _path(self, sha256: str) -> Path:
        check_digest(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def _write(self, sha256: str, data: bytes) -> None:
        path = self._path(sha256)
        made = not path.parent.exists()
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            # nothing half-written: the temporary file goes, and the folder made for it
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    path.parent.rmdir()
            if isinstance(e, OSError):
                what = f"artifact store {self.uri}: cannot store blob {sha256[:16]}… ({len(data)} bytes)"
                if (err := storage_error(e, what)) is not None:
                    raise err from None
            raise

    def _read(self, sha256: str) -> bytes:
        try:
            return self._path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {sha256[:16]}… not in artifact store {self.uri}") from None

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)
