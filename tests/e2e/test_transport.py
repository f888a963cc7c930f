"""MqttTransport against a real Mosquitto on loopback: delivery, will, reconnect, scale, errors."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.cloud.broker import ManagedBroker, free_port
from edgefleet.protos.errors import Conflict, InvalidArgument, Unauthenticated, Unavailable
from edgefleet.protos.transport import Message, MqttSettings, MqttTransport, Will
from tests.support.identity import SecureBroker

WAIT = 5.0


def _settings(where: str | SecureBroker, client_id: str, **kw: object) -> MqttSettings:
    """Fast retries; with the test broker, the coordinator's credential on its listener
    (these tests are about the transport, not about device identities)."""
    fast: dict[str, object] = {"backoff_base": 0.05, "backoff_cap": 0.5, "connect_timeout": 5.0}
    fast.update(kw)
    if isinstance(where, str):
        return MqttSettings(url=where, client_id=client_id, **fast)  # type: ignore[arg-type]
    return where.coordinator().settings(client_id, **fast)


def _prefix() -> str:
    return f"test/{uuid.uuid4().hex[:10]}"


class _Records(logging.Handler):
    """Collects protos.transport log records (the run uses -p no:logging, so no caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records() -> Iterator[_Records]:
    log = logging.getLogger("edgefleet.protos.transport")
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


async def _until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def _next(it: object, timeout: float = WAIT) -> Message:
    async with asyncio.timeout(timeout):
        return await anext(it)  # type: ignore[call-overload,no-any-return]


# -- delivery ---------------------------------------------------------------------


def test_roundtrip_qos1_and_retained_for_a_later_subscriber(broker: SecureBroker) -> None:
    p = _prefix()

    async def main() -> None:
        async with (
            MqttTransport(_settings(broker, "sub")) as sub,
            MqttTransport(_settings(broker, "pub")) as pub,
        ):
            async with asyncio.timeout(WAIT):
                await sub.wait_connected()
                await pub.wait_connected()
                assert sub.connected and pub.connected
                await sub.subscribe(f"{p}/+", qos=1)
            inbox = sub.messages()
            await pub.publish(f"{p}/a", b"hello", qos=1)  # returns on PUBACK
            assert await _next(inbox) == Message(f"{p}/a", b"hello", qos=1, retain=False)
            await pub.publish(f"{p}/b", bytearray(b"\x00\xff"), qos=0)
            assert await _next(inbox) == Message(f"{p}/b", b"\x00\xff", qos=0, retain=False)
            await pub.publish(f"{p}/kept", b"state", qos=1, retain=True)
            assert (await _next(inbox)).payload == b"state"
            await sub.unsubscribe(f"{p}/+")
            await pub.publish(f"{p}/c", b"unheard", qos=1)
            with pytest.raises(TimeoutError):
                await _next(inbox, timeout=0.3)

        # subscribed before connecting: the intent goes out with the connection
        late = MqttTransport(_settings(broker, "late"))
        await late.subscribe(f"{p}/kept")
        async with late:
            msg = await _next(late.messages())
        assert msg == Message(f"{p}/kept", b"state", qos=1, retain=True)

    asyncio.run(main())


def test_on_message_gets_messages_in_order_and_survives_a_failing_handler(
    broker: SecureBroker,
) -> None:
    p = _prefix()
    got: list[bytes] = []

    async def handle(msg: Message) -> None:
        if msg.payload == b"boom":
            raise ValueError("handler bug")
        await asyncio.sleep(0)
        got.append(msg.payload)

    async def main() -> None:
        sub = MqttTransport(_settings(broker, "sub"), on_message=handle)
        async with sub, MqttTransport(_settings(broker, "pub")) as pub:
            await sub.subscribe(f"{p}/x")
            async with asyncio.timeout(WAIT):
                await sub.wait_connected()
                await pub.wait_connected()
            for i in range(50):
                await pub.publish(f"{p}/x", b"boom" if i == 10 else b"%d" % i)
            await _until(lambda: len(got) == 49)
            with pytest.raises(Conflict, match="on_message"):
                sub.messages()
        assert got == [b"%d" % i for i in range(50) if i != 10]

    asyncio.run(main())


# -- will ---------------------------------------------------------------------------


def test_will_on_dropped_connection_but_not_on_clean_exit(broker: SecureBroker) -> None:
    p = _prefix()
    status = f"{p}/dev/d1/status"
    births = 0

    async def main() -> None:
        async def birth() -> None:
            nonlocal births
            births += 1
            await dev.publish(status, b"online", retain=True)

        watcher = MqttTransport(_settings(broker, "watcher"))
        await watcher.subscribe(status)
        dev = MqttTransport(
            _settings(broker, "d1"), will=Will(status, b"offline"), on_connect=birth
        )
        async with watcher:
            inbox = watcher.messages()
            async with dev:
                await dev.wait_connected(WAIT)
                assert (await _next(inbox)).payload == b"online"

                dev.drop_connection()  # no DISCONNECT: the broker publishes the will
                assert not dev.connected
                assert (await _next(inbox)).payload == b"offline"

                await _until(lambda: births == 2)  # reconnected, birth again
                await dev.wait_connected(WAIT)
                assert (await _next(inbox)).payload == b"online"
            # clean exit: DISCONNECT, so no will
            assert not dev.connected
            with pytest.raises(TimeoutError):
                await _next(inbox, timeout=1.0)

        # and the retained status still says online
        async with MqttTransport(_settings(broker, "later")) as later:
            await later.subscribe(status)
            assert (await _next(later.messages())).payload == b"online"

    asyncio.run(main())


# -- reconnect ----------------------------------------------------------------------


def test_subscriptions_and_on_connect_survive_a_broker_restart(
    broker: SecureBroker, records: _Records
) -> None:
    p = _prefix()
    connects = {"sub": 0, "pub": 0}

    def counter(name: str) -> Callable[[], Awaitable[None]]:
        async def on_connect() -> None:
            connects[name] += 1

        return on_connect

    async def main() -> None:
        sub = MqttTransport(_settings(broker, "sub"), on_connect=counter("sub"))
        pub = MqttTransport(_settings(broker, "pub"), on_connect=counter("pub"))
        async with sub, pub:
            await sub.subscribe(f"{p}/#")
            async with asyncio.timeout(WAIT):
                await sub.wait_connected()
                await pub.wait_connected()
            inbox = sub.messages()
            await pub.publish(f"{p}/before", b"1")
            assert (await _next(inbox)).topic == f"{p}/before"

            await asyncio.to_thread(broker.restart)
            await _until(lambda: connects == {"sub": 2, "pub": 2}, timeout=15)
            async with asyncio.timeout(WAIT):
                await sub.wait_connected()
                await pub.wait_connected()
            await pub.publish(f"{p}/after", b"2")
            assert await _next(inbox) == Message(f"{p}/after", b"2", qos=1, retain=False)

    asyncio.run(main())
    assert any("retrying in" in m and "(attempt 1)" in m for m in records.messages)


def test_publish_while_disconnected_raises_unavailable_and_retries_with_backoff(
    records: _Records,
) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there

    async def main() -> None:
        t = MqttTransport(_settings(url, "lonely", backoff_base=0.01, backoff_cap=0.05))
        with pytest.raises(Unavailable, match=r"not connected to mqtt://127\.0\.0\.1:\d+"):
            await t.publish("a/b", b"x")
        async with t:
            with pytest.raises(Unavailable, match="within 0.5s"):
                await t.wait_connected(timeout=0.5)
            assert not t.connected
            with pytest.raises(Unavailable, match="cannot publish to 'a/b'"):
                await t.publish("a/b", b"x")
            await t.subscribe("a/#")  # kept as intent, no error

    asyncio.run(main())
    retries = [m for m in records.messages if "retrying in" in m]
    assert len(retries) >= 3
    assert "lonely: cannot connect to" in retries[0] and "(attempt 1)" in retries[0]
    assert "(attempt 3)" in retries[2]


def test_keepalive_detects_a_stalled_broker_and_acks_time_out(broker: SecureBroker) -> None:
    assert broker.pid is not None
    pid = broker.pid

    async def main() -> None:
        async with MqttTransport(_settings(broker, "ka", keepalive=1, connect_timeout=1.0)) as t:
            await t.wait_connected(WAIT)
            await asyncio.sleep(2.5)  # idle for more than keepalive: pings keep it up
            assert t.connected
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(Unavailable, match="no acknowledgement .* within 0.3s"):
                    await t.publish("test/ka", b"x", timeout=0.3)
                await _until(lambda: not t.connected, timeout=5)  # no PINGRESP: link dropped
            finally:
                os.kill(pid, signal.SIGCONT)
            await t.wait_connected(10)
            await t.publish("test/ka", b"y")

    asyncio.run(main())


def test_reusable_but_not_reentrant(broker: SecureBroker) -> None:
    async def main() -> None:
        t = MqttTransport(_settings(broker, "again"))
        for _ in range(2):
            async with t:
                await t.wait_connected(WAIT)
                with pytest.raises(Conflict, match="not reentrant"):
                    async with t:
                        pass
                await t.publish("test/again", b"x")
                inbox = t.messages()
            assert not t.connected
            assert [m async for m in inbox] == []  # ends when the transport closes
        with pytest.raises(Conflict, match="not running"):
            await t.wait_connected()

    asyncio.run(main())


# -- auth and TLS ---------------------------------------------------------------------


class _CustomBroker(ManagedBroker):
    """ManagedBroker with extra lines appended to its config (they apply to its listener)."""

    def __init__(self, state_dir: Path, extra: list[str]) -> None:
        super().__init__(state_dir, persistence=False)
        self.extra = extra

    def _write_config(self) -> Path:
        conf = super()._write_config()
        conf.write_text(conf.read_text() + "\n".join(self.extra) + "\n")
        return conf


@pytest.fixture
def state_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fleet-mqtt-"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_bad_credentials_give_up_at_once(state_dir: Path) -> None:
    pwfile = state_dir / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "dev1", "right"], check=True)
    os.chmod(pwfile, 0o644)
    extra = ["allow_anonymous false", f"password_file {pwfile}"]
    with _CustomBroker(state_dir, extra) as b:

        async def main() -> None:
            good = _settings(b.url, "d1", username="dev1", password="right")
            async with MqttTransport(good) as t:
                await t.wait_connected(WAIT)
            for bad in (
                _settings(b.url, "d2", username="dev1", password="wrong"),
                _settings(b.url, "d3"),
            ):
                async with MqttTransport(bad) as t:
                    started = time.monotonic()
                    with pytest.raises(
                        Unauthenticated, match=r"refused the connection: \[rc 13[45]\]"
                    ):
                        await t.wait_connected(WAIT)
                    assert time.monotonic() - started < 2  # no retries
                    with pytest.raises(Unauthenticated):
                        await t.publish("a", b"x")

        asyncio.run(main())


