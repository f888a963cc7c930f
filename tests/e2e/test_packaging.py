"""The two distributions built from this tree, and the agent installed alone.

`edgefleet-agent` (packaging/agent) is what a device installs: the agent, the wire
contract and the model runtimes under the `edgefleet` namespace, and nothing of the
coordinator. `edgefleet` (the root pyproject) adds the coordinator, the CLI and the
simulator on top of it. The install test builds the agent wheel and installs it into a
fresh virtual environment from the package registry, as a device installer would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT_PROJECT = ROOT / "packaging" / "agent"


def _version(pyproject: Path) -> str:
    return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def _source_copy(dest: Path) -> Path:
    """The tree's files (what git tracks or would add), links kept: a build there cannot
    pick up a stale build/ folder of the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(src.readlink())
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src / "packaging" / "agent"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    found = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    assert set(found) == {"edgefleet", "edgefleet_agent"}, found
    return found


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def _meta(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        entry = next(n for n in z.namelist() if n.endswith(f".dist-info/{name}"))
        return z.read(entry).decode()


def _requires(wheel: Path) -> list[str]:
    return Parser().parsestr(_meta(wheel, "METADATA")).get_all("Requires-Dist") or []


def test_versions_agree() -> None:
    assert _version(AGENT_PROJECT / "pyproject.toml") == _version(ROOT / "pyproject.toml")


def test_agent_wheel_holds_only_the_device_parts(wheels: dict[str, Path]) -> None:
    names = _names(wheels["edgefleet_agent"])
    tops = {n.split("/")[0] for n in names}
    assert tops == {
        "edgefleet",
        "edgefleet_agent-" + _version(ROOT / "pyproject.toml") + ".dist-info",
    }
    parts = {n.split("/")[1] for n in names if n.startswith("edgefleet/") and n.count("/") > 1}
    assert parts == {"agent", "protos", "models"}
    assert "edgefleet/__init__.py" in names
    assert "edgefleet/models/fl/app/pyproject.toml" in names  # the Flower App `flwr run` needs
    scripts = _meta(wheels["edgefleet_agent"], "entry_points.txt")
    assert "fleet-agent = edgefleet.agent.cli:main" in scripts
    assert "fleet =" not in scripts
    base = [r for r in _requires(wheels["edgefleet_agent"]) if "extra ==" not in r]
    heavy = {"torch", "boto3", "sqlmodel", "sqlalchemy", "psycopg", "onnx", "flwr"}
    assert not [r for r in base if r.split(">")[0].split("=")[0].split(";")[0].strip() in heavy]


def test_full_wheel_adds_the_coordinator_on_the_agent(wheels: dict[str, Path]) -> None:
    names = _names(wheels["edgefleet"])
    parts = {n.split("/")[1] for n in names if n.startswith("edgefleet/")}
    assert parts == {"cloud", "simulator"}
    assert "edgefleet/__init__.py" not in names  # owned by edgefleet-agent
    version = _version(ROOT / "pyproject.toml")
    assert f"edgefleet-agent[serve]=={version}" in _requires(wheels["edgefleet"])
    assert "fleet = edgefleet.cloud.cli.main:main" in _meta(wheels["edgefleet"], "entry_points.txt")


def test_agent_installs_alone_and_writes_a_unit_systemd_accepts(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    # the device's own Python: nothing of this checkout's import path leaks in
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env_dir = tmp_path / "device-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "constraints.txt"),
            str(wheels["edgefleet_agent"]),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    assert (bin_dir / "fleet-agent").exists()
    assert not (bin_dir / "fleet").exists()
    probe = (
        "import importlib.util as u; import edgefleet.agent.cli, edgefleet.agent.agent;"
        "print(sorted(m for m in ('edgefleet.cloud','edgefleet.simulator','sqlalchemy','torch',"
        "'boto3','onnx') if u.find_spec(m) is not None))"
    )
    found = subprocess.run(
        [str(py), "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    )
    assert found.stdout.strip() == "[]"
    info = subprocess.run(
        [str(bin_dir / "fleet-agent"), "info", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert info.returncode == 0, info.stderr
    assert "onnxruntime" in info.stdout

    unit_dir = tmp_path / "units"
    done = subprocess.run(
        [
            str(bin_dir / "fleet-agent"),
            "service",
            "install",
            "--unit-dir",
            str(unit_dir),
            "--config",
            str(tmp_path / "agent.json"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    unit = unit_dir / "edgefleet-agent.service"
    assert f"ExecStart={bin_dir / 'fleet-agent'} run --config {tmp_path / 'agent.json'}" in (
        unit.read_text()
    )
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
