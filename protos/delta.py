"""Model deltas: the wire format both sides share (docs/protocol.md, "Deltas").

A delta rebuilds one artifact (the *target*) from another (the *base*) a device
already holds. It starts with a fixed header naming both by sha256, so a delta
applied to the wrong bytes is refused before any work, and the result is checked
against the target's digest and size (the signed manifest's) before it is used::

    magic "EFD1" | format u8 | base sha256 (32) | target sha256 (32) | target size u64 LE | body

Formats:

- ``tensor`` (1): one zstd frame (the base as its raw-content dictionary, so names and
  graph bytes the base shares cost almost nothing) holding a table of ops and their payload. Ops, in
  target order, each ``kind u8 | a u64 | b u64 | width u8`` (little-endian):
  ``LITERAL`` (0) the next ``b`` payload bytes; ``COPY`` (1) ``base[a:a+b]``;
  ``XOR`` (2) ``base[a:a+b]`` XOR the next ``b`` payload bytes, which are stored as
  ``width`` byte planes (byte 0 of every element, then byte 1, …; width 1: as is);
  ``ADD`` (3) ``base[a:a+b] + payload`` element-wise as ``width``-byte little-endian
  unsigned integers modulo 2^(8*width), the payload zigzag-coded (``(d << 1) ^ (d >> bits-1)``
  of the signed difference) and stored as byte planes like XOR's: a float that moved a
  little differs from its old bit pattern by a small integer, without XOR's carry bursts.
  The coordinator writes it for ONNX models (one op per initializer); the device
  needs no ONNX parser to apply it.
- ``bsdiff4`` (2): a BSDIFF4 patch (PyPI ``bsdiff4``), for any file type.
- ``zstd`` (3): one zstd frame compressed with the base as a raw-content dictionary
  (zstd's ``--patch-from``), for any file type.

zstandard and bsdiff4 are imported when a delta is applied, never at agent start.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from edgefleet.protos.errors import DataLoss, InvalidArgument

MAGIC = b"EFD1"
_HEADER = struct.Struct("<4sB32s32sQ")
HEADER_SIZE = _HEADER.size
_OP = struct.Struct("<BQQB")
_COUNT = struct.Struct("<I")
#: a delta never rebuilds more than this (a bound on what a device allocates)
MAX_TARGET = 4 * 1024 * 1024 * 1024
#: zstd's largest window: a base (dictionary) or frame bigger than this is not delta'd
MAX_WINDOW_LOG = 31


class DeltaFormat(IntEnum):
    TENSOR = 1
    BSDIFF4 = 2
    ZSTD = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class DeltaOffer:
    """`fleet.v1.ArtifactDelta`: a desired state's artifact offered as a delta against
    `base_sha256` (both sides' serde convert it; the format number is `DeltaFormat`)."""

    base_sha256: str
    sha256: str
    size: int
    format: int
    chunk_size: int
    chunk_digests: tuple[bytes, ...]


class Op(IntEnum):
    LITERAL = 0
    COPY = 1
    XOR = 2
    ADD = 3


@dataclass(frozen=True)
class DeltaHeader:
    format: DeltaFormat
    base_sha256: str
    target_sha256: str
    target_size: int

    def encode(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            int(self.format),
            bytes.fromhex(self.base_sha256),
            bytes.fromhex(self.target_sha256),
            self.target_size,
        )


def read_header(delta: bytes) -> DeltaHeader:
    if len(delta) < HEADER_SIZE:
        raise InvalidArgument(f"delta is {len(delta)} bytes; a header alone is {HEADER_SIZE}")
    magic, fmt, base, target, size = _HEADER.unpack_from(delta)
    if magic != MAGIC:
        raise InvalidArgument(f"delta starts with {magic!r}; expected {MAGIC!r}")
    try:
        f = DeltaFormat(fmt)
    except ValueError:
        accepted = ", ".join(f"{x.value} ({x.label})" for x in DeltaFormat)
        raise InvalidArgument(f"delta format {fmt} unknown; accepted: {accepted}") from None
    if size > MAX_TARGET:
        raise InvalidArgument(f"delta target size {size} is over {MAX_TARGET} bytes")
    return DeltaHeader(f, base.hex(), target.hex(), size)


# -- byte planes -------------------------------------------------------------------


def _uint(width: int) -> Any:
    """The numpy unsigned dtype of `width` bytes, or None."""
    import numpy as np

    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(width)


def zigzag_diff(before: bytes, after: bytes, width: int) -> bytes:
    """The ADD payload (before shuffling): `after - before` per `width`-byte element,
    zigzag-coded so small differences of either sign are small numbers."""
    import numpy as np

    dt = _uint(width)
    if dt is None or len(after) != len(before) or len(after) % width:
        raise InvalidArgument(f"cannot diff {len(after)} bytes as {width}-byte elements")
    d = np.frombuffer(after, dt) - np.frombuffer(before, dt)
    bits = dt(8 * width - 1)
    return bytes(((d << dt(1)) ^ (dt(0) - (d >> bits))).tobytes())


def shuffle(data: bytes, width: int) -> bytes:
    """Element bytes grouped by position (all first bytes, then all second bytes, …):
    the high bytes of slightly changed floats XOR to runs of zeros that compress."""
    if width <= 1 or len(data) % width:
        return data
    import numpy as np

    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def unshuffle(data: bytes | memoryview, width: int) -> bytes:
    if width <= 1 or len(data) % width:
        return bytes(data)
    import numpy as np

    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


# -- apply -------------------------------------------------------------------------


def apply_delta(base: bytes, delta: bytes, *, base_sha256: str | None = None) -> bytes:
    """The target the delta rebuilds from `base`, checked against the header's digest
    and size. `base_sha256`: the digest the caller knows `base` by (a device's installed
    model), compared with the header instead of hashing `base` — damaged base bytes
    still cannot pass, as the rebuilt file is hashed. `InvalidArgument`: the delta is
    malformed or is for another base; `DataLoss`: the rebuilt bytes are not the target."""
    h = read_header(delta)
    actual = base_sha256 if base_sha256 is not None else hashlib.sha256(base).hexdigest()
    if actual != h.base_sha256:
        raise InvalidArgument(
            f"delta applies to base {h.base_sha256[:16]}…; the bytes given are {actual[:16]}…"
        )
    body = memoryview(delta)[HEADER_SIZE:]
    try:
        if h.format is DeltaFormat.TENSOR:
            out = _apply_tensor(base, body, h.target_size)
        elif h.format is DeltaFormat.BSDIFF4:
            import bsdiff4

            out = bsdiff4.patch(base, bytes(body))
        else:
            out = _zstd_decompress(bytes(body), base, h.target_size)
    except (InvalidArgument, DataLoss):
        raise
    except Exception as e:  # a library's own error on a garbled body (zstd, bz2, struct)
        raise DataLoss(f"delta {h.format.label} body does not decode: {e}") from None
    if len(out) != h.target_size:
        raise DataLoss(f"delta rebuilt {len(out)} bytes; its header says {h.target_size}")
    digest = hashlib.sha256(out).hexdigest()
    if digest != h.target_sha256:
        raise DataLoss(
            f"delta rebuilt bytes hashing to {digest[:16]}…; its header says "
            f"{h.target_sha256[:16]}…"
        )
    return out


def _decompressor(dictionary: bytes) -> Any:
    import zstandard

    return zstandard.ZstdDecompressor(
        dict_data=zstandard.ZstdCompressionDict(
            dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT
        ),
        max_window_size=1 << MAX_WINDOW_LOG,
    )


def _compressor(dictionary: bytes, size: int, level: int) -> Any:
    import zstandard

    window = max(10, min(MAX_WINDOW_LOG, (len(dictionary) + size).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=window, enable_ldm=len(dictionary) > (1 << 27)
    )
    dictionary_ = zstandard.ZstdCompressionDict(
        dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT
    )
    return zstandard.ZstdCompressor(dict_data=dictionary_, compression_params=params)


def _zstd_decompress(body: bytes, dictionary: bytes, size: int) -> bytes:
    return bytes(_decompressor(dictionary).decompress(body, max_output_size=size))


def _planes(payload: Any, width: int, dt: Any) -> Any:
    """Byte planes back to `width`-byte little-endian elements, as an array of `dt`
    (shift-or of contiguous planes: several times faster than a strided transpose)."""
    if width == 1:
        return payload.view(dt)
    planes = payload.reshape(width, -1)
    acc = planes[0].astype(dt)
    for k in range(1, width):
        acc |= planes[k].astype(dt) << dt(8 * k)
    return acc


def _apply_tensor(base: bytes, body: memoryview, target_size: int) -> bytes:
    import numpy as np

    frame = bytes(_decompressor(base).decompress(body))
    raw = np.frombuffer(frame, np.uint8)
    if len(raw) < _COUNT.size:
        raise DataLoss("tensor delta body is shorter than its op count")
    (n,) = _COUNT.unpack_from(frame)
    pos = _COUNT.size + n * _OP.size
    if pos > len(raw):
        raise DataLoss(f"tensor delta lists {n} ops but holds {len(raw)} bytes")
    src = np.frombuffer(base, np.uint8)
    out = np.empty(target_size, np.uint8)
    at = 0
    for i in range(n):
        kind, a, b, width = _OP.unpack_from(frame, _COUNT.size + i * _OP.size)
        if at + b > target_size:
            raise DataLoss(f"tensor delta op {i} runs past the target size {target_size}")
        if kind != Op.COPY and pos + b > len(raw):
            raise DataLoss(f"tensor delta op {i} wants {b} payload bytes past the end")
        if kind != Op.LITERAL and a + b > len(base):
            raise DataLoss(f"tensor delta op {i} reads base[{a}:{a + b}] of {len(base)} bytes")
        dest = out[at : at + b]
        if kind == Op.LITERAL:
            dest[:] = raw[pos : pos + b]
            pos += b
        elif kind == Op.COPY:
            dest[:] = src[a : a + b]
        elif kind in (Op.XOR, Op.ADD):
            dt = _uint(width)
            if dt is None or b % width:
                raise DataLoss(f"tensor delta op {i}: width {width} over {b} bytes")
            patch = _planes(raw[pos : pos + b], width, dt)
            old = np.frombuffer(base, dt, b // width, a)  # unaligned is fine on numpy
            if kind == Op.XOR:
                np.bitwise_xor(old, patch, out=dest.view(dt))
            else:  # zigzag back to two's complement, then add modulo 2^bits
                diff = (patch >> dt(1)) ^ (dt(0) - (patch & dt(1)))
                np.add(old, diff, out=dest.view(dt))
            pos += b
        else:
            raise DataLoss(f"tensor delta op {i} has kind {kind}; accepted: 0-3")
        at += b
    if at != target_size:
        raise DataLoss(f"tensor delta rebuilt {at} bytes; its header says {target_size}")
    return out.tobytes()


# -- build (the coordinator writes deltas; tests and the bench use it too) ----------


@dataclass(frozen=True)
class Segment:
    """One op of a tensor delta before encoding."""

    op: Op
    length: int
    base_offset: int = 0
    width: int = 1
    payload: bytes = b""


def encode_tensor(base: bytes, target: bytes, segments: list[Segment], *, level: int = 19) -> bytes:
    table = bytearray(_COUNT.pack(len(segments)))
    payload = bytearray()
    for s in segments:
        table += _OP.pack(int(s.op), s.base_offset, s.length, s.width)
        payload += s.payload
    raw = bytes(table + payload)
    body = bytes(_compressor(base, len(raw), level).compress(raw))
    return _header(DeltaFormat.TENSOR, base, target) + body


def encode_bsdiff4(base: bytes, target: bytes) -> bytes:
    import bsdiff4

    return _header(DeltaFormat.BSDIFF4, base, target) + bytes(bsdiff4.diff(base, target))


def encode_zstd(base: bytes, target: bytes, *, level: int = 19) -> bytes:
    body = bytes(_compressor(base, len(target), level).compress(target))
    return _header(DeltaFormat.ZSTD, base, target) + body


def _header(fmt: DeltaFormat, base: bytes, target: bytes) -> bytes:
    return DeltaHeader(
        fmt,
        hashlib.sha256(base).hexdigest(),
        hashlib.sha256(target).hexdigest(),
        len(target),
    ).encode()
