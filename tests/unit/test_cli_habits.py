"""What a newcomer meets first: --version, completion, help texts, filters, JSON times, init."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet import __version__
from tests.conftest import Cli


def test_version(cli: Cli) -> None:
    r = cli("--version")
    assert r.code == 0
    assert r.out.strip() == f"fleet (edgefleet) {__version__}"


def test_shell_completion_is_offered(cli: Cli) -> None:
    r = cli("--help")
    assert r.code == 0
    assert "--install-completion" in r.out
    assert "--show-completion" in r.out


def _squash(text: str) -> str:
    """Help text without box drawing and line breaks, for substring checks."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def test_help_keeps_bracketed_texts_defaults_and_env_vars(cli: Cli) -> None:
    r = cli("serve", "--help")
    assert r.code == 0
    text = _squash(r.out)
    assert "needs edgefleet[fl]" in text  # Rich markup used to eat "[fl]"
    assert "[env var: FLEET_MQTT_PORT]" in text
    assert "(default 1883)" in text
    assert " ." not in text.replace(" ...", "")  # what a swallowed "[…]" left behind
    top = _squash(cli("--help").out)
    assert "State folder (default ~/.edgefleet)." in top
    assert "[env var: FLEET_HOME]" in top


def test_piped_help_is_not_wrapped_at_80_columns(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet.cloud.cli.main", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd()), "HOME": str(tmp_path)},
    ).stdout
    assert max(len(line) for line in out.splitlines()) > 80


def test_device_state_filter_names_the_accepted_states(cli: Cli, fleet_home: Path) -> None:
    assert cli("init").code == 0
    r = cli("devices", "ls", "--state", "bogus")
    assert r.code == 1
    assert "device state 'bogus' unknown" in r.err
    for accepted in ("enrolled", "active", "failed", "shadowing", "rolled_back"):
        assert accepted in r.err
    assert cli("devices", "ls", "--state", "active").code == 0


def test_init_takes_db_url_and_artifacts_as_the_docs_show(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / "h"
    db, art = tmp_path / "reg.db", tmp_path / "art"
    r = cli("--home", str(home), "init", "--db-url", f"sqlite:///{db}", "--artifacts", art.as_uri())
    assert r.code == 0, r.err
    config = (home / "config.toml").read_text()
    assert f"sqlite:///{db}" in config
    assert art.as_uri() in config
    assert db.exists()


def test_failed_init_leaves_no_fleet_home(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / "never"
    r = cli("--home", str(home), "init", "--artifacts", "gs://bucket/models")
    assert r.code == 1
    assert "gs://bucket/models" in r.err and "supported: file, s3" in r.err
    assert not home.exists()


def test_failed_init_keeps_an_existing_fleet_home(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / "mine"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    assert cli("--home", str(home), "init", "--artifacts", "gs://b/m").code == 1
    assert (home / "notes.txt").read_text() == "keep me"


def test_json_times_are_iso_8601_utc() -> None:
    from datetime import datetime, timedelta, timezone

    from edgefleet.cloud.cli.output import alert_json, iso_utc
    from edgefleet.cloud.drift.alerts import Alert

    assert iso_utc(0) is None and iso_utc(None) is None
    assert iso_utc(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    assert iso_utc(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"
    plus_two = timezone(timedelta(hours=2))
    assert iso_utc(datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus_two)) == "2026-01-02T03:04:05.000Z"
    a = Alert(
        id=1,
        scope="group",
        subject="cpu",
        model="digits",
        version=1,
        metric="inputs",
        state="open",
        psi=0.5,
        max_psi=0.6,
        threshold=0.2,
        rows=100,
        detail="",
        first_seen_ms=1_700_000_000_000,
        last_seen_ms=1_700_000_001_000,
        resolved_ms=None,
    )
    j = alert_json(a)
    assert j["first_seen"] == "2023-11-14T22:13:20.000Z"
    assert j["last_seen"] == "2023-11-14T22:13:21.000Z"
    assert j["resolved"] is None
    assert not any(k.endswith("_ms") for k in j)
    json.dumps(j)


def test_agent_cli_version_and_verbose_help() -> None:
    from typer.testing import CliRunner

    from edgefleet.agent.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    assert "More log output" in _squash(r.output)
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_litert_banner_is_held_back(capfd: pytest.CaptureFixture[str]) -> None:
    from edgefleet.models.runtime import quiet_native_banners

    with quiet_native_banners():
        import os

        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"a real error\n")
    captured = capfd.readouterr()
    assert "XNNPACK" not in captured.err
    assert "a real error" in captured.err


def test_license_file_matches_pyproject() -> None:
    root = Path(__file__).resolve().parents[2]
    assert "Apache License" in (root / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (root / "pyproject.toml").read_text()
