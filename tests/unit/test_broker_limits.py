"""The managed broker's per-client in-flight limits: defaults, settings, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edgefleet.cloud.broker import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT_BYTES, ManagedBroker
from edgefleet.cloud.config import CloudSettings
from edgefleet.protos.errors import InvalidArgument


def conf(broker: ManagedBroker) -> list[str]:
    return broker._write_config().read_text().splitlines()


def test_defaults_bound_what_a_broadcast_holds_per_subscriber(tmp_path: Path) -> None:
    lines = conf(ManagedBroker(tmp_path, port=1))
    assert f"max_inflight_messages {DEFAULT_MAX_INFLIGHT}" in lines
    assert f"max_inflight_bytes {DEFAULT_MAX_INFLIGHT_BYTES}" in lines
    # a few 64 KiB chunks per subscriber, not the 100 that grew it to 12.7 GB at 10,000
    assert DEFAULT_MAX_INFLIGHT * 64 * 1024 <= 256 * 1024


def test_settings_reach_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_MQTT_MAX_INFLIGHT", "16")
    monkeypatch.setenv("FLEET_MQTT_MAX_INFLIGHT_KB", "0")
    s = CloudSettings()
    assert (s.mqtt_max_inflight, s.mqtt_max_inflight_kb) == (16, 0)
    b = ManagedBroker(
        tmp_path,
        port=1,
        max_inflight=s.mqtt_max_inflight,
        max_inflight_bytes=s.mqtt_max_inflight_kb * 1024,
    )
    assert {"max_inflight_messages 16", "max_inflight_bytes 0"} <= set(conf(b))
    monkeypatch.setenv("FLEET_MQTT_MAX_INFLIGHT", "0")
    with pytest.raises(ValidationError, match="mqtt_max_inflight"):
        CloudSettings()


def test_bad_limits_are_refused_naming_the_value(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"max_inflight_messages 0: must be >= 1"):
        ManagedBroker(tmp_path, port=1, max_inflight=0)
    with pytest.raises(InvalidArgument, match=r"max_inflight_bytes -1: must be >= 0"):
        ManagedBroker(tmp_path, port=1, max_inflight_bytes=-1)


def test_receive_maximum_is_checked() -> None:
    from edgefleet.protos.transport import MqttSettings

    with pytest.raises(InvalidArgument, match=r"receive_maximum 70000 for c: accepted 0"):
        MqttSettings(url="mqtt://127.0.0.1:1883", client_id="c", receive_maximum=70000)
