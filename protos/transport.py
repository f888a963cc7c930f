"""MQTT transport: paho-mqtt v2 driven by the asyncio event loop, no threads.

One `MqttTransport` is one MQTT client. The device agent, the coordinator and the
simulator (1,000+ agents in one process) all use it::

    async with MqttTransport(settings, will=will, on_connect=birth) as t:
        await t.subscribe("ef/v1/dev/d1/desired")
        await t.publish("ef/v1/dev/d1/telemetry", payload)   # returns on PUBACK

How it runs:

- paho does the MQTT framing; the event loop does the I/O. The socket is watched
  with `loop.add_reader` (always) and `loop.add_writer` (while paho has bytes to
  send), through paho's on_socket_* callbacks; a 1 s timer calls `loop_misc()`
  for keepalive. paho's own `loop_start()` thread uses select() and stalls near
  330 clients per process; this holds thousands on one loop.
- paho's blocking connect (TCP connect + TLS handshake) never runs: the socket is
  connected and TLS-wrapped here with non-blocking calls and handed to paho.
  Host names (not IP literals) are resolved with `loop.getaddrinfo`, which asyncio
  runs in its default executor.
- paho's `reconnect_on_failure` is off. Our loop reconnects with capped
  exponential backoff and full jitter; auth and TLS failures give up at once
  (`Unauthenticated`). Each connection gets a fresh paho client and a clean
  session, so nothing stale is resent behind the caller's back: a publish either
  returns (acknowledged) or raises `Unavailable`, and the caller decides whether
  to spool it.
- MQTT 5 or 3.1.1 (`MqttVersion`; AUTO tries 5 and settles on 3.1.1 when the broker
  answers "unsupported protocol version"). What each version gives and what 3.1.1
  loses is in docs/protocol.md (MQTT versions).
- Several broker URLs (`fallback_urls`, e.g. a cluster's nodes): a failed attempt
  moves on to the next one (`failover_order`), with the same jittered backoff.
- Subscriptions are kept as intent and re-sent on every connect, before the
  `on_connect` callback (which typically publishes the birth message) runs.
- Received messages go, in order, to `on_message` or, without one, to the queue
  behind `messages()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.protos.backoff import Backoff
from edgefleet.protos.errors import (
    Conflict,
    FleetError,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

logger = logging.getLogger(__name__)

#: scheme -> (TLS, default port)
_SCHEMES: dict[str, tuple[bool, int]] = {"mqtt": (False, 1883), "mqtts": (True, 8883)}

#: how often paho's loop_misc() runs (keepalive pings, ping timeouts)
_MISC_INTERVAL = 1.0
#: how long a clean exit waits for the DISCONNECT to be written
_DISCONNECT_TIMEOUT = 2.0

# MQTT 5 CONNACK reason codes after which retrying cannot help
# bad user name or password, not authorized, banned, bad authentication method
_AUTH_REFUSALS = frozenset({0x86, 0x87, 0x8A, 0x8C})
# unsupported protocol version, client identifier not valid
_CONFIG_REFUSALS = frozenset({0x84, 0x85})
# SUBACK / PUBACK reason codes that name a bad request rather than a bad moment
_BAD_REQUEST = frozenset({0x8F, 0x90, 0x91, 0x95, 0x99, 0x9E, 0xA1, 0xA2})
_NOT_AUTHORIZED = 0x87
_UNSUPPORTED_VERSION = 0x84
#: tries at re-sending subscriptions a (re)connect could not restore
_RESUBSCRIBE_TRIES = 8
#: a 3.1.1 SUBACK says only "failure" (0x80); brokers send it for ACL refusals
_V311_SUB_FAILURE = 0x80
_KEEPALIVE_TIMEOUT = 0x8D

Payload = bytes | bytearray


# -- values -------------------------------------------------------------------------


@dataclass(frozen=True)
class Will:
    """Last will: what the broker publishes when the connection dies without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        _check_topic(self.topic, what="will topic")
        _check_qos(self.qos, what=f"will on {self.topic!r}")


