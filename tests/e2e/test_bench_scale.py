"""`bench.scale` on a small fleet: a real `fleet serve`, its Mosquitto SIGKILLed under
live telemetry; every device is re-admitted and no (device, seq) is missing. Slow: it
waits out telemetry intervals on both sides of the kill."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from bench.scale import measure

pytestmark = pytest.mark.slow


def test_broker_kill_readmits_every_device_and_loses_no_telemetry() -> None:
    args = argparse.Namespace(
        scale_per_process=20, scale_telemetry_interval=3.0, scale_timeout=120.0
    )
    r = asyncio.run(measure(40, args))
    assert r["procs"] == 2
    assert r["tel_devices"] == 40, r
    assert r["missing"] == 0, r
    # each device sent telemetry on both sides of the kill: more than one window each
    assert r["rows"] > 2 * 40, r
    assert r["broker_rss_after"] > 0, r
