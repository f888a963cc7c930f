"""`make demo` (python -m edgefleet.simulator.demo) tells the whole story and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.protos.errors import NotFound

REPO = Path(__file__).resolve().parents[2]

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)


# in `make test` (about a minute on a quiet machine): the README's first command must work
def test_demo_tells_the_story_and_exits_0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [sys.executable, "-m", "edgefleet.simulator.demo"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert "20 of 20 active" in err  # the plain deploy of digits:1
    assert "rollout " in err and ": done" in err  # digits:2 through canary and waves
    assert "rolled_back (canary: gate accuracy" in err  # digits:3 stopped at the canary
    assert "devices serve {'digits:2': 20}" in err
    assert "group  npu" in r.stdout and "group  cpu" not in r.stdout  # that group's alert
    assert "Try next:" in err
    assert "XNNPACK" not in err + r.stdout
    assert not (tmp_path / ".demo" / "home" / "serve.json").exists()
