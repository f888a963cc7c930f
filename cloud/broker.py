"""A Mosquitto broker the coordinator starts and supervises on loopback.

`fleet serve` without `--broker` runs one under FLEET_HOME/broker (config,
persistence, log). Tests and the simulator use the same class on a free port.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from edgefleet.protos.errors import NotFound, Unavailable

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


class ManagedBroker:
    """Start, supervise and stop a private Mosquitto. Usable as a context manager.

    Listens on `host:port` (loopback by default; port 0 picks a free one),
    anonymous access on loopback only, persistence and log in `state_dir`.
    """

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

    def start(self, *, timeout: float = 10.0) -> ManagedBroker:
        if self._proc is not None and self._proc.poll() is None:
            return self
        binary = find_mosquitto()
        conf = self._write_config()
        self._proc = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
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
                raise Unavailable(
                    f"mosquitto on {self.host}:{self.port} exited with code {self._proc.returncode}: "
                    f"{(err or log).strip().splitlines()[-1] if (err or log).strip() else 'no output'}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    logger.info("mosquitto listening on %s (pid %d)", self.url, self._proc.pid)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise Unavailable(
            f"mosquitto did not listen on {self.host}:{self.port} within {timeout:.0f}s"
        )

    def stop(self, *, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
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
