"""A Mosquitto broker the coordinator starts and supervises on loopback.

`fleet serve` without `--broker` runs one under FLEET_HOME/broker (config,
persistence, log). Tests and the simulator use the same class on a free port.

The broker never outlives its coordinator: on Linux a watchdog with a parent-death signal
stops it when the coordinator dies, even by SIGKILL, and `broker.pid` in its folder lets
the next start find and stop one left running anyway. A port held by another
program is refused before Mosquitto starts, naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from edgefleet.protos.errors import Conflict, InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    from edgefleet.cloud.identity import BrokerAuth

logger = logging.getLogger(__name__)

_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next((p for p in _SEARCH if os.access(p, os.X_OK)), None)
    if not found:
        raise NotFound(
            "mosquitto not found: install it (Debian/Ubuntu: apt-get install mosquitto; "
            "macOS: brew install mosquitto) or pass --broker mqtt://HOST:PORT to use an existing broker"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _reachable_by_mosquitto(path: Path) -> bool:
    """Whether the 'mosquitto' user may walk down to `path` (search bit on every parent)."""
    try:
        import pwd

        pw = pwd.getpwnam("mosquitto")
    except (KeyError, ImportError):
        return True  # no such user: mosquitto does not drop privileges
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == pw.pw_gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return False
    return True


def _accepts(address: tuple[str, int], username: str, password: str) -> bool:
    """Whether the broker accepts this login (one MQTT 3.1.1 CONNECT, then DISCONNECT)."""

    def field(text: str) -> bytes:
        data = text.encode()
        return len(data).to_bytes(2, "big") + data

    body = (
        field("MQTT")
        + bytes([4, 0b11000010])  # level 4; username, password, clean session
        + (10).to_bytes(2, "big")
        + field(f"probe-{os.getpid()}-{time.monotonic_ns()}")
        + field(username)
        + field(password)
    )
    n, size = len(body), b""
    while True:  # MQTT variable-length "remaining length"
        n, digit = n >> 7, n & 0x7F
        size += bytes([digit | (0x80 if n else 0)])
        if not n:
            break
    packet = b"\x10" + size + body
    try:
        with socket.create_connection(address, timeout=2) as s:
            s.sendall(packet)
            ack = s.recv(4)
            ok = len(ack) == 4 and ack[0] == 0x20 and ack[3] == 0
            if ok:
                s.sendall(b"\xe0\x00")
            return ok
    except OSError:
        return False


PID_FILE = "broker.pid"
#: per-client in-flight limits of the managed broker (FLEET_MQTT_MAX_INFLIGHT,
#: FLEET_MQTT_MAX_INFLIGHT_KB). Mosquitto 2.0 holds a copy of every packet in flight per
#: subscriber: a broadcast chunk (64 KiB) to 10,000 devices with 100 in flight grew it to
#: 12.7 GB; a few messages bound it to about subscribers x limit x chunk size.
#: BENCHMARKS.md "Broker in-flight limits" measures the choice.
DEFAULT_MAX_INFLIGHT = 2
DEFAULT_MAX_INFLIGHT_BYTES = 128 * 1024
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """preexec_fn: SIGTERM this process when the thread that started it dies (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def listeners(port: int) -> dict[int, str]:
    """{pid: process name} of every process listening on TCP `port` (any address);
    empty when none, or when this user may not see who (psutil)."""
    import psutil

    found: dict[int, str] = {}
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return found
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                found[c.pid] = psutil.Process(c.pid).name()
            except psutil.Error:
                found[c.pid] = "?"
    return found


def port_holder(port: int) -> str:
    """'mosquitto (pid 812)' for who listens on `port`, or '' when unknown."""
    return ", ".join(f"{name} (pid {pid})" for pid, name in sorted(listeners(port).items()))


def port_taken_error(host: str, port: int) -> Conflict:
    holder = port_holder(port)
    return Conflict(
        f"MQTT port {host}:{port} is already taken"
        + (f" by {holder}" if holder else " by another program")
        + f": give the managed broker another port with --mqtt-port N (0 picks a free one), "
        f"or use the broker already there with --broker mqtt://{host}:{port}"
    )


def check_port_free(host: str, port: int) -> None:
    """Conflict naming the holder when `host:port` cannot be listened on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # what Mosquitto does: a port in TIME_WAIT is free, one with a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise port_taken_error(host, port) from None
            raise Unavailable(f"cannot listen on {host}:{port} for MQTT: {e.strerror}") from None


#: a watchdog beside each managed Mosquitto: it gets SIGTERM when the thread that started
#: the broker dies (PR_SET_PDEATHSIG, even on SIGKILL) and then stops the broker; it ends by
#: itself when the broker does. Mosquitto cannot carry that signal itself: started by root,
#: it drops to the 'mosquitto' user, which clears it.
_WATCHDOG = (
    "trap 'kill -TERM \"$1\" 2>/dev/null; exit 0' TERM HUP INT; "
    'while kill -0 "$1" 2>/dev/null; do sleep 0.5; done'
)


class ManagedBroker:
    """Start, supervise and stop a private Mosquitto. Usable as a context manager.

    Listens on `host:port` (loopback by default; port 0 picks a free one),
    persistence and log in `state_dir`. With `auth` (cloud.identity.BrokerAuth) anonymous
    access is off: devices use `url` with a password (client id forced to the username),
    the coordinator its own loopback listener (`coordinator_url`), and each of
    `auth.tls_listeners` takes TLS with a client certificate. Without `auth` it is
    anonymous (benchmarks only).
    """

    _watchdog: subprocess.Popen[bytes] | None = None

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        persistence: bool = True,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        max_queued: int = 100_000,
        auth: BrokerAuth | None = None,
        coordinator_port: int = 0,
    ) -> None:
        self.state_dir = state_dir
        self.auth = auth
        self.coordinator_port = (coordinator_port or free_port()) if auth is not None else 0
        self.host = host
        self.port = port or free_port(host)
        self.persistence = persistence
        if max_inflight < 1:
            raise InvalidArgument(
                f"broker max_inflight_messages {max_inflight}: must be >= 1 (messages in "
                "flight per client; mosquitto's 0, unlimited, is what let it grow to 12.7 GB)"
            )
        if max_inflight_bytes < 0:
            raise InvalidArgument(
                f"broker max_inflight_bytes {max_inflight_bytes}: must be >= 0 (0: no byte limit)"
            )
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.max_queued = max_queued
        self._proc: subprocess.Popen[bytes] | None = None
        #: SIGHUPs sent to the running broker (each re-reads every password/ACL file)
        self.reloads = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def coordinator_url(self) -> str:
        """Where the coordinator's own clients connect (the device URL without `auth`)."""
        if self.auth is None:
            return self.url
        return f"mqtt://127.0.0.1:{self.coordinator_port}"

    @property
    def tls_urls(self) -> list[str]:
        return [f"mqtts://{h}:{p}" for h, p in (self.auth.tls_listeners if self.auth else ())]

    @property
    def log_path(self) -> Path:
        return self.state_dir / "mosquitto.log"

    def _write_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # mosquitto drops privileges to the 'mosquitto' user when started as root:
        # let it write its own folder
        if os.geteuid() == 0:
            try:
                import pwd

                pw = pwd.getpwnam("mosquitto")
                os.chown(self.state_dir, pw.pw_uid, pw.pw_gid)
            except (KeyError, OSError):
                pass
        conf = self.state_dir / "mosquitto.conf"
        lines = ["# written by edgefleet; regenerated at every start", *self._listeners()]
        if (
            self.auth is not None
            and os.geteuid() == 0
            and not _reachable_by_mosquitto(self.auth.directory)
        ):
            # it reads the password/ACL files after dropping to 'mosquitto', which cannot
            # enter a 0700 FLEET_HOME: it keeps the coordinator's user instead
            lines.append("user root")
        lines += [
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.state_dir}/",
            # save sessions, subscriptions and retained messages every second (the
            # default is 1800 s: a crash lost them all); bench/persistence.py measures it
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            # bounds what the broker copies out per client: a slow device holds up
            # its own queue (shared references), not gigabytes of packet copies
            f"max_inflight_messages {self.max_inflight}",
            f"max_inflight_bytes {self.max_inflight_bytes}",
            f"max_queued_messages {self.max_queued}",
            "max_packet_size 16777216",
            "set_tcp_nodelay true",
        ]
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _listeners(self) -> list[str]:
        a = self.auth
        if a is None:
            return [f"listener {self.port} {self.host}", "allow_anonymous true"]
        devices = [
            "allow_anonymous false",
            f"acl_file {a.device_acl}",
            # the client id is the username (the device id): nobody takes over a session
            "use_username_as_clientid true",
        ]
        lines = [
            "per_listener_settings true",
            f"listener {self.coordinator_port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {a.coordinator_passwd}",
            f"acl_file {a.coordinator_acl}",
            f"listener {self.port} {self.host}",
            f"password_file {a.device_passwd}",
            *devices,
        ]
        for host, port in a.tls_listeners:
            lines += [
                f"listener {port} {host}",
                f"cafile {a.ca_file}",
                f"certfile {a.server_cert}",
                f"keyfile {a.server_key}",
                f"crlfile {a.crl_file}",
                "require_certificate true",
                "use_identity_as_username true",
                *devices,
            ]
        return lines

    def reload(self, *, timeout: float = 5.0) -> None:
        """SIGHUP: Mosquitto re-reads its password and ACL files and the CRL, and drops
        clients that no longer authenticate; other sessions stay connected. With `auth`,
        returns once the broker accepts the probe user of the files just written (so a
        connection made after that sees them)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGHUP)
        self.reloads += 1
        if self.auth is None:
            return
        from edgefleet.cloud.identity.material import PROBE_USER

        secret = self.auth.probe_secret.read_text().strip()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _accepts(("127.0.0.1", self.coordinator_port), PROBE_USER, secret):
                return
            time.sleep(0.01)
        logger.warning("mosquitto (%s) did not apply a reload within %.0fs", self.url, timeout)

    def start(self, *, timeout: float = 10.0) -> ManagedBroker:
        if self._proc is not None and self._proc.poll() is None:
            return self
        binary = find_mosquitto()
        self.stop_stale()
        check_port_free(self.host, self.port)
        if self.auth is not None:
            check_port_free("127.0.0.1", self.coordinator_port)
        conf = self._write_config()
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._watch(self._proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(
                    errors="replace"
                )
                log = (
                    self.log_path.read_text(errors="replace")[-500:]
                    if self.log_path.exists()
                    else ""
                )
                why = (err or log).strip()
                if "Address already in use" in why:
                    raise port_taken_error(self.host, self.port)
                raise Unavailable(
                    f"mosquitto on {self.host}:{self.port} exited with code {self._proc.returncode}: "
                    f"{why.splitlines()[-1] if why else 'no output'}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            holders = listeners(self.port)
            if holders and self._proc.pid not in holders:
                # something answers, but not ours (yet): never settle for a foreign broker
                time.sleep(0.05)
                continue
            self._write_pid_file(conf)
            logger.info("mosquitto listening on %s (pid %d)", self.url, self._proc.pid)
            return self
        self.stop()
        raise Unavailable(
            f"mosquitto did not listen on {self.host}:{self.port} within {timeout:.0f}s"
        )

    def _watch(self, pid: int) -> None:
        if not os.path.exists("/proc/self"):  # PR_SET_PDEATHSIG is Linux-only
            return
        self._watchdog = subprocess.Popen(
            ["/bin/sh", "-c", _WATCHDOG, "edgefleet-broker-watchdog", str(pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid_file(self) -> Path:
        return self.state_dir / PID_FILE

    def _write_pid_file(self, conf: Path) -> None:
        assert self._proc is not None
        record = {"pid": self._proc.pid, "port": self.port, "config": str(conf)}
        with contextlib.suppress(OSError):
            self.pid_file.write_text(json.dumps(record) + "\n")

    def stop_stale(self, *, timeout: float = 5.0) -> None:
        """Stop a Mosquitto an earlier coordinator started from this folder and left
        running (it was SIGKILLed, say): `broker.pid` names it, and its command line
        must name this folder's config, so a reused pid is never touched."""
        import psutil

        try:
            record = json.loads(self.pid_file.read_text())
            pid, port, conf = int(record["pid"]), int(record["port"]), str(record["config"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if self._proc is not None and self._proc.pid == pid:
            return
        try:
            proc = psutil.Process(pid)
            if conf not in proc.cmdline():
                raise psutil.NoSuchProcess(pid)
        except psutil.Error:
            self.pid_file.unlink(missing_ok=True)
            return
        logger.warning(
            "stopping a mosquitto left running by an earlier coordinator (pid %d, port %d, %s)",
            pid,
            port,
            self.state_dir,
        )
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            try:
                proc.wait(timeout)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.pid_file.unlink(missing_ok=True)

    def stop(self, *, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog.poll() is None:
            watchdog.kill()  # SIGKILL: its trap must not fire on a broker stopped on purpose
            watchdog.wait()
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.pid_file.read_text()).get("pid") == proc.pid:
                    self.pid_file.unlink()
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        """Stop and start again on the same port (retained messages survive with persistence)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> ManagedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
