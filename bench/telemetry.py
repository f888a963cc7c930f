"""Telemetry ingest: MQTT → database, sustained messages per second.

The broker holds a backlog of N telemetry messages (QoS 1, 1,000 device topics)
for a persistent session; the subscriber under test then connects and drains it.
That measures the subscriber's own sustained capacity, whatever the publishers
could do on the same two cores. Measured in the same run:

- raw: a bare paho client (its own network loop) that only counts messages;
- ours → SQLite / PostgreSQL: the coordinator's path (`TelemetrySubscriber` with
  its persistent session and shared subscription, `TelemetryIngest` decoding each
  message and writing batches with Core INSERT … ON CONFLICT DO NOTHING from its
  writer thread), timed until every row is committed. PostgreSQL is a throwaway cluster with default durability (fsync on);
- ours with N workers (`--telemetry-workers`): `fleet serve --ingest-workers N`'s
  `IngestPool`, N processes with one persistent session each in the shared group
  (the broker splits the backlog between them), timed on the workers' own clocks
  from the first CONNACK to the last commit.

Each drain also records CPU seconds per message of our process(es), of mosquitto
and of the PostgreSQL server: the cost that decides what two cores can sustain,
and a figure that other work on the machine does not inflate (msg/s it does).
`--telemetry-runs R` interleaves R rounds and reports medians.

Targets (issue 16): ≥ 15,000 msg/s into each database and ≥ 0.7× the raw
subscriber; a py-spy profile of our drain shows where the time goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import _pyspy
from bench._table import Table

TARGET_RATE = 15_000  # msg/s, issue 16
TARGET_RATIO = 0.7  # of a bare counting paho subscriber, same run

# where the ingest process's time goes: first phase with a marker in a stack's frames
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("acks: 1 QoS-0 PUBLISH per device per batch", ("TelemetrySubscriber._ack",)),
    ("SQL insert + commit (writer thread)", ("sqlalchemy", "sqlite3", "psycopg", "do_commit")),
    ("protobuf decode + row build", ("decode_telemetry", "decode_row", "FromString", "_row (")),
    ("buffer hand-off (add: lock, wake)", ("TelemetryIngest.add", "_on_message")),
    ("paho: PUBACK send", ("_send_puback",)),
    ("paho: packet read + PUBLISH decode", ("_packet_read", "_handle_publish", "decode_publish")),
    ("paho: socket", ("_sock_recv", "_sock_send", "loop_write")),
    ("bench poll loop (main thread)", ("_drain_ours",)),
)

DEVICES = 1000
TOPIC = "ef/v1/dev/{}/telemetry"
SESSION_EXPIRY = 600


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("telemetry")
    g.add_argument(
        "--telemetry-messages",
        type=int,
        default=150_000,
        help="backlog drained per subscriber (default 150000)",
    )
    g.add_argument(
        "--telemetry-workers",
        default="2",
        help="comma-separated ingest worker process counts measured besides the in-process "
        "path (fleet serve --ingest-workers; default 2; '' for none)",
    )
    g.add_argument(
        "--telemetry-runs",
        type=int,
        default=1,
        help="rounds over every subscriber, interleaved; the table shows medians (default 1)",
    )
    g.add_argument(
        "--telemetry-profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="py-spy our subscriber while it drains (default on, if installed)",
    )


def _payloads(n: int) -> list[tuple[str, bytes]]:
    from edgefleet.protos.fleet.v1 import device_pb2

    bounds = [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000]
    out = []
    now = int(time.time() * 1000)
    for i in range(n):
        dev = f"tel-{i % DEVICES:04d}"
        seq = i // DEVICES + 1
        m = device_pb2.Telemetry(
            device_id=dev,
            seq=seq,
            window_start_ms=now - 10_000,
            window_end_ms=now,
            predictions=100 + i % 50,
            errors=i % 7 == 0,
            rss_bytes=80_000_000 + i % 1000,
            cpu_percent=3.5,
        )
        m.active.model, m.active.version, m.active.variant = "digits", 3, "int8"
        m.latency.bounds_us.extend(bounds)
        m.latency.counts.extend([i % 5, 30, 40, 20, 5, 3, 1, 0, 0, 0, 1])
        m.latency.sum_us = 51234.0
        m.latency.count = 100
        out.append((TOPIC.format(dev), m.SerializeToString()))
    return out


def _client(client_id: str, *, v5: bool) -> Any:
    """A paho client with a persistent session (MQTT 5 with expiry, or 3.1.1)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    if v5:
        return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=False,
    )


