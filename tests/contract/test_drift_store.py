"""Drift sketches and drift alerts on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from edgefleet.cloud.drift import AlertStore, Finding
from edgefleet.cloud.telemetry import TelemetryStore
from edgefleet.protos.errors import InvalidArgument

NOW = 1_700_000_000_000


def _sketch(device: str, seq: int, end_ms: int, inputs: list[list[int]], preds: list[int]) -> tuple:
    counts = json.dumps({"inputs": inputs, "predictions": preds})
    return (device, seq, end_ms, "digits", 1, "fp32", sum(preds), counts)


def test_sketches_sum_per_device_over_the_window(registry_url: str) -> None:
    store = TelemetryStore(registry_url)
    try:
        rows = [
            _sketch("d1", 1, NOW - 5_000, [[1, 2], [3, 0]], [2, 1]),
            _sketch("d1", 2, NOW - 1_000, [[1, 1], [0, 2]], [1, 1]),
            _sketch("d1", 2, NOW - 1_000, [[1, 1], [0, 2]], [1, 1]),  # re-delivered: skipped
            _sketch("d2", 1, NOW - 1_000, [[0, 4], [4, 0]], [0, 4]),
            _sketch("d3", 1, NOW - 60_000, [[9, 9], [9, 9]], [9, 9]),  # before the window
        ]
        store.insert_drift(rows[:3])
        store.insert_drift(rows[3:])
        got = {r.device_id: r for r in store.drift_window(since_ms=NOW - 10_000)}
        assert set(got) == {"d1", "d2"}
        assert got["d1"].rows == 5
        assert got["d1"].inputs == ((2, 3), (3, 2)) and got["d1"].predictions == (3, 2)
        assert store.drift_window(since_ms=NOW - 10_000, model="other") == []
        assert [r.device_id for r in store.drift_window(since_ms=NOW - 10_000, version=1)] == [
            "d1",
            "d2",
        ]
        # retention: compaction drops old sketches with the raw windows
        store.compact(now_ms=NOW + 48 * 3_600_000)
        assert store.drift_window(since_ms=0) == []
    finally:
        store.close()


def _f(subject: str, psi: float, metric: str = "inputs", scope: str = "group") -> Finding:
    return Finding(scope, subject, "digits", 1, metric, psi, 500, "worst feature mean")


def test_alerts_open_refresh_and_resolve(registry_url: str) -> None:
    alerts = AlertStore(registry_url)
    try:
        opened, resolved = alerts.apply(
            [_f("a", 0.05), _f("b", 0.9), _f("b", 0.1, "predictions")], threshold=0.2, now_ms=NOW
        )
        assert [(a.subject, a.metric, a.state) for a in opened] == [("b", "inputs", "open")]
        assert resolved == []
        # still above: the same alert, refreshed (latest and peak PSI, last seen)
        opened, _ = alerts.apply([_f("b", 0.5)], threshold=0.2, now_ms=NOW + 1_000)
        assert opened == []
        (b,) = alerts.find()
        assert (b.psi, b.max_psi, b.first_seen_ms, b.last_seen_ms) == (0.5, 0.9, NOW, NOW + 1_000)
        # back below: resolved, and a new episode opens a new alert
        _, resolved = alerts.apply([_f("b", 0.15)], threshold=0.2, now_ms=NOW + 2_000)
        assert [(a.id, a.state, a.resolved_ms) for a in resolved] == [
            (b.id, "resolved", NOW + 2_000)
        ]
        assert alerts.find() == []
        opened, _ = alerts.apply([_f("b", 0.3, scope="device")], threshold=0.2, now_ms=NOW + 3_000)
        assert opened[0].id != b.id and opened[0].scope == "device"
        everything = alerts.find(open_only=False)
        assert [a.state for a in everything] == ["open", "resolved"]
        with pytest.raises(InvalidArgument, match="threshold -1 must be > 0"):
            alerts.apply([], threshold=-1)
        with pytest.raises(InvalidArgument, match="scope must be one of device, group"):
            alerts.apply([_f("x", 0.5, scope="fleet")], threshold=0.2)
    finally:
        alerts.close()
