"""Flower process plumbing shared by the coordinator (SuperLink) and the agent (SuperNode).

No `flwr` import: both sides run Flower's own executables as child processes.
`FlowerProcess` starts one in its own session with the environment Flower needs
here (telemetry and update checks off, a private FLWR_HOME) and stops it with
everything it spawned: Flower starts its ServerApp/ClientApp processes in their
own sessions, so a process group is not enough and descendants are found with
psutil and stopped one by one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.protos.errors import NotFound

if TYPE_CHECKING:  # psutil is imported where a process tree is stopped, not by the idle agent
    import psutil

logger = logging.getLogger(__name__)

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_LOG_LEVEL": "INFO",
}


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # the Flower App's components import edgefleet: make sure Flower's children find it
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # Flower starts its helpers (flower-superexec, flwr-serverapp, …) by name
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
    env.update(extra or {})
    return env


def find_flower(name: str) -> str:
    """Path of a Flower executable: next to this Python first, then PATH."""
    here = Path(sys.executable).parent / name
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if not found:
        raise NotFound(
            f"{name} not found: install Flower with the fl extra "
            "(pip install 'edgefleet[fl]'; devices: 'edgefleet-agent[fl]')"
        )
    return found


def flower_available() -> bool:
    try:
        find_flower("flwr")
    except NotFound:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: longest entry of `Capabilities.features` the coordinator takes (cloud.inbound.MAX_NAME);
#: a longer one would get the whole status message refused
MAX_FEATURE = 128


#: the feature of a device whose ClientApp has no PyTorch: it trains `mlp` checkpoints
#: (numpy) but not the architectures that need torch (models/fl/numpy_task.py)
NO_TORCH = "fl-no-torch"


def fl_features(
    *, ready: bool, reason: str = "", samples: int = 0, torch: bool = True
) -> list[str]:
    """How an agent states its federated sidecar in `Capabilities.features` (a reason too
    long for one entry, e.g. one naming a deep data directory, is cut to fit with "…")."""
    extra = [] if torch else [NO_TORCH]
    if ready:
        return ["fl", f"fl-samples={samples}", *extra]
    off = f"fl-off={reason}"
    if len(off) > MAX_FEATURE:
        off = off[: MAX_FEATURE - 1] + "…"
    return [off, f"fl-samples={samples}", *extra]


def parse_fl_features(features: Sequence[str]) -> dict[str, object] | None:
    """The reverse of `fl_features`: {"ready", "reason", "samples", "torch"}; None if not
    stated (an agent from before "fl-no-torch" needed torch to be ready: torch True)."""
    out: dict[str, object] = {}
    for f in features:
        if f == "fl":
            out.update(ready=True, reason="")
        elif f.startswith("fl-off="):
            out.update(ready=False, reason=f.removeprefix("fl-off="))
        elif f.startswith("fl-samples="):
            value = f.removeprefix("fl-samples=")
            out["samples"] = int(value) if value.isdigit() else 0
    if "ready" not in out:
        return None
    out.setdefault("samples", 0)
    out["torch"] = NO_TORCH not in features
    return out


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below `pid`."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


class FlowerProcess:
    """One Flower executable run as a child in its own session, output to a log file."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("started %s (pid %d)", Path(self.argv[0]).name, self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, *, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        import psutil

        tree = descendants(proc.pid)
        _signal(proc.pid, signal.SIGTERM)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        deadline = time.monotonic() + timeout
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
        # ours are reaped by their parents; wait for them to go
        _, alive = psutil.wait_procs(tree, timeout=max(0.0, deadline - time.monotonic()))
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()

    def kill(self) -> None:
        """Die at once, children included (SIGKILL): a crash, for faults and tests."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        import psutil

        tree = descendants(proc.pid)
        _signal(proc.pid, signal.SIGKILL)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait(10)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
