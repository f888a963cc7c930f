"""The broadcast carousel: merged wants, one send per chunk per round, repairs."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from edgefleet.cloud.distribution import Broadcaster, chunk_digests
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.topics import Topics

DATA = bytes(range(256)) * 1000  # 256,000 bytes
SHA = hashlib.sha256(DATA).hexdigest()


def run_rounds(
    wants: list[list[tuple[int, int]]], *, chunk: int = 64_000
) -> tuple[list[int], Broadcaster]:
    sent: list[int] = []

    async def publish(topic: str, payload: bytes) -> None:
        assert topic == f"t/art/{SHA}/chunk"
        msg = device_pb2.ArtifactChunk()
        msg.ParseFromString(payload)
        assert msg.data == DATA[msg.index * chunk : (msg.index + 1) * chunk]
        sent.append(msg.index)

    async def main() -> Broadcaster:
        b = Broadcaster(publish, topics=Topics("t"), gather=0.01)
        b.register(SHA, DATA, chunk)
        task = asyncio.create_task(b.run())
        for ranges in wants:
            b.on_want(SHA, ranges)
        await asyncio.sleep(0.1)
        task.cancel()
        return b

    return sent, asyncio.run(main())


def test_merged_wants_send_each_chunk_once() -> None:
    # 100 devices each missing everything: 4 chunks go out once
    sent, b = run_rounds([[(0, 4)]] * 100)
    assert sorted(sent) == [0, 1, 2, 3]
    st = b.stats(SHA)
    assert st.bytes_sent == len(DATA) and st.wants == 100 and st.chunks == 4


def test_repairs_send_only_the_union_of_missing() -> None:
    sent, _ = run_rounds([[(1, 2)], [(3, 4)], [(1, 2), (3, 4)], [(9, 12)]])
    assert sorted(sent) == [1, 3]


def test_chunk_digests_and_validation() -> None:
    d = chunk_digests(DATA, 100_000)
    assert len(d) == 3 and d[2] == hashlib.sha256(DATA[200_000:]).digest()

    async def nop(_t: str, _p: bytes) -> None:
        return None

    async def main() -> None:
        b = Broadcaster(nop, topics=Topics())
        with pytest.raises(InvalidArgument, match="do not hash"):
            b.register(SHA, DATA[:-1])
        with pytest.raises(InvalidArgument, match="positive bytes/s"):
            Broadcaster(nop, topics=Topics(), rate=-1)

    asyncio.run(main())


def test_publish_failure_keeps_chunks_pending_until_the_link_is_back() -> None:
    from edgefleet.protos.errors import Unavailable

    sent: list[int] = []
    fail = {"left": 3}

    async def flaky(topic: str, payload: bytes) -> None:
        if fail["left"] > 0:
            fail["left"] -= 1
            raise Unavailable("broker gone")
        msg = device_pb2.ArtifactChunk()
        msg.ParseFromString(payload)
        sent.append(msg.index)

    async def main() -> None:
        b = Broadcaster(flaky, topics=Topics("t"), gather=0.0)
        b.retry_delay = 0.01
        b.register(SHA, DATA, 64_000)
        task = asyncio.create_task(b.run())
        b.on_want(SHA, [(0, 4)])
        async with asyncio.timeout(5):
            while sorted(sent) != [0, 1, 2, 3]:
                await asyncio.sleep(0.01)
        task.cancel()
        assert not task.done() or task.cancelled()

    asyncio.run(main())
    assert sorted(sent) == [0, 1, 2, 3]


def test_repairs_tell_lost_chunks_from_chunks_still_in_flight() -> None:
    sent: list[int] = []
    skew = [0.0]  # real time plus what the test skips ahead

    def clock() -> float:
        return time.monotonic() + skew[0]

    async def publish(topic: str, payload: bytes) -> None:
        msg = device_pb2.ArtifactChunk()
        msg.ParseFromString(payload)
        sent.append(msg.index)

    async def main() -> None:
        b = Broadcaster(publish, topics=Topics("t"), gather=0.01, clock=clock)
        b.register(SHA, DATA, 64_000)
        task = asyncio.create_task(b.run())
        b.on_want(SHA, [(0, 4)])  # first round: all four chunks, in order
        await asyncio.sleep(0.1)
        assert sent == [0, 1, 2, 3]
        skew[0] += 2.0
        # a device lacking 0..3 may just not have been served yet: not re-sent before the grace
        b.on_want(SHA, [(0, 4)])
        # a device holding 3 but lacking 1 lost 1 (delivery is in order): re-sent
        b.on_want(SHA, [(1, 2)])
        await asyncio.sleep(0.1)
        assert sent[4:] == [1]
        skew[0] += b.in_flight_grace
        b.on_want(SHA, [(0, 4)])  # still nothing after the grace: everything again
        await asyncio.sleep(0.1)
        assert sorted(sent[5:]) == [0, 1, 2, 3]
        skew[0] += 2.0
        b.on_want(SHA, [(2, 3)], resume=True)  # just reconnected: it missed 2 for sure
        await asyncio.sleep(0.1)
        assert sent[9:] == [2]
        task.cancel()

    asyncio.run(main())


class _Clocked:
    """A Broadcaster on real time plus what the test skips ahead, recording sends."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.skew = 0.0

        async def publish(topic: str, payload: bytes) -> None:
            msg = device_pb2.ArtifactChunk()
            msg.ParseFromString(payload)
            self.sent.append(msg.index)

        self.b = Broadcaster(publish, topics=Topics("t"), gather=0.01, clock=self.clock)
        self.b.register(SHA, DATA, 64_000)

    def clock(self) -> float:
        return time.monotonic() + self.skew

    async def want(self, device: str, ranges: list[tuple[int, int]]) -> list[int]:
        """Send one want, let a round go out; the chunks it sent."""
        before = len(self.sent)
        self.b.on_want(SHA, ranges, device_id=device)
        await asyncio.sleep(0.1)
        return self.sent[before:]


