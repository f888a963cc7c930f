"""A wheelhouse: the agent's wheels for another platform, for a device with no registry.

A thin wrapper over ``pip download --only-binary=:all: --platform … --python-version …``
of the agent distribution's requirements (or of the agent wheel itself, which pip
resolves the same way and copies beside them). On the device:
``pip install --no-index --find-links DIR edgefleet-agent``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgefleet.protos.errors import InvalidArgument, NotFound

AGENT_DISTRIBUTION = "edgefleet-agent"
#: the agent-only pyproject in a source checkout (used when the distribution is not installed)
_SOURCE_PYPROJECT = Path(__file__).resolve().parents[1] / "packaging" / "agent" / "pyproject.toml"
_PLATFORM = re.compile(r"[a-z0-9_]+")  # manylinux2014_aarch64, linux_armv7l, …
_MANYLINUX = re.compile(r"manylinux(?:2014|_2_(\d+))_([a-z0-9_]+)")
_MANYLINUX2014_GLIBC = 17
_PYTHON = re.compile(r"3\.\d{1,2}")


@dataclass(frozen=True)
class WheelhouseSpec:
    platform: str
    python: str
    out: Path
    agent_wheel: Path | None = None
    extras: tuple[str, ...] = ()
    constraints: Path | None = None
    #: a registry mirror (e.g. a piwheels-style index for armv7l); default: pip's own
    index_url: str = ""
    pip: tuple[str, ...] = (sys.executable, "-m", "pip")

    def __post_init__(self) -> None:
        if not _PLATFORM.fullmatch(self.platform):
            raise InvalidArgument(
                f"platform {self.platform!r} is not a wheel platform tag; e.g. "
                "manylinux2014_aarch64, manylinux2014_x86_64, linux_armv7l"
            )
        if not _PYTHON.fullmatch(self.python):
            raise InvalidArgument(f"python {self.python!r} is not MAJOR.MINOR; e.g. 3.11")
        if self.agent_wheel is not None and self.agent_wheel.suffix != ".whl":
            raise InvalidArgument(f"agent wheel {self.agent_wheel} is not a .whl file")


def agent_requirements(extras: Sequence[str] = ()) -> list[str]:
    """The agent distribution's requirements (installed metadata, else the source
    checkout's packaging/agent/pyproject.toml), with the given extras' ones."""
    try:
        reqs = metadata.requires(AGENT_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        reqs = _source_requirements()
    wanted = set(extras)
    out: list[str] = []
    for r in reqs:
        spec, _, marker = r.partition(";")
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if m is None:
            out.append(r.strip())
        elif m.group(1) in wanted:
            rest = re.sub(r"(and\s+)?extra\s*==\s*['\"][^'\"]+['\"](\s+and)?", "", marker).strip()
            out.append(f"{spec.strip()}; {rest}" if rest else spec.strip())
    return out


def _source_requirements() -> list[str]:
    import tomllib

    try:
        project = tomllib.loads(_SOURCE_PYPROJECT.read_text())["project"]
    except FileNotFoundError:
        raise NotFound(
            f"{AGENT_DISTRIBUTION} is not installed and {_SOURCE_PYPROJECT} is missing: "
            "pass --agent-wheel PATH"
        ) from None
    reqs = list(project["dependencies"])
    for extra, deps in project.get("optional-dependencies", {}).items():
        reqs += [f"{d.split(';')[0].strip()}; extra == '{extra}'" for d in deps]
    return reqs


def platform_tags(platform: str) -> list[str]:
    """The wheel platform tags a device with `platform` installs, newest first.

    A manylinux tag names the device's glibc (``manylinux_2_36_aarch64``: Debian 12):
    every older manylinux tag of the same architecture fits it too, as pip itself
    reckons for the machine it runs on (``manylinux2014`` is glibc 2.17). Other tags
    (``linux_armv7l``) stand alone.
    """
    m = _MANYLINUX.fullmatch(platform)
    if m is None:
        return [platform]
    glibc = int(m.group(1)) if m.group(1) else _MANYLINUX2014_GLIBC
    arch = m.group(2)
    tags = [f"manylinux_2_{v}_{arch}" for v in range(glibc, _MANYLINUX2014_GLIBC - 1, -1)]
    return [*tags, f"manylinux2014_{arch}"]


def pip_command(spec: WheelhouseSpec) -> list[str]:
    """The `pip download` command line that fills `spec.out`."""
    cmd = [
        *spec.pip,
        "download",
        "--only-binary=:all:",
        *(a for tag in platform_tags(spec.platform) for a in ("--platform", tag)),
        "--python-version",
        spec.python,
        "--implementation",
        "cp",
        "--dest",
        str(spec.out),
    ]
    if spec.constraints is not None:
        cmd += ["--constraint", str(spec.constraints)]
    if spec.index_url:
        cmd += ["--index-url", spec.index_url]
    if spec.agent_wheel is not None:
        extras = f"[{','.join(spec.extras)}]" if spec.extras else ""
        cmd.append(f"{AGENT_DISTRIBUTION}{extras} @ {spec.agent_wheel.absolute().as_uri()}")
    else:
        cmd += agent_requirements(spec.extras)
    return cmd
