"""A resumable, chunked download of one artifact, kept on disk (docs/protocol.md).

Two files per artifact in the download directory:

- ``{sha256}.part``: the artifact, preallocated to its size; chunk ``i`` lives at
  ``i * chunk_size``.
- ``{sha256}.bitmap``: a 56-byte header (magic, size, chunk size, a fingerprint of
  the artifact digest and every chunk digest) followed by one bit per chunk
  (chunk ``i`` is bit ``i % 8`` of byte ``i // 8``).

Crash consistency: a chunk's bytes are written and flushed (``fdatasync``) before
its bit is written and flushed, so after a crash a set bit always means a stored
chunk. Only the changed bitmap byte is rewritten (one sector, written whole), and
the bitmap is kept in memory, so a chunk costs two small writes and no read.
``finish`` re-hashes the whole file anyway and clears the bits of any chunk that
no longer matches, so damage behind our back costs a re-fetch, not a bad model.

With ``durable=False`` the flushes are skipped (for the simulator, where a
thousand devices share one disk); a crash can then leave a set bit over bytes
that never reached the disk, which ``finish`` detects and repairs as above.

No file handle stays open between calls: thousands of these may exist at once.
One object per (directory, sha256) at a time; the class is not thread-safe.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from edgefleet.protos.errors import Conflict, DataLoss, InvalidArgument

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAGIC = b"EFPART\x00\x01"
#: magic, size, chunk size, fingerprint of (sha256, chunk digests)
_HEADER = struct.Struct("<8sQQ32s")
_DIGEST_SIZE = 32
_READ_SIZE = 1 << 20

_datasync = getattr(os, "fdatasync", os.fsync)


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry change (create, rename, unlink) to disk."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class PartialDownload:
    """One artifact being assembled from chunks; see the module docstring.

    Build it with `PartialDownload.open`, never directly.
    """

    def __init__(
        self,
        directory: Path,
        *,
        sha256: str,
        size: int,
        chunk_size: int,
        chunk_digests: tuple[bytes, ...],
        bits: bytearray,
        durable: bool,
    ) -> None:
        self._directory = directory
        self._sha256 = sha256
        self._size = size
        self._chunk_size = chunk_size
        self._digests = chunk_digests
        self._bits = bits
        self._have = int.from_bytes(bits, "little").bit_count()
        self._durable = durable
        self._closed = False

    # -- construction ---------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        sha256: str,
        size: int,
        chunk_size: int,
        chunk_digests: Sequence[bytes],
        durable: bool = True,
    ) -> PartialDownload:
        """Resume the partial download of `sha256` in `directory`, or start one.

        Saved state made with other parameters (size, chunk size, chunk digests), or
        damaged, is discarded and logged. Raises `InvalidArgument` for bad
        parameters and `OSError` (e.g. ENOSPC) when the file cannot be preallocated.
        """
        if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
            raise InvalidArgument(f"artifact sha256 {sha256!r} is not 64 lowercase hex characters")
        if chunk_size <= 0:
            raise InvalidArgument(
                f"artifact {sha256[:16]}…: chunk size {chunk_size} must be positive"
            )
        if size <= 0:
            raise InvalidArgument(f"artifact {sha256[:16]}…: size {size} must be positive")
        total = math.ceil(size / chunk_size)
        if len(chunk_digests) != total:
            raise InvalidArgument(
                f"artifact {sha256[:16]}…: {len(chunk_digests)} chunk digests given; "
                f"{size} bytes in chunks of {chunk_size} needs {total}"
            )
        digests = tuple(bytes(d) for d in chunk_digests)
        for i, d in enumerate(digests):
            if len(d) != _DIGEST_SIZE:
                raise InvalidArgument(
                    f"artifact {sha256[:16]}…: chunk digest {i} is {len(d)} bytes; "
                    f"a raw sha256 digest is {_DIGEST_SIZE}"
                )

        directory.mkdir(parents=True, exist_ok=True)
        header = _HEADER.pack(_MAGIC, size, chunk_size, _fingerprint(sha256, digests))
        nbytes = (total + 7) // 8
        pd = cls(
            directory,
            sha256=sha256,
            size=size,
            chunk_size=chunk_size,
            chunk_digests=digests,
            bits=bytearray(nbytes),
            durable=durable,
        )
        bits, why = pd._load(header, nbytes)
        if bits is None:
            if why is not None:
                logger.info("discarding partial download of %s: %s", sha256, why)
            pd._start_fresh(header)
        else:
            pd._bits = bits
            pd._have = int.from_bytes(bits, "little").bit_count()
            logger.debug(
                "resuming download of %s: %d of %d chunks on disk", sha256, pd._have, total
            )
        return pd

    def _load(self, header: bytes, nbytes: int) -> tuple[bytearray | None, str | None]:
        """The saved bitmap if it fits these parameters, else (None, why); why is
        None when there was simply nothing saved."""
        part_size: int | None
        try:
            part_size = self.part_path.stat().st_size
        except FileNotFoundError:
            part_size = None
        try:
            saved = self.bitmap_path.read_bytes()
        except FileNotFoundError:
            if part_size is None:
                return None, None
            return None, "data file without a bitmap"
        if part_size is None:
            return None, "bitmap without a data file"
        if len(saved) < _HEADER.size or saved[:8] != _MAGIC:
            return None, f"bitmap file is damaged ({len(saved)} bytes, no valid header)"
        _, old_size, old_chunk, _ = _HEADER.unpack_from(saved)
        if saved[: _HEADER.size] != header:
            if (old_size, old_chunk) != (self._size, self._chunk_size):
                return None, (
                    f"parameters changed: size {old_size} -> {self._size}, "
                    f"chunk size {old_chunk} -> {self._chunk_size}"
                )
            return None, "parameters changed: different chunk digests"
        if len(saved) != _HEADER.size + nbytes:
            return None, (
                f"bitmap file is damaged ({len(saved)} bytes; expected {_HEADER.size + nbytes})"
            )
        if part_size != self._size:
            return None, f"data file is {part_size} bytes; expected {self._size}"
        bits = bytearray(saved[_HEADER.size :])
        pad = nbytes * 8 - self.chunks_total
        if pad:
            bits[-1] &= 0xFF >> pad  # ignore stray bits past the last chunk
        return bits, None

    def _start_fresh(self, header: bytes) -> None:
        """Empty state on disk: preallocated data file, then an all-zero bitmap."""
        self.bitmap_path.unlink(missing_ok=True)
        fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _preallocate(fd, self._size)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._bits = bytearray(len(self._bits))
        self._have = 0
        tmp = self.bitmap_path.with_name(self.bitmap_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, header + bytes(self._bits), 0)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.bitmap_path)
        if self._durable:
            fsync_dir(self._directory)

    # -- properties -----------------------------------------------------------------

    @property
    def sha256(self) -> str:
        return self._sha256

    @property
    def size(self) -> int:
        return self._size

    @property
    def durable(self) -> bool:
        """Whether each chunk is flushed to disk before its bit (then `add` blocks on I/O)."""
        return self._durable

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def chunks_total(self) -> int:
        return len(self._digests)

    @property
    def chunks_have(self) -> int:
        return self._have

    @property
    def complete(self) -> bool:
        return self._have == len(self._digests)

    @property
    def part_path(self) -> Path:
        return self._directory / f"{self._sha256}.part"

    @property
    def bitmap_path(self) -> Path:
        return self._directory / f"{self._sha256}.bitmap"

    def has(self, index: int) -> bool:
        self._check_index(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def missing_ranges(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Half-open index ranges [start, end) of the chunks not yet stored, in
        order; at most `limit` ranges (the first ones) when given."""
        if limit is not None and limit <= 0:
            raise InvalidArgument(f"missing_ranges limit {limit} must be positive or None")
        total = len(self._digests)
        out: list[tuple[int, int]] = []
        start: int | None = None
        for byte_index, byte in enumerate(self._bits):
            base = byte_index << 3
            if byte == 0xFF and start is None:
                continue  # eight chunks held: skip without looking at bits
            if byte == 0 and start is not None:
                continue  # eight missing, inside a range already open
            for bit in range(8):
                i = base + bit
                if i >= total:
                    break
                if byte & (1 << bit):
                    if start is not None:
                        out.append((start, i))
                        if limit is not None and len(out) >= limit:
                            return out
                        start = None
                elif start is None:
                    start = i
        if start is not None:
            out.append((start, total))
        return out

    # -- writing --------------------------------------------------------------------

    def add(self, index: int, data: bytes) -> bool:
        """Store chunk `index` if its length and sha256 match; True if newly stored,
        False if it was already held (then it is neither hashed nor rewritten).

        Raises `DataLoss` naming the chunk when it does not match (nothing is
        stored), `InvalidArgument` when `index` is out of range.
        """
        self._check_open()
        self._check_index(index)
        mask = 1 << (index & 7)
        if self._bits[index >> 3] & mask:
            return False
        expected_len = self._chunk_len(index)
        if len(data) != expected_len:
            raise DataLoss(
                f"chunk {index} of artifact {self._sha256[:16]}… is {len(data)} bytes; "
                f"expected {expected_len}"
            )
        digest = hashlib.sha256(data).digest()
        if digest != self._digests[index]:
            raise DataLoss(
                f"chunk {index} of artifact {self._sha256[:16]}… has sha256 "
                f"{digest.hex()[:16]}…; expected {self._digests[index].hex()[:16]}… "
                "(corrupted or tampered)"
            )
        try:
            fd = os.open(self.part_path, os.O_WRONLY)
        except FileNotFoundError:
            logger.warning(
                "partial download of %s vanished from %s; starting over",
                self._sha256,
                self._directory,
            )
            self._start_fresh(self._header())
            fd = os.open(self.part_path, os.O_WRONLY)
        try:
            _pwrite_all(fd, data, index * self._chunk_size)
            if self._durable:
                _datasync(fd)  # the bytes are on disk before their bit is
        finally:
            os.close(fd)
        self._bits[index >> 3] |= mask
        self._have += 1
        self._persist_bits(index >> 3, 1)
        return True

    def finish(self, dest: Path) -> Path:
        """Verify the assembled file and move it to `dest`; returns `dest`.

        Re-reads the whole file: every chunk against its digest and the whole against
        the artifact's sha256 and size. On a mismatch raises `DataLoss` and clears
        the bits of the bad chunks (all of them when only the whole fails), so
        `complete` is False and the missing ranges name what to fetch again.
        Raises `Conflict` while chunks are missing. `dest` should be on the same
        file system (it is copied otherwise). Afterwards the object is closed.
        """
        self._check_open()
        if not self.complete:
            missing = self.missing_ranges(limit=3)
            shown = ", ".join(f"[{a}, {b})" for a, b in missing)
            raise Conflict(
                f"download of artifact {self._sha256[:16]}… is incomplete: "
                f"{self.chunks_total - self._have} of {self.chunks_total} chunks missing "
                f"(first ranges: {shown})"
            )
        try:
            bad, digest = self._verify()
        except FileNotFoundError:
            self._start_fresh(self._header())
            raise DataLoss(
                f"partial download of artifact {self._sha256[:16]}… vanished from "
                f"{self._directory}; starting over"
            ) from None
        if bad:
            for i in bad:
                self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            self._have -= len(bad)
            self._persist_bits(0, len(self._bits))
            shown = ", ".join(str(i) for i in bad[:10]) + (", …" if len(bad) > 10 else "")
            raise DataLoss(
                f"artifact {self._sha256[:16]}…: {len(bad)} stored chunk(s) no longer match "
                f"their digest (chunks {shown}); they will be fetched again"
            )
        if digest != self._sha256:
            self._start_fresh(self._header())
            raise DataLoss(
                f"artifact {self._sha256[:16]}…: assembled file has sha256 {digest[:16]}… "
                "although every chunk matched its digest (the chunk digests do not "
                "describe this artifact); starting over"
            )
        self._move(dest)
        self.bitmap_path.unlink(missing_ok=True)
        if self._durable:
            fsync_dir(self._directory)
        self._closed = True
        logger.debug("artifact %s assembled at %s", self._sha256, dest)
        return dest

    def discard(self) -> None:
        """Delete the partial state from disk; the object is closed afterwards."""
        self.part_path.unlink(missing_ok=True)
        self.bitmap_path.unlink(missing_ok=True)
        self._closed = True

    # -- internals ------------------------------------------------------------------

    def _header(self) -> bytes:
        return _HEADER.pack(
            _MAGIC, self._size, self._chunk_size, _fingerprint(self._sha256, self._digests)
        )

    def _chunk_len(self, index: int) -> int:
        return min(self._chunk_size, self._size - index * self._chunk_size)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._digests):
            raise InvalidArgument(
                f"chunk index {index} is out of range for artifact {self._sha256[:16]}…; "
                f"valid: 0 … {len(self._digests) - 1}"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise Conflict(
                f"partial download of artifact {self._sha256[:16]}… was already finished "
                "or discarded"
            )

    def _persist_bits(self, start: int, length: int) -> None:
        fd = os.open(self.bitmap_path, os.O_WRONLY)
        try:
            _pwrite_all(fd, memoryview(self._bits)[start : start + length], _HEADER.size + start)
            if self._durable:
                _datasync(fd)
        finally:
            os.close(fd)

    def _verify(self) -> tuple[list[int], str]:
        """One pass over the file: indexes of chunks that fail their digest, and the
        sha256 of the first `size` bytes."""
        bad: list[int] = []
        whole = hashlib.sha256()
        with self.part_path.open("rb") as f:
            actual = os.fstat(f.fileno()).st_size
            if actual != self._size:
                logger.warning(
                    "partial download of %s is %d bytes on disk; expected %d",
                    self._sha256,
                    actual,
                    self._size,
                )
            for i, want in enumerate(self._digests):
                data = f.read(self._chunk_len(i))
                whole.update(data)
                if hashlib.sha256(data).digest() != want:
                    bad.append(i)
        if actual != self._size:
            with self.part_path.open("r+b") as f:
                f.truncate(self._size)  # back to the preallocated size
        return bad, whole.hexdigest()

    def _move(self, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.part_path, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(self.part_path, tmp)
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            self.part_path.unlink()
        fsync_dir(dest.parent)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the blocks now, so a full disk fails here (ENOSPC), not mid-download;
    a file system that cannot reserve gets a sparse file of the right size."""
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _fingerprint(sha256: str, digests: Sequence[bytes]) -> bytes:
    h = hashlib.sha256(sha256.encode())
    for d in digests:
        h.update(d)
    return h.digest()


__all__ = ["PartialDownload", "fsync_dir"]