def test_a_device_still_being_served_gets_no_shared_resend() -> None:
    async def main() -> None:
        c = _Clocked()
        task = asyncio.create_task(c.b.run())
        assert await c.want("slow", [(0, 4)]) == [0, 1, 2, 3]
        c.skew += c.b.resend_after
        # holding 3 but not 2 proves 2 lost (in-order delivery): at once, whatever the grace
        assert await c.want("other", [(2, 3)]) == [2]
        assert c.b.grace(SHA) == c.b.in_flight_grace  # nothing seen of the broker yet
        c.skew += 4.0 - c.b.resend_after
        assert await c.want("slow", [(0, 4)]) == []  # not served yet, within the grace
        c.skew += 4.0
        # 8 s after the round it holds chunk 0 only: the broker is serving it, slowly
        # (0 reached it at least 4 s after it was sent); 1..3 are queued behind 0
        assert await c.want("slow", [(1, 4)]) == []
        assert c.b.grace(SHA) >= 2 * 4.0 > c.b.in_flight_grace
        c.skew += c.b.in_flight_grace + 1.0
        # past the fixed 5 s since its progress, but the broker was seen taking >= 4 s
        # per chunk: the grace has grown with it, nothing goes out to everyone
        assert await c.want("slow", [(1, 4)]) == []
        c.skew += c.b.grace(SHA)
        # no progress for a whole (grown) grace: lost after all, sent again
        assert await c.want("slow", [(1, 4)]) == [1, 2, 3]
        task.cancel()

    asyncio.run(main())


def test_the_grace_follows_the_delivery_seen_and_is_bounded() -> None:
    async def main() -> None:
        c = _Clocked()
        task = asyncio.create_task(c.b.run())
        c.b.max_grace = 7.0
        await c.want("d1", [(0, 4)])
        c.skew += 4.5
        await c.want("d1", [(0, 4)])  # 4.5 s later it still had nothing...
        c.skew += 1.0
        await c.want("d1", [(2, 4)])  # ...then 0 and 1: a delivery of >= 4.5 s, x2 = 9
        assert c.b.grace(SHA) == c.b.max_grace
        # what was seen goes stale: a later wave gets the base grace again
        c.skew += c.b.max_grace + 1.0
        assert c.b.grace(SHA) == c.b.in_flight_grace
        # wants without a device id (or from a device seen once) get the send-time grace
        assert sorted(await c.want("", [(0, 4)])) == [0, 1, 2, 3]
        task.cancel()

    asyncio.run(main())


