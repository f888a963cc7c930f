"""The coordinator trusts nothing a device says: out-of-range, oversized and unknown
values are refused at the boundary and counted, while every other device's messages
keep landing (real Mosquitto, real ingest into SQLite, real coordinator)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.inbound import Refusals
from edgefleet.cloud.metrics import refusal_families, render
from edgefleet.cloud.telemetry import TelemetryIngest, TelemetryStore, TelemetrySubscriber
from edgefleet.cloud.telemetry.ingest import decode_row
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import MqttTransport
from tests.support.e2e import local_coordinator
from tests.support.identity import SecureBroker

TOPIC = "ef/v1/dev/{}/telemetry"


def _now_ms() -> int:
    return int(time.time() * 1000)


def telemetry(device: str, seq: int, **fields: object) -> device_pb2.Telemetry:
    end = _now_ms()
    m = device_pb2.Telemetry(
        device_id=device, seq=seq, window_start_ms=end - 10_000, window_end_ms=end
    )
    m.active.model, m.active.version, m.active.variant = "digits", 1, "int8"
    m.latency.bounds_us.extend([100, 1000])
    m.latency.counts.extend([3, 1, 0])
    m.latency.count = 4
    m.predictions = 4
    for k, v in fields.items():
        if k == "model":
            m.active.model = str(v)
        else:
            setattr(m, k, v)
    return m


def _wait(pred: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


async def _publish(
    broker: SecureBroker, items: list[tuple[str, bytes]], *, retain: bool = False
) -> None:
    # what reaches the coordinator's boundary, whoever sent it: published with the
    # coordinator's own rights (the broker's ACLs keep devices to their own topics;
    # tests/e2e/test_identity.py)
    async with MqttTransport(broker.coordinator().settings("inbound-pub")) as t:
        await t.wait_connected(timeout=10)
        for topic, data in items:
            await t.publish(topic, data, qos=1, retain=retain)


# the attacks: (device, payload, reason the coordinator counts)
BAD: list[tuple[str, bytes, str]] = [
    ("evil", telemetry("evil", 2**63).SerializeToString(), "out_of_range"),  # seq past int63
    ("evil", telemetry("evil", 2**64 - 1).SerializeToString(), "out_of_range"),  # seq = -1
    ("evil", telemetry("evil", 1, predictions=2**64 - 5).SerializeToString(), "out_of_range"),
    ("evil", telemetry("evil", 2, errors=2**63).SerializeToString(), "out_of_range"),
    ("evil", telemetry("evil", 3, cpu_percent=-5.0).SerializeToString(), "out_of_range"),
    ("evil", telemetry("evil", 4, model="m" * (1 << 20)).SerializeToString(), "too_large"),
    ("evil", telemetry("evil", 5, model="m" * 50_000).SerializeToString(), "too_long"),
    ("evil", telemetry("evil", 6, window_end_ms=2**62).SerializeToString(), "bad_timestamp"),
    ("evil", telemetry("g0", 7).SerializeToString(), "wrong_device"),  # g0's name, own topic
    ("evil", b"\x08\xff\xff", "malformed"),
]


def test_bad_telemetry_is_refused_while_everyone_elses_lands(
    broker: SecureBroker, tmp_path: Path
) -> None:
    store = TelemetryStore(f"sqlite:///{tmp_path / 't.db'}")
    refusals = Refusals()
    ingest = TelemetryIngest(store, interval=0.05, refusals=refusals)
    sub = TelemetrySubscriber(broker.coordinator().settings("coordinator-inbound-test"), ingest)
    good = [
        (TOPIC.format(f"g{i % 4}"), telemetry(f"g{i % 4}", i).SerializeToString())
        for i in range(40)
    ]
    bad = [(TOPIC.format(dev), data) for dev, data, _ in BAD]
    # the bad ones in the middle: what comes after them must land too
    items = good[:20] + bad + good[20:]
    sub.start()
    try:
        asyncio.run(_publish(broker, items))
        _wait(lambda: ingest.written == 40 and refusals.total() == len(BAD))
        assert store.count() == 40
        # still ingesting after the attack
        asyncio.run(
            _publish(broker, [(TOPIC.format("g9"), telemetry("g9", 1).SerializeToString())])
        )
        _wait(lambda: ingest.written == 41)
    finally:
        sub.stop()
    assert store.count() == 41
    assert ingest.rejected == len(BAD) and ingest.write_errors == 0
    want: dict[tuple[str, str], int] = {}
    for _dev, _data, reason in BAD:
        want[("telemetry", reason)] = want.get(("telemetry", reason), 0) + 1
    assert refusals.snapshot() == want
    text = render(refusal_families(refusals))
    assert 'edgefleet_inbound_refused_total{kind="telemetry",reason="out_of_range"} 5.0' in text
    store.close()


def test_rows_the_database_refuses_are_isolated_and_the_rest_land_at_shutdown(
    tmp_path: Path,
) -> None:
    """A value that slipped past the decoder (here put in the buffer directly) no longer
    holds the batch hostage: it is isolated, counted and dropped; the other rows are
    written, also by the final flush at shutdown."""
    store = TelemetryStore(f"sqlite:///{tmp_path / 't.db'}")
    refusals = Refusals()
    ingest = TelemetryIngest(store, interval=3600, refusals=refusals)  # flushes only at stop
    ingest.start()
    now = _now_ms()
    rows = [
        decode_row(f"d{i % 5}", telemetry(f"d{i % 5}", i).SerializeToString(), received_ms=now)
        for i in range(100)
    ]
    poison = list(rows[0])
    poison[1] = 2**63  # "Python int too large to convert to SQLite INTEGER"
    for r in rows:
        assert ingest.add(r[0], telemetry(r[0], r[1]).SerializeToString())
    with ingest._lock:  # the decoder refuses it; this one reaches the database
        ingest._rows.insert(50, tuple(poison))
    ingest.stop()
    assert store.count() == 100
    assert ingest.written == 100 and ingest.refused_rows == 1
    assert refusals.snapshot() == {("telemetry", "database_refused"): 1}
    store.close()


@pytest.fixture
def coordinator_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    client = LocalClient(load_settings(home=home))
    client.init()
    client.close()
    return home


def test_bad_control_messages_are_refused_and_good_ones_recorded(
    broker: SecureBroker, coordinator_home: Path
) -> None:
    settings = load_settings(home=coordinator_home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    for d in ("d1", "d2"):
        devices.enroll(d)
    topics = Topics()

    def reported(device: str, **fields: object) -> bytes:
        m = device_pb2.ReportedState(
            device_id=device,
            generation=1,
            state=device_pb2.UPDATE_STATE_ACTIVE,
            reason=device_pb2.REASON_CODE_OK,
            timestamp_ms=_now_ms(),
        )
        for k, v in fields.items():
            setattr(m, k, v)
        return m.SerializeToString()

    status = device_pb2.DeviceStatus(device_id="d1", online=True, boot_id="b1")
    status.capabilities.runtimes.append("onnxruntime")
    bad_caps = device_pb2.DeviceStatus(device_id="d2", online=True)
    bad_caps.capabilities.accelerator = "quantum"
    want = device_pb2.ArtifactWant(device_id="d1", sha256="a" * 64, chunks_total=4)
    want.missing.add(start=3, end=2**32 - 1)
    bad = [
        (topics.reported("d2"), reported("d2", state=99), ("reported", "unknown_enum")),
        (topics.reported("d2"), reported("d2", reason=1234), ("reported", "unknown_enum")),
        (topics.reported("d2"), reported("d2", generation=2**63), ("reported", "out_of_range")),
        (topics.reported("d1"), reported("d2"), ("reported", "wrong_device")),
        (topics.reported("d2"), reported("d2", detail="x" * 5000), ("reported", "too_long")),
        (topics.status("d2"), b"\x0a" + b"\xff" * 20_000, ("status", "too_large")),
        (topics.status("d2"), bad_caps.SerializeToString(), ("status", "unknown_enum")),
        (topics.want("a" * 64), want.SerializeToString(), ("want", "out_of_range")),
        ("ef/v1/dev/bad id!/reported", reported("d2"), ("reported", "bad_device_id")),
    ]

    async def main() -> None:
        async with local_coordinator(
            client,
            devices,
            broker.coordinator(),
            flush_interval=0.01,
        ) as coord:
            await _publish(broker, [(t, p) for t, p, _ in bad])
            await _publish(
                broker,
                [
                    (topics.status("d1"), status.SerializeToString()),
                    (topics.reported("d2"), reported("d2", generation=7)),
                ],
            )
            async with asyncio.timeout(20):
                while (
                    getattr(devices.get("d2").reported, "generation", None) != 7
                    or not devices.get("d1").online
                    or coord.refusals.total() < len(bad)
                ):
                    await coord.changed(0.2)
            counts: dict[tuple[str, str], int] = {}
            for *_x, key in bad:
                counts[key] = counts.get(key, 0) + 1
            assert coord.refusals.snapshot() == counts

    try:
        asyncio.run(main())
        d2 = devices.get("d2")
        assert d2.reported and d2.reported.state == "active" and d2.reported.generation == 7
        caps = devices.get("d1").capabilities
        assert caps and caps.runtimes == ("onnxruntime",)
    finally:
        devices.close()
        client.close()
