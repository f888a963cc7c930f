"""Scale: N simulated devices online against a real `fleet serve`, then its broker killed.

A real coordinator (`fleet serve` in its own process, with its managed, password-protected
Mosquitto and its SQLite database) enrols N devices over gRPC (the bulk path);
`SimCluster` runs them as real agents over several simulator processes. Measured per N,
in the same run:

- enrol: N devices enrolled through the running coordinator in batches (`EnrollDevices`:
  one credential write and one broker reload per batch);
- online: from starting the simulator processes until the coordinator's database has all
  N devices online (births through the broker, the coordinator's paced writes);
- coordinator RSS and CPU seconds over that admission, broker RSS, and RSS per simulated
  agent (the simulator processes' RSS over N, interpreter included);
- broker restart: SIGKILL mosquitto; the coordinator's supervisor restarts it; time until
  every device is online again with a `last_seen` after the kill (re-admitted), then a
  clean stop and a count of telemetry rows per device: every (device, seq) from 1 to the
  device's last must be there (agents spool while the broker is away and replay).

The smaller N is the baseline for the ratios: linear cost shows as ratio ≈ N ratio.
Slow (minutes at 10,000 on two cores): `python -m bench --only scale`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._serve import start_serve
from bench._table import Table, ratio

logger = logging.getLogger("bench.scale")

_TICK = os.sysconf("SC_CLK_TCK")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale")
    g.add_argument(
        "--scale-sizes",
        default="1000,10000",
        help="device counts; the first is the baseline (default 1000,10000)",
    )
    g.add_argument(
        "--scale-per-process",
        type=int,
        default=2500,
        help="simulated devices per simulator process (default 2500)",
    )
    g.add_argument(
        "--scale-telemetry-interval",
        type=float,
        default=30.0,
        help="seconds between each device's telemetry messages (default 30)",
    )
    g.add_argument(
        "--scale-timeout",
        type=float,
        default=900.0,
        help="seconds allowed for each phase (enrol, online, re-admission; default 900)",
    )


@dataclass(frozen=True)
class Proc:
    rss_mb: float
    hwm_mb: float
    cpu_s: float


def proc(pid: int | None) -> Proc:
    """RSS, peak RSS (MB) and CPU seconds (user + system) of a running process."""
    if pid is None:
        return Proc(0.0, 0.0, 0.0)
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return Proc(0.0, 0.0, 0.0)
    kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in status if ln.startswith("Vm")}
    return Proc(
        kb.get("VmRSS", 0) / 1024,
        kb.get("VmHWM", 0) / 1024,
        (int(stat[11]) + int(stat[12])) / _TICK,
    )


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _stop_serve(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class _Db:
    """Read-only counts straight from the coordinator's database."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.engine = sa.create_engine(url)

    def online(self, since: datetime | None = None) -> int:
        import sqlalchemy as sa
        from sqlmodel import SQLModel

        import edgefleet.cloud.devices.store  # noqa: F401  (registers the devices table)

        t = SQLModel.metadata.tables["devices"]
        q = sa.select(sa.func.count()).select_from(t).where(t.c.online.is_(True))
        if since is not None:
            q = q.where(t.c.last_seen >= since)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar_one())

    def telemetry(self) -> tuple[int, int, int, int]:
        """(rows, devices with rows, rows missing inside each device's 1..max(seq), spooled)."""
        import sqlalchemy as sa

        from edgefleet.cloud.telemetry.store import telemetry as t

        q = sa.select(
            t.c.device_id,
            sa.func.count(),
            sa.func.max(t.c.seq),
            sa.func.sum(sa.cast(t.c.spooled, sa.Integer)),
        ).group_by(t.c.device_id)
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        total = sum(int(r[1]) for r in rows)
        missing = sum(int(r[2]) - int(r[1]) for r in rows)
        spooled = sum(int(r[3] or 0) for r in rows)
        return total, len(rows), missing, spooled

    def close(self) -> None:
        self.engine.dispose()


async def _until(pred: Any, timeout: float, what: str, *, interval: float = 0.5) -> float:
    t0 = time.monotonic()
    while True:
        if await asyncio.to_thread(pred):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        await asyncio.sleep(interval)


