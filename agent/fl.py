"""The federated-learning sidecar: a supervised `flower-supernode` for this device.

With the bundle's ``fl`` part in its config and Flower installed (`edgefleet-agent[fl]`),
the agent runs Flower's SuperNode next to itself. The SuperNode dials the coordinator's SuperLink over TLS (the bundle's CA),
authenticates with this device's node key, and runs the `models.fl` ClientApp on
the shards in the data directory; the data never leaves the device. The
SuperNode retries a lost link by itself; when it exits (crash, refused key,
retries exhausted) the sidecar starts it again after a capped, jittered backoff.

`fl_capability()` is what the agent reports (as `Capabilities.features`, see
`protos.flower.fl_features`): ready or not, why, how many local samples, and whether
PyTorch is installed (the ClientApp trains `mlp` checkpoints in numpy; other
architectures, the CNN, need torch: `TORCH_CPU` says how to get the CPU build), so the
coordinator can choose participants and show why a device was skipped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from edgefleet.agent.config import AgentSettings
from edgefleet.models.fl.numpy_task import TORCH_CPU
from edgefleet.models.fl.shards import count_samples
from edgefleet.protos.backoff import Backoff
from edgefleet.protos.flower import (
    FlowerProcess,
    find_flower,
    flower_available,
    flower_env,
    free_port,
)

logger = logging.getLogger(__name__)

#: what flower-supernode logs when the SuperLink refuses its key (1.41; the process
#: itself exits 1, so the log is the only place that tells this apart)
REFUSED = b"Exit Code: 305"
#: what it logs when it has given up; 1.41 can then hang in interpreter shutdown
#: instead of exiting, so the sidecar ends it on these lines
GAVE_UP = (REFUSED, b"Giving up reconnection", b"SuperNode terminated gracefully")


def data_dir(settings: AgentSettings) -> Path:
    return settings.fl_data_dir or settings.state_dir / "data"


__all__ = ["TORCH_CPU", "FlSidecar", "fl_capability", "missing_fl_runtime", "torch_available"]


def missing_fl_runtime() -> str:
    """Why this device cannot run the ClientApp ("" when it can): Flower runs it. PyTorch,
    which edgefleet-agent[fl] does not pull in, is only needed for non-`mlp` checkpoints
    (`torch_available`); the coordinator leaves a device without it out of those runs."""
    if not flower_available():
        return "Flower is not installed on this device (pip install 'edgefleet-agent[fl]')"
    return ""


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def fl_capability(settings: AgentSettings) -> dict[str, Any] | None:
    """The ``fl`` capability; None for a device not enrolled for federated learning."""
    if not settings.fl_superlink:
        return None
    torch = torch_available()
    missing = missing_fl_runtime()
    if missing:
        return {"ready": False, "reason": missing, "samples": 0, "torch": torch}
    d = data_dir(settings)
    samples = count_samples(d) if d.is_dir() else 0
    if samples == 0:
        reason = f"no shard-*.npz training data in {d}"
        return {"ready": False, "reason": reason, "samples": 0, "torch": torch}
    return {"ready": True, "reason": "", "samples": samples, "torch": torch}


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""


class FlSidecar:
    """Run and restart `flower-supernode` until cancelled."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        poll: float = 0.5,
    ) -> None:
        self.settings = settings
        self.device_id = settings.device_id
        self.dir = settings.state_dir / "fl"
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.poll = poll
        self.starts = 0
        self.state = "stopped"  # starting | running | waiting | stopped
        self.last_exit = ""
        self._proc: FlowerProcess | None = None

    def _argv(self, port: int) -> list[str]:
        s = self.settings
        key, ca = self.dir / "node.key", self.dir / "superlink-ca.crt"
        _write_private(key, s.fl_private_key)
        ca.write_text(s.fl_ca_pem)
        node_config = f'device-id="{self.device_id}" data-dir="{data_dir(s)}"'
        return [
            find_flower("flower-supernode"),
            "--superlink",
            s.fl_superlink,
            "--root-certificates",
            str(ca),
            "--auth-supernode-private-key",
            str(key),
            "--port",
            str(port),
            "--node-config",
            node_config,
        ]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def run(self) -> None:
        """Keep a SuperNode running until cancelled; stop it (and its children) on the way out."""
        attempt = 0
        try:
            while True:
                self.state = "starting"
                log_path = self.dir / "supernode.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_from = log_path.stat().st_size if log_path.exists() else 0
                self._proc = FlowerProcess(
                    self._argv(free_port()),
                    env=flower_env(self.dir / "flwr-home"),
                    log_path=log_path,
                )
                await asyncio.to_thread(self._proc.start)
                self.starts += 1
                self.state = "running"
                logger.info(
                    "%s: flower-supernode (pid %s) dialling %s",
                    self.device_id,
                    self._proc.pid,
                    self.settings.fl_superlink,
                )
                started = asyncio.get_running_loop().time()
                new = b""
                while self._proc is not None and self._proc.running:
                    await asyncio.sleep(self.poll)
                    new += _read_from(log_path, log_from + len(new))
                    if any(p in new for p in GAVE_UP):  # it may linger on: end it now
                        logger.info("%s: flower-supernode gave up; stopping it", self.device_id)
                        await asyncio.to_thread(self._proc.stop)
                        break
                proc, self._proc = self._proc, None
                rc = proc.returncode if proc is not None else None
                new += _read_from(log_path, log_from + len(new))
                text = new.decode(errors="replace")
                if REFUSED.decode() in text:
                    self.last_exit = (
                        "the SuperLink refused to activate this node (key not registered, or "
                        "its previous session has not expired yet)"
                    )
                elif "Giving up reconnection" in text:
                    self.last_exit = "gave up reconnecting to the SuperLink (link lost)"
                else:
                    self.last_exit = f"exit {rc}: {(text.strip().splitlines() or [''])[-1]}"
                if asyncio.get_running_loop().time() - started > 60:
                    attempt = 0  # it ran a good while: this is a fresh failure
                attempt += 1
                delay = Backoff(self.backoff_base, self.backoff_cap).delay(attempt)
                self.state = "waiting"
                logger.warning(
                    "%s: flower-supernode stopped (%s); retrying in %.1fs (attempt %d)",
                    self.device_id,
                    self.last_exit,
                    delay,
                    attempt,
                )
                await asyncio.sleep(delay)
        finally:
            self.state = "stopped"
            last, self._proc = self._proc, None
            if last is not None:
                await asyncio.shield(asyncio.to_thread(last.stop))

    def kill(self) -> None:
        """Kill the SuperNode and its ClientApp at once (a crash or lost device; tests)."""
        if self._proc is not None:
            self._proc.kill()
