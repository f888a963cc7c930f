"""Fan-out: N simulated devices receive, verify and activate a ~1 MB model.

Ours: the coordinator broadcasts each chunk once per wave on a shared topic and
repairs only what devices say they lack. Baseline, same broker, same run: each
device gets its own copy (one 1 MB QoS-1 message per device on its own topic,
i.e. what a per-device download costs the coordinator's uplink).
Targets: 1,000 devices active within 6 s (issue 16; was 20 s); coordinator egress ≤ 1.2× the
artifact size per wave plus repairs.

`--fanout-sessions shared` (or `both`) runs the simulator with one ONNX Runtime session
per model per worker process (`simulator.sessions`): every device still downloads,
verifies, writes its slot, self-tests and activates, but the ~10 MB session is not
held once per device, which is what lets 10,000 devices fit on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _pyspy
from bench._table import Table

TARGET_S = 6.0  # issue 16: 1,000 devices active within 6 s


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fanout")
    g.add_argument(
        "--fanout-sizes", default="100,500,1000", help="device counts (default 100,500,1000)"
    )
    g.add_argument(
        "--fanout-profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="py-spy the simulator workers at the largest size (default on, if installed)",
    )
    g.add_argument(
        "--fanout-processes",
        type=int,
        default=None,
        help="simulator processes (default: one per ~250 devices, at most one per core)",
    )
    g.add_argument(
        "--fanout-sessions",
        choices=("per-device", "shared", "both"),
        default="per-device",
        help="ONNX Runtime sessions in the simulator: one per device (default), one per model "
        "per worker process (shared), or both, each size measured both ways in the same run",
    )
    g.add_argument(
        "--fanout-broker-inflight-kb",
        type=int,
        default=128,
        help="mosquitto max_inflight_bytes per client, KiB (default 128, as `fleet serve`; "
        "was 512 before session 6)",
    )
    g.add_argument(
        "--fanout-broker-inflight",
        type=int,
        default=2,
        help="mosquitto max_inflight_messages per client (default 2, as `fleet serve`; was "
        "100 before session 6, which let mosquitto 2.0.11 hold 12.7 GB of packet copies at "
        "10,000 devices; max_inflight_bytes alone did not bound it: 6.9 GB with 128 KiB)",
    )
    g.add_argument(
        "--fanout-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also send the same bytes once per device (the per-device baseline; at 10,000 "
        "devices that is 10 GB through the broker)",
    )


def _peak_rss(pid: int | None) -> float:
    """Peak resident memory (VmHWM) of a live process, bytes; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds a live process has used so far; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def coordinator(client: Any, settings: Any, broker_url: str, devices: Any, **kw: Any) -> Any:
    """A Coordinator over the bench's LocalClient registry and store, signing with its key."""
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.signing import load_private_key

    return Coordinator(
        broker_url=broker_url,
        registry=client.registry,
        store=client.pipeline.store,
        devices=devices,
        signing_key=lambda: load_private_key(settings.signing_key_path),
        **kw,
    )