def _broker_pid(home: Path) -> int | None:
    from edgefleet.cloud.broker import PID_FILE
    from edgefleet.cloud.config import load_settings

    path = load_settings(home=home).broker_dir / PID_FILE
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _enroll(home: Path, address: str, planned: list[Any]) -> dict[str, Any]:
    """Enrol every planned device through the running coordinator (`EnrollDevices`, the
    bulk path `fleet devices enroll --count/--from-file` takes): one credential write and
    one broker reload per batch of `DEFAULT_BATCH`."""
    from edgefleet.cloud.cli.enrol import DEFAULT_BATCH
    from edgefleet.cloud.client import read_token
    from edgefleet.cloud.devices import DeviceSpec
    from edgefleet.cloud.remote import GrpcClient

    client = GrpcClient(address, read_token(home / "keys" / "token"))
    try:
        bundles = []
        for i in range(0, len(planned), DEFAULT_BATCH):
            part = planned[i : i + DEFAULT_BATCH]
            specs = [DeviceSpec(e.device_id, e.group, dict(e.tags)) for e in part]
            bundles += client.enroll_devices(specs).bundles
    finally:
        client.close()
    return {
        "signing_public_key": bundles[0].signing_public_key,
        "topic_prefix": bundles[0].topic_prefix,
        "passwords": {b.device_id: b.password for b in bundles},
    }