def _make_pki(d: Path) -> tuple[Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it; returns (ca, other_ca)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        else:
            ip = ipaddress.ip_address("127.0.0.1")
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
        return b.sign(signer, hashes.SHA256())

    def pem(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    ca_key, other_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    (d / "ca.pem").write_bytes(pem(cert("test ca", ca_key, "test ca", ca_key, True)))
    (d / "other-ca.pem").write_bytes(pem(cert("other ca", other_key, "other ca", other_key, True)))
    (d / "server.pem").write_bytes(pem(cert("127.0.0.1", srv_key, "test ca", ca_key, False)))
    (d / "server.key").write_bytes(
        srv_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for f in d.iterdir():
        os.chmod(f, 0o644)
    return d / "ca.pem", d / "other-ca.pem"


def test_tls_roundtrip_and_untrusted_certificate(state_dir: Path) -> None:
    ca, other_ca = _make_pki(state_dir)
    extra = [f"certfile {state_dir}/server.pem", f"keyfile {state_dir}/server.key"]
    with _CustomBroker(state_dir, extra) as b:
        url = f"mqtts://{b.host}:{b.port}"

        async def main() -> None:
            p = _prefix()
            s = _settings(url, "tls-sub", ca_file=str(ca))
            async with (
                MqttTransport(s) as sub,
                MqttTransport(_settings(url, "tls-pub", ca_file=str(ca))) as pub,
            ):
                await sub.subscribe(f"{p}/#")
                async with asyncio.timeout(WAIT):
                    await sub.wait_connected()
                    await pub.wait_connected()
                inbox = sub.messages()
                for i in range(20):  # several records in one read: pending() must be drained
                    await pub.publish(f"{p}/{i}", b"x" * 3000, qos=0)
                await pub.publish(f"{p}/last", b"done")
                topics = [(await _next(inbox)).topic for _ in range(21)]
                assert topics == [f"{p}/{i}" for i in range(20)] + [f"{p}/last"]

            async with MqttTransport(_settings(url, "tls-bad", ca_file=str(other_ca))) as t:
                with pytest.raises(Unauthenticated, match="TLS certificate of mqtts://.* rejected"):
                    await t.wait_connected(WAIT)

        asyncio.run(main())

    with pytest.raises(InvalidArgument, match="CA file '/nonexistent.pem'"):
        asyncio.run(
            MqttTransport(
                MqttSettings(url="mqtts://127.0.0.1:1", client_id="c", ca_file="/nonexistent.pem")
            ).__aenter__()
        )


# -- scale --------------------------------------------------------------------------


async def _fleet(broker: SecureBroker, n: int, *, restart: bool = False) -> dict[str, float]:
    """n clients on this one event loop: connect, subscribe, all receive one broadcast;
    with `restart`, the broker restarts and all receive a second broadcast."""
    p = _prefix()
    received: dict[bytes, int] = {}
    connects = 0
    all_in = asyncio.Event()

    def on_message(msg: Message) -> None:
        received[msg.payload] = received.get(msg.payload, 0) + 1
        if received[msg.payload] == n:
            all_in.set()

    async def on_connect() -> None:
        nonlocal connects
        connects += 1

    async def broadcast(payload: bytes) -> float:
        all_in.clear()
        async with MqttTransport(_settings(broker, f"caster-{payload.decode()}")) as caster:
            await caster.wait_connected(WAIT)
            t = time.perf_counter()
            await caster.publish(f"{p}/all", payload)
            async with asyncio.timeout(60):
                await all_in.wait()
            return time.perf_counter() - t

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    clients = [
        MqttTransport(
            _settings(
                broker, f"sim-{i:05d}", connect_timeout=30.0, backoff_base=0.5, backoff_cap=5.0
            ),
            on_connect=on_connect,
            on_message=on_message,
        )
        for i in range(n)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            await stack.enter_async_context(c)
        async with asyncio.timeout(60):
            await asyncio.gather(*(c.wait_connected() for c in clients))
        timings["connect"] = time.perf_counter() - t0
        t = time.perf_counter()
        async with asyncio.timeout(60):
            await asyncio.gather(*(c.subscribe(f"{p}/all") for c in clients))
        timings["subscribe"] = time.perf_counter() - t
        timings["fanout"] = await broadcast(b"one")
        assert received == {b"one": n}
        if restart:
            t = time.perf_counter()
            await asyncio.to_thread(broker.restart)
            await _until(lambda: connects == 2 * n, timeout=60)
            async with asyncio.timeout(60):
                await asyncio.gather(*(c.wait_connected() for c in clients))
            timings["reconnect"] = time.perf_counter() - t
            timings["fanout2"] = await broadcast(b"two")
            assert received == {b"one": n, b"two": n}
        assert all(c.connected for c in clients)
        t = time.perf_counter()
    timings["close"] = time.perf_counter() - t
    return {k: round(v, 2) for k, v in timings.items()}


def test_1000_clients_on_one_event_loop(broker: SecureBroker) -> None:
    print("1000 clients:", asyncio.run(_fleet(broker, 1000)))


@pytest.mark.slow
def test_3000_clients_on_one_event_loop_survive_a_broker_restart(broker: SecureBroker) -> None:
    print("3000 clients:", asyncio.run(_fleet(broker, 3000, restart=True)))
