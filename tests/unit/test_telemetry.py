"""Telemetry windows: sent when the link is up, spooled on disk when it is not, delivered once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.inference import ModelHolder
from edgefleet.agent.telemetry import Spool, Telemetry
from edgefleet.protos.errors import Unavailable
from edgefleet.protos.fleet.v1 import device_pb2


def decode(p: bytes) -> device_pb2.Telemetry:
    t = device_pb2.Telemetry()
    t.ParseFromString(p)
    return t


def test_offline_windows_are_spooled_then_delivered_once(tmp_path: Path) -> None:
    delivered: list[device_pb2.Telemetry] = []
    link = {"up": True}

    async def publish(payload: bytes) -> None:
        if not link["up"]:
            raise Unavailable("broker unreachable")
        delivered.append(decode(payload))

    holder = ModelHolder()
    tel = Telemetry(device_id="d1", holder=holder, spool=Spool(tmp_path / "spool"), publish=publish)

    async def main() -> None:
        for _ in range(3):  # no model yet: each predict is an error, still counted
            with pytest.raises(Unavailable):
                holder.predict(np.zeros((1, 4), np.float32))
        assert await tel.emit()
        link["up"] = False
        for n in (2, 5):
            for _ in range(n):
                with pytest.raises(Unavailable):
                    holder.predict(np.zeros((1, 4), np.float32))
            assert not await tel.emit()
        assert len(tel.spool.read()) == 2
        link["up"] = True
        assert await tel.flush() == 2
        assert await tel.flush() == 0

    asyncio.run(main())
    assert [t.predictions for t in delivered] == [3, 2, 5]
    assert [t.spooled for t in delivered] == [False, True, True]
    assert [t.errors for t in delivered] == [3, 2, 5]
    assert len({t.seq for t in delivered}) == 3 and all(t.device_id == "d1" for t in delivered)
    assert tel.spool.read() == []


def test_spool_is_bounded_and_survives_a_torn_write(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_records=3)
    for i in range(5):
        spool.append(bytes([i]) * 10)
    assert spool.read() == [bytes([i]) * 10 for i in (2, 3, 4)]  # oldest dropped first
    with open(spool.path, "ab") as f:
        f.write(b"\x10\x00\x00\x00abc")  # a record cut short by a crash
    assert len(spool.read()) == 3
    assert Spool(tmp_path).next_seq() < Spool(tmp_path).next_seq()  # seq persists across restarts