async def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.simulator.cluster import SimCluster
    from edgefleet.simulator.plan import plan

    root = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
    os.chmod(root, 0o755)
    home = root / "home"
    LocalClient(load_settings(home=home)).init()
    settings = load_settings(home=home)
    out: dict[str, Any] = {"n": n, "load_start": load()}
    planned = plan(n, "cpu", id_prefix="sc")
    t0 = time.monotonic()
    serve, info = start_serve(home)
    out["serve_s"] = time.monotonic() - t0
    db = _Db(settings.registry_url)
    try:
        t0 = time.monotonic()
        shared = await asyncio.to_thread(_enroll, home, info.grpc, planned)
        out["enrol_s"] = time.monotonic() - t0
        logger.info("scale %d: enrolled in %.1f s (%s)", n, out["enrol_s"], load())
        c0 = proc(serve.pid)
        procs = max(1, -(-n // args.scale_per_process))
        sim = SimCluster(
            n,
            broker_url=info.advertise_broker,
            public_key_pem=shared["signing_public_key"],
            state_root=root / "devices",
            processes=procs,
            profile="cpu",
            id_prefix="sc",
            topic_prefix=shared["topic_prefix"],
            credentials=shared["passwords"] or None,
            telemetry_interval=args.scale_telemetry_interval,
            connect_timeout=args.scale_timeout,
        )
        out["procs"] = procs
        t0 = time.monotonic()
        async with sim:
            out["connected_s"] = time.monotonic() - t0
            await _until(
                lambda: db.online() >= n, args.scale_timeout, f"{n} online in the database"
            )
            out["online_s"] = time.monotonic() - t0
            c1 = proc(serve.pid)
            workers = [proc(w.proc.pid) for w in sim._workers]
            out["coord_rss"], out["coord_hwm"] = c1.rss_mb, c1.hwm_mb
            out["coord_cpu"] = c1.cpu_s - c0.cpu_s
            out["broker_rss"] = proc(_broker_pid(home)).rss_mb
            out["sim_rss"] = sum(w.rss_mb for w in workers)
            out["load_online"] = load()
            logger.info("scale %d: all online in %.1f s (%s)", n, out["online_s"], load())
            # steady state for one telemetry interval, then the broker dies
            await asyncio.sleep(args.scale_telemetry_interval)
            out["steady_cpu"] = (proc(serve.pid).cpu_s - c1.cpu_s) / args.scale_telemetry_interval
            bpid = _broker_pid(home)
            killed = datetime.now(UTC)
            t0 = time.monotonic()
            if bpid is not None:
                os.kill(bpid, signal.SIGKILL)
            await _until(
                lambda: db.online(since=killed) >= n,
                args.scale_timeout,
                f"{n} re-admitted after the broker restart",
            )
            out["readmit_s"] = time.monotonic() - t0
            out["broker_rss_after"] = proc(_broker_pid(home)).rss_mb
            out["load_readmit"] = load()
            logger.info("scale %d: re-admitted in %.1f s (%s)", n, out["readmit_s"], load())
            # one more interval so every device has sent telemetry across the restart
            await asyncio.sleep(args.scale_telemetry_interval + 2)
        # after a clean stop, the ingest drains; then count every (device, seq)
        last = -1
        while (now := (await asyncio.to_thread(db.telemetry))[0]) != last:
            last = now
            await asyncio.sleep(3)
        out["rows"], out["tel_devices"], out["missing"], out["spooled"] = await asyncio.to_thread(
            db.telemetry
        )
    finally:
        db.close()
        _stop_serve(serve)
        shutil.rmtree(root, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> list[Table]:
    sizes = [int(x) for x in args.scale_sizes.split(",") if x.strip()]
    results = []
    for n in sizes:
        try:
            results.append(asyncio.run(measure(n, args)))
            logger.info("scale %d: %s", n, json.dumps(results[-1]))
        except (TimeoutError, RuntimeError) as e:
            logger.warning("scale %d did not finish: %s", n, e)
            results.append({"n": n, "error": str(e), "load_start": load()})
    t = Table(
        "scale: N real agents against `fleet serve` (its Mosquitto, SQLite), broker SIGKILLed",
        [
            "devices",
            "procs",
            "enrol s",
            "online s",
            "coord RSS MB",
            "coord CPU s",
            "steady CPU %",
            "broker RSS MB",
            "KB/agent",
            "re-admit s",
            "tel rows",
            "lost",
            "spooled",
        ],
    )
    for r in results:
        if "error" in r:
            t.add(r["n"], *(["-"] * 11), "FAIL")
            t.notes.append(f"  {r['n']}: {r['error']} ({r['load_start']})")
            t.misses += 1
            continue
        t.add(
            r["n"],
            r["procs"],
            f"{r['enrol_s']:.1f}",
            f"{r['online_s']:.1f}",
            f"{r['coord_rss']:.0f}",
            f"{r['coord_cpu']:.1f}",
            f"{r['steady_cpu'] * 100:.0f}",
            f"{r['broker_rss']:.1f}",
            f"{r['sim_rss'] * 1024 / r['n']:.0f}",
            f"{r['readmit_s']:.1f}",
            r["rows"],
            r["missing"] + (r["n"] - r["tel_devices"]),
            r["spooled"],
        )
        t.misses += int(r["missing"] > 0 or r["tel_devices"] < r["n"])
    ok = [r for r in results if "error" not in r]
    if len(ok) >= 2:
        b = ok[0]
        for r in ok[1:]:
            t.notes.append(
                f"  {r['n']} vs {b['n']} (x{r['n'] / b['n']:.0f} devices): online "
                f"{ratio(r['online_s'] / b['online_s'])}, coordinator CPU "
                f"{ratio(r['coord_cpu'] / max(b['coord_cpu'], 1e-3))}, coordinator RSS "
                f"{ratio(r['coord_rss'] / b['coord_rss'])}, broker RSS "
                f"{ratio(r['broker_rss'] / b['broker_rss'])}, re-admit "
                f"{ratio(r['readmit_s'] / b['readmit_s'])}"
            )
    for r in ok:
        t.notes.append(
            f"  {r['n']}: {json.dumps({k: v for k, v in r.items() if k.startswith('load')})}"
        )
    t.notes += [
        "  online: simulator processes started -> every device online in the coordinator's database",
        "  coord CPU s: the `fleet serve` process's user+system seconds over that admission",
        "  KB/agent: RSS of all simulator processes / N (interpreters and imports included)",
        "  re-admit: mosquitto SIGKILLed -> every device online again with last_seen after the kill",
        "  lost: (device, seq) rows missing between 1 and each device's last seq, plus devices with none",
    ]
    return [t]
