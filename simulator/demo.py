"""`make demo`: the product's story in about a minute, on embedded defaults.

A fresh FLEET_HOME under .demo/ (SQLite, file:// store, new signing key). Train and
quantize the digits model (digits:1), train a better one (digits:2) and a broken one on
shuffled labels (digits:3); start a real coordinator (`fleet serve`, with its own Mosquitto
on loopback); enrol 20 simulated devices (real agent code, three hardware groups) through
it and send live traffic through each device's model from its own data; then, through the
same CLI an operator uses:

1. a plain deploy of digits:1 to every device;
2. digits:2 through a canary and two waves, each baked on live traffic and gated on
   on-device accuracy;
3. digits:3 stopped at the canary by that gate, the fleet left on digits:2;
4. the live inputs of one group drift; that group's drift alert opens, no other.

Lives in `simulator` because it drives both sides; `cloud` and `agent` still never
import each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEVICES = 20
PROFILE = "cpu,gpu,npu"  # groups cpu, gpu, npu
DRIFTED = "npu"
GATE = ("--canary", "10%", "--waves", "50%,100%", "--bake", "4s", "--min-accuracy", "0.8")

logger = logging.getLogger(__name__)


def say(text: str) -> None:
    bold = sys.stderr.isatty()
    sys.stderr.write(f"\n\033[1m{text}\033[0m\n" if bold else f"\n{text}\n")
    sys.stderr.flush()


def fleet(home: Path, *args: str, quiet: bool = False, shown: bool = True) -> tuple[int, str]:
    """`fleet --home HOME ARGS…` in this process, shown as the operator would type it
    (unless not `shown`); with `quiet` its stdout is kept (and returned), not printed."""
    from edgefleet.cloud.cli.main import run

    if shown:
        say("$ fleet " + " ".join(args))
    if not quiet:
        return run(["--home", str(home), *args]), ""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = run(["--home", str(home), *args])
    return code, buf.getvalue()


def build(home: Path, root: Path) -> None:
    import numpy as np

    from edgefleet.models.data import load_dataset

    ds = load_dataset("digits")
    shuffled = root / "digits-shuffled-labels.npz"
    np.savez(shuffled, X=ds.x, y=np.random.default_rng(0).permutation(ds.y))
    steps: list[tuple[Sequence[str], bool]] = [
        (("init",), True),
        (("train", "--model", "digits", "--arch", "mlp", "--epochs", "6"), True),
        (("quantize", "digits:1", "--variants", "int8,fp16"), False),
        (("train", "--model", "digits", "--arch", "mlp", "--epochs", "10", "--seed", "1"), True),
        (("train", "--model", "digits", "--data", str(shuffled), "--epochs", "2"), True),
    ]
    for args, quiet in steps:
        code, _out = fleet(home, *args, quiet=quiet)
        if code:
            raise SystemExit(f"demo: 'fleet {' '.join(args)}' failed with exit code {code}")
    sys.stderr.write(
        "digits:1 and digits:2 are good; digits:3 learnt shuffled labels (about 10% accurate)\n"
    )


def start_coordinator(home: Path) -> tuple[subprocess.Popen[bytes], Any]:
    from edgefleet.cloud.config import ServeInfo

    say("$ fleet serve   (coordinator + its own Mosquitto on loopback, free ports)")
    env = {**os.environ, "FLEET_DRIFT_INTERVAL": "2", "FLEET_DRIFT_WINDOW": "20"}
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home), "serve"),
            *("--mqtt-port", "0", "--grpc-listen", "127.0.0.1:0", "--metrics-listen", "off"),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: fleet serve exited; see {home / 'serve.log'}")
        info = ServeInfo.read(home / "serve.json")
        if info is not None and info.pid == proc.pid:
            sys.stderr.write(f"FleetService on {info.grpc}; broker {info.broker_url}\n")
            return proc, info
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"demo: fleet serve did not start; see {home / 'serve.log'}")


def versions(home: Path) -> dict[str, int]:
    from collections import Counter

    code, out = fleet(home, "devices", "ls", "--json", quiet=True, shown=False)
    if code:
        return {}
    return dict(
        Counter(f"digits:{d['active'].get('version', '-')}" for d in json.loads(out) if d["online"])
    )


async def story(home: Path, root: Path, info: Any) -> int:
    from edgefleet.cloud.cli.sim import _enroll
    from edgefleet.cloud.client import read_token
    from edgefleet.cloud.remote import GrpcClient
    from edgefleet.simulator.cluster import SimCluster
    from edgefleet.simulator.plan import plan

    say(
        f"$ fleet sim --devices {DEVICES} --profile {PROFILE} --traffic 10   "
        "(real agents; each predicts on its own data)"
    )
    planned = plan(DEVICES, PROFILE, id_prefix="demo")
    client = GrpcClient(info.grpc, read_token(home / "keys" / "token"))
    try:
        shared = _enroll(client, planned, root / "devices")
    finally:
        client.close()
    sim = SimCluster(
        DEVICES,
        broker_url=shared["broker_url"],
        public_key_pem=shared["signing_public_key"],
        state_root=root / "devices",
        profile=PROFILE,
        topic_prefix=shared["topic_prefix"],
        id_prefix="demo",
        credentials=shared["passwords"] or None,  # each device's own (security is on)
        telemetry_interval=2.0,
        processes=1,
    )
    async with sim:
        await sim.partition_traffic(rate=10, labelled=1.0)
        groups: dict[str, int] = {}
        for e in planned:
            groups[e.group] = groups.get(e.group, 0) + 1
        sys.stderr.write(
            f"{sim.online()} devices online: "
            + ", ".join(f"{n} {g}" for g, n in sorted(groups.items()))
            + "\n"
        )

        async def cli(*args: str, quiet: bool = False, shown: bool = True) -> tuple[int, str]:
            return await asyncio.to_thread(fleet, home, *args, quiet=quiet, shown=shown)

        code, _ = await cli("deploy", "digits:1", "--to", "all", quiet=True)
        if code:
            return code
        code, _ = await cli("deploy", "digits:2", "--to", "all", *GATE)
        if code:
            sys.stderr.write("demo: the good version did not roll out\n")
            return code
        code, _ = await cli("deploy", "digits:3", "--to", "all", *GATE)
        if code != 1:
            sys.stderr.write("demo: the broken version was not stopped at the canary\n")
            return 1
        on = await asyncio.to_thread(versions, home)
        sys.stderr.write(f"the quality gate stopped digits:3 at the canary; devices serve {on}\n")
        if on != {"digits:2": DEVICES}:
            return 1

        drifted = [e.device_id for e in planned if e.group == DRIFTED]
        say(
            f"(simulator) the {DRIFTED} group's sensors drift: live inputs x + 4 on "
            f"{len(drifted)} devices"
        )
        await sim.drift(drifted, shift=4.0)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            code, out = await cli("alerts", "--json", quiet=True, shown=False)
            subjects = {a["subject"] for a in json.loads(out or "[]") if a["scope"] == "group"}
            if subjects:
                break
            await asyncio.sleep(2)
        await cli("alerts")
        if subjects != {DRIFTED}:
            sys.stderr.write(f"demo: expected a drift alert for group {DRIFTED} only\n")
            return 1
    return 0


def main() -> int:
    logging.basicConfig(
        level=logging.ERROR, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    root = Path(".demo").resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    home = root / "home"
    start = time.monotonic()
    build(home, root)
    proc, info = start_coordinator(home)
    try:
        code = asyncio.run(story(home, root, info))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    took = time.monotonic() - start
    if code:
        sys.stderr.write(f"\ndemo FAILED after {took:.0f}s; logs in {root}\n")
        return code
    sys.stderr.write(
        f"\ndemo done in {took:.0f}s; state in {root} (delete it to clean up). Try next:\n"
        f"  export FLEET_HOME={home}\n"
        "  fleet rollouts ls                       # the three deploys, stored\n"
        "  fleet models show digits:1              # variants: size, accuracy, latency\n"
        "  fleet serve &                           # the coordinator again; in another shell:\n"
        "  fleet sim --devices 20 --profile cpu,gpu --traffic 10 --faults 'drift:group=gpu@60s=4'\n"
        "  fleet deploy digits:2 --to all --canary 10% --bake 10s --min-accuracy 0.9 --dry-run\n"
        "  fleet drift --by group                  # PSI per group; fleet alerts after a minute\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
