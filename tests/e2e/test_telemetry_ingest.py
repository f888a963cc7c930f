"""Telemetry from MQTT into the database through a real Mosquitto: batched rows, bad
payloads rejected and counted, and nothing lost while the subscriber is away."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgefleet.cloud.telemetry import TelemetryIngest, TelemetryStore, TelemetrySubscriber
from edgefleet.protos.transport import MqttTransport
from tests.contract.test_telemetry import NOW, payload
from tests.support.identity import SecureBroker


def _wait(pred: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


async def _publish(broker: SecureBroker, items: list[tuple[str, bytes]]) -> None:
    # one publisher speaking for many devices: the coordinator's credential (a device's
    # own would only let it publish its own telemetry; tests/e2e/test_identity.py)
    async with MqttTransport(broker.coordinator().settings("telemetry-pub")) as t:
        await t.wait_connected(timeout=10)
        for topic, data in items:
            await t.publish(topic, data, qos=1)


def test_ingest_through_the_broker_with_a_persistent_session(
    broker: SecureBroker, tmp_path: Path
) -> None:
    store = TelemetryStore(f"sqlite:///{tmp_path / 't.db'}")
    seen: list[str] = []

    def subscriber() -> tuple[TelemetrySubscriber, TelemetryIngest]:
        ingest = TelemetryIngest(store, interval=0.05, on_written=seen.extend)
        settings = broker.coordinator().settings("coordinator-telemetry-test")
        return TelemetrySubscriber(settings, ingest), ingest

    topic = "ef/v1/dev/{}/telemetry"
    good = [
        (topic.format(f"t{i % 4}"), payload(f"t{i % 4}", i, NOW, [1, 2, 0, 0])) for i in range(20)
    ]
    bad = [
        (topic.format("t0"), b"\x08\xff\xff"),  # not a Telemetry message
        (topic.format("t1"), payload("t2", 99, NOW, [1, 0, 0, 0])),  # reports for another device
    ]
    sub, ingest = subscriber()
    sub.start()
    try:
        asyncio.run(_publish(broker, good + bad))
        _wait(lambda: ingest.written == 20 and ingest.rejected == 2)
    finally:
        sub.stop()
    assert store.count() == 20
    assert set(seen) == {"t0", "t1", "t2", "t3"}

    # published while the coordinator's subscriber is down: queued by the broker
    later = [(topic.format("t9"), payload("t9", i, NOW, [0, 1, 0, 0])) for i in range(10)]
    asyncio.run(_publish(broker, later))
    sub, ingest = subscriber()
    sub.start()
    try:
        _wait(lambda: ingest.written == 10)
    finally:
        sub.stop()
    assert store.count() == 30
    store.close()


def test_committed_windows_are_acknowledged_to_their_devices(
    broker: SecureBroker, tmp_path: Path
) -> None:
    from edgefleet.agent.serde import decode_telemetry_ack

    store = TelemetryStore(f"sqlite:///{tmp_path / 't.db'}")
    ingest = TelemetryIngest(store, interval=0.05)
    sub = TelemetrySubscriber(broker.coordinator().settings("ack-test"), ingest)
    topic = "ef/v1/dev/{}/telemetry"
    windows = [
        (topic.format(d), payload(d, s, NOW, [1, 0, 0, 0])) for d in ("a1", "a2") for s in (1, 2, 3)
    ]
    acked: dict[str, set[int]] = {"a1": set(), "a2": set()}

    async def main() -> None:
        got = asyncio.Event()

        async def on_ack(msg: object) -> None:
            dev = msg.topic.split("/")[3]  # type: ignore[attr-defined]
            for first, last in decode_telemetry_ack(dev, msg.payload):  # type: ignore[attr-defined]
                acked[dev].update(range(first, last + 1))
            if all(len(v) == 3 for v in acked.values()):
                got.set()

        async with MqttTransport(broker.watcher("ack-watch"), on_message=on_ack) as w:
            await w.wait_connected(timeout=10)
            await w.subscribe("ef/v1/dev/+/ack")
            # sent twice (a device re-sending after a lost ack): stored once, acknowledged again
            await _publish(broker, windows + windows[:2])
            async with asyncio.timeout(30):
                await got.wait()
                while ingest.written + ingest.duplicated < 8:
                    await asyncio.sleep(0.05)

    sub.start()
    try:
        asyncio.run(main())
    finally:
        sub.stop()
    assert acked == {"a1": {1, 2, 3}, "a2": {1, 2, 3}}
    assert (store.count(), ingest.written, ingest.duplicated, ingest.acked) == (6, 6, 2, 8)
    store.close()