async def _ours(
    n: int,
    client: Any,
    home: Path,
    root: Path,
    processes: int | None,
    profile: bool = False,
    share_sessions: bool = False,
    inflight_kb: int = 512,
    inflight: int = 100,
) -> dict[str, float]:
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceStore, Selector
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.simulator.cluster import SimCluster
    from edgefleet.simulator.plan import device_specs

    settings = load_settings(home=home)
    bdir = root / "broker"
    bdir.mkdir(parents=True)
    os.chmod(bdir, 0o777)
    devices = DeviceStore(f"sqlite:///{root / 'devices.db'}")
    with ManagedBroker(
        bdir, persistence=False, max_inflight=inflight, max_inflight_bytes=inflight_kb * 1024
    ) as broker:
        async with coordinator(
            client, settings, broker.url, devices, chunk_size=64 * 1024, gather=0.3
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
                connect_timeout=max(120.0, n * 0.05),
                share_sessions=share_sessions,
            )
            devices.enroll_many(device_specs(sim.ids_for_enrollment()))
            async with sim:
                while len(await asyncio.to_thread(devices.find, online=True)) < n:
                    await asyncio.sleep(0.2)
                recs: list[_pyspy.Recording] = []
                me = None
                if profile:
                    recs = [
                        r
                        for i, w in enumerate(sim._workers)
                        if (r := _pyspy.record(w.proc.pid, root / f"worker{i}.txt"))
                    ]
                    me = _pyspy.record(os.getpid(), root / "coordinator.txt")
                    await asyncio.sleep(1.0)  # py-spy attaches
                workers = [w.proc.pid for w in sim._workers]
                cpu0 = time.process_time(), _cpu_s(broker.pid), sum(map(_cpu_s, workers))
                t0 = time.perf_counter()
                outcome = await coord.deploy(ModelRef("big", 1), Selector.parse("all"))
                await sim.wait(
                    lambda: sim.states().get("active", 0) >= n,
                    max(300.0, n * 0.1),
                    what="all active",
                )
                elapsed = time.perf_counter() - t0
                cpu = (
                    time.process_time() - cpu0[0],
                    _cpu_s(broker.pid) - cpu0[1],
                    sum(map(_cpu_s, workers)) - cpu0[2],
                )
                rss = [_peak_rss(pid) for pid in workers]
                broker_rss = _peak_rss(broker.pid)
                sessions = sim.sessions_opened()
                for r in recs:
                    await asyncio.to_thread(r.stop)
                if me is not None:
                    await asyncio.to_thread(me.stop)
                st = coord.broadcaster.stats(outcome.targets[0].sha256)
    devices.close()
    return {
        "seconds": elapsed,
        "bytes": st.bytes_sent,
        "size": st.size,
        "wants": st.wants,
        "processes": sim.processes,
        "coord_cpu": cpu[0],
        "broker_cpu": cpu[1],
        "workers_cpu": cpu[2],
        "workers_rss": sum(rss),
        "worker_rss_max": max(rss, default=0.0),
        "broker_rss": broker_rss,
        "sessions": float(sum(sessions)) if sessions is not None else float(n),
        "repairs": getattr(st, "repairs", None),
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


# where a device's time goes, from py-spy stacks of the simulator workers: a stack
# counts for the first phase with a marker in any of its frames
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ORT session create (load)", ("_create_inference_session",)),
    ("self-test (Session.run)", ("Session.run", "selftest")),
    ("fsync (download dir, slot files)", ("fsync",)),
    ("slot write (atomic rename)", ("_write_atomic",)),
    ("sha256 (chunks + whole file)", ("check_artifact", "PartialDownload._verify", "sha256")),
    ("read the file back", ("read_bytes",)),
    ("chunk pwrite + bookkeeping", ("PartialDownload.add", "_pwrite_all", "_start_fresh")),
    ("signature checks (Ed25519)", ("KeyTrust.verify", "verify_manifest")),
    ("memory probe (rss_bytes)", ("rss_bytes",)),
    ("MQTT receive/send (paho, transport)", ("Client._", "decode_publish", "_Link.")),
    ("event loop + thread pool", ("selectors.py", "selector_events", "thread.py")),
)


def _floor(data: bytes, root: Path, repeats: int = 15) -> dict[str, float]:
    """Median seconds of each cost a device cannot skip, measured alone in this process:
    digest the file, write + fsync it, create its ONNX Runtime session, run one self-test."""
    import hashlib
    import statistics

    import numpy as np

    from edgefleet.models.runtime import open_session

    times: dict[str, list[float]] = {"sha256": [], "write+fsync": [], "session": [], "run": []}
    for i in range(repeats):
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t1 = time.perf_counter()
        path = root / f"floor{i}.onnx"
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        t2 = time.perf_counter()
        sess = open_session(data, "onnxruntime", threads=1)
        t3 = time.perf_counter()
        spec = sess.inputs[0]
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        sess.run(np.zeros(shape, dtype=spec.dtype))
        t4 = time.perf_counter()
        path.unlink()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[k].append(v)
    return {k: statistics.median(v) for k, v in times.items()}


def _profile_table(
    n: int, root: Path, seconds: float, floor: dict[str, float] | None
) -> Table | None:
    samples = _pyspy.stacks(sorted(root.glob("worker*.txt")))
    total = sum(samples.values())
    if not total:
        return None
    coord = sum(_pyspy.stacks([root / "coordinator.txt"]).values())
    t = Table(
        f"fan-out profile at {n} devices: simulator workers, py-spy {_pyspy.RATE} Hz (busy threads)",
        ["phase", "thread-s", "share", "ms per device"],
    )
    for name, k in sorted(_pyspy.phases(samples, PHASES).items(), key=lambda kv: -kv[1]):
        t.add(
            name, f"{k / _pyspy.RATE:.1f}", f"{k / total:.0%}", f"{k / _pyspy.RATE / n * 1e3:.1f}"
        )
    t.add("total", f"{total / _pyspy.RATE:.1f}", "100%", f"{total / _pyspy.RATE / n * 1e3:.1f}")
    t.notes.append(
        f"  wall {seconds:.1f} s on {len(os.sched_getaffinity(0))} cores; the coordinator process "
        f"(this one) was busy {coord / _pyspy.RATE:.1f} thread-s; thread-s counts threads in "
        "blocking syscalls (fsync) too, so it can exceed cores x wall"
    )
    top = ", ".join(f"{f} {k / total:.0%}" for f, k in _pyspy.top_frames(samples, 6))
    t.notes.append(f"  top self frames: {top}")
    if floor:
        cores = len(os.sched_getaffinity(0))
        per = sum(floor.values())
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in floor.items())
        t.notes.append(
            f"  floor, same run: the unavoidable per-device costs measured alone (median ms: {parts}) "
            f"= {per * 1e3:.1f} ms; x {n} devices / {cores} cores = {per * n / cores:.1f} s "
            f"before any MQTT, bookkeeping or scheduling"
        )
    return t
    return t


