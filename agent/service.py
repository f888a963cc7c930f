"""The agent as a systemd service: the unit file, written by `fleet-agent service install`.

The unit names the absolute path of this installation's `fleet-agent` (a venv under
/opt is not on sudo's or systemd's PATH) and runs it as an unprivileged system user with
the state folder as its only writable path. `deploy/systemd/edgefleet-agent.service` is
this rendering with the defaults (a test keeps the two equal).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protos.errors import InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

UNIT_NAME = "edgefleet-agent.service"
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_EXEC = Path("/opt/edgefleet/bin/fleet-agent")


@dataclass(frozen=True)
class ServiceSpec:
    """What the unit runs, as whom, and where it may write."""

    executable: Path = DEFAULT_EXEC
    config: Path = Path("/etc/edgefleet/agent.json")
    state_dir: Path = Path("/var/lib/edgefleet")
    user: str = "edgefleet"

    def __post_init__(self) -> None:
        for what, p in (
            ("executable", self.executable),
            ("config", self.config),
            ("state dir", self.state_dir),
        ):
            if not p.is_absolute() or any(c.isspace() for c in str(p)):
                raise InvalidArgument(
                    f"service {what} {str(p)!r}: needs an absolute path without spaces"
                )
        if not self.user.replace("-", "").replace("_", "").isalnum():
            raise InvalidArgument(
                f"service user {self.user!r}: use letters, digits, '-' or '_' (a system account)"
            )


def render_unit(spec: ServiceSpec) -> str:
    """The systemd unit text for `spec`."""
    return f"""\
# edgefleet device agent (written by `fleet-agent service install`)
[Unit]
Description=edgefleet device agent
After=network-online.target
Wants=network-online.target

[Service]
# notify: the agent says READY=1 once it serves; a new agent version it switched to
# takes over as the main process with MAINPID= (docs/agent.md, "Agent updates")
Type=notify
NotifyAccess=all
User={spec.user}
Group={spec.user}
ExecStart={spec.executable} run --config {spec.config}
Restart=always
RestartSec=5
# the agent drains and disconnects cleanly on SIGTERM
KillSignal=SIGTERM
TimeoutStopSec=20
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
ReadWritePaths={spec.state_dir}
ReadOnlyPaths={spec.config}

[Install]
WantedBy=multi-user.target
"""


def this_executable() -> Path:
    """The `fleet-agent` of the running installation (beside this interpreter)."""
    found = Path(sys.executable).parent / "fleet-agent"
    return found if found.exists() else Path(shutil.which("fleet-agent") or DEFAULT_EXEC)


def install(spec: ServiceSpec, *, unit_dir: Path = DEFAULT_UNIT_DIR, enable: bool = False) -> Path:
    """Write the unit (0644) into `unit_dir`; with `enable`, reload systemd and start it."""
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        path = unit_dir / UNIT_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(render_unit(spec))
        os.chmod(tmp, 0o644)
        tmp.replace(path)
    except PermissionError:
        raise Unavailable(
            f"cannot write {unit_dir / UNIT_NAME}: permission denied (run it with sudo, "
            f"giving the full path: sudo {this_executable()} service install)"
        ) from None
    logger.info("wrote %s", path)
    if enable:
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            raise Unavailable(
                f"wrote {path}, but systemctl is not on this device: start it by hand"
            )
        for args in (["daemon-reload"], ["enable", "--now", UNIT_NAME]):
            done = subprocess.run([systemctl, *args], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise Unavailable(
                    f"systemctl {' '.join(args)}: {done.stderr.strip() or done.returncode}"
                )
    return path