def _connect(c: Any, port: int, *, v5: bool) -> None:
    if v5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY
        c.connect("127.0.0.1", port, 60, clean_start=False, properties=props)
    else:
        c.connect("127.0.0.1", port, 60)


def _create_session(client_id: str, port: int, topic_filter: str, *, v5: bool) -> None:
    """Connect once with a persistent session and subscribe, so the broker queues for it."""
    c = _client(client_id, v5=v5)
    _connect(c, port, v5=v5)
    done = threading.Event()
    c.on_subscribe = lambda *a: done.set()
    c.loop_start()
    c.subscribe(topic_filter, qos=1)
    if not done.wait(10):
        raise RuntimeError("no SUBACK from the broker")
    c.disconnect()
    c.loop_stop()


def _forget(port: int, client_ids: list[str]) -> None:
    """End these persistent sessions: an idle one in the shared group would take its share
    of the next backlog (and a plain one a copy of it)."""
    from edgefleet.cloud.telemetry.pool import forget_sessions
    from edgefleet.protos.transport import MqttSettings

    forget_sessions(MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id="-"), client_ids)


def _preload(port: int, messages: list[tuple[str, bytes]]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port, 60)
    c.loop_start()
    for start in range(0, len(messages), 5000):  # bounded: paho's queue has a limit
        infos = [c.publish(t, p, qos=1) for t, p in messages[start : start + 5000]]
        for info in infos:
            info.wait_for_publish(300)
    c.disconnect()
    c.loop_stop()


def _drain_raw(port: int, n: int, *, client_id: str, v5: bool) -> tuple[float, float]:
    c = _client(client_id, v5=v5)
    got = 0
    done = threading.Event()
    t0 = 0.0

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    c.on_message = on_message
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    _connect(c, port, v5=v5)
    c.loop_start()
    if not done.wait(600):
        raise RuntimeError(f"raw subscriber got {got} of {n}")
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    return n / elapsed, cpu


def _drain_ours(
    port: int, n: int, db_url: str, profile: Path | None = None
) -> tuple[float, int, float]:
    from edgefleet.cloud.telemetry import TelemetryIngest, TelemetryStore, TelemetrySubscriber
    from edgefleet.protos.transport import MqttSettings

    store = TelemetryStore(db_url)
    ingest = TelemetryIngest(store)
    sub = TelemetrySubscriber(
        MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id="bench-ours"),
        ingest,
    )
    rec = _pyspy.record(os.getpid(), profile) if profile is not None else None
    if rec is not None:
        time.sleep(1.0)  # py-spy attaches
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    sub.start()
    try:
        deadline = time.monotonic() + 600
        while ingest.written < n:
            if ingest.rejected:
                raise RuntimeError(f"{ingest.rejected} telemetry messages rejected")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ours wrote {ingest.written} of {n} rows")
            # coarse: a thread waking every few ms takes the GIL from the ingest's threads
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0  # this process: paho + writer + the poll loop
    finally:
        if rec is not None:
            rec.stop()
        sub.stop()
    rows = store.count()
    store.close()
    return n / elapsed, rows, cpu


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (gone ones count 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _postgres_cpu_s(url: str) -> float:
    """CPU seconds of the PostgreSQL server at `url` so far: its postmaster, its live
    children (backends, WAL writer, checkpointer) and the children it has reaped (a
    backend whose connection closed)."""
    import psutil

    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("postgres") and "-p" in cmd and port in cmd:
            t = p.cpu_times()
            own = t.user + t.system + t.children_user + t.children_system
            return own + _cpu_s([c.pid for c in p.children(recursive=True)])
    return 0.0


class _Cpu:
    """CPU seconds of the broker and the database server over a drain."""

    def __init__(self, broker_pid: int | None, db_url: str) -> None:
        self.broker = [broker_pid] if broker_pid else []
        self.db_url = db_url
        self.b0 = _cpu_s(self.broker)
        self.d0 = _postgres_cpu_s(db_url) if db_url.startswith("postgresql") else 0.0

    def end(self) -> tuple[float, float | None]:
        b = _cpu_s(self.broker) - self.b0
        if not self.db_url.startswith("postgresql"):
            return b, None  # SQLite runs inside the ingest process
        return b, _postgres_cpu_s(self.db_url) - self.d0


def _drain_pool(
    port: int, n: int, db_url: str, workers: int, profile: Path | None = None
) -> tuple[float, int, float]:
    """`fleet serve --ingest-workers N`'s path: N worker processes (`IngestPool`) drain
    their sessions' shares of the backlog; timed from the first worker's CONNACK (the
    processes' start-up is not the ingest's sustained rate) until every row is
    committed."""
    from edgefleet.cloud.telemetry import TelemetryStore
    from edgefleet.cloud.telemetry.pool import IngestPool
    from edgefleet.protos.transport import MqttSettings

    store = TelemetryStore(db_url)
    pool = IngestPool(
        workers,
        db_url=db_url,
        settings=MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id="bench-pool"),
        touch_devices=False,
    )
    rec = None
    pool.start()
    cpu0 = pool.cpu_s  # the processes' start-up (imports, connect): not the ingest's
    try:
        if profile is not None:
            pids = [p for p in pool.pids if p is not None]
            rec = [_pyspy.record(p, profile.with_suffix(f".{i}.pyspy")) for i, p in enumerate(pids)]
        deadline = time.monotonic() + 600
        while pool.written < n:
            if pool.rejected:
                raise RuntimeError(f"{pool.rejected} telemetry messages rejected")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers wrote {pool.written} of {n} rows")
            time.sleep(0.05)
        # the workers' own clocks: first CONNACK to the commit of the last batch (the
        # counter lines come every 0.5 s, so time.time() here would be up to that late)
        elapsed = pool.committed_at - pool.connected_at
    finally:
        for r in rec or []:
            if r is not None:
                r.stop()
        cpu = pool.cpu_s - cpu0  # read before stop: the shutdown flush is not ingest
        pool.stop()
    rows = store.count()
    store.close()
    return n / elapsed, rows, cpu


