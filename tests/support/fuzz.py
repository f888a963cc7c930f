"""Untrusted MQTT payloads for fuzzing: random bytes, valid payloads with bytes flipped,
inserted or cut, and structurally valid protobuf messages whose every field takes any
value its wire type allows (uint64 past 2^63, NaN, huge strings, unknown enum numbers,
long repeated fields).

Hypothesis draws a seed; the payloads are made from `random.Random(seed)` in plain
Python, far faster than drawing every field through Hypothesis (a failing seed still
replays exactly).
"""

from __future__ import annotations

import random
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

F = FieldDescriptor
_EDGE_U64 = [0, 1, 2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
_EDGE_I64 = [-(2**63), -1, 0, 1, 2**62, 2**63 - 1]
_EDGE_F = [0.0, -0.0, -1.0, 1e300, -1e300, float("nan"), float("inf"), float("-inf")]
_STRINGS = ["", "d1", "a" * 64, "0" * 64, "x" * 5000, "é\x00\U0001f600"]
_HUGE = "s" * 300_000


def _scalar(rng: random.Random, f: FieldDescriptor, *, huge: bool = False) -> Any:
    t = f.type
    if t == F.TYPE_UINT64:
        return rng.choice(_EDGE_U64) if rng.random() < 0.5 else rng.getrandbits(64)
    if t == F.TYPE_INT64:
        return rng.choice(_EDGE_I64) if rng.random() < 0.5 else rng.getrandbits(64) - 2**63
    if t == F.TYPE_UINT32:
        return rng.getrandbits(32)
    if t == F.TYPE_INT32:
        return rng.getrandbits(32) - 2**31
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice(_EDGE_F) if rng.random() < 0.5 else rng.uniform(-1e9, 1e9)
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        if huge and rng.random() < 0.05:
            return _HUGE
        return rng.choice(_STRINGS) if rng.random() < 0.6 else rng.randbytes(8).hex()
    if t == F.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 31, 32, 33]))
    if t == F.TYPE_ENUM:
        return rng.randint(-3, 40)
    raise AssertionError(f"no generator for field type {t}")


def random_message(
    rng: random.Random, desc: Descriptor, *, depth: int = 0, **fixed: Any
) -> Message:
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if f.name in fixed:
            setattr(msg, f.name, fixed[f.name])
            continue
        if rng.random() < 0.4:
            continue
        if f.type == F.TYPE_MESSAGE:
            if depth >= 2 or f.message_type.GetOptions().map_entry:
                continue
            for _ in range(rng.randint(1, 3) if f.is_repeated else 1):
                sub = random_message(rng, f.message_type, depth=depth + 1)
                target = getattr(msg, f.name)
                (target.add() if f.is_repeated else target).CopyFrom(sub)
        elif f.is_repeated:
            one = _scalar(rng, f)
            if isinstance(one, str | bytes) and len(one) > 64:
                one = one[:64]
            getattr(msg, f.name).extend([one] * rng.choice([0, 1, 3, 65, 1100]))
        else:
            setattr(msg, f.name, _scalar(rng, f, huge=True))
    return msg


def mutate(rng: random.Random, valid: bytes) -> bytes:
    """`valid` with a few bytes flipped, inserted or cut."""
    data = bytearray(valid)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(max(1, len(data)))
        op = rng.random()
        if op < 0.4 and data:
            data[at] ^= rng.randint(1, 255)
        elif op < 0.7:
            data[at:at] = rng.randbytes(rng.randint(1, 12))
        elif data:
            del data[at : at + rng.randint(1, 8)]
    return bytes(data)


def payload(rng: random.Random, cls: type[Message], valid: bytes, **fixed: Any) -> bytes:
    """One untrusted payload for a `cls` topic."""
    pick = rng.random()
    if pick < 0.2:
        return rng.randbytes(rng.randint(0, 300))
    if pick < 0.5:
        return mutate(rng, valid)
    if pick < 0.75:
        return random_message(rng, cls.DESCRIPTOR, **fixed).SerializeToString()
    return random_message(rng, cls.DESCRIPTOR).SerializeToString()
