"""The managed Mosquitto: starts on a free loopback port, keeps retained messages over a restart."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.cloud.broker import ManagedBroker
from edgefleet.protos.errors import NotFound
from tests.support.identity import SecureBroker


def _connect(c: mqtt.Client, b: SecureBroker) -> None:
    """As the coordinator, on its own listener (anonymous access is off)."""
    own = b.coordinator()
    c.username_pw_set(own.username, own.password)
    c.connect("127.0.0.1", b.coordinator_port)


def _get_retained(b: SecureBroker, topic: str, timeout: float = 5.0) -> bytes | None:
    got: list[bytes] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="")
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    _connect(c, b)
    c.subscribe(topic, qos=1)
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        c.loop(0.05)
    c.disconnect()
    return got[0] if got else None


def test_broker_serves_and_keeps_retained_across_restart(broker: SecureBroker) -> None:
    assert broker.host == "127.0.0.1" and broker.running
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    _connect(c, broker)
    c.loop_start()
    c.publish("ef/v1/test/retained", b"hello", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    assert _get_retained(broker, "ef/v1/test/retained") == b"hello"
    broker.restart()
    assert _get_retained(broker, "ef/v1/test/retained") == b"hello"
    broker.stop()
    assert not broker.running
    with pytest.raises(OSError), socket.create_connection((broker.host, broker.port), timeout=0.5):
        pass


def test_missing_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import edgefleet.cloud.broker as cb

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cb, "_SEARCH", ())
    with pytest.raises(NotFound, match=r"apt-get install mosquitto.*--broker mqtt://"):
        ManagedBroker(tmp_path).start()