@dataclass(frozen=True)
class Message:
    """One received PUBLISH. `retain` is set when the broker replays a retained message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    # with `MqttSettings.flow_control`: sends the PUBACK once the message is handled
    ack: Callable[[], None] | None = field(default=None, repr=False, compare=False)


class MqttVersion(StrEnum):
    """The MQTT protocol version a client speaks (docs/protocol.md, MQTT versions)."""

    #: MQTT 5 first; a broker that answers "unsupported protocol version" gets 3.1.1
    #: on the next attempt (remembered for the transport's lifetime)
    AUTO = "auto"
    V5 = "5"
    V311 = "3.1.1"

    @classmethod
    def parse(cls, value: str | MqttVersion) -> MqttVersion:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidArgument(
                f"MQTT version {value!r} is unknown; accepted: auto, 5, 3.1.1"
            ) from None


def failover_order(urls: Sequence[str], current: int, failures: int) -> tuple[int, int]:
    """(index of the broker URL to try next, backoff round) after `failures` (>= 1)
    consecutive failed attempts, the last one on `urls[current]`.

    Each failure moves on to the next URL; the backoff round grows once per full pass
    over the list, so with three brokers a dead one costs one short jittered pause, not
    an exponential wait. (After a lost connection the transport first tries the same
    broker again: a restart is the common case.)
    """
    n = len(urls)
    return (current + 1) % n, (max(failures, 1) - 1) // n + 1


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int
    tls: bool


#: Reconnect backoff cap for the coordinator's own clients: one client per process,
#: usually next to its broker, so retrying every second or two costs nothing and a
#: restarted broker has its subscriber back at once (devices keep the default cap).
COORDINATOR_BACKOFF_CAP = 2.0
#: QoS 1 messages the broker may have in flight to a coordinator-side client (MQTT 5
#: Receive Maximum): it takes every device's status, reports, wants and telemetry, so
#: it keeps the window the broker-wide limit had before devices got 2 (cloud.broker)
COORDINATOR_RECEIVE_MAXIMUM = 100


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to connect. `url` is mqtt://HOST[:PORT] or mqtts://HOST[:PORT].

    Backoff before reconnect attempt n is uniform in
    [0, min(backoff_cap, backoff_base * 2**(n-1))] seconds (full jitter).
    `connect_timeout` bounds TCP connect, TLS handshake, CONNACK and SUBACK.
    """

    url: str
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    ca_file: str | None = None
    #: client certificate and its key (PEM files) for mutual TLS
    cert_file: str | None = None
    key_file: str | None = None
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    connect_timeout: float = 10.0
    #: Acknowledge a QoS 1 message only once `on_message` has handled it, so the
    #: broker holds back what this client has not processed yet (at most its
    #: in-flight window is buffered here) instead of it piling up in memory.
    flow_control: bool = False
    #: > 0: a persistent session (clean start off, MQTT 5 session expiry in seconds):
    #: the broker keeps this client's subscriptions and queues its QoS 1 messages
    #: while it is away (a restarted coordinator misses no telemetry or report).
    session_expiry: int = 0
    #: further brokers of the same fleet (a cluster's nodes), tried in order when the
    #: current one cannot be reached (`failover_order`)
    fallback_urls: tuple[str, ...] = ()
    mqtt_version: MqttVersion = MqttVersion.AUTO
    #: MQTT 5 Receive Maximum: how many QoS 1/2 messages the broker may have in flight
    #: to this client, in place of the broker's own per-client limit (Mosquitto's
    #: max_inflight_messages); 0: the broker's limit. Ignored on MQTT 3.1.1.
    receive_maximum: int = 0

    def __post_init__(self) -> None:
        endpoint = _parse_url(self.url)
        object.__setattr__(self, "mqtt_version", MqttVersion.parse(self.mqtt_version))
        object.__setattr__(self, "fallback_urls", tuple(self.fallback_urls))
        for other in self.fallback_urls:
            if _parse_url(other).tls != endpoint.tls:
                raise InvalidArgument(
                    f"MQTT broker URLs {self.url} and {other} mix mqtt:// and mqtts://; "
                    "give every broker of one fleet the same scheme"
                )
        if not self.client_id:
            raise InvalidArgument(
                f"MQTT client_id for {self.url} is empty; give each client its own id"
            )
        if not 0 <= self.keepalive <= 65535:
            raise InvalidArgument(
                f"MQTT keepalive {self.keepalive} is out of range; accepted: 0 (off) to 65535 seconds"
            )
        if not 0 <= self.receive_maximum <= 65535:
            raise InvalidArgument(
                f"MQTT receive_maximum {self.receive_maximum} for {self.client_id}: accepted "
                "0 (the broker's limit) to 65535"
            )
        if self.password is not None and self.username is None:
            raise InvalidArgument(f"MQTT password for {self.url} is set without a username")
        if self.ca_file is not None and not endpoint.tls:
            raise InvalidArgument(
                f"ca_file {self.ca_file!r} is set but {self.url} is plain TCP; use mqtts:// for TLS"
            )
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument(
                f"MQTT client certificate for {self.url}: give both cert_file and key_file"
            )
        if self.cert_file is not None and not endpoint.tls:
            raise InvalidArgument(
                f"cert_file {self.cert_file!r} is set but {self.url} is plain TCP; use mqtts://"
            )
        if not (0 < self.backoff_base <= self.backoff_cap):
            raise InvalidArgument(
                f"MQTT backoff base {self.backoff_base} / cap {self.backoff_cap} are invalid; "
                "need 0 < base <= cap"
            )
        if self.connect_timeout <= 0:
            raise InvalidArgument(f"MQTT connect_timeout {self.connect_timeout} must be > 0")

    @property
    def endpoint(self) -> _Endpoint:
        return _parse_url(self.url)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every broker URL, the primary first."""
        return (self.url, *(u for u in self.fallback_urls if u != self.url))

    def tls_context(self) -> ssl.SSLContext:
        """The TLS context for mqtts:// (system CAs, or `ca_file`; the client certificate
        when given); `InvalidArgument` naming the file when it cannot be used."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise InvalidArgument(
                f"CA file {self.ca_file!r} for {self.url} cannot be used: {e}"
            ) from None
        if self.cert_file is not None:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as e:
                raise InvalidArgument(
                    f"client certificate {self.cert_file!r} / key {self.key_file!r} for "
                    f"{self.url} cannot be used: {e}"
                ) from None
        return ctx


