"""`fleet-agent wheelhouse`: the pip command it builds, and that pip accepts it.

No registry is reached: the real pip run points at an empty local index.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.wheelhouse import (
    WheelhouseSpec,
    agent_requirements,
    pip_command,
    platform_tags,
)
from edgefleet.protos.errors import InvalidArgument


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_a_manylinux_tag_brings_every_older_glibc_of_its_architecture() -> None:
    # numpy 2.4 for aarch64 is manylinux_2_28 only: a Debian 12 device (glibc 2.36) takes it
    tags = platform_tags("manylinux_2_36_aarch64")
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_28_aarch64" in tags and "manylinux_2_17_aarch64" in tags
    assert not any("x86_64" in t for t in tags) and len(tags) == 36 - 17 + 2
    assert platform_tags("manylinux2014_x86_64") == [
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
    ]
    assert platform_tags("linux_armv7l") == ["linux_armv7l"]


def test_command_downloads_binary_wheels_for_the_platform(tmp_path: Path) -> None:
    spec = WheelhouseSpec(platform="manylinux2014_aarch64", python="3.11", out=tmp_path / "wh")
    cmd = pip_command(spec)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--only-binary=:all:" in cmd
    platforms = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"]
    assert platforms == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert _opt(cmd, "--python-version") == "3.11"
    assert _opt(cmd, "--dest") == str(tmp_path / "wh")
    names = {
        r.split(";")[0].split("<")[0].split(">")[0].strip() for r in cmd[cmd.index("cp") + 3 :]
    }
    assert {"paho-mqtt", "onnxruntime", "cryptography"} <= names
    assert not names & {"sqlalchemy", "boto3", "torch"}  # the agent-only requirements
    assert "--index-url" not in cmd and "flwr" not in names  # extras only when asked


def test_extras_constraints_mirror_and_agent_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "edgefleet_agent-0.1.0-py3-none-any.whl"
    spec = WheelhouseSpec(
        platform="linux_armv7l",
        python="3.11",
        out=tmp_path,
        agent_wheel=wheel,
        extras=("fl",),
        constraints=tmp_path / "constraints.txt",
        index_url="https://www.piwheels.org/simple",
    )
    cmd = pip_command(spec)
    assert _opt(cmd, "--constraint") == str(tmp_path / "constraints.txt")
    assert _opt(cmd, "--index-url") == "https://www.piwheels.org/simple"
    # the wheel itself: pip resolves its dependencies and copies it into the wheelhouse
    assert cmd[-1] == f"edgefleet-agent[fl] @ {wheel.as_uri()}"
    fl = [r for r in agent_requirements(["fl"]) if r.startswith("flwr")]
    assert fl and "extra" not in fl[0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("platform", "manylinux 2014", "not a wheel platform tag"),
        ("python", "311", "not MAJOR.MINOR"),
        ("agent_wheel", Path("agent.tar.gz"), "not a .whl file"),
    ],
)
def test_bad_arguments_are_named(field: str, value: object, message: str) -> None:
    args: dict[str, object] = {"platform": "manylinux2014_x86_64", "python": "3.11"}
    args[field] = value
    with pytest.raises(InvalidArgument, match=message):
        WheelhouseSpec(out=Path("wh"), **args)  # type: ignore[arg-type]


def test_pip_accepts_the_command(tmp_path: Path) -> None:
    """The flags go together (pip refuses --platform without --only-binary, for one): a
    real pip run against an empty local index gets as far as looking for a wheel."""
    index = tmp_path / "index"
    index.mkdir()
    spec = WheelhouseSpec(
        platform="manylinux2014_aarch64",
        python="3.11",
        out=tmp_path / "wh",
        index_url=index.as_uri(),
    )
    r = subprocess.run(
        [*pip_command(spec), "--disable-pip-version-check", "--no-cache-dir"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "No matching distribution found for " in r.stderr, r.stderr


def test_cli_prints_the_command(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable, "-m", "edgefleet.agent.cli", "wheelhouse",
            "--platform", "manylinux2014_aarch64", "--out", str(tmp_path), "--print",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "pip download --only-binary=:all: --platform manylinux_2_17_aarch64" in r.stdout
    missing = subprocess.run(
        [
            sys.executable, "-m", "edgefleet.agent.cli", "wheelhouse",
            "--platform", "manylinux2014_aarch64", "--agent-wheel", str(tmp_path / "x.whl"),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1 and "error (not-found): agent wheel" in missing.stderr


def test_grpcio_is_the_serve_extra_of_the_agent_distribution() -> None:
    from edgefleet.agent.wheelhouse import _source_requirements

    grpc = [r for r in _source_requirements() if r.startswith("grpcio")]
    assert grpc == ["grpcio>=1.66; extra == 'serve'"]  # an agent with no `listen` goes without
