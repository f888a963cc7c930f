"""Shared fixtures: a FLEET_HOME per test, and the CLI run in-process."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from tests.support.identity import SecureBroker

# Property tests run on shared, loaded machines: slow input generation is not a failure,
# and no example has a deadline (the properties assert results, never timings).
settings.register_profile(
    "fleet", suppress_health_check=[HealthCheck.too_slow], deadline=None, print_blob=True
)
settings.load_profile("fleet")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


Cli = Callable[..., CliResult]


@pytest.fixture
def fleet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "fleet-home"
    monkeypatch.setenv("FLEET_HOME", str(home))
    for var in ("FLEET_DB_URL", "FLEET_ARTIFACT_URI", "FLEET_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `fleet ARGS…` in this process: exit code, stdout, stderr."""
    from edgefleet.cloud.cli.main import run

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()
        code = run(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """A real Mosquitto on free 127.0.0.1 ports, private to the test, with identities on
    (no anonymous access): `broker.credentials_for(device_id)`, `broker.coordinator()`."""
    from tests.support.identity import SecureBroker

    state = Path(tempfile.mkdtemp(prefix="fleet-mqtt-"))
    os.chmod(state, 0o777)
    with SecureBroker(state, persistence=True) as b:
        yield b
    shutil.rmtree(state, ignore_errors=True)