@dataclass(frozen=True)
class MqttAccess:
    """Where and as whom to connect: the part of `MqttSettings` a deployment decides
    (a broker URL and a credential); each client adds its own client id and options."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt_version: MqttVersion = MqttVersion.AUTO

    @classmethod
    def of(cls, access: str | MqttAccess) -> MqttAccess:
        return cls(access) if isinstance(access, str) else access

    @property
    def urls(self) -> tuple[str, ...]:
        """`url` may list several brokers of one cluster, comma-separated."""
        return split_urls(self.url)

    def settings(self, client_id: str, **options: Any) -> MqttSettings:
        first, *others = self.urls
        tls = _parse_url(first).tls
        options.setdefault("fallback_urls", tuple(others))
        options.setdefault("mqtt_version", self.mqtt_version)
        return MqttSettings(
            url=first,
            client_id=client_id,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file if tls else None,
            cert_file=self.cert_file if tls else None,
            key_file=self.key_file if tls else None,
            **options,
        )


def broker_address(url: str) -> tuple[str, int]:
    """(host, port) of an mqtt:// or mqtts:// URL (default ports 1883 / 8883)."""
    ep = _parse_url(url)
    return ep.host, ep.port


def split_urls(text: str) -> tuple[str, ...]:
    """'mqtt://a:1883, mqtt://b:1883' -> ('mqtt://a:1883', 'mqtt://b:1883')."""
    urls = tuple(u.strip() for u in text.split(",") if u.strip())
    if not urls:
        raise InvalidArgument(f"MQTT broker list {text!r} names no URL")
    return urls


