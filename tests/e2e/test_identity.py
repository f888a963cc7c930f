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
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edgefleet.agent.serde import Reason, UpdateState, encode_reported, encode_status
from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceStore
from edgefleet.protos.errors import NotFound, Unauthenticated, Unavailable
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import MqttAccess, MqttSettings, MqttTransport
from tests.conftest import Cli
from tests.support.e2e import local_coordinator
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
            local_coordinator(
                client,
                devices,
                broker.coordinator(),
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
                # over TLS too (client id = certificate CN); another device, so that it does
                # not share dev-a's client id with the connection above (they would take
                # turns knocking each other off, which is the point of this test for dev-b)
                async with connected(_s(broker.tls_credentials_for("dev-c"), "dev-b")) as c:
                    await asyncio.sleep(1.0)
                    assert c.t.connected and b.t.connected and a.t.connected
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


# -- revocation through `fleet serve` and the CLI ---------------------------------------


def test_fleet_devices_revoke_and_rm_cut_the_device_and_close_its_rollout_states(
    cli: Cli, tmp_path: Path
) -> None:
    from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, RolloutStore
    from edgefleet.cloud.rollouts.model import DevicePhase, RolloutState, Stage
    from tests.e2e.test_serve import fleet_serve

    home = tmp_path / "home"
    h = ("--home", str(home))
    assert cli(*h, "init").code == 0
    bundles = {}
    tls_port = _free_port("127.0.0.1")
    with fleet_serve(home, "--mqtt-listen", f"127.0.0.1:{tls_port}") as (_proc, info):
        for d in ("dev-a", "dev-b", "dev-c"):
            out = tmp_path / f"{d}.json"
            r = cli(*h, "devices", "enroll", d, "--out", str(out))
            assert r.code == 0, r.err
            bundles[d] = json.loads(out.read_text())
        assert bundles["dev-a"]["broker_url"] == f"mqtts://127.0.0.1:{tls_port}"
        settings = load_settings(home=home)
        rollouts = RolloutStore(settings.registry_url)
        stage = Stage("canary", 1.0, 3)
        rollouts.create(
            Rollout(
                "r-open",
                "digits:1",
                "digits",
                1,
                "all",
                Policy.all_at_once(),
                RolloutState.PAUSED,
                (stage,),
            ),
            [RolloutDevice("r-open", d, 0, "int8", "0" * 64, None) for d in bundles],
        )

        def password(d: str) -> MqttSettings:
            b = bundles[d]
            access = MqttAccess(info.broker_url, username=b["username"], password=b["password"])
            return _s(access, d)

        def certificate(d: str) -> MqttSettings:
            b, folder = bundles[d], tmp_path / d
            folder.mkdir()
            for name, field in (("ca.pem", "ca_certificate"), ("c.pem", "client_certificate")):
                (folder / name).write_text(b[field])
            (folder / "c.key").write_text(b["client_key"])
            access = MqttAccess(
                b["broker_url"],
                ca_file=str(folder / "ca.pem"),
                cert_file=str(folder / "c.pem"),
                key_file=str(folder / "c.key"),
            )
            return _s(access, d)

        async def main() -> None:
            a_settings, b_settings = password("dev-a"), certificate("dev-b")
            async with (
                connected(a_settings) as a,
                connected(b_settings) as b,
                connected(password("dev-c")) as c,
            ):
                r = await asyncio.to_thread(cli, *h, "devices", "revoke", "dev-a")
                assert r.code == 0, r.err
                assert "r-open" in r.err
                async with asyncio.timeout(10):  # the running broker reloaded: a is cut off
                    while a.t.connected:
                        await asyncio.sleep(0.05)
                r = await asyncio.to_thread(cli, *h, "devices", "rm", "dev-b")
                assert r.code == 0, r.err
                async with asyncio.timeout(10):  # b's open session can do nothing more
                    while True:
                        try:
                            await b.t.publish(T.telemetry("dev-b"), b"x", qos=1)
                        except Unauthenticated:
                            break
                        await asyncio.sleep(0.1)
                assert "Not authorized" in await refused(a_settings)
                await refused(b_settings)  # on the CRL
                assert c.t.connected and c.connects == 1  # its session was never dropped
                await c.t.publish(T.telemetry("dev-c"), b"still here", qos=1)

        asyncio.run(main())
        shown = {d: json.loads(cli(*h, "devices", "show", d, "--json").out) for d in bundles}
        assert shown["dev-a"]["state"] == "revoked" and not shown["dev-a"]["online"]
        assert shown["dev-b"]["state"] == "revoked"
        assert shown["dev-c"]["state"] != "revoked"
        phases = {d.device_id: d for d in rollouts.devices("r-open")}
        assert phases["dev-a"].phase == DevicePhase.SKIPPED and phases["dev-a"].reason == "revoked"
        assert phases["dev-b"].phase == DevicePhase.SKIPPED and phases["dev-b"].reason == "removed"
        assert phases["dev-c"].phase == DevicePhase.PENDING
        rollouts.close()
        assert cli(*h, "devices", "revoke", "ghost").code != 0


# -- a device on another host ----------------------------------------------------------


@contextlib.contextmanager
def other_host() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair on a private /30:
    (namespace, address here, address there). Skips where namespaces cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' tool (iproute2) is not installed")
    tag = uuid.uuid4().hex[:6]
    ns, here_if, there_if = f"ef-{tag}", f"efh{tag}", f"efn{tag}"
    net = int(tag, 16) % 250 + 1
    here, there = f"10.231.{net}.1", f"10.231.{net}.2"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root): {made.stderr.strip()}")
    try:
        for cmd in (
            ["ip", "link", "add", here_if, "type", "veth", "peer", "name", there_if],
            ["ip", "link", "set", there_if, "netns", ns],
            ["ip", "addr", "add", f"{here}/30", "dev", here_if],
            ["ip", "link", "set", here_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{there}/30", "dev", there_if],
            ["ip", "netns", "exec", ns, "ip", "link", "set", there_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        yield ns, here, there
    finally:
        subprocess.run(["ip", "link", "del", here_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_device_on_another_host_connects_over_tls_and_is_served_a_model(
    cli: Cli, tmp_path: Path
) -> None:
    from edgefleet.cloud.registry import ModelRef
    from tests.e2e.test_serve import _env, fleet_serve

    home = tmp_path / "home"
    assert cli("--home", str(home), "init").code == 0
    local = LocalClient(load_settings(home=home))
    local.train(
        "digits", "digits", arch="mlp", epochs=2, seed=0, batch_size=64, lr=3e-3, on_epoch=None
    )
    local.quantize(
        ModelRef("digits", 1), ["int8"], max_drop=100.0, force=False, progress=lambda *_: None
    )
    local.close()
    h = ("--home", str(home))
    with other_host() as (ns, here, there):
        port = _free_port(here)
        with fleet_serve(home, "--mqtt-listen", f"{here}:{port}") as (_proc, info):
            assert info.advertise_broker == f"mqtts://{here}:{port}"
            bundle = tmp_path / "edge-ns.json"
            r = cli(*h, "devices", "enroll", "edge-ns", "--out", str(bundle))
            assert r.code == 0, r.err
            b = json.loads(bundle.read_text())
            assert b["broker_url"] == f"mqtts://{here}:{port}"
            assert "BEGIN CERTIFICATE" in b["client_certificate"]
            # a second device that is not on the other host: its credential is not used there
            assert cli(*h, "devices", "enroll", "bystander", "--out", "-").code == 0

            device = tmp_path / "device"
            in_ns = ["ip", "netns", "exec", ns, sys.executable, "-m", "edgefleet.agent.cli"]
            cfg = device / "agent.json"
            args = ["--config", str(cfg), "--state-dir", str(device / "state"), "--listen", ""]
            enrol = subprocess.run(
                [*in_ns, "enroll", str(bundle), *args],
                cwd=REPO,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert enrol.returncode == 0, enrol.stderr
            assert os.stat(cfg).st_mode & 0o777 == 0o600
            key = device / "state" / "credentials" / "client.key"
            assert os.stat(key).st_mode & 0o777 == 0o600
            # the namespace really is another host: the coordinator's loopback is not there
            loopback_port = info.broker_url.rsplit(":", 1)[1]
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    "-c",
                    _DIAL,
                    "127.0.0.1",
                    loopback_port,
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert probe.stdout.strip() == "refused", probe.stdout + probe.stderr
            log = (device / "agent.log").open("w")
            agent = subprocess.Popen(
                [*in_ns, "-v", "run", "--config", str(cfg)],
                cwd=REPO,
                env=_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:

                def online() -> bool:
                    r = cli(*h, "devices", "show", "edge-ns", "--json")
                    return r.code == 0 and bool(json.loads(r.out).get("online"))

                _wait_for(online, 90, "the agent in the namespace to come online")
                r = cli(*h, "deploy", "digits:1", "--to", "device=edge-ns", "--timeout", "90")
                assert r.code == 0, r.out + r.err + (device / "agent.log").read_text()[-3000:]
                row = next(ln.split() for ln in r.out.splitlines() if ln.startswith("edge-ns"))
                assert row[1:3] == ["int8", "active"], row
                shown = json.loads(cli(*h, "devices", "show", "edge-ns", "--json").out)
                assert shown["active"]["variant"] == "int8"
            finally:
                agent.terminate()
                try:
                    agent.wait(30)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
                log.close()
    # it connected over the veth with its certificate (CN = username = client id); the
    # broker's log is complete once it stopped
    broker_log = (home / "broker" / "mosquitto.log").read_text()
    assert f"connected from {there}:" in broker_log, broker_log[-2000:]
    assert "as edge-ns (p5, c1, k30, u'edge-ns')" in broker_log, broker_log[-2000:]


_DIAL = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError:
    print("refused")
"""
