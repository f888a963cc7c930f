"""Where an ONNX model's initializers lie in its file, read straight off the protobuf
wire format (no `onnx` import, no re-serialization): the tensor delta references
and diffs exactly these byte ranges and copies everything else as it is."""

from __future__ import annotations

from dataclasses import dataclass

#: TensorProto.data_type -> bytes per element (onnx.TensorProto.DataType)
_WIDTH = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_GRAPH = 7  # ModelProto.graph
_INITIALIZER = 5  # GraphProto.initializer
_DATA_TYPE, _NAME, _RAW_DATA = 2, 8, 9  # TensorProto fields


@dataclass(frozen=True)
class TensorBlob:
    """An initializer's raw_data: `length` bytes at `offset` in the file."""

    name: str
    offset: int
    length: int
    width: int


class _Malformed(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("varint runs past the end")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of one message."""
    out = []
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((num, wire, value, pos))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise _Malformed("length-delimited field runs past its message")
            out.append((num, wire, pos, pos + length))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise _Malformed(f"wire type {wire} (groups) not expected in ONNX")
        if pos > end:
            raise _Malformed("field runs past its message")
    return out


def initializers(data: bytes) -> list[TensorBlob]:
    """The top-level graph's initializers stored as raw_data, in file order; [] if the
    bytes are not an ONNX model (or hold no such initializer)."""
    try:
        blobs: list[TensorBlob] = []
        for num, wire, a, b in _fields(data, 0, len(data)):
            if num != _GRAPH or wire != 2:
                continue
            for gnum, gwire, ga, gb in _fields(data, a, b):
                if gnum != _INITIALIZER or gwire != 2:
                    continue
                name, raw, width = "", None, 1
                for tnum, twire, ta, tb in _fields(data, ga, gb):
                    if tnum == _NAME and twire == 2:
                        name = data[ta:tb].decode("utf-8", "replace")
                    elif tnum == _RAW_DATA and twire == 2:
                        raw = (ta, tb)
                    elif tnum == _DATA_TYPE and twire == 0:
                        width = _WIDTH.get(ta, 1)
                if raw is not None and raw[1] > raw[0]:
                    blobs.append(TensorBlob(name, raw[0], raw[1] - raw[0], width))
        return sorted(blobs, key=lambda t: t.offset)
    except _Malformed:
        return []