def run(args: argparse.Namespace) -> list[Table]:
    sizes = [int(x) for x in args.fanout_sizes.split(",") if x.strip()]
    modes = {"per-device": [False], "shared": [True], "both": [False, True]}[args.fanout_sessions]
    home = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    client, mv = _version(home)
    size = mv.variant("fp32").size
    data = client.pipeline.store.get(mv.variant("fp32").sha256)
    t = Table(
        f"fan-out: a {size / 1e6:.2f} MB model to N simulated devices (received, verified, self-tested, active)",
        [
            "devices",
            "sessions",
            "procs",
            "ours s",
            "vs per-device sessions",
            "egress MB",
            "egress/size",
            "CPU s coord/broker/sim",
            "peak RSS sim GB",
            "broker RSS MB",
            "per-device s",
            "per-device MB",
            "ours/per-device",
            "bytes saved",
            f"1,000 in {TARGET_S:g} s",
            "egress <= 1.2x",
        ],
    )
    profiles: list[Table] = []
    largest = max(sizes)
    for n in sizes:
        base: dict[str, float] | None = None
        unshared: float | None = None
        for shared in modes:
            root = Path(tempfile.mkdtemp(prefix=f"bench-fanout-{n}-"))
            # the profile goes to the last mode measured at the largest size
            profile = (
                args.fanout_profile
                and n == largest
                and shared == modes[-1]
                and _pyspy.available() is not None
            )
            ours = asyncio.run(
                _ours(
                    n,
                    client,
                    home,
                    root,
                    args.fanout_processes,
                    profile,
                    shared,
                    args.fanout_broker_inflight_kb,
                    args.fanout_broker_inflight,
                )
            )
            # each device wrote ~1 MB to its own state directory
            shutil.rmtree(root / "dev", ignore_errors=True)
            if base is None and args.fanout_baseline:
                base = asyncio.run(_baseline(n, size, root))
            if not shared:
                unshared = ours["seconds"]
            ratio = ours["bytes"] / ours["size"]
            ok_time = "PASS" if ours["seconds"] <= TARGET_S else "MISS"
            ok_egress = "PASS" if ratio <= 1.2 else "MISS"
            t.misses += int(n >= 1000 and ok_time == "MISS") + int(ok_egress == "MISS")
            t.add(
                n,
                f"{int(ours['sessions'])} ({'shared' if shared else 'per device'})",
                int(ours["processes"]),
                f"{ours['seconds']:.1f}",
                f"{ours['seconds'] / unshared:.2f}x" if shared and unshared else "-",
                f"{ours['bytes'] / 1e6:.2f}",
                f"{ratio:.2f}x",
                f"{ours['coord_cpu']:.1f} / {ours['broker_cpu']:.1f} / {ours['workers_cpu']:.1f}",
                f"{ours['workers_rss'] / 1e9:.2f} (max {ours['worker_rss_max'] / 1e9:.2f})",
                f"{ours['broker_rss'] / 1e6:.0f}",
                f"{base['seconds']:.1f}" if base else "-",
                f"{base['bytes'] / 1e6:.0f}" if base else "-",
                f"{ours['seconds'] / base['seconds']:.1f}x" if base else "-",
                f"{n * size / max(ours['bytes'], 1):.0f}x",
                ok_time if n >= 1000 else "-",
                ok_egress,
            )
            if ours.get("repairs"):
                t.notes.append(
                    f"  {n} devices ({'shared' if shared else 'per-device'} sessions): chunks "
                    f"re-queued by wants, by reason: {ours['repairs']}"
                )
            floor = _floor(data, root) if profile else None
            if profile and (pt := _profile_table(n, root, ours["seconds"], floor)) is not None:
                profiles.append(pt)
            shutil.rmtree(root, ignore_errors=True)
    t.notes.append(
        "  procs: simulator worker processes (agents split across them); the coordinator and the broker run apart"
    )
    t.notes.append(
        "  sessions: ONNX Runtime sessions the simulator held: one per device, or shared by the "
        "devices of a worker process that load the same bytes (each device still downloads, "
        "verifies, writes its slot, self-tests and activates); vs per-device sessions: time "
        "against the per-device row of the same size in this run"
    )
    t.notes.append(
        "  ours: deploy() until every device reports active (download, chunk + file + signature checks, load, self-test, swap)"
    )
    t.notes.append(
        "  CPU s: over that interval, the coordinator (this process), mosquitto and the simulator "
        "workers together; peak RSS: VmHWM of the workers summed (the largest one) and of the broker"
    )
    t.notes.append(
        "  per-device: baseline, the same bytes sent once per device on its own topic over the same broker, "
        "until all received; ours/per-device = the agents' share on top of pure delivery; "
        "bytes saved: N x size over what the coordinator sent"
    )
    if args.fanout_profile and _pyspy.available() is None:
        t.notes.append("  no profile: py-spy not installed (pip install py-spy)")
    client.close()
    return [t, *profiles]
