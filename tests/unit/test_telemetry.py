"""Telemetry windows: spooled before they are sent, deleted only when the coordinator
acknowledges them, sent again after a reconnect or an ack timeout."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.inference import ModelHolder
from edgefleet.agent.serde import decode_telemetry_ack
from edgefleet.agent.telemetry import Spool, Telemetry
from edgefleet.cloud.serde import encode_telemetry_ack, seq_ranges
from edgefleet.protos.errors import InvalidArgument, Unavailable
from edgefleet.protos.fleet.v1 import device_pb2


def decode(p: bytes) -> device_pb2.Telemetry:
    t = device_pb2.Telemetry()
    t.ParseFromString(p)
    return t


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _errors(holder: ModelHolder, n: int) -> None:
    for _ in range(n):  # no model yet: each predict is an error, still counted
        with pytest.raises(Unavailable):
            holder.predict(np.zeros((1, 4), np.float32))


def test_windows_leave_the_spool_only_when_acknowledged(tmp_path: Path) -> None:
    delivered: list[device_pb2.Telemetry] = []
    link = {"up": True}

    async def publish(payload: bytes) -> None:
        if not link["up"]:
            raise Unavailable("broker unreachable")
        delivered.append(decode(payload))

    holder, clock = ModelHolder(), Clock()
    tel = Telemetry(
        device_id="d1",
        holder=holder,
        spool=Spool(tmp_path / "spool"),
        publish=publish,
        ack_timeout=10,
        clock=clock,
    )

    async def main() -> None:
        _errors(holder, 3)
        assert await tel.emit()  # sent, but kept until acknowledged (a PUBACK is not enough)
        assert tel.unacked == 1
        link["up"] = False
        for n in (2, 5):
            _errors(holder, n)
            assert not await tel.emit()
        assert tel.unacked == 3
        link["up"] = True
        tel.reconnected()
        assert await tel.replay() == 3  # everything unacknowledged goes again, oldest first
        assert await tel.replay() == 0  # and not again before its ack timeout
        seqs = [t.seq for t in delivered]
        assert tel.on_ack([(seqs[0], seqs[0])]) == 1
        assert tel.on_ack([(seqs[0], seqs[0])]) == 0  # a duplicate ack changes nothing
        clock.t += 11  # no ack for the other two: sent again, then after 20 s, 40 s ...
        assert await tel.replay() == 2
        clock.t += 11
        assert await tel.replay() == 0
        clock.t += 10
        assert await tel.replay() == 2
        assert tel.on_ack([(min(seqs), max(seqs))]) == 2
        assert tel.unacked == 0 and tel.spool.read() == []

    asyncio.run(main())
    first = delivered[0]
    assert [t.predictions for t in delivered[:4]] == [3, 3, 2, 5]
    assert [t.spooled for t in delivered[:4]] == [False, True, True, True]
    assert len({t.seq for t in delivered}) == 3 and all(t.device_id == "d1" for t in delivered)
    assert first.seq == delivered[1].seq  # the same window again, same seq: a duplicate


def test_an_ack_before_the_puback_still_deletes_the_window(tmp_path: Path) -> None:
    holder = ModelHolder()
    tel: Telemetry

    async def publish(payload: bytes) -> None:
        seq = decode(payload).seq
        tel.on_ack([(seq, seq)])  # the coordinator was quicker

    tel = Telemetry(device_id="d1", holder=holder, spool=Spool(tmp_path), publish=publish)

    async def main() -> None:
        assert await tel.emit()
        tel.reconnected()
        assert await tel.replay() == 0

    asyncio.run(main())
    assert tel.unacked == 0


def test_spool_is_bounded_and_survives_a_crash(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=3)
    for _ in range(5):
        seq = spool.next_seq()
        spool.put(seq, bytes([seq]) * 10)
    assert spool.seqs() == [3, 4, 5] and spool.dropped == 2  # oldest dropped first
    assert spool.read() == [bytes([i]) * 10 for i in (3, 4, 5)]
    (tmp_path / "00000000000000000006.tw.tmp").write_bytes(b"torn")  # a write cut short
    again = Spool(tmp_path, max_records=3)
    assert again.seqs() == [3, 4, 5] and not list(tmp_path.glob("*.tmp"))
    assert again.next_seq() == 6  # seq persists across restarts
    (tmp_path / "telemetry.seq").write_text("1")  # a stale seq file: the spool wins
    assert Spool(tmp_path).next_seq() == 6


def test_a_legacy_spool_file_is_migrated(tmp_path: Path) -> None:
    records = [device_pb2.Telemetry(device_id="d1", seq=s).SerializeToString() for s in (7, 8)]
    data = b"".join(struct.pack("<I", len(r)) + r for r in records)
    (tmp_path / "telemetry.spool").write_bytes(data + b"\x10\x00\x00\x00abc")  # torn tail
    spool = Spool(tmp_path)
    assert spool.seqs() == [7, 8] and spool.read() == records
    assert not (tmp_path / "telemetry.spool").exists()
    assert spool.next_seq() == 9


def test_ack_round_trip_and_bad_acks() -> None:
    assert seq_ranges([5, 1, 2, 3, 9, 10, 2]) == [(1, 3), (5, 5), (9, 10)]
    payload = encode_telemetry_ack("d1", [1, 2, 3, 9])
    assert decode_telemetry_ack("d1", payload) == [(1, 3), (9, 9)]
    with pytest.raises(InvalidArgument, match="names device 'd1'; this is 'd2'"):
        decode_telemetry_ack("d2", payload)
    with pytest.raises(InvalidArgument, match="telemetry ack .* is not valid protobuf"):
        decode_telemetry_ack("d1", b"\x12\xff")
    bad = device_pb2.TelemetryAck(device_id="d1")
    bad.committed.add(first=5, last=2)
    with pytest.raises(InvalidArgument, match="range 5-2 is reversed"):
        decode_telemetry_ack("d1", bad.SerializeToString())


def test_latency_bounds_checked_once_refused_every_time() -> None:
    """`cloud.inbound` remembers bounds that passed; bad ones are refused on every window."""
    import time

    from edgefleet.cloud.inbound import Refused, decode_telemetry

    now = int(time.time() * 1000)

    def window(bounds: list[float], counts: list[int]) -> bytes:
        m = device_pb2.Telemetry(device_id="b1", seq=1)
        m.latency.bounds_us.extend(bounds)
        m.latency.counts.extend(counts)
        return m.SerializeToString()

    good = window([10.0, 20.0], [1, 2, 3])
    for _ in range(2):
        assert decode_telemetry("b1", good, received_ms=now).bounds_us == (10.0, 20.0)
    for bad, why in (
        ([20.0, 10.0], "not increasing"),
        ([10.0, float("nan")], "latency bound nan"),
        ([-1.0, 10.0], "latency bound -1.0"),
    ):
        for _ in range(2):
            with pytest.raises(Refused, match=why):
                decode_telemetry("b1", window(bad, [1, 2, 3]), received_ms=now)
    with pytest.raises(Refused, match="latency count 9223372036854775808"):
        decode_telemetry("b1", window([10.0, 20.0], [1, 2**63, 3]), received_ms=now)