def _parse_url(url: str) -> _Endpoint:
    accepted = "accepted: mqtt://HOST[:PORT], mqtts://HOST[:PORT]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidArgument(f"MQTT URL {url!r} is malformed ({e}); {accepted}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidArgument(
            f"MQTT URL {url!r} has scheme {scheme or '(none)'!r}; accepted schemes: mqtt, mqtts"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(
            f"MQTT URL for host {parts.hostname!r} carries credentials; "
            "pass username/password in the settings instead"
        )
    if not parts.hostname:
        raise InvalidArgument(f"MQTT URL {url!r} names no host; {accepted}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgument(f"MQTT URL {url!r} has a path or query; {accepted}")
    tls, default_port = _SCHEMES[scheme]
    return _Endpoint(parts.hostname, port or default_port, tls)


def _check_qos(qos: int, *, what: str) -> None:
    if qos not in (0, 1, 2):
        raise InvalidArgument(f"QoS {qos!r} for {what} is invalid; accepted: 0, 1, 2")


def _check_topic(topic: str, *, what: str = "topic") -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise InvalidArgument(
            f"{what} {topic!r} is invalid; a topic is non-empty, without wildcards (+ #) or NUL"
        )
    if len(topic.encode()) > 65535:
        raise InvalidArgument(f"{what} {topic[:40]!r}… is longer than 65535 bytes")


def _check_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    bad = (
        not topic_filter
        or "\0" in topic_filter
        or any(("+" in lv and lv != "+") or ("#" in lv and lv != "#") for lv in levels)
        or "#" in levels[:-1]
    )
    if bad:
        raise InvalidArgument(
            f"topic filter {topic_filter!r} is invalid; '+' must fill a whole level and "
            "'#' must be the whole last level"
        )


class _VersionRefused(InvalidArgument):
    """CONNACK "unsupported protocol version" to an MQTT 5 CONNECT (MqttVersion.AUTO
    then speaks 3.1.1)."""


def _describe(rc: ReasonCode) -> str:
    return f"[rc {rc.value}] {rc.getName()}"


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # mark an exception as seen, so an abandoned future does not log "never retrieved"
    if not fut.cancelled():
        fut.exception()


# -- the paho side: one connection --------------------------------------------------


class _Client(mqtt.Client):
    """paho's client, handed a socket already connected (and TLS-wrapped) on the loop.

    `connect()` then never blocks: it takes `preconnected` instead of dialling.
    This overrides `_create_socket_connection`, a private hook present in paho
    1.x and 2.x (pinned <3 in pyproject).
    """

    preconnected: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        sock, self.preconnected = self.preconnected, None
        if sock is None:
            raise ConnectionError("no connected socket to hand to paho")
        return sock


class _Link:
    """One connection: a socket, the paho client on it, and the futures awaiting acks."""

    def __init__(self, transport: MqttTransport, sock: socket.socket, url: str, v311: bool) -> None:
        settings = transport.settings
        self._loop = asyncio.get_running_loop()
        self._label = transport.label
        self._url = self.url = url
        self.v311 = v311
        #: subscriptions the broker refused on this link, retried by `retry` while it lasts
        self.refused: list[tuple[str, int]] = []
        self.retry: asyncio.Task[None] | None = None
        self._deliver = transport._deliver
        self.sock = sock
        self.up = False  # CONNACK accepted and the socket still open
        self.closed = asyncio.Event()
        self.connack: asyncio.Future[None] = self._new_future()
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._tick: asyncio.TimerHandle | None = None
        self.reason = ""  # why it closed
        self._on_closed = transport._link_closed

        c = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv311 if v311 else mqtt.MQTTv5,
            # 3.1.1 has no session expiry: a persistent session is clean_session off
            # (kept until the broker's own limit), see docs/protocol.md
            clean_session=settings.session_expiry <= 0 if v311 else None,
            reconnect_on_failure=False,
        )
        c.preconnected = sock
        if settings.username is not None:
            c.username_pw_set(settings.username, settings.password)
        if transport.will is not None:
            w = transport.will
            c.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        if logger.isEnabledFor(logging.DEBUG):
            c.enable_logger(logging.getLogger(f"{__name__}.paho"))
        c.on_socket_open = self._socket_open
        c.on_socket_close = self._socket_close
        c.on_socket_register_write = self._register_write
        c.on_socket_unregister_write = self._unregister_write
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_publish = self._acked
        c.on_subscribe = self._acked_list
        c.on_unsubscribe = self._acked_list
        c.on_message = self._message
        self._flow_control = settings.flow_control
        if settings.flow_control:
            c.manual_ack_set(True)
        self.client = c
        self._keepalive = settings.keepalive
        self._endpoint = _parse_url(url)
        self._session_expiry = settings.session_expiry
        self._receive_maximum = settings.receive_maximum

    def _new_future(self) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        return fut

    def start(self) -> None:
        """Send CONNECT; the CONNACK resolves `connack`."""
        ep = self._endpoint
        if self.v311:
            rc = self.client.connect(ep.host, ep.port, self._keepalive)
        else:
            props = None
            if self._session_expiry > 0 or self._receive_maximum:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                if self._session_expiry > 0:
                    props.SessionExpiryInterval = self._session_expiry
                if self._receive_maximum:
                    props.ReceiveMaximum = self._receive_maximum
            rc = self.client.connect(
                ep.host,
                ep.port,
                self._keepalive,
                clean_start=self._session_expiry <= 0,
                properties=props,
            )
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise Unavailable(
                f"{self._label}: CONNECT to {self._url} failed: {mqtt.error_string(rc)}"
            )
        self._tick = self._loop.call_later(_MISC_INTERVAL, self._misc)

    # paho -> event loop
    def _socket_open(self, _c: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        self._loop.add_reader(sock, self._readable)

    def _socket_close(self, _c: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        if not self._loop.is_closed() and sock.fileno() != -1:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            # paho calls on_disconnect right after this, with the cause; this is the fallback
            self._loop.call_soon(self.mark_closed, "socket closed")

    def _register_write(self, _c: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        self._loop.add_writer(sock, self._writable)

    def _unregister_write(self, _c: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        if not self._loop.is_closed() and sock.fileno() != -1:
            self._loop.remove_writer(sock)

    def _readable(self) -> None:
        self.client.loop_read()
        # TLS: records already decrypted sit in the SSL object, invisible to epoll
        sock = self.client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending() and self.client.socket() is sock:
            self.client.loop_read()

    def _writable(self) -> None:
        self.client.loop_write()

    def _misc(self) -> None:
        if self.closed.is_set():
            return
        self.client.loop_misc()
        if not self.closed.is_set():
            self._tick = self._loop.call_later(_MISC_INTERVAL, self._misc)

    # paho callbacks
    def _connected(
        self, _c: mqtt.Client, _u: Any, _f: mqtt.ConnectFlags, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if self.connack.done():
            return
        if not rc.is_failure:
            self.up = True
            self.connack.set_result(None)
            return
        where = f"{self._label}: broker {self._url} refused the connection: {_describe(rc)}"
        err: FleetError
        if rc.value in _AUTH_REFUSALS:
            err = Unauthenticated(f"{where}; check the username and password")
        elif rc.value == _UNSUPPORTED_VERSION and not self.v311:
            err = _VersionRefused(f"{where}; the broker does not speak MQTT 5")
        elif rc.value in _CONFIG_REFUSALS:
            err = InvalidArgument(f"{where}; check the client id and broker version")
        else:
            err = Unavailable(where)
        self.connack.set_exception(err)

    def _disconnected(
        self,
        _c: mqtt.Client,
        _u: Any,
        flags: mqtt.DisconnectFlags,
        rc: ReasonCode,
        _p: Properties | None,
    ) -> None:
        # paho reports a lost socket as "Unspecified error": say what happened instead
        if flags.is_disconnect_packet_from_server:
            reason = f"broker sent DISCONNECT {_describe(rc)}"
        elif rc.value == _KEEPALIVE_TIMEOUT:
            reason = "no answer to keepalive ping"
        elif rc.value == 0:
            reason = "disconnected"
        else:
            reason = "connection closed by the broker or the network"
        self.mark_closed(reason)

    def _acked(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Properties) -> None:
        fut = self._acks.pop(mid, None)
        if fut is None or fut.done():
            return
        if rc.is_failure:
            fut.set_exception(self._refusal("publish", rc))
        else:
            fut.set_result(None)

    def _acked_list(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Properties | None
    ) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(codes)

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            logger.warning("%s: dropped a message whose topic is not UTF-8", self._label)
            return
        ack = None
        if self._flow_control and msg.qos > 0:
            mid, qos = msg.mid, msg.qos

            def ack() -> None:
                if self.up:  # on a dropped link the broker redelivers anyway
                    self.client.ack(mid, qos)

        self._deliver(Message(topic, bytes(msg.payload), msg.qos, bool(msg.retain), ack))

    def _refusal(self, what: str, rc: ReasonCode) -> FleetError:
        text = f"{self._label}: broker {self._url} refused {what}: {_describe(rc)}"
        if rc.value == _NOT_AUTHORIZED:
            return Unauthenticated(text)
        if self.v311 and rc.value == _V311_SUB_FAILURE:
            return Unauthenticated(f"{text} (MQTT 3.1.1 gives no reason; most often the ACL)")
        if rc.value in _BAD_REQUEST:
            return InvalidArgument(text)
        return Unavailable(text)

    # requests
    async def _await_ack(self, mid: int | None, what: str, timeout: float) -> Any:
        if mid is None:
            raise Unavailable(f"{self._label}: not connected to {self._url}; {what} not sent")
        fut = self._new_future()
        self._acks[mid] = fut
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that lands in the same step as the result, and close() would then hang
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise Unavailable(
                f"{self._label}: no acknowledgement from {self._url} for {what} within {timeout:g}s"
            ) from None
        finally:
            self._acks.pop(mid, None)

    async def publish(
        self, topic: str, payload: Payload, qos: int, retain: bool, timeout: float
    ) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise Unavailable(
                f"{self._label}: publish to {topic!r} failed: {mqtt.error_string(info.rc)}"
            )
        if qos > 0:
            await self._await_ack(info.mid, f"publish to {topic!r}", timeout)

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float) -> list[ReasonCode]:
        rc, mid = self.client.subscribe(filters)
        what = f"subscribe to {', '.join(f for f, _ in filters)}"
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            mid = None
        codes: list[ReasonCode] = await self._await_ack(mid, what, timeout)
        return codes

    async def unsubscribe(self, topic_filter: str, timeout: float) -> None:
        rc, mid = self.client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            mid = None
        await self._await_ack(mid, f"unsubscribe from {topic_filter}", timeout)

    def disconnect(self) -> None:
        """Queue a clean DISCONNECT (the broker then drops the will); paho closes after sending."""
        self.client.disconnect()

    # teardown
    def mark_closed(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.up = False
        self.closed.set()
        self.reason = reason
        if self._tick is not None:
            self._tick.cancel()
        lost = f"{self._label}: connection to {self._url} lost ({reason})"
        if not self.connack.done():
            self.connack.set_exception(Unavailable(f"{lost} before CONNACK"))
        acks, self._acks = self._acks, {}
        for fut in acks.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"{lost} before the broker acknowledged"))
        self._on_closed(self)

    def abort(self, reason: str) -> None:
        """Close the socket now, without DISCONNECT (the broker then publishes the will)."""
        c = self.client
        c.on_socket_open = c.on_socket_close = None
        c.on_socket_register_write = c.on_socket_unregister_write = None
        c.on_disconnect = None
        if not self._loop.is_closed() and self.sock.fileno() != -1:
            self._loop.remove_reader(self.sock)
            self._loop.remove_writer(self.sock)
        self.sock.close()
        self.mark_closed(reason)


# -- connecting ---------------------------------------------------------------------


async def _wait_io(sock: socket.socket, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(sock, ready)
    else:
        loop.add_reader(sock, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(sock)


async def _tls_handshake(sock: ssl.SSLSocket) -> None:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await _wait_io(sock, write=False)
        except ssl.SSLWantWriteError:
            await _wait_io(sock, write=True)


async def _tcp_connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    try:
        ipaddress.ip_address(host)
        ip_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        addresses: list[tuple[int, Any]] = [(ip_family, (host, port))]
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [(fam, addr) for fam, _t, _p, _c, addr in infos]
    last: OSError | None = None
    for family, addr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as e:
            sock.close()
            last = e
        except BaseException:
            sock.close()
            raise
    raise last or OSError(f"no address for {host}")


# -- the transport ------------------------------------------------------------------


class MqttTransport:
    """One MQTT client on the running event loop. Reusable, not reentrant.

    `on_connect` runs after every (re)connect, once subscriptions are restored;
    `on_message` gets every received message in order (awaited if it returns an
    awaitable). Without `on_message`, iterate `messages()`.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        will: Will | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        on_message: Callable[[Message], Awaitable[None] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.will = will
        self.label = settings.client_id
        self._on_connect = on_connect
        self._on_message = on_message
        self._subs: dict[str, int] = {}  # topic filter -> QoS: what we want, connected or not
        self._running = False
        self._link: _Link | None = None
        self._ready = asyncio.Event()  # connected, subscriptions restored, on_connect done
        self._stopped = asyncio.Event()  # the connection loop ended (exit or a fatal error)
        self._fatal: FleetError | None = None
        self._tls: ssl.SSLContext | None = None
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._current = 0  # index into settings.urls
        self._version = (
            MqttVersion.V5 if settings.mqtt_version == MqttVersion.AUTO else settings.mqtt_version
        )
        #: AUTO: whether a refused MQTT 5 CONNECT may still switch to 3.1.1
        self._auto = settings.mqtt_version == MqttVersion.AUTO

    def __repr__(self) -> str:
        state = "connected" if self.connected else "running" if self._running else "stopped"
        return f"<MqttTransport {self.label} {self.url} {state}>"

    # lifecycle
    async def __aenter__(self) -> MqttTransport:
        if self._running:
            raise Conflict(
                f"MQTT transport {self.label} is already running; it is reusable but not reentrant"
            )
        if self.settings.endpoint.tls and self._tls is None:
            self._tls = self.settings.tls_context()
        self._running = True
        self._fatal = None
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._run(), name=f"mqtt-{self.label}")]
        if self._on_message is not None:
            self._tasks.append(
                asyncio.create_task(self._dispatch(self._queue), name=f"mqtt-{self.label}-messages")
            )
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect cleanly (so the broker does not publish the will) and stop."""
        if not self._running:
            return
        self._running = False
        run, *others = self._tasks
        run.cancel()
        # a cancellation can be lost in a race with a result; insist until the task ends
        while not run.done():
            await asyncio.wait({run}, timeout=1.0)
            if not run.done():
                run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None and not link.closed.is_set():
            if link.up:
                link.disconnect()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_DISCONNECT_TIMEOUT):
                        await link.closed.wait()
            link.abort("transport closed")
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._tasks = []
        self._queue.put_nowait(None)
        self._ready.clear()
        self._stopped.set()
        logger.info("%s: closed connection to %s", self.label, self.url)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        logger.error("%s: transport task %s crashed", self.label, task.get_name(), exc_info=err)
        if self._fatal is None:
            self._fatal = Unavailable(f"{self.label}: MQTT transport stopped: {err!r}")
        self._stopped.set()

    # state
    @property
    def connected(self) -> bool:
        """True once connected, subscriptions restored and on_connect done; False when the link drops."""
        return self._ready.is_set() and self._link is not None and self._link.up

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once `connected`; raise the fatal error (e.g. `Unauthenticated`) if it gave up,
        `Unavailable` after `timeout` seconds."""
        if self._fatal is not None:
            raise self._fatal
        if not self._running:
            raise Conflict(f"MQTT transport {self.label} is not running; use `async with` first")
        ready = asyncio.ensure_future(self._ready.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            stopped.cancel()
        if self._fatal is not None:
            raise self._fatal
        if not done:
            raise Unavailable(f"{self.label}: not connected to {self.url} within {timeout:g}s")
        if stopped in done and ready not in done:
            raise Unavailable(f"{self.label}: transport closed before connecting to {self.url}")

    # requests
    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Keep `topic_filter` subscribed from now on, across reconnects.

        While connected, returns on SUBACK; while disconnected, returns at once and
        the subscription goes out on the next connect. A broker refusal drops the
        intent and raises (`Unauthenticated` when not authorised, else `InvalidArgument`
        or `Unavailable`); on MQTT 3.1.1, whose refusal gives no reason, it raises
        `Unauthenticated` but keeps the intent: sent again with backoff while the link
        lasts and on every connect (a clustered broker refuses for a moment too).
        """
        _check_filter(topic_filter)
        _check_qos(qos, what=f"subscription {topic_filter!r}")
        self._subs[topic_filter] = qos
        link = self._live_link()
        if link is None:
            return
        try:
            (code,) = await link.subscribe([(topic_filter, qos)], self.settings.connect_timeout)
        except Unavailable:
            if link.closed.is_set():
                return  # kept as intent: sent again on the next connect
            raise
        if code.is_failure:
            if link.v311 and code.value == _V311_SUB_FAILURE:
                # 3.1.1 does not say why, and a clustered broker refuses for a moment
                # while it moves a dead node's state: keep it and try again meanwhile
                link.refused.append((topic_filter, qos))
                self._retry_refused(link)
            elif self._subs.get(topic_filter) == qos:
                del self._subs[topic_filter]
            raise link._refusal(f"subscription {topic_filter!r}", code)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Forget `topic_filter`; while connected, returns on UNSUBACK."""
        _check_filter(topic_filter)
        self._subs.pop(topic_filter, None)
        link = self._live_link()
        if link is None:
            return
        try:
            await link.unsubscribe(topic_filter, self.settings.connect_timeout)
        except Unavailable:
            if not link.closed.is_set():
                raise

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10,
    ) -> None:
        """Publish; with QoS 1/2 return when the broker acknowledged it.

        Raises `Unavailable` when not connected, when the link drops before the
        acknowledgement or none comes within `timeout` (the message may or may not
        have arrived: the caller decides whether to spool and resend).
        """
        _check_topic(topic)
        _check_qos(qos, what=f"publish to {topic!r}")
        if self._fatal is not None:
            raise self._fatal
        link = self._live_link()
        if link is None:
            raise Unavailable(
                f"{self.label}: not connected to {self.url}; cannot publish to {topic!r}"
            )
        await link.publish(topic, payload, qos, retain, timeout)

    def messages(self) -> AsyncIterator[Message]:
        """Received messages, in order, until the transport closes (only without `on_message`)."""
        if self._on_message is not None:
            raise Conflict(
                f"MQTT transport {self.label} hands messages to on_message; messages() would get none"
            )
        if not self._running:
            raise Conflict(f"MQTT transport {self.label} is not running; use `async with` first")
        return self._iterate(self._queue)

    def drop_connection(self) -> None:
        """Fault hook: close the socket abruptly, without DISCONNECT.

        The broker publishes the will; the connection loop reconnects with backoff.
        """
        link = self._link
        if link is not None and not link.closed.is_set():
            logger.warning("%s: dropping the connection to %s on purpose", self.label, self.url)
            link.abort("dropped on purpose")

    def abandon(self) -> None:
        """For a `close()` that was itself cancelled: drop the connection (no DISCONNECT:
        the broker publishes the will) and cancel the transport's tasks, so nothing of it
        keeps running. Does not wait for them."""
        self.drop_connection()
        for task in self._tasks:
            task.cancel()

    @property
    def backlog(self) -> int:
        """Messages received but not handed to `on_message` / `messages()` yet."""
        return self._queue.qsize()

    # internals
    def _live_link(self) -> _Link | None:
        link = self._link
        return link if link is not None and link.up else None

    def _deliver(self, msg: Message) -> None:
        self._queue.put_nowait(msg)

    def _link_closed(self, link: _Link) -> None:
        if link is self._link:
            self._ready.clear()

    @staticmethod
    async def _iterate(queue: asyncio.Queue[Message | None]) -> AsyncIterator[Message]:
        while True:
            msg = await queue.get()
            if msg is None:
                queue.put_nowait(None)  # let any other iterator end too
                return
            yield msg
            if msg.ack is not None:
                msg.ack()

    async def _dispatch(self, queue: asyncio.Queue[Message | None]) -> None:
        handler = self._on_message
        if handler is None:
            return
        while (msg := await queue.get()) is not None:
            try:
                result = handler(msg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # a handler bug must not stop delivery of the next messages
                logger.exception("%s: on_message failed for %s", self.label, msg.topic)
            finally:
                if msg.ack is not None:
                    msg.ack()

    def _backoff(self, attempt: int) -> float:
        return Backoff(self.settings.backoff_base, self.settings.backoff_cap).delay(attempt)

    @property
    def url(self) -> str:
        """The broker URL connected to (or tried) last."""
        return self.settings.urls[self._current]

    @property
    def mqtt_version(self) -> MqttVersion:
        """The version spoken: `settings.mqtt_version`, or what AUTO settled on."""
        return self._version

    async def _run(self) -> None:
        urls = self.settings.urls
        failures = 0
        while True:
            try:
                link = await self._connect()
            except _VersionRefused as e:
                if self._auto:
                    logger.info("%s; speaking MQTT 3.1.1 from now on", e)
                    self._version = MqttVersion.V311
                    continue
                logger.error("%s; giving up (settings ask for MQTT 5 only)", e)
                self._fatal = e
                self._stopped.set()
                return
            except (Unauthenticated, InvalidArgument) as e:
                logger.error("%s; giving up", e)
                self._fatal = e
                self._stopped.set()
                return
            except Unavailable as e:
                failures += 1
                self._current, rnd = failover_order(urls, self._current, failures)
                delay = self._backoff(rnd)
                logger.warning(
                    "%s: %s; retrying in %.1fs, on %s (attempt %d)",
                    self.label,
                    e,
                    delay,
                    self.url,
                    failures,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            if link.refused:
                self._retry_refused(link)
            try:
                await self._connected(link)
                await link.closed.wait()
            finally:
                retry, link.retry = link.retry, None
                if retry is not None:
                    retry.cancel()
                    await asyncio.gather(retry, return_exceptions=True)
            delay = self._backoff(1)
            logger.warning(
                "%s: connection to %s lost (%s); retrying in %.1fs (attempt 1)",
                self.label,
                self.url,
                link.reason,
                delay,
            )
            await asyncio.sleep(delay)

    def _retry_refused(self, link: _Link) -> None:
        if link.retry is None or link.retry.done():
            link.retry = asyncio.create_task(
                self._resubscribe(link), name=f"mqtt-{self.label}-resubscribe"
            )

    async def _resubscribe(self, link: _Link) -> None:
        """Subscriptions a (re)connect could not restore, sent again with backoff while
        the link lasts: a clustered broker refuses them for a moment while it moves the
        state of a dead node (NATS: JetStream consumers), and a device without its
        `desired` subscription would never hear of a deployment."""
        for attempt in range(1, _RESUBSCRIBE_TRIES + 1):
            await asyncio.sleep(self._backoff(attempt))
            pending = [(f, q) for f, q in link.refused if self._subs.get(f) == q]
            if not pending or not link.up:
                return
            try:
                codes = await link.subscribe(pending, self.settings.connect_timeout)
            except Unavailable:
                return  # the link dropped: the next connect restores everything
            still = [p for p, c in zip(pending, codes, strict=False) if c.is_failure]
            link.refused = still + [r for r in link.refused if r not in pending]
            if not link.refused:
                logger.info("%s: subscriptions restored on %s", self.label, link.url)
                return
        logger.error(
            "%s: broker %s keeps refusing %s; giving up until the next connect",
            self.label,
            link.url,
            ", ".join(f for f, _ in link.refused),
        )

    async def _connect(self) -> _Link:
        s, url = self.settings, self.url
        ep = _parse_url(url)
        timeout = s.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                sock = await self._open_socket(ep)
        except TimeoutError:
            raise Unavailable(f"{self.label}: no connection to {url} within {timeout:g}s") from None
        link = _Link(self, sock, url, self._version == MqttVersion.V311)
        self._link = link
        try:
            link.start()
            try:
                async with asyncio.timeout(timeout):
                    await link.connack
            except TimeoutError:
                raise Unavailable(
                    f"{self.label}: no CONNACK from {url} within {timeout:g}s"
                ) from None
            if self._subs:
                filters = list(self._subs.items())
                codes = await link.subscribe(filters, timeout)
                for (flt, qos), code in zip(filters, codes, strict=False):
                    if code.is_failure:
                        logger.warning(
                            "%s: broker %s refused subscription %r: %s; trying again",
                            self.label,
                            url,
                            flt,
                            _describe(code),
                        )
                        link.refused.append((flt, qos))
        except BaseException:
            link.abort("connect attempt failed")
            if self._link is link:
                self._link = None
            raise
        return link

    async def _open_socket(self, ep: _Endpoint) -> socket.socket:
        try:
            sock = await _tcp_connect(ep.host, ep.port)
        except OSError as e:
            raise Unavailable(f"{self.label}: cannot connect to {self.url}: {e}") from None
        if self._tls is None:
            return sock
        try:
            tls = self._tls.wrap_socket(
                sock, server_hostname=ep.host, do_handshake_on_connect=False
            )
        except BaseException:
            sock.close()
            raise
        try:
            await _tls_handshake(tls)
        except ssl.SSLCertVerificationError as e:
            tls.close()
            raise Unauthenticated(
                f"{self.label}: TLS certificate of {self.url} rejected: {e.verify_message}"
            ) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as e:
            tls.close()
            raise Unavailable(f"{self.label}: TLS handshake with {self.url} cut off: {e}") from None
        except ssl.SSLError as e:
            tls.close()
            raise Unauthenticated(
                f"{self.label}: TLS handshake with {self.url} failed: {e}"
            ) from None
        except BaseException:
            tls.close()
            raise
        return tls

    async def _connected(self, link: _Link) -> None:
        logger.info("%s: connected to %s", self.label, self.url)
        if self._on_connect is not None:
            try:
                await self._on_connect()
            except Unavailable as e:
                if not link.closed.is_set():
                    logger.warning("%s: on_connect failed: %s", self.label, e)
            except Exception:
                # the link is up; a bug in the callback must not take it down
                logger.exception("%s: on_connect failed", self.label)
        if link.up and link is self._link:
            self._ready.set()


__all__ = [
    "COORDINATOR_BACKOFF_CAP",
    "Message",
    "MqttAccess",
    "MqttSettings",
    "MqttTransport",
    "MqttVersion",
    "Will",
    "broker_address",
    "failover_order",
    "split_urls",
]
