"""Console page time with a large fleet in PostgreSQL (target: p95 under 300 ms).

A throwaway PostgreSQL (tests/support/postgres.py) gets an initialised FLEET_HOME's
schema, `--console-devices` devices (groups, versions, variants, update states, 80 %
online) and `--console-minutes` minutes of telemetry from each of them (one window
every 30 s). The console's real Starlette app (`cloud.console.app`, the one `fleet
serve --ui-listen` serves) answers in-process through httpx's ASGI transport, so the
figures are server time: token check, SQL, template rendering. Same-run baselines:
/healthz (no token, no SQL) and the federated runs page (token check, one small query,
a template). The first overview pays for counting the activity chart's minutes once;
it is shown apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._table import Table

TARGET_P95_MS = 300.0
GROUPS = [f"site-{i:02d}" for i in range(20)]
VERSIONS = [("digits", 1), ("digits", 2), ("digits", 3)]
VARIANTS = ["fp32", "int8", "fp16"]
STATES = ["active"] * 8 + ["failed", "downloading"]
BOUNDS = json.dumps([250, 500, 1000, 2000, 5000, 10000, 20000, 50000])


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("console")
    g.add_argument("--console-devices", type=int, default=10_000)
    g.add_argument("--console-minutes", type=int, default=10)
    g.add_argument("--console-requests", type=int, default=100)


def _fill(url: str, devices: int, minutes: int) -> int:
    """Devices and telemetry straight into the tables (as the ingest would leave them)."""
    import sqlalchemy as sa

    from edgefleet.cloud.db import metadata
    from edgefleet.cloud.devices.store import DeviceRow
    from edgefleet.cloud.telemetry.store import telemetry

    rng = random.Random(0)
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC)
    table = metadata.tables[DeviceRow.__tablename__]
    rows = []
    for i in range(devices):
        model, version = VERSIONS[i % len(VERSIONS)]
        state = rng.choice(STATES)
        rows.append(
            {
                "device_id": f"dev-{i:05d}",
                "group": GROUPS[i % len(GROUPS)],
                "tags": {"site": GROUPS[i % len(GROUPS)]},
                "enrolled_at": stamp,
                "online": rng.random() < 0.8,
                "last_seen": stamp,
                "boot_id": "b",
                "agent_version": "0.1.0",
                "runtimes": ["onnxruntime"],
                "accelerator": "cpu",
                "active_model": model,
                "active_version": version,
                "active_variant": VARIANTS[i % 3],
                "update_state": state,
                "update_reason": "ok" if state != "failed" else "oom",
                "desired_generation": 1,
                "rollout_id": "",
            }
        )
    with engine.begin() as conn:
        for k in range(0, len(rows), 2000):
            conn.execute(sa.insert(table), rows[k : k + 2000])
    windows = 0
    steps = minutes * 2
    with engine.begin() as conn:
        for step in range(steps):
            end_ms = int((now - (steps - step) * 30) * 1000)
            batch = []
            for i in range(devices):
                model, version = VERSIONS[i % len(VERSIONS)]
                batch.append(
                    {
                        "device_id": f"dev-{i:05d}",
                        "seq": step,
                        "window_start_ms": end_ms - 30_000,
                        "window_end_ms": end_ms,
                        "received_ms": end_ms,
                        "model": model,
                        "version": version,
                        "variant": VARIANTS[i % 3],
                        "predictions": 30,
                        "errors": 0,
                        "latency_bounds": BOUNDS,
                        "latency_counts": "[0,3,20,5,2,0,0,0,0]",
                        "latency_sum_us": 30_000.0,
                        "latency_count": 30,
                        "rss_bytes": 50_000_000,
                        "cpu_percent": 3.0,
                        "spooled": False,
                    }
                )
            conn.execute(sa.insert(telemetry), batch)
            windows += len(batch)
    engine.dispose()
    return windows


async def _time(client: Any, path: str, n: int, headers: dict[str, str]) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.get(path, headers=headers)
        out.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path}: {r.status_code} {r.text[:200]}")
    return out


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run(args: argparse.Namespace) -> list[Table]:
    from tests.support.postgres import PostgresUnavailable, TempPostgres

    n_dev, minutes, n = args.console_devices, args.console_minutes, args.console_requests
    t = Table(
        f"console page server time: {n_dev:,} devices and {minutes} min of telemetry in "
        f"PostgreSQL, {n} requests per page",
        ["page", "p50 ms", "p95 ms", "p50 vs /healthz", f"p95 < {TARGET_P95_MS:.0f} ms"],
    )
    try:
        with TempPostgres(database="bench", durable=True) as url:
            t.rows, notes = asyncio.run(_measure(url, n_dev, minutes, n, t))
            t.notes.extend(notes)
    except PostgresUnavailable as e:
        t.notes.append(f"  skipped: {e}")
        return [t]
    t.misses = sum(r[-1] == "MISS" for r in t.rows)
    load = os.getloadavg()
    t.notes.append(f"  load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return [t]


async def _measure(
    url: str, n_dev: int, minutes: int, n: int, t: Table
) -> tuple[list[list[str]], list[str]]:
    import httpx

    from edgefleet.cloud.access import open_access_store
    from edgefleet.cloud.cli.main import run as fleet
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.console.app import Console, build_app
    from edgefleet.cloud.console.queries import ConsoleQueries

    home = Path(tempfile.mkdtemp(prefix="bench-console-")) / "home"
    if fleet(["--home", str(home), "--db-url", url, "init"]) != 0:
        raise RuntimeError("fleet init failed")
    t0 = time.perf_counter()
    windows = await asyncio.to_thread(_fill, url, n_dev, minutes)
    filled = time.perf_counter() - t0
    local = LocalClient(load_settings(home=home))
    tokens = open_access_store(local.database)
    app = build_app(Console(ConsoleQueries(local.database), local, tokens))
    headers = {"authorization": f"Bearer {(home / 'keys' / 'token').read_text().strip()}"}
    pages = {
        "/healthz (baseline)": "/healthz",
        "/fl (baseline: token, 1 query)": "/fl",
        "fleet overview /": "/",
        "device list /devices": "/devices",
        "filtered, page 5": "/devices?group=site-03&state=active&page=5",
        "last page /devices?page=200": "/devices?page=200",
    }
    rows: list[list[str]] = []
    notes: list[str] = []
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as c:
            cold = await _time(c, "/", 1, headers)
            results = {}
            for label, path in pages.items():
                await _time(c, path, 5, headers)  # warm: connections, templates
                results[label] = await _time(c, path, n, headers)
            base = statistics.median(results["/healthz (baseline)"]) * 1000
            for label, times in results.items():
                p50, p95 = _p(times, 0.5), _p(times, 0.95)
                target = "-" if "baseline" in label else ("PASS" if p95 < TARGET_P95_MS else "MISS")
                rows.append([label, f"{p50:.1f}", f"{p95:.1f}", f"{p50 / base:.0f}x", target])
    finally:
        tokens.close()
        local.close()
    notes.append(
        f"  filled {n_dev:,} devices and {windows:,} telemetry windows in {filled:.0f} s; "
        f"first overview (counts every minute of the activity chart): {cold[0] * 1000:.0f} ms"
    )
    notes.append("  in-process ASGI requests one at a time: no network, no browser")
    del t
    return rows, notes