def test_a_repair_of_a_held_chunk_proves_nothing_lost() -> None:
    async def main() -> None:
        c = _Clocked()
        task = asyncio.create_task(c.b.run())
        assert await c.want("a", [(0, 4)]) == [0, 1, 2, 3]
        c.skew += c.b.in_flight_grace
        # device "a" still has nothing after the grace: 0..3 go out again
        assert sorted(await c.want("a", [(0, 4)])) == [0, 1, 2, 3]
        c.skew += c.b.resend_after
        c.b.on_want(SHA, [(0, 1)], resume=True, device_id="c")  # reconnected: 0 again, alone
        await asyncio.sleep(0.1)
        assert c.sent[8:] == [0]
        c.skew += c.b.resend_after
        # "b" holds 0 (maybe its first copy: the latest copy of 0 proves nothing) and
        # lacks 1..3, re-sent after 0's first copy: they may be queued behind it, not lost
        assert await c.want("b", [(1, 4)]) == []
        task.cancel()

    asyncio.run(main())


def test_a_subscribed_device_waits_while_the_wave_is_still_delivered() -> None:
    async def main() -> None:
        c = _Clocked()
        task = asyncio.create_task(c.b.run())
        # "early" and "busy" asked before the round: they were subscribed when it went out
        c.b.on_want(SHA, [(0, 4)], device_id="busy")
        assert await c.want("early", [(0, 4)]) == [0, 1, 2, 3]
        c.skew += 2.0
        await c.want("busy", [(0, 4)])  # nothing yet
        c.skew += 2.0
        await c.want("busy", [(1, 4)])  # now 0: the wave is being delivered
        c.skew += c.b.in_flight_grace + 1.0 - 4.0
        # "early" has had nothing for longer than the base grace since the send, but the
        # broker is still delivering this wave to others: its copies are queued, not lost
        assert await c.want("early", [(0, 4)]) == []
        # "late" asked only after the round went out: it may have missed it; the wave
        # quiet for a grace, it gets it
        c.skew += c.b.grace(SHA)
        assert await c.want("late", [(0, 4)]) == [0, 1, 2, 3]
        assert c.b.stats(SHA).repairs == {"proven": 0, "resume": 0, "grace": 0, "late": 4}
        # the wave quiet for a whole grace: "early" gets what it still lacks
        c.skew += c.b.grace(SHA)
        assert await c.want("early", [(0, 4)]) == [0, 1, 2, 3]
        task.cancel()

    asyncio.run(main())


def test_a_late_asker_waits_for_the_wave_but_not_past_max_grace() -> None:
    async def main() -> None:
        c = _Clocked()
        c.b.delivery_factor = 0.0  # keep the grace at in_flight_grace (5 s)
        c.b.max_grace = 10.0
        task = asyncio.create_task(c.b.run())
        c.b.on_want(SHA, [(0, 4)], device_id="busy")
        await asyncio.sleep(0.1)
        assert c.sent == [0, 1, 2, 3]
        c.skew += 2.0
        await c.want("busy", [(0, 4)])
        for t, lacks in ((4.0, 1), (8.0, 2), (12.0, 3)):
            c.skew += 4.0 if t > 4.0 else 2.0
            await c.want("busy", [(lacks, 4)])  # one more chunk each time: still delivered
            # "late" asked only after the send, and has nothing: while the wave is still
            # delivered it waits (it may only have asked late), not re-sent to everyone
            c.skew += 1.5
            got = await c.want("late", [(0, 4)])
            c.skew -= 1.5
            if t < 12.0:
                assert got == [], t
        # 13.5 s after the send, past max_grace (10) + grace (5) would be 15: at 12 + 1.5
        # nothing yet; at 15.5 it goes out although "busy" is still being served
        assert got == []
        c.skew += 3.5
        await c.want("busy", [(3, 4)])
        assert await c.want("late", [(0, 4)]) == [0, 1, 2, 3]
        assert c.b.stats(SHA).repairs["late"] == 4
        task.cancel()

    asyncio.run(main())


def test_a_want_for_the_chunk_going_out_does_not_send_it_twice() -> None:
    sent: list[int] = []
    gate = asyncio.Event()

    async def slow(topic: str, payload: bytes) -> None:
        msg = device_pb2.ArtifactChunk()
        msg.ParseFromString(payload)
        if msg.index == 0:
            await gate.wait()  # the broker has not acknowledged chunk 0 yet
        sent.append(msg.index)

    async def main() -> None:
        b = Broadcaster(slow, topics=Topics("t"), gather=0.0)
        b.register(SHA, DATA, 64_000)
        task = asyncio.create_task(b.run())
        b.on_want(SHA, [(0, 4)], device_id="a")
        await asyncio.sleep(0.05)
        b.on_want(SHA, [(0, 4)], device_id="b")  # asks while chunk 0 is being published
        gate.set()
        async with asyncio.timeout(5):
            while len(sent) < 4:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    assert sent == [0, 1, 2, 3]
