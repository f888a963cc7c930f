"""The agent updates itself: an agent release installed beside the running agent,
checked, switched to with an overlap, and undone when the new agent is not healthy.

An agent release (`cloud/agent_releases`) is an uncompressed tar of wheels for one
platform, signed and rolled out like a model; the updater downloads and verifies it
through the same chunked path. Here:

- **install** (`Releases.install`): a new venv ``STATE/agent-releases/<version>/``
  (``python -m venv --without-pip``) whose site-packages come first and whose
  ``_edgefleet_base.pth`` lists the running agent's library folders after them, so
  the release's wheels (the agent, and any dependency the release carries) win and
  every other dependency is the one the running agent uses: ``pip install --no-index
  --no-deps`` of the release's wheels, nothing fetched.
- **check** (`Releases.check`): ``<venv>/bin/python -m edgefleet.agent.cli selfcheck``
  runs the *new* code against this device's state: it must report the release's
  version from the new venv, verify and load the active model and pass its self-test.
  This is the shadow step of a rollout: the canary's failure-rate gate judges it.
- **switch** (`Agent.switch_agent`): the running agent writes a trial record,
  disconnects from the broker and releases the state directory, and starts the new
  agent (``run --config`` from the new venv, ``EDGEFLEET_AGENT_TRIAL`` set). The old
  agent keeps answering Predict; the new one binds the same port beside it
  (SO_REUSEPORT), loads and self-tests the active model, connects, and marks the
  trial healthy. Only then does the old one stop its server (in-flight calls finish)
  and exit, and ``current`` points at the new venv. Not healthy within the deadline
  (exited, crashed, could not connect or load): the old agent kills it, takes the
  state directory and the broker session back and reports ``AGENT_UNHEALTHY``.
- **restart** (`exec_current`): ``fleet-agent run`` started by the service (the base
  install's ``fleet-agent``) execs the ``current`` release's interpreter, so a
  reboot keeps the switched version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import site
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.protos.errors import DataLoss, InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

RELEASES_DIR = "agent-releases"
CURRENT = "current"
TRIAL_FILE = "trial.json"
FAILED_FILE = "failed.json"
PREVIOUS_FILE = "previous.json"
MARKER = ".release.json"
TRIAL_ENV = "EDGEFLEET_AGENT_TRIAL"
CHECK_TIMEOUT_S = 120.0
#: how another agent version is started: isolated (-I), so neither the working folder
#: (`python -m` would put it first on sys.path) nor PYTHON* variables pick its code
AGENT_MAIN = ("-I", "-m", "edgefleet.agent.cli")
_LOG_TAIL = 600


@dataclass(frozen=True)
class Release:
    """An installed agent release: a venv under the state directory."""

    version: str
    sha256: str
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"


@dataclass(frozen=True)
class Trial:
    """The record the old and the new agent share while switching."""

    generation: int
    version: str
    root: str  # the new agent's venv; "" for the base install (a rollback to it)
    from_version: str
    from_python: str
    from_root: str
    deadline_ms: int
    healthy_pid: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def read(cls, path: Path) -> Trial | None:
        try:
            d = json.loads(path.read_text())
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (OSError, ValueError, TypeError, KeyError):
            return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def running_root() -> str:
    """The venv this agent runs from when it is an installed release, else ""."""
    prefix = Path(sys.prefix)
    return str(prefix) if (prefix / MARKER).exists() else ""


def base_paths() -> list[str]:
    """The running agent's library folders (not the standard library): a new release's
    venv reads them after its own site-packages."""
    std = {
        sysconfig.get_path("stdlib"),
        sysconfig.get_path("platstdlib"),
    }
    out: list[str] = []
    for p in sys.path:
        if not p or not os.path.isdir(p) or p in std or p in out:
            continue
        if p.endswith("lib-dynload") or Path(p).resolve() == Path.cwd().resolve():
            continue
        out.append(p)
    for p in site.getsitepackages():
        if p not in out and os.path.isdir(p):
            out.append(p)
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for another agent version: no PYTHONPATH (it would put this
    agent's code ahead of the new venv's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", TRIAL_ENV)}
    env.update(extra)
    return env


class Releases:
    """Agent releases installed under ``STATE/agent-releases``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / RELEASES_DIR
        self.downloads = self.root / "downloads"

    @property
    def trial_path(self) -> Path:
        return self.root / TRIAL_FILE

    def installed(self, version: str, sha256: str) -> Release | None:
        root = self.root / version
        try:
            marker = json.loads((root / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if marker.get("sha256") != sha256 or not (root / "bin" / "python").exists():
            return None
        return Release(version, sha256, root)

    def install(self, archive: Path, *, version: str, sha256: str) -> Release:
        """A venv for the release in `archive` (already verified); replaces a partial one."""
        if not version or "/" in version or version.startswith("."):
            raise InvalidArgument(f"agent release version {version!r} is not a folder name")
        final = self.root / version
        tmp = self.root / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        wheels_dir = tmp / "wheels"
        wheels_dir.mkdir(parents=True)
        wheels: list[Path] = []
        try:
            with tarfile.open(archive, mode="r:") as tar:
                for member in tar.getmembers():
                    name = member.name
                    if not member.isfile() or "/" in name or not name.endswith(".whl"):
                        raise DataLoss(
                            f"agent release {version}: entry {name!r} is not a wheel file "
                            "(a release holds *.whl files only)"
                        )
                    src = tar.extractfile(member)
                    assert src is not None
                    (wheels_dir / name).write_bytes(src.read())
                    wheels.append(wheels_dir / name)
        except tarfile.TarError as e:
            raise DataLoss(f"agent release {version}: not a tar of wheels: {e}") from e
        if not any(w.name.startswith(f"edgefleet_agent-{version}-") for w in wheels):
            raise InvalidArgument(
                f"agent release {version} holds no edgefleet_agent-{version} wheel; "
                f"it holds {', '.join(w.name for w in wheels) or 'nothing'}"
            )
        self._run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], f"venv for {version}")
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(tmp), "platbase": str(tmp)}))
        purelib.mkdir(parents=True, exist_ok=True)
        (purelib / "_edgefleet_base.pth").write_text("\n".join(base_paths()) + "\n")
        pip = [sys.executable, "-m", "pip", "--python", str(tmp / "bin" / "python"), "install"]
        pip += ["-q", "--no-index", "--no-deps", "--force-reinstall", "--no-warn-script-location"]
        self._run([*pip, *map(str, wheels)], f"pip install of agent release {version}")
        shutil.rmtree(wheels_dir)
        (tmp / MARKER).write_text(
            json.dumps({"version": version, "sha256": sha256, "installed_at": time.time()})
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        logger.info("agent release %s installed in %s", version, final)
        return Release(version, sha256, final)

    @staticmethod
    def _run(cmd: list[str], what: str) -> None:
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, env=clean_env(), timeout=600
        )
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-_LOG_TAIL:]
            raise Unavailable(f"{what} failed ({done.returncode}): {tail}")

    def check(self, release: Release, config: Path) -> dict[str, Any]:
        """Run the release's own ``selfcheck`` against this device's state; its report, or
        `Unavailable` with the output's tail."""
        cmd = [str(release.python), *AGENT_MAIN, "selfcheck"]
        cmd += ["--config", str(config), "--expect-version", release.version]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                check=False,
                env=clean_env(),
                timeout=CHECK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"agent {release.version}: selfcheck did not finish in {CHECK_TIMEOUT_S:.0f}s"
            ) from None
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip())[-_LOG_TAIL:]
            raise Unavailable(
                f"agent {release.version}: selfcheck exited {done.returncode}: {tail}"
            )
        try:
            report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise Unavailable(
                f"agent {release.version}: selfcheck printed no report: {done.stdout[-200:]!r}"
            ) from None
        return report

    # -- records ---------------------------------------------------------------------

    def failed(self, sha256: str) -> str | None:
        """Why the release with this digest failed here before (it is not retried)."""
        return self._records(FAILED_FILE).get(sha256)

    def mark_failed(self, sha256: str, detail: str) -> None:
        d = self._records(FAILED_FILE)
        d[sha256] = detail[:_LOG_TAIL]
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / FAILED_FILE, json.dumps(d))

    def forget_failed(self, sha256: str) -> None:
        d = self._records(FAILED_FILE)
        if d.pop(sha256, None) is not None:
            _atomic_write(self.root / FAILED_FILE, json.dumps(d))

    def previous(self) -> dict[str, str] | None:
        """The agent that ran before the current one: {version, python, root}."""
        d = self._records(PREVIOUS_FILE)
        return d if d.get("python") else None

    def _records(self, name: str) -> dict[str, str]:
        try:
            d = json.loads((self.root / name).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}

    def set_current(self, root: str, *, previous: dict[str, str]) -> None:
        """Point ``current`` at `root` (a release venv), or remove it ("": the base install),
        and remember what ran before."""
        self.root.mkdir(parents=True, exist_ok=True)
        link = self.root / CURRENT
        if root:
            tmp = self.root / f".{CURRENT}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(root)
            tmp.replace(link)
        else:
            link.unlink(missing_ok=True)
        _atomic_write(self.root / PREVIOUS_FILE, json.dumps(previous))

    def current(self) -> Path | None:
        link = self.root / CURRENT
        try:
            target = link.resolve(strict=True)
        except OSError:
            return None
        return (
            target if (target / MARKER).exists() and (target / "bin" / "python").exists() else None
        )

    def gc(self, keep: set[str]) -> list[str]:
        """Remove installed releases whose venv is not in `keep` (the running one and the
        one before it); the versions removed."""
        removed: list[str] = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if d.is_symlink() or d.name.startswith(".") or str(d) in keep:
                continue
            if (d / MARKER).exists():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed

    def drop(self, version: str) -> bool:
        """Remove a staged (not running, not current) release; True if there was one."""
        root = self.root / version
        if not root.exists() or str(root) == running_root() or root == self.current():
            return False
        shutil.rmtree(root, ignore_errors=True)
        return True


