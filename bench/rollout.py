"""Staged rollout at fleet scale: N simulated devices (real agents, several processes),
10% canary and three waves, shadow evaluation on live labelled traffic, gates.

Measured in one run, on one broker:
- a good version through canary + 3 waves: time per stage (install as a shadow,
  bake, activate) and what the coordinator sent (artifact chunks, desired states);
- a version whose accuracy collapses: time from the failed gate at the canary until
  every canary device confirmed it dropped the candidate (the rollout is rolled back);
- a rollback by hand after the good version reached every device: time until every
  device serves the previous version again (last-known-good, no download).
Target: back on the previous version within two heartbeat intervals (the agents'
telemetry interval, 10 s by default: 20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._table import Table

HEARTBEAT_S = 10.0  # AgentSettings.telemetry_interval default


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-devices", type=int, default=1000, help="devices (default 1000)")
    g.add_argument(
        "--rollout-processes", type=int, default=None, help="simulator processes (default auto)"
    )
    g.add_argument(
        "--rollout-bake", type=float, default=10.0, help="bake seconds per stage (default 10)"
    )
    g.add_argument(
        "--rollout-rate",
        type=float,
        default=1.0,
        help="live predictions per device per second (default 1)",
    )


def _setup(home: Path) -> Any:
    import numpy as np

    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.models.data import load_dataset

    client = LocalClient(
        load_settings(
            home=home, db_url=f"sqlite:///{home / 'r.db'}", artifact_uri=(home / "a").as_uri()
        )
    )
    client.init()
    kw: dict[str, Any] = {"arch": "mlp", "epochs": 5}
    client.pipeline.train("digits", "digits", seed=0, **kw)  # 1: in service
    client.pipeline.train("digits", "digits", seed=1, **kw)  # 2: as good
    ds = load_dataset("digits")
    np.savez(home / "traffic.npz", X=ds.x.astype(np.float32), y=ds.y)
    np.savez(home / "shifted.npz", X=ds.x, y=(ds.y + 3) % 10)
    client.pipeline.train("digits", str(home / "shifted.npz"), seed=2, **kw)  # 3: collapses
    return client


async def _wait(pred: Any, timeout: float, what: str) -> float:
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - t0


async def _follow(store: Any, rollout_id: str, timeout: float) -> Any:
    t0 = time.perf_counter()
    while True:
        r = await asyncio.to_thread(store.get, rollout_id)
        if r.final or r.state == "paused":
            return r
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"rollout {rollout_id} still {r.state} after {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def _run(args: argparse.Namespace, client: Any, home: Path, root: Path) -> dict[str, Any]:
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.devices import DeviceStore, Selector
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.cloud.rollouts import RolloutStore
    from edgefleet.cloud.rollouts.controller import RolloutController
    from edgefleet.cloud.signing import load_private_key
    from edgefleet.simulator.cluster import SimCluster
    from edgefleet.simulator.plan import device_specs

    n = args.rollout_devices
    settings = load_settings(home=home)
    bdir = root / "broker"
    bdir.mkdir(parents=True)
    os.chmod(bdir, 0o777)
    db = f"sqlite:///{root / 'fleet.db'}"
    devices, rollouts = DeviceStore(db), RolloutStore(db)
    everyone = Selector.parse("all")
    out: dict[str, Any] = {"devices": n}
    with ManagedBroker(bdir, persistence=False) as broker:
        async with Coordinator(
            broker_url=broker.url,
            registry=client.registry,
            store=client.pipeline.store,
            devices=devices,
            signing_key=lambda: load_private_key(settings.signing_key_path),
            gather=0.3,
        ) as coord:
            sim = SimCluster(
                n,
                broker_url=broker.url,
                public_key_pem=settings.public_key_path.read_text(),
                state_root=root / "dev",
                processes=args.rollout_processes,
                profile="cpu",
                id_prefix="roll",
            )
            out["processes"] = sim.processes
            devices.enroll_many(device_specs(sim.ids_for_enrollment()))
            async with sim:
                while len(await asyncio.to_thread(devices.find, online=True)) < n:
                    await asyncio.sleep(0.2)
                await coord.deploy(ModelRef("digits", 1), everyone)
                await _wait(lambda: sim.active_versions()["digits:1"] >= n, 300, "baseline")
                while (
                    sum(d.active.get("version") == 1 for d in await asyncio.to_thread(devices.find))
                    < n
                ):  # the coordinator has recorded what every device runs
                    await asyncio.sleep(0.2)
                await sim.traffic(home / "traffic.npz", rate=args.rollout_rate)
                controller = RolloutController(coord, rollouts)
                task = asyncio.create_task(controller.run())
                try:
                    out["good"] = await _good(args, coord, controller, rollouts, sim, n)
                    out["manual"] = await _manual_rollback(controller, rollouts, sim, n, out)
                    out["bad"] = await _bad(args, controller, rollouts, sim, n)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await sim.traffic(home / "traffic.npz", rate=0)
    rollouts.close()
    devices.close()
    return out


def _policy(args: argparse.Namespace, **gates: Any) -> Any:
    from edgefleet.cloud.rollouts import Policy

    return Policy(
        canary=0.1,
        waves=(0.25, 0.5, 1.0),
        bake_s=args.rollout_bake,
        min_samples=50,
        sample_rate=1.0,
        stage_timeout_s=300,
        **gates,
    )


async def _good(
    args: argparse.Namespace, coord: Any, controller: Any, store: Any, sim: Any, n: int
) -> dict[str, Any]:
    from edgefleet.cloud.devices import Selector
    from edgefleet.cloud.registry import ModelRef

    mv = coord.registry.get_version(ModelRef("digits", 2))
    shas = [v.sha256 for v in mv.variants]
    chunks_before = _chunk_bytes(coord, shas)
    desired_before = coord.desired_bytes
    t0 = time.perf_counter()
    r, _ = await controller.create(
        ModelRef("digits", 2),
        Selector.parse("all"),
        _policy(args, min_agreement=0.9, min_accuracy=0.8, max_latency_regression=0.5),
    )
    r = await _follow(store, r.rollout_id, 1800)
    wall = time.perf_counter() - t0
    await _wait(lambda: sim.active_versions()["digits:2"] >= n, 120, "every device on v2")
    size = sum(v.size for v in mv.variants if coord.broadcaster.known(v.sha256))
    return {
        "rollout": r,
        "wall_s": wall,
        "chunk_bytes": _chunk_bytes(coord, shas) - chunks_before,
        "desired_bytes": coord.desired_bytes - desired_before,
        "artifact_bytes": size,
    }


async def _manual_rollback(
    controller: Any, store: Any, sim: Any, n: int, out: dict[str, Any]
) -> dict[str, Any]:
    r = out["good"]["rollout"]
    if r.state != "done":
        return {"skipped": f"good rollout ended {r.state}"}
    t0 = time.perf_counter()
    await controller.control(r.rollout_id, "rollback")
    back = await _wait(lambda: sim.active_versions()["digits:1"] >= n, 300, "all back on v1")
    r = await _follow(store, r.rollout_id, 300)
    return {"back_s": back, "settled_s": time.perf_counter() - t0, "state": r.state}


async def _bad(
    args: argparse.Namespace, controller: Any, store: Any, sim: Any, n: int
) -> dict[str, Any]:
    from edgefleet.cloud.devices import Selector
    from edgefleet.cloud.registry import ModelRef

    r, _ = await controller.create(
        ModelRef("digits", 3), Selector.parse("all"), _policy(args, min_accuracy=0.8)
    )
    r = await _follow(store, r.rollout_id, 900)
    failed = [s for s in r.stages if s.state == "failed"]
    gate_at = failed[0].finished_at if failed else 0.0
    # rolled back = every device the rollout touched reported it serves the previous version
    return {
        "rollout": r,
        "gate_to_back_s": (r.finished_at - gate_at) if gate_at and r.finished_at else None,
        "on_v1": sim.active_versions()["digits:1"],
    }


def _chunk_bytes(coord: Any, shas: list[str]) -> int:
    b = coord.broadcaster
    return sum(b.stats(sha).bytes_sent for sha in shas if b.known(sha))


def run(args: argparse.Namespace) -> list[Table]:
    home = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    client = _setup(home)
    root = Path(tempfile.mkdtemp(prefix="bench-rollout-run-"))
    res = asyncio.run(_run(args, client, home, root))
    client.close()
    n = res["devices"]
    good = res["good"]
    r = good["rollout"]
    t = Table(
        f"rollout: digits v1 -> v2 on {n} simulated devices ({res['processes']} processes), "
        f"10% canary + 3 waves, bake {args.rollout_bake:g} s, "
        f"{args.rollout_rate:g} labelled predictions/s per device",
        ["stage", "devices", "install s", "bake s", "activate s", "total s", "samples", "gates"],
    )
    for s in r.stages:
        t.add(
            s.name,
            s.devices,
            f"{s.bake_started_at - s.started_at:.1f}",
            f"{s.activated_at - s.bake_started_at:.1f}",
            f"{s.finished_at - s.activated_at:.1f}",
            f"{s.finished_at - s.started_at:.1f}",
            s.samples,
            " ".join(f"{g.name}={g.value:.3g}{'' if g.ok else '!'}" for g in s.gates),
        )
    t.notes.append(
        f"outcome {r.state}; wall {good['wall_s']:.1f} s; coordinator sent "
        f"{good['chunk_bytes'] / 1e3:.0f} KB of chunks for a {good['artifact_bytes'] / 1e3:.0f} KB "
        f"artifact over {len(r.stages)} stages ({good['chunk_bytes'] / max(1, good['artifact_bytes']):.2f}x) "
        f"and {good['desired_bytes'] / 1e3:.0f} KB of signed desired states "
        f"({good['desired_bytes'] / max(1, 2 * n):.0f} B each, 2 per device)"
    )
    back = Table(
        "rollback: back on the previous version (target: within two heartbeat intervals, "
        f"{2 * HEARTBEAT_S:.0f} s)",
        ["case", "devices", "seconds", "within 2 heartbeats"],
    )
    bad = res["bad"]
    br = bad["rollout"]
    secs = bad["gate_to_back_s"]
    ok = secs is not None and secs <= 2 * HEARTBEAT_S and bad["on_v1"] >= n
    back.misses += int(not ok)
    back.add(
        "accuracy gate fails at the canary -> canary drops the shadow",
        br.stages[0].devices,
        "-" if secs is None else f"{secs:.2f}",
        "PASS" if ok else "MISS",
    )
    back.notes.append(f"bad rollout: {br.state} ({br.reason})")
    man = res["manual"]
    if "back_s" in man:
        ok2 = man["back_s"] <= 2 * HEARTBEAT_S
        back.misses += int(not ok2)
        back.add(
            "rollback by hand after v2 reached every device -> last-known-good",
            n,
            f"{man['back_s']:.2f}",
            "PASS" if ok2 else "MISS",
        )
    else:
        back.notes.append(f"rollback by hand: {man['skipped']}")
    return [t, back]
