"""MqttSettings, Will and MqttTransport argument checks: no broker needed (the transport
against a real Mosquitto: tests/e2e/test_transport.py)."""

from __future__ import annotations

import asyncio

import pytest

from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.transport import MqttSettings, MqttTransport, Will


@pytest.mark.parametrize(
    ("url", "match"),
    [
        (
            "http://127.0.0.1:1883",
            r"'http://127\.0\.0\.1:1883' has scheme 'http'; accepted schemes: mqtt, mqtts",
        ),
        ("127.0.0.1:1883", r"accepted schemes: mqtt, mqtts"),
        ("mqtt://:1883", r"names no host"),
        ("mqtt://host:port", r"malformed"),
        ("mqtt://host:99999", r"malformed"),
        ("mqtt://user:secret@host:1883", r"carries credentials"),
        ("mqtt://host:1883/path", r"path or query"),
    ],
)
def test_bad_url_raises_invalid_argument(url: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as info:
        MqttSettings(url=url, client_id="c")
    assert "secret" not in str(info.value)


def test_other_bad_settings_and_arguments() -> None:
    with pytest.raises(InvalidArgument, match="client_id"):
        MqttSettings(url="mqtt://h", client_id="")
    with pytest.raises(InvalidArgument, match="use mqtts://"):
        MqttSettings(url="mqtt://h", client_id="c", ca_file="/ca.pem")
    assert MqttSettings(url="mqtts://h", client_id="c").endpoint.port == 8883
    with pytest.raises(InvalidArgument, match="wildcards"):
        Will("a/+", b"x")

    async def main() -> None:
        t = MqttTransport(MqttSettings(url="mqtt://127.0.0.1:1", client_id="c"))
        with pytest.raises(InvalidArgument, match="topic 'a/#' is invalid"):
            await t.publish("a/#", b"x")
        with pytest.raises(InvalidArgument, match="QoS 3"):
            await t.publish("a", b"x", qos=3)
        with pytest.raises(InvalidArgument, match="filter 'a/#/b'"):
            await t.subscribe("a/#/b")
        with pytest.raises(InvalidArgument, match="filter 'a/b\\+'"):
            await t.subscribe("a/b+")
        await t.subscribe("$share/g/a/+/c/#")

    asyncio.run(main())
