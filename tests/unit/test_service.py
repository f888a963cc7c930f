"""The systemd unit `fleet-agent service install` writes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgefleet.agent.service import ServiceSpec, install, render_unit
from edgefleet.protos.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_unit_is_the_default_rendering() -> None:
    shipped = ROOT / "deploy" / "systemd" / "edgefleet-agent.service"
    assert shipped.read_text() == render_unit(ServiceSpec())


def test_install_writes_the_unit_readable_by_all(tmp_path: Path) -> None:
    spec = ServiceSpec(executable=Path("/usr/bin/true"), state_dir=Path("/var/lib/ef"))
    path = install(spec, unit_dir=tmp_path)
    assert path == tmp_path / "edgefleet-agent.service"
    assert path.stat().st_mode & 0o777 == 0o644
    text = path.read_text()
    assert "ExecStart=/usr/bin/true run --config /etc/edgefleet/agent.json" in text
    assert "ReadWritePaths=/var/lib/ef" in text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("executable", Path("bin/fleet-agent"), "service executable 'bin/fleet-agent'"),
        ("state_dir", Path("/var/lib/my state"), "service state dir '/var/lib/my state'"),
        ("user", "root;rm", "service user 'root;rm'"),
    ],
)
def test_bad_spec_is_named(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ServiceSpec(**{field: value})


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_tells_a_broken_unit_from_ours(tmp_path: Path) -> None:
    good = install(ServiceSpec(executable=Path("/usr/bin/true")), unit_dir=tmp_path / "good")
    assert (
        subprocess.run(["systemd-analyze", "verify", str(good)], capture_output=True).returncode
        == 0
    )
    broken = tmp_path / "bad" / "edgefleet-agent.service"
    broken.parent.mkdir()
    broken.write_text(good.read_text().replace("ExecStart=/usr/bin/true", "ExecStart=fleet-agent"))
    assert (
        subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True).returncode
        != 0
    )