def exec_current(state_dir: Path, argv: list[str]) -> None:
    """Become the ``current`` release's agent (os.execv) unless this is it already."""
    if os.environ.get(TRIAL_ENV):
        return
    target = Releases(state_dir).current()
    if target is None or Path(sys.prefix).resolve() == target:
        return
    python = target / "bin" / "python"
    logger.info("current agent release is %s: running it", target.name)
    os.execve(str(python), [str(python), *AGENT_MAIN, *argv], clean_env())


def log_tail(path: Path, limit: int = _LOG_TAIL) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


def sd_notify(message: str) -> bool:
    """Tell systemd (``Type=notify``) something, e.g. ``MAINPID=…``; False when not under it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        logger.warning("sd_notify %s: %s", message, e)
        return False
    return True


@dataclass(frozen=True)
class SelfUpdate:
    """What the updater needs to apply an agent release; the agent provides `switch`,
    which starts the switch in the background (it ends this process when it works)."""

    releases: Releases
    config_path: Path
    machine: str
    running_version: str
    switch: Callable[[SwitchTarget], None]


@dataclass(frozen=True)
class SwitchTarget:
    generation: int
    sha256: str  # the release's digest ("" when switching back to a previous agent)
    version: str
    python: Path
    root: str  # the release venv; "" for the base install


__all__ = [
    "AGENT_MAIN",
    "CURRENT",
    "RELEASES_DIR",
    "TRIAL_ENV",
    "Release",
    "Releases",
    "SelfUpdate",
    "SwitchTarget",
    "Trial",
    "exec_current",
    "running_root",
    "sd_notify",
]
