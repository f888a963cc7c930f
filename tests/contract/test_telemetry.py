"""TelemetryStore against SQLite and PostgreSQL: batched inserts, duplicates, percentiles,
rollups and retention."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from edgefleet.cloud.telemetry import TelemetryStore, decode_row, quantile
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.fleet.v1 import device_pb2

BOUNDS = [100, 1000, 10000]
HOUR = 3_600_000
NOW = 1_800_000_000_000 - 1_800_000_000_000 % HOUR  # an hour boundary


@pytest.fixture
def store(registry_url: str) -> Iterator[TelemetryStore]:
    s = TelemetryStore(registry_url)
    yield s
    s.close()


def payload(device: str, seq: int, end_ms: int, counts: list[int], version: int = 1) -> bytes:
    m = device_pb2.Telemetry(
        device_id=device, seq=seq, window_start_ms=end_ms - 10_000, window_end_ms=end_ms
    )
    m.active.model, m.active.version, m.active.variant = "digits", version, "int8"
    m.predictions = sum(counts)
    m.latency.bounds_us.extend(BOUNDS)
    m.latency.counts.extend(counts)
    m.latency.count = sum(counts)
    m.rss_bytes = 1000 * seq
    return m.SerializeToString()


def row(device: str, seq: int, end_ms: int, counts: list[int], version: int = 1) -> tuple:  # type: ignore[type-arg]
    return decode_row(device, payload(device, seq, end_ms, counts, version), received_ms=end_ms)


def test_batches_insert_and_duplicates_are_ignored(store: TelemetryStore) -> None:
    rows = [row(f"d{i % 10}", i // 10 + 1, NOW - 1000 * i, [1, 2, 3, 0]) for i in range(500)]
    assert store.insert_many(rows) == 500
    assert store.count() == 500
    # the same windows again (a spool flushed twice, a QoS 1 redelivery) add nothing
    assert store.insert_many([*rows[:100], row("d0", 999, NOW, [0, 0, 0, 1])]) == 1  # new ones
    assert store.count() == 501


def test_latency_percentiles_per_version(store: TelemetryStore) -> None:
    store.insert_many(
        [row("a", i, NOW - i, [90, 9, 1, 0], version=1) for i in range(1, 11)]
        + [row("b", i, NOW - i, [0, 10, 80, 10], version=2) for i in range(1, 11)]
    )
    got = {p.version: p for p in store.latency_percentiles(since_ms=NOW - HOUR)}
    assert got[1].count == 1000 and got[1].p50_us == 100 and got[1].p99_us == 1000
    assert got[2].p50_us == 10000 and got[2].p99_us == 10000  # overflow bucket: last bound


def test_compact_folds_old_windows_into_hours_and_keeps_percentiles(
    store: TelemetryStore,
) -> None:
    old_hour = NOW - 48 * HOUR
    store.insert_many(
        [row("a", i, old_hour + i * 60_000, [5, 5, 0, 0]) for i in range(1, 31)]
        + [row("a", 100 + i, NOW - i * 1000, [0, 10, 0, 0]) for i in range(1, 6)]
    )
    folded, dropped = store.compact(raw_retention=timedelta(hours=24), now_ms=NOW)
    assert (folded, dropped) == (30, 0)
    assert store.count() == 5  # the recent windows stay raw
    # the hourly row carries the merged histogram: 300 samples, half ≤ 100 µs
    p = store.latency_percentiles(since_ms=old_hour)[0]
    assert p.count == 300 + 50 and p.p50_us == 1000
    # folding again finds nothing new; an expired rollup is dropped
    assert store.compact(raw_retention=timedelta(hours=24), now_ms=NOW) == (0, 0)
    assert store.compact(
        raw_retention=timedelta(hours=24), rollup_retention=timedelta(hours=1), now_ms=NOW
    ) == (0, 1)


def test_decode_rejects_bad_payloads_naming_the_device() -> None:
    with pytest.raises(InvalidArgument, match="'cam-1'.*not a valid Telemetry"):
        decode_row("cam-1", b"\xff\xff\xff", received_ms=0)
    with pytest.raises(InvalidArgument, match="names device 'cam-2'"):
        decode_row("cam-1", payload("cam-2", 1, NOW, [1, 0, 0, 0]), received_ms=0)
    with pytest.raises(InvalidArgument, match="3 counts for 3 bounds"):
        decode_row("cam-1", payload("cam-1", 1, NOW, [1, 0, 0]), received_ms=0)


def test_quantile_edges() -> None:
    assert quantile(BOUNDS, [0, 0, 0, 0], 0.5) is None
    assert quantile(BOUNDS, [1, 0, 0, 0], 0.99) == 100
    assert quantile(BOUNDS, [0, 0, 1, 1], 0.5) == 10000


def test_a_row_the_database_refuses_is_isolated_and_the_rest_land(store: TelemetryStore) -> None:
    """Should a value the decoder lets through be refused by the database (here a seq
    past a signed 64-bit column, put in the buffer directly), only that row is dropped
    and counted; its batch-mates are written."""
    from edgefleet.cloud.inbound import Refusals
    from edgefleet.cloud.telemetry import TelemetryIngest

    refusals = Refusals()
    ingest = TelemetryIngest(store, refusals=refusals)
    rows = [row(f"d{i % 7}", i + 1, NOW - i, [1, 0, 0, 0]) for i in range(64)]
    poison = (*rows[0][:1], 2**63, *rows[0][2:])
    with ingest._lock:
        ingest._rows.extend([*rows[:30], poison, *rows[30:]])
    assert ingest.flush()
    assert store.count() == 64
    assert ingest.written == 64 and ingest.refused_rows == 1
    assert refusals.snapshot() == {("telemetry", "database_refused"): 1}
