"""`fleet serve` for a bench: free loopback ports, no metrics listener, its log in
HOME/serve.log; returns once serve.json names it. Imported as `bench._serve` and, by
`_enrol_worker.py` (a script run against another checkout too), as `_serve` from its folder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def start_serve(home: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Any]:
    """(the process, its ServeInfo)."""
    from edgefleet.cloud.config import ServeInfo

    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home), "serve"),
            *("--mqtt-port", "0", "--grpc-listen", "127.0.0.1:0", "--metrics-listen", "off"),
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fleet serve exited; see {home / 'serve.log'}")
        info = ServeInfo.read(home / "serve.json")
        if info is not None and info.pid == proc.pid:
            return proc, info
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"fleet serve did not start within 120 s; see {home / 'serve.log'}")
