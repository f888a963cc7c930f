"""Fan-out: N simulated devices receive, verify and activate a ~1 MB model.

Ours: the coordinator broadcasts each chunk once per wave on a shared topic and
repairs only what devices say they lack. Baseline, same broker, same run: each
device gets its own copy (one 1 MB QoS-1 message per device on its own topic,
i.e. what a per-device download costs the coordinator's uplink).
Targets: 1,000 devices active within 20 s; coordinator egress ≤ 1.2× the
artifact size per wave plus repairs.
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fanout")
    g.add_argument(
        "--fanout-sizes", default="100,500,1000", help="device counts (default 100,500,1000)"
    )
    g.add_argument(
        "--fanout-processes",
        type=int,
        default=None,
        help="simulator processes (default: one per ~250 devices, at most one per core)",
    )


def _version(home: Path) -> tuple[Any, Any]:
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.registry import ModelRef

    client = LocalClient(
        load_settings(
            home=home, db_url=f"sqlite:///{home / 'r.db'}", artifact_uri=(home / "a").as_uri()
        )
    )
    client.init()
    client.pipeline.train("big", "digits", arch="mlp", epochs=2, options={"hidden": [512, 448]})
    return client, client.registry.get_version(ModelRef("big", 1))


async def _ours(
    n: int, client: Any, home: Path, root: Path, processes: int | None
) -> dict[str, float]:
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.devices import DeviceStore, Selector
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.cloud.signing import load_private_key
    from edgefleet.simulator.cluster import SimCluster

    settings = load_settings(home=home)
    bdir = root / "broker"
    bdir.mkdir(parents=True)
    os.chmod(bdir, 0o777)
    devices = DeviceStore(f"sqlite:///{root / 'devices.db'}")
    with ManagedBroker(bdir, persistence=False) as broker:
        async with Coordinator(
            broker_url=broker.url,
            registry=client.registry,
            store=client.pipeline.store,
            devices=devices,
            signing_key=lambda: load_private_key(settings.signing_key_path),
            chunk_size=64 * 1024,
            gather=0.3,
        ) as coord:
            sim = SimCluster(
                n,
                broker_url=broker.url,
                public_key_pem=settings.public_key_path.read_text(),
                state_root=root / "dev",
                processes=processes,
                profile="cpu",
                seed=0,
                id_prefix="fan",
            )
            for e in sim.ids_for_enrollment():
                devices.enroll(e.device_id, group=e.group, tags=e.tags)
            async with sim:
                while len(await asyncio.to_thread(devices.find, online=True)) < n:
                    await asyncio.sleep(0.2)
                t0 = time.perf_counter()
                outcome = await coord.deploy(ModelRef("big", 1), Selector.parse("all"))
                await sim.wait(lambda: sim.states().get("active", 0) >= n, 300, what="all active")
                elapsed = time.perf_counter() - t0
                st = coord.broadcaster.stats(outcome.targets[0].sha256)
    devices.close()
    return {
        "seconds": elapsed,
        "bytes": st.bytes_sent,
        "size": st.size,
        "wants": st.wants,
        "processes": sim.processes,
    }


async def _baseline(n: int, size: int, root: Path) -> dict[str, float]:
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.protos.transport import Message, MqttSettings, MqttTransport

    bdir = root / "broker-baseline"
    bdir.mkdir(parents=True)
    os.chmod(bdir, 0o777)
    payload = os.urandom(size)
    got = 0
    done = asyncio.Event()

    def on_message(_m: Message) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    with ManagedBroker(bdir, persistence=False) as broker:
        clients = [
            MqttTransport(MqttSettings(url=broker.url, client_id=f"b{i}"), on_message=on_message)
            for i in range(n)
        ]
        for i, c in enumerate(clients):
            await c.subscribe(f"bench/dl/{i}")
        for i in range(0, n, 100):
            batch = clients[i : i + 100]
            for c in batch:
                await c.__aenter__()
            await asyncio.gather(*(c.wait_connected(timeout=60) for c in batch))
        pub = MqttTransport(MqttSettings(url=broker.url, client_id="coordinator"))
        async with pub:
            await pub.wait_connected(timeout=30)
            t0 = time.perf_counter()
            sem = asyncio.Semaphore(32)

            async def send(i: int) -> None:
                async with sem:
                    await pub.publish(f"bench/dl/{i}", payload, qos=1, timeout=120)

            await asyncio.gather(*(send(i) for i in range(n)))
            async with asyncio.timeout(300):
                await done.wait()
            elapsed = time.perf_counter() - t0
        for c in clients:
            await c.close()
    return {"seconds": elapsed, "bytes": float(n * size)}


def run(args: argparse.Namespace) -> list[Table]:
    sizes = [int(x) for x in args.fanout_sizes.split(",") if x.strip()]
    home = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    client, mv = _version(home)
    size = mv.variant("fp32").size
    t = Table(
        f"fan-out: a {size / 1e6:.2f} MB model to N simulated devices (received, verified, self-tested, active)",
        [
            "devices",
            "procs",
            "ours s",
            "egress MB",
            "egress/size",
            "per-device s",
            "per-device MB",
            "bytes saved",
            "1,000 in 20 s",
            "egress <= 1.2x",
        ],
    )
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"bench-fanout-{n}-"))
        ours = asyncio.run(_ours(n, client, home, root, args.fanout_processes))
        base = asyncio.run(_baseline(n, size, root))
        ratio = ours["bytes"] / ours["size"]
        ok_time = "PASS" if n < 1000 or ours["seconds"] <= 20 else "MISS"
        ok_egress = "PASS" if ratio <= 1.2 else "MISS"
        t.misses += int(ok_time == "MISS") + int(ok_egress == "MISS")
        t.add(
            n,
            int(ours["processes"]),
            f"{ours['seconds']:.1f}",
            f"{ours['bytes'] / 1e6:.2f}",
            f"{ratio:.2f}x",
            f"{base['seconds']:.1f}",
            f"{base['bytes'] / 1e6:.0f}",
            f"{base['bytes'] / max(ours['bytes'], 1):.0f}x",
            ok_time if n >= 1000 else "-",
            ok_egress,
        )
    t.notes.append(
        "  procs: simulator worker processes (agents split across them); the coordinator and the broker run apart"
    )
    t.notes.append(
        "  ours: deploy() until every device reports active (download, chunk + file + signature checks, load, self-test, swap)"
    )
    t.notes.append(
        "  per-device: the same bytes sent once per device on its own topic over the same broker, until all received"
    )
    client.close()
    return [t]
