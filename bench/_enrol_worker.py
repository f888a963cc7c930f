"""One enrolment measurement in its own process, against the edgefleet on PYTHONPATH (this
tree, or another checkout such as main for a same-run baseline): only APIs both have are
used outside the batch modes.

    python bench/_enrol_worker.py MODE N SAMPLE ROOT   ->  one JSON line on stdout

single: N - SAMPLE devices put in place at once (credentials with `IdentityStore.enroll_many`,
rows with one insert), then SAMPLE more enrolled one at a time, in FLEET_HOME (`LocalClient
.enroll_device`) and then through a running `fleet serve` (`EnrollDevice` over gRPC): the
rate of single enrolments once N devices exist.
batch: all N in one `enroll_devices` call, in FLEET_HOME and (a second home) through
`fleet serve` (`EnrollDevices`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# run as a script: its folder (bench/) is sys.path[0]
from _serve import start_serve


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _home(root: Path, name: str) -> Path:
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings

    home = root / name
    c = LocalClient(load_settings(home=home))
    c.init()
    c.close()
    return home


def _prefill(home: Path, n: int) -> None:
    """n devices with credentials and rows, at once (APIs main has too)."""
    import sqlalchemy as sa

    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceStore
    from edgefleet.cloud.devices.store import DeviceRow
    from edgefleet.cloud.identity import IdentityStore

    if n <= 0:
        return
    settings = load_settings(home=home)
    ids = [f"pre-{i:06d}" for i in range(n)]
    IdentityStore(settings.identity_dir).enroll_many(ids)
    store = DeviceStore(settings.registry_url)
    template = DeviceRow(device_id="-").model_dump(exclude={"id"})
    table: sa.Table = DeviceRow.__table__  # type: ignore[attr-defined]
    with store.database.session() as s:
        s.execute(sa.insert(table), [{**template, "device_id": d} for d in ids])
        s.commit()
    store.close()


def single(n: int, sample: int, root: Path) -> dict[str, Any]:
    from edgefleet.cloud.client import LocalClient, read_token
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.remote import GrpcClient

    home = _home(root, "single")
    _prefill(home, n - sample)
    out: dict[str, Any] = {}
    c = LocalClient(load_settings(home=home))
    t0 = time.perf_counter()
    for i in range(sample):
        c.enroll_device(f"loc-{i:05d}", group="", tags={}, broker_url="-")
    out["local_s"] = time.perf_counter() - t0
    c.close()
    serve, info = start_serve(home)
    address = info.grpc
    try:
        g = GrpcClient(address, read_token(home / "keys" / "token"))
        t0 = time.perf_counter()
        for i in range(sample):
            g.enroll_device(f"rpc-{i:05d}", group="", tags={})
        out["grpc_s"] = time.perf_counter() - t0
        g.close()
    finally:
        _stop(serve)
    return out


def batch(n: int, root: Path) -> dict[str, Any]:
    from edgefleet.cloud.client import LocalClient, read_token
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceSpec
    from edgefleet.cloud.remote import GrpcClient

    specs = [DeviceSpec(f"b-{i:06d}") for i in range(n)]
    out: dict[str, Any] = {}
    c = LocalClient(load_settings(home=_home(root, "batch-local")))
    t0 = time.perf_counter()
    got = c.enroll_devices(specs, broker_url="-")
    out["local_s"] = time.perf_counter() - t0
    assert len(got.bundles) == n
    c.close()
    home = _home(root, "batch-grpc")
    serve, info = start_serve(home)
    address = info.grpc
    try:
        g = GrpcClient(address, read_token(home / "keys" / "token"))
        t0 = time.perf_counter()
        got = g.enroll_devices(specs)
        out["grpc_s"] = time.perf_counter() - t0
        assert len(got.bundles) == n
        g.close()
    finally:
        _stop(serve)
    return out


def main() -> None:
    mode, n, sample, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    root.mkdir(parents=True, exist_ok=True)
    out = single(n, sample, root) if mode == "single" else batch(n, root)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
