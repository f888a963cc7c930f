"""MQTT 3.1.1 / 5 on the wire and broker failover, against a minimal MQTT listener here
(it reads the CONNECT bytes paho writes and answers CONNACKs by hand): no broker needed.
The same against real brokers: tests/e2e/test_transport.py (Mosquitto, MQTT 5) and
tests/e2e/test_nats_cluster.py (NATS, 3.1.1 only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.config import config_from_bundle
from edgefleet.protos.backoff import Backoff
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.transport import (
    MqttAccess,
    MqttSettings,
    MqttTransport,
    MqttVersion,
    failover_order,
    split_urls,
)

ACCEPT = bytes([0x20, 0x02, 0x00, 0x00])
V311_BAD_VERSION = bytes([0x20, 0x02, 0x00, 0x01])  # 3.1.1 return code 1


@dataclass(frozen=True)
class Connect:
    level: int  # 4: MQTT 3.1.1, 5: MQTT 5
    clean: bool  # clean session (3.1.1) / clean start (5)
    properties: bytes  # MQTT 5 CONNECT properties (empty for 3.1.1)


def parse_connect(packet: bytes) -> Connect:
    assert packet[0] == 0x10, f"not a CONNECT: {packet[:8]!r}"
    i, mult = 1, 1
    while packet[i] & 0x80:  # remaining length
        i, mult = i + 1, mult * 128
    body = packet[i + 1 :]
    assert body[:6] == b"\x00\x04MQTT"
    level, flags = body[6], body[7]
    props = b""
    if level == 5:
        n = body[10]  # one-byte property length in these tests
        props = body[11 : 11 + n]
    return Connect(level, bool(flags & 0x02), props)


@dataclass
class FakeBroker:
    """Answers each CONNECT with `answers` in turn (ACCEPT after they run out), or closes
    at once when `refuse`; records what it got, in `log` shared by several."""

    name: str
    log: list[tuple[str, Connect | None]]
    answers: list[bytes] = field(default_factory=list)
    refuse: bool = False
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.refuse:
                self.log.append((self.name, None))
                return
            head = await reader.readexactly(2)
            rest = await reader.readexactly(head[1])  # short CONNECTs: one length byte
            self.log.append((self.name, parse_connect(head + rest)))
            writer.write(self.answers.pop(0) if self.answers else ACCEPT)
            await writer.drain()
            await reader.read()  # hold the connection until the client goes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve(*brokers: FakeBroker) -> AsyncIterator[list[str]]:
    servers = [await asyncio.start_server(b.handle, "127.0.0.1", 0) for b in brokers]
    for b, s in zip(brokers, servers, strict=True):
        b.port = s.sockets[0].getsockname()[1]
    try:
        yield [f"mqtt://127.0.0.1:{b.port}" for b in brokers]
    finally:
        for s in servers:
            s.close()


def fast(
    url: str,
    *,
    session_expiry: int = 0,
    fallback_urls: tuple[str, ...] = (),
    mqtt_version: str = "auto",
) -> MqttSettings:
    return MqttSettings(
        url=url,
        client_id="dev-1",
        backoff_base=0.01,
        backoff_cap=0.02,
        connect_timeout=2,
        session_expiry=session_expiry,
        fallback_urls=fallback_urls,
        mqtt_version=MqttVersion.parse(mqtt_version),
    )


def test_failover_order_walks_the_list_and_grows_the_backoff_once_per_pass() -> None:
    urls = ["a", "b", "c"]
    steps = []
    current = 0
    for failures in range(1, 8):
        current, rnd = failover_order(urls, current, failures)
        steps.append((urls[current], rnd))
    assert steps == [
        ("b", 1),
        ("c", 1),
        ("a", 1),
        ("b", 2),
        ("c", 2),
        ("a", 2),
        ("b", 3),
    ]
    # one broker: the plain exponential backoff of before
    assert [failover_order(["a"], 0, f) for f in (1, 2, 3)] == [(0, 1), (0, 2), (0, 3)]
    # the round is what the one Backoff caps: round 1 never waits more than base
    assert all(Backoff(0.5, 30).delay(1) <= 0.5 for _ in range(100))


def test_auto_falls_back_to_3_1_1_and_3_1_1_keeps_a_persistent_session() -> None:
    log: list[tuple[str, Connect | None]] = []
    broker = FakeBroker("nats-like", log, answers=[V311_BAD_VERSION])

    async def main() -> None:
        async with serve(broker) as (url,):
            t = MqttTransport(fast(url, session_expiry=3600))
            assert t.mqtt_version == MqttVersion.V5
            async with t:
                await t.wait_connected(timeout=5)
                assert t.mqtt_version == MqttVersion.V311

    asyncio.run(main())
    (_, first), (_, second) = log
    assert first is not None and first.level == 5 and not first.clean
    assert first.properties[:1] == b"\x11"  # Session Expiry Interval
    assert int.from_bytes(first.properties[1:5], "big") == 3600
    # 3.1.1 has no session expiry: clean_session off keeps the session instead
    assert second is not None and second.level == 4 and not second.clean


def test_explicit_versions_are_spoken_and_5_only_gives_up_on_a_3_1_1_broker() -> None:
    log: list[tuple[str, Connect | None]] = []

    async def main() -> None:
        async with (
            serve(FakeBroker("b", log)) as (url,),
            MqttTransport(fast(url, mqtt_version="3.1.1")) as t,
        ):
            await t.wait_connected(timeout=5)
        async with (
            serve(FakeBroker("old", log, answers=[V311_BAD_VERSION])) as (old,),
            MqttTransport(fast(old, mqtt_version="5")) as t5,
        ):
            with pytest.raises(InvalidArgument, match="does not speak MQTT 5"):
                await t5.wait_connected(timeout=5)

    asyncio.run(main())
    assert [(n, c.level if c else None, c.clean if c else None) for n, c in log] == [
        ("b", 4, True),
        ("old", 5, True),
    ]


def test_a_dead_broker_is_skipped_for_the_next_url_in_the_list() -> None:
    log: list[tuple[str, Connect | None]] = []
    dead1 = FakeBroker("dead1", log, refuse=True)
    dead2 = FakeBroker("dead2", log, refuse=True)
    live = FakeBroker("live", log)

    async def main() -> None:
        async with serve(dead1, dead2, live) as urls:
            settings = fast(urls[0], fallback_urls=tuple(urls[1:]), mqtt_version="3.1.1")
            assert settings.urls == tuple(urls)
            async with MqttTransport(settings) as t:
                await t.wait_connected(timeout=5)
                assert t.url == urls[2]

    asyncio.run(main())
    assert [n for n, _ in log] == ["dead1", "dead2", "live"]


def test_broker_lists_in_settings_access_and_bundles(tmp_path: Path) -> None:
    assert split_urls(" mqtt://a:1 ,mqtt://b:2,") == ("mqtt://a:1", "mqtt://b:2")
    with pytest.raises(InvalidArgument, match="names no URL"):
        split_urls(" , ")
    s = MqttAccess("mqtt://a:1,mqtt://b:2", mqtt_version=MqttVersion.V311).settings("c")
    assert (s.url, s.fallback_urls, s.mqtt_version) == ("mqtt://a:1", ("mqtt://b:2",), "3.1.1")
    with pytest.raises(InvalidArgument, match="mix mqtt:// and mqtts://"):
        MqttSettings(url="mqtt://a", client_id="c", fallback_urls=("mqtts://b",))
    with pytest.raises(InvalidArgument, match="accepted: auto, 5, 3.1.1"):
        # a value from a config file, not an MqttVersion: checked at run time too
        MqttSettings(url="mqtt://a", client_id="c", mqtt_version="3")  # type: ignore[arg-type]

    pem = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    bundle = {
        "device_id": "d1",
        "broker_urls": ["mqtt://n1:1883", "mqtt://n2:1883", "mqtt://n3:1883"],
        "mqtt_version": "3.1.1",
        "signing_public_key": pem,
    }
    cfg = config_from_bundle(json.dumps(bundle).encode(), state_dir=tmp_path, listen="")
    assert cfg.broker_url == "mqtt://n1:1883"
    assert cfg.broker_urls == ["mqtt://n2:1883", "mqtt://n3:1883"]
    assert cfg.mqtt_version == "3.1.1"
    with pytest.raises(InvalidArgument, match="broker_urls"):
        config_from_bundle(
            json.dumps({**bundle, "broker_urls": "mqtt://n1"}).encode(),
            state_dir=tmp_path,
            listen="",
        )
    with pytest.raises(InvalidArgument, match="MQTT version 'x'"):
        config_from_bundle(
            json.dumps({**bundle, "mqtt_version": "x"}).encode(), state_dir=tmp_path, listen=""
        )
