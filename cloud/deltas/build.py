"""Build the smallest delta from a base artifact to a target, or none worth sending.

ONNX pairs get a tensor delta (initializers byte-identical to the base's are
referenced, changed ones sent as XOR/ADD against the base's bytes, zstd over all);
every pair also gets the binary fallbacks (zstd with the base as dictionary, and
bsdiff4 for files up to `BSDIFF_MAX`). The smallest that rebuilds the target
exactly is kept, if it is under `keep_ratio` of the target's size."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from edgefleet.cloud.deltas.onnx import TensorBlob, initializers
from edgefleet.protos.delta import (
    DeltaFormat,
    Op,
    Segment,
    apply_delta,
    encode_bsdiff4,
    encode_tensor,
    encode_zstd,
    read_header,
    shuffle,
    zigzag_diff,
)
from edgefleet.protos.errors import FleetError, InvalidArgument

logger = logging.getLogger(__name__)

#: keep a delta only when it is smaller than this share of the full artifact
KEEP_RATIO = 0.7
#: bsdiff4 needs ~17x the file in memory and is slow past a few MB: not tried above this
BSDIFF_MAX = 32 * 1024 * 1024


@dataclass(frozen=True)
class BuiltDelta:
    format: DeltaFormat
    data: bytes
    base_sha256: str
    target_sha256: str
    target_size: int
    build_s: float

    @property
    def ratio(self) -> float:
        return len(self.data) / max(1, self.target_size)


def tensor_segments(base: bytes, target: bytes) -> list[Segment] | None:
    """The ops that rebuild `target` from `base`, one per initializer; None when
    either file is not ONNX with raw-data initializers."""
    old, new = initializers(base), initializers(target)
    if not old or not new:
        return None
    by_name = {t.name: t for t in old}
    by_digest: dict[bytes, TensorBlob] = {}
    for t in old:
        by_digest.setdefault(hashlib.sha256(base[t.offset : t.offset + t.length]).digest(), t)
    segs: list[Segment] = []
    pos = 0
    for t in new:
        if t.offset > pos:
            segs.append(Segment(Op.LITERAL, t.offset - pos, payload=target[pos : t.offset]))
        data = target[t.offset : t.offset + t.length]
        src = by_name.get(t.name)
        if src is None or src.length != t.length:
            src = by_digest.get(hashlib.sha256(data).digest())
        if src is None or src.length != t.length:
            segs.append(Segment(Op.LITERAL, t.length, payload=data))
        else:
            before = base[src.offset : src.offset + src.length]
            if before == data:
                segs.append(Segment(Op.COPY, t.length, src.offset))
            else:
                segs.append(_diff(before, data, src.offset, t.width))
        pos = t.offset + t.length
    if pos < len(target):
        segs.append(Segment(Op.LITERAL, len(target) - pos, payload=target[pos:]))
    return segs


def _diff(before: bytes, after: bytes, offset: int, width: int) -> Segment:
    """A changed tensor as integer differences of its elements (zigzag, byte planes): a
    weight nudged by training differs from its old bit pattern by a small number, and
    an int8 step of one is one (XOR would turn 127 -> 128 into 255)."""
    if len(after) % width:
        width = 1
    return Segment(
        Op.ADD, len(after), offset, width, shuffle(zigzag_diff(before, after, width), width)
    )


def candidates(base: bytes, target: bytes, *, level: int = 19) -> list[bytes]:
    """Every delta format that applies to this pair, encoded."""
    out = []
    segs = tensor_segments(base, target)
    if segs is not None:
        out.append(encode_tensor(base, target, segs, level=level))
    out.append(encode_zstd(base, target, level=level))
    if max(len(base), len(target)) <= BSDIFF_MAX:
        out.append(encode_bsdiff4(base, target))
    return out


def build_delta(
    base: bytes, target: bytes, *, keep_ratio: float = KEEP_RATIO, level: int = 19
) -> BuiltDelta | None:
    """The smallest delta that rebuilds `target` from `base` exactly (checked by applying
    it), or None when none is under `keep_ratio` of the target."""
    if not 0 < keep_ratio <= 1:
        raise InvalidArgument(f"delta keep ratio {keep_ratio}: must be in (0, 1]")
    t0 = time.perf_counter()
    best: bytes | None = None
    for delta in sorted(candidates(base, target, level=level), key=len):
        if len(delta) >= keep_ratio * len(target):
            break
        try:
            apply_delta(base, delta)
        except FleetError as e:  # a builder bug must never reach a device
            logger.error("delta %s does not round-trip (%s); not used", read_header(delta), e)
            continue
        best = delta
        break
    if best is None:
        return None
    h = read_header(best)
    return BuiltDelta(
        h.format, best, h.base_sha256, h.target_sha256, h.target_size, time.perf_counter() - t0
    )
