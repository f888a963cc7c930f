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

from edgefleet.protos.errors import Conflict, NotFound, Unavailable

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


PID_FILE = "broker.pid"
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
    anonymous access on loopback only, persistence and log in `state_dir`.
    """

    _watchdog: subprocess.Popen[bytes] | None = None

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        persistence: bool = True,
        max_inflight: int = 100,
        max_inflight_bytes: int = 512 * 1024,
        max_queued: int = 100_000,
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port or free_port(host)
        self.persistence = persistence
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.max_queued = max_queued
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

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
        lines = [
            "# written by edgefleet; regenerated at every start",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.state_dir}/",
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

    def start(self, *, timeout: float = 10.0) -> ManagedBroker:
        if self._proc is not None and self._proc.poll() is None:
            return self
        binary = find_mosquitto()
        self.stop_stale()
        check_port_free(self.host, self.port)
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