def _reset(db_url: str) -> None:
    """Empty the telemetry table between rounds (each drain writes the same keys)."""
    import sqlalchemy as sa

    from edgefleet.cloud.telemetry import TelemetryStore
    from edgefleet.cloud.telemetry.store import telemetry

    store = TelemetryStore(db_url)
    with store.database.engine.begin() as conn:
        conn.execute(sa.delete(telemetry))
    store.close()


def run(args: argparse.Namespace) -> list[Table]:
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.cloud.telemetry.ingest import SHARE_GROUP
    from tests.support.postgres import PostgresUnavailable, TempPostgres

    n = args.telemetry_messages
    messages = _payloads(n)
    size = sum(len(p) for _, p in messages) / n
    t = Table(
        f"telemetry ingest: drain a backlog of {n:,} messages ({size:.0f} B each, "
        f"{DEVICES} devices) from MQTT",
        [
            "subscriber",
            "msg/s",
            "vs raw",
            "rows stored",
            ">= 15,000/s",
            ">= 0.7x raw",
            "CPU µs/msg: ours",
            "broker",
            "PostgreSQL",
        ],
    )
    root = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    os.chmod(root, 0o777)
    pg: TempPostgres | None = TempPostgres(database="bench", durable=True)
    try:
        assert pg is not None
        pg_url: str | None = pg.__enter__()
    except PostgresUnavailable as e:
        pg, pg_url = None, None
        t.notes.append(f"  PostgreSQL skipped: {e}")
    try:
        with ManagedBroker(root / "broker", persistence=False, max_queued=n + 1000) as broker:
            port = int(broker.url.rsplit(":", 1)[1])
            # per run: msg/s, rows stored (None: raw), CPU s of ours, broker, database
            results: dict[str, list[tuple[float, int | None, float, float, float | None]]] = {}
            profiles: dict[str, list[Path]] = {}
            pool_sizes = [int(w) for w in str(args.telemetry_workers).split(",") if w.strip()]
            targets: list[tuple[str, str, int]] = [
                ("raw paho, MQTT 3.1.1 (count only)", "raw3", 0),
                ("raw paho, MQTT 5 (count only)", "raw5", 0),
                ("ours → SQLite", "sqlite", 0),
            ]
            targets += [(f"ours → SQLite, {w} workers", "sqlite", w) for w in pool_sizes]
            if pg_url:
                targets.append(("ours → PostgreSQL", "pg", 0))
                targets += [(f"ours → PostgreSQL, {w} workers", "pg", w) for w in pool_sizes]
            sqlite_url = f"sqlite:///{root / 'telemetry.db'}"
            for round_ in range(max(1, args.telemetry_runs)):
                for label, kind, workers in targets:
                    if kind.startswith("raw"):
                        cid, v5 = f"bench-{kind}", kind == "raw5"
                        _create_session(cid, port, TOPIC.format("+"), v5=v5)
                        _preload(port, messages)
                        cpu = _Cpu(broker.pid, "")
                        rate, ours = _drain_raw(port, n, client_id=cid, v5=v5)
                        b, _ = cpu.end()
                        _forget(port, [cid])
                        results.setdefault(label, []).append((rate, None, ours, b, None))
                        continue
                    url = sqlite_url if kind == "sqlite" else str(pg_url)
                    _reset(url)  # every drain writes the same (device, seq) keys
                    # the subscriptions the coordinator's ingest makes: one session, or one
                    # per worker (the broker splits the backlog between the group's sessions)
                    shared = f"$share/{SHARE_GROUP}/{TOPIC.format('+')}"
                    ids = [f"bench-pool-w{k}" for k in range(workers)] or ["bench-ours"]
                    for cid in ids:
                        _create_session(cid, port, shared, v5=False)
                    _preload(port, messages)
                    tag = f"{kind}{workers}-r{round_}"
                    prof = root / f"{tag}.pyspy" if args.telemetry_profile and not round_ else None
                    cpu = _Cpu(broker.pid, url)
                    if workers:
                        rate, rows, ours = _drain_pool(port, n, url, workers, prof)
                        paths = sorted(root.glob(f"{tag}.*.pyspy")) if prof else []
                    else:
                        rate, rows, ours = _drain_ours(port, n, url, prof)
                        paths = [prof] if prof else []
                    b, d = cpu.end()
                    _forget(port, ids)
                    results.setdefault(label, []).append((rate, rows, ours, b, d))
                    if paths:
                        profiles[label] = paths
            raw = statistics.median(r[0] for r in results[targets[0][0]])
            for label, runs in results.items():
                rate = statistics.median(r[0] for r in runs)
                stored = runs[-1][1]

                def us(i: int, runs: list[Any] = runs) -> str:
                    vals = [r[i] for r in runs if r[i] is not None]
                    return f"{statistics.median(vals) / n * 1e6:.0f}" if vals else "-"

                ok = "-" if stored is None else ("PASS" if rate >= TARGET_RATE else "MISS")
                ok_r = "-" if stored is None else ("PASS" if rate / raw >= TARGET_RATIO else "MISS")
                t.misses += (ok == "MISS") + (ok_r == "MISS")
                spread = (
                    f" ({min(r[0] for r in runs):,.0f}-{max(r[0] for r in runs):,.0f})"
                    if len(runs) > 1
                    else ""
                )
                t.add(
                    label,
                    f"{rate:,.0f}{spread}",
                    f"{rate / raw:.2f}x",
                    "-" if stored is None else f"{stored:,}",
                    ok,
                    ok_r,
                    us(2),
                    us(3),
                    us(4),
                )
    finally:
        if pg is not None:
            pg.__exit__(None, None, None)
    t.notes.append("  vs raw: against the bare MQTT 3.1.1 client (ours uses 3.1.1, see ingest.py)")
    t.notes.append(
        "  rows stored = rows in the table afterwards (duplicates of (device, seq) are ignored)"
    )
    if args.telemetry_runs > 1:
        t.notes.append(f"  msg/s: median of {args.telemetry_runs} interleaved rounds (min-max)")
    t.notes.append(
        "  N workers: `fleet serve --ingest-workers N` (IngestPool), timed from the first "
        "worker's CONNACK"
    )
    t.notes.append(
        "  CPU µs/msg: user+system CPU over the drain per message (medians): ours = the "
        "subscriber's process(es) (SQLite runs inside them), broker = mosquitto, PostgreSQL = "
        "its server processes; unlike msg/s, load from other work does not inflate it"
    )
    tables = [t]
    for label, paths in profiles.items():
        samples = _pyspy.stacks(paths)
        total = sum(samples.values())
        if not total:
            continue
        rate = statistics.median(r[0] for r in results[label])
        p = Table(
            f"telemetry ingest profile, {label}: py-spy {_pyspy.RATE} Hz over the drain (busy threads)",
            ["phase", "thread-s", "share", "µs per message"],
        )
        for name, k in sorted(_pyspy.phases(samples, PHASES).items(), key=lambda kv: -kv[1]):
            p.add(
                name,
                f"{k / _pyspy.RATE:.1f}",
                f"{k / total:.0%}",
                f"{k / _pyspy.RATE / n * 1e6:.0f}",
            )
        p.add("total", f"{total / _pyspy.RATE:.1f}", "100%", f"{total / _pyspy.RATE / n * 1e6:.0f}")
        threads = _pyspy.threads(samples)
        p.notes.append(
            "  by thread: "
            + ", ".join(f"{name} {k / _pyspy.RATE:.1f} s" for name, k in threads[:4])
            + f"; drain wall {n / rate:.1f} s"
        )
        top = ", ".join(f"{f} {k / total:.0%}" for f, k in _pyspy.top_frames(samples, 6))
        p.notes.append(f"  top self frames: {top}")
        tables.append(p)
    shutil.rmtree(root, ignore_errors=True)  # broker state, SQLite file, profiles
    return tables
