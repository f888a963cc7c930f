"""Two coordinator replicas (`fleet serve --replica`) on a real PostgreSQL, moto's S3
server and a broker, 50 real agents (SimCluster, own credentials), a staged rollout:
the leader is SIGKILLed (or, slow, SIGSTOPped) during the canary's bake, the other
replica takes over and finishes the rollout; every device ends on the new version,
updated once; every telemetry window is stored exactly once across the replicas.

The broker is one Mosquitto (shared subscriptions: each window reaches one replica),
or (slow, `nats-kill`) a 3-node NATS cluster: the replicas on different nodes, the
agents spread over all three, everyone on MQTT 3.1.1; NATS has no shared
subscriptions, so every window reaches both replicas and the (device, seq) key keeps
one row; `nats-node` (slow) kills the NATS node under the leader instead, and the leader
leads on from another node. Federated calls on a follower name the leader; replica mode
on SQLite is refused in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.config import ServeInfo, load_settings
from edgefleet.cloud.db import Database
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.identity import IdentityStore
from edgefleet.cloud.replicas import ReplicaStore
from edgefleet.cloud.rollouts import RolloutStore
from edgefleet.protos.errors import NotFound
from edgefleet.simulator.cluster import SimCluster
from tests.conftest import Cli, CliResult
from tests.contract.conftest import _AWS_ENV
from tests.e2e.test_rollouts import _stop
from tests.support.identity import SecureBroker
from tests.support.nats import NatsCluster, find_nats_server, nats_version
from tests.support.postgres import PostgresUnavailable, TempPostgres

REPO = Path(__file__).resolve().parents[2]
N = 50
LEASE_S = 2.0

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

AWS_ENV = _AWS_ENV  # fake credentials: boto3 signs requests for moto only


@dataclass(frozen=True)
class Shared:
    home: Path  # FLEET_HOME of replica a (keys, config.toml naming PostgreSQL and S3)
    db_url: str
    root: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """PostgreSQL, moto's S3 (one bucket) and a home on them with digits:1 and :2."""
    from moto.server import ThreadedMotoServer

    from edgefleet.cloud.client import LocalClient

    root = tmp_path_factory.mktemp("replicas")
    pg = TempPostgres()
    try:
        db_url = pg.__enter__()
    except PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {e}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable ({e})")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        s3.start()
        try:
            import boto3

            host, port = s3.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket="fleet"
            )
            home = root / "home-a"
            client = LocalClient(
                load_settings(
                    home=home,
                    db_url=db_url,
                    artifact_uri="s3://fleet/artifacts",
                    s3_endpoint_url=endpoint,
                )
            )
            client.init()
            kw = {"arch": "mlp", "batch_size": 64, "lr": 3e-3, "on_epoch": None}
            client.train("digits", "digits", epochs=3, seed=0, **kw)
            client.train("digits", "digits", epochs=3, seed=1, **kw)
            client.close()
            yield Shared(home=home, db_url=db_url, root=root)
        finally:
            s3.stop()
            pg.__exit__(None, None, None)


def serve_replica(
    home: Path, name: str, broker_url: str, *options: str, verbose: bool = False
) -> tuple[subprocess.Popen[bytes], ServeInfo]:
    """Start `fleet serve --replica` (its log in HOME/serve.log; `verbose`: at INFO)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "AWS_"))}
    env.update(AWS_ENV, PYTHONPATH=str(REPO))
    log = (home / "serve.log").open("ab")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(home)),
            *(["-v"] if verbose else []),
            "serve",
            *("--replica", "--replica-id", name, "--lease", str(LEASE_S)),
            *("--broker", broker_url, "--grpc-listen", "127.0.0.1:0"),
            *("--metrics-listen", "127.0.0.1:0"),
            *options,
        ],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    log.close()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"replica {name} exited with {proc.returncode}: {(home / 'serve.log').read_text()[-2000:]}"
            )
        info = ServeInfo.read(home / "serve.json")
        if info is not None and info.pid == proc.pid:
            return proc, info
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    pytest.fail(f"replica {name} did not start within 90 s")


def counted(metrics_url: str, name: str = "written") -> float:
    """A telemetry counter of the replica's /metrics: `written` (new rows committed),
    `received` (windows decoded)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"edgefleet_telemetry_{name}_total "):
                return float(line.split()[1])
    return 0.0


def nats_skip() -> str | None:
    """Why the NATS case cannot run here (None: it can)."""
    try:
        if nats_version(find_nats_server()) < (2, 9):
            return "nats-server older than 2.9 (MQTT + JetStream)"
    except NotFound:
        return "nats-server is not installed (make system-deps)"
    return None


def snapshot(
    rid: str,
    rollouts: RolloutStore,
    devices: DeviceStore,
    replicas: ReplicaStore,
    selector: Selector,
    cluster: SimCluster,
    nats: NatsCluster | None,
    homes: dict[str, Path],
) -> str:
    """Where everything stood when a rollout did not finish: the rollout and its stages,
    every device (rollout row, database row, the agents' own counts), the replicas, the
    NATS nodes (who is connected where, JetStream) and the logs' tails; for the next
    person reading a CI failure."""
    out: list[str] = []

    def add(what: str, fn: object) -> None:
        try:
            out.append(f"{what}: {fn() if callable(fn) else fn}")
        except Exception as e:  # a dead node or a closed database must not hide the rest
            out.append(f"{what}: ({e!r})")

    r = rollouts.get(rid)
    out.append(f"rollout {rid}: state={r.state} stage={r.stage} reason={r.reason!r}")
    now = time.time()
    for i, st in enumerate(r.stages):
        out.append(
            f"  stage {i} {st.name}: {st.state} devices={st.devices} samples={st.samples} "
            f"by_state={dict(st.by_state)} started={now - st.started_at if st.started_at else 0:.1f}s ago "
            f"bake_started={now - st.bake_started_at if st.bake_started_at else 0:.1f}s ago "
            f"gates={[(g.name, g.ok) for g in st.gates]}"
        )
    rows = {d.device_id: d for d in rollouts.devices(rid)}
    db = {d.device_id: d for d in devices.find(selector)}
    unsettled = []
    for dev in sorted(set(rows) | set(db)):
        rd, d = rows.get(dev), db.get(dev)
        line = (
            f"  {dev}: rollout(stage={rd.stage if rd else '-'} phase={rd.phase if rd else '-'} "
            f"action={rd.action if rd else '-'} gen={rd.generation if rd else '-'} "
            f"state={rd.state if rd else '-'} shadow={dict(rd.shadow) if rd else '-'}) "
            f"db(online={d.online if d else '-'} desired_gen={d.desired_generation if d else '-'} "
            f"reported={(d.reported.generation, str(d.reported.state)) if d and d.reported else None} "
            f"last_seen={(now - d.last_seen.timestamp()) if d and d.last_seen else -1:.1f}s ago)"
        )
        if rd is None or (rd.phase, rd.state) != ("active", "active"):
            unsettled.append(line)
    out.append(f"devices not active/active in the rollout ({len(unsettled)} of {len(rows)}):")
    out.extend(unsettled[:60])
    add("agents' update states", lambda: dict(cluster.states()))
    add("agents' versions", lambda: dict(cluster.active_versions()))
    add("agents online", cluster.online)
    add("simulator workers failed", cluster.failed_workers)
    add(
        "replicas",
        lambda: [(x.replica_id, x.leader, x.token, x.address) for x in replicas.list()],
    )
    if nats is not None:
        for i in range(len(nats.nodes)):
            if i not in nats.alive():
                out.append(f"nats node n{i}: dead")
                continue
            add(f"nats node n{i} clients", lambda i=i: sorted(nats.mqtt_clients(i)))

            def jsz(i: int = i) -> str:
                url = f"http://127.0.0.1:{nats.nodes[i].http_port}/jsz?streams=true&consumers=true"
                with urllib.request.urlopen(url, timeout=10) as resp:
                    doc = json.load(resp)
                meta = doc.get("meta_cluster", {})
                streams = [
                    (
                        sd.get("name"),
                        sd.get("state", {}).get("messages"),
                        (sd.get("cluster") or {}).get("leader"),
                        len(sd.get("consumer_detail") or []),
                    )
                    for a in doc.get("account_details", [])
                    for sd in a.get("stream_detail", [])
                ]
                return f"meta leader {meta.get('leader')}; streams {streams}"

            add(f"nats node n{i} jetstream", jsz)
    for home in homes.values():
        log = home / "serve.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        out.append(f"--- {log} (last 40 lines) ---")
        out.extend(line[:400] for line in text.splitlines()[-40:])
    out.append(f"(kept: {cluster.state_root}/worker-*.log, nats logs under the test's tmp root)")
    return "\n".join(out)


CLUSTER = [pytest.mark.slow, pytest.mark.cluster]


@pytest.mark.parametrize(
    ("fault", "broker_kind"),
    [
        pytest.param("kill", "mosquitto", id="kill"),
        pytest.param("pause", "mosquitto", id="pause", marks=CLUSTER),
        pytest.param("kill", "nats", id="nats-kill", marks=CLUSTER),
        # slow only, not yet back in `make test-cluster`: its hang (the node died while
        # the leader published the canary's activation; the controller retried the step)
        # is fixed (test_rollouts' broker-away case) and it passed 7 of 7 since, but two
        # other failures were seen once each in 16 runs on a loaded machine (a canary
        # device that never settled before the fault; the 2 s lease lost after the
        # kill); on a timeout it now dumps where everything stood
        pytest.param("node", "nats", id="nats-node", marks=pytest.mark.slow),
    ],
)
def test_leader_lost_during_the_canary_bake_another_replica_finishes_the_rollout(
    shared: Shared, request: pytest.FixtureRequest, cli: Cli, fault: str, broker_kind: str
) -> None:
    """`kill`: SIGKILL. `pause` (slow): SIGSTOP, so its session and lock linger until
    the lease runs out; after the takeover it gets SIGCONT and must step down without
    acting (its writes are fenced) and stay on as a follower. `nats-kill` (slow): SIGKILL
    with the replicas and agents on a 3-node NATS cluster. `nats-node` (slow): the NATS
    node the leader is connected to is SIGKILLed instead: the leader's clients and that
    node's devices move to the next node, and the leader leads on in the same term."""
    from edgefleet.cloud.client import read_token

    case = request.node.callspec.id
    if broker_kind == "nats" and (why := nats_skip()) is not None:
        pytest.skip(why)
    settings = load_settings(home=shared.home)
    token = read_token(settings.token_path)
    # both replicas connect with FLEET_HOME's coordinator credential (made here, before
    # the copy: an operator copies keys/ to every replica)
    identities = IdentityStore(settings.identity_dir)
    identities.coordinator()  # (NATS writes its users from it: before the copy too)
    nats: NatsCluster | None = None
    if broker_kind == "nats":
        nats = NatsCluster(shared.root / f"nats-{case}", identities)
        # each replica on its own node first, then the others (its MQTT clients fail over)
        replica_urls = [",".join(nats.urls_from(0)), ",".join(nats.urls_from(1))]
        agent_url, spread, mqtt_version = nats.mqtt_urls[0], nats.mqtt_urls, "3.1.1"
    else:
        broker: SecureBroker = request.getfixturevalue("broker")
        broker.use_identities(identities)
        replica_urls = [broker.coordinator_url] * 2
        agent_url, spread, mqtt_version = broker.url, [], "auto"
    a, b, group = f"{case}-a", f"{case}-b", f"rep-{case}"
    home_b = shared.root / f"home-{b}"  # the other replica: a copy of the keys and settings
    shutil.copytree(shared.home, home_b, ignore=shutil.ignore_patterns("serve.*"))
    db = Database(shared.db_url)
    devices, rollouts, replicas = DeviceStore(db), RolloutStore(db), ReplicaStore(db)
    cluster = SimCluster(
        N,
        broker_url=agent_url,
        public_key_pem=settings.public_key_path.read_text(),
        state_root=shared.root / f"devices-{case}",
        processes=2,
        profile="cpu",
        id_prefix=case,
        want_interval=0.5,
        telemetry_interval=1.0,
        spread=spread,  # NATS: device i on node i % 3 first
        mqtt_version=mqtt_version,
        log_level="INFO" if nats is not None else "WARNING",  # worker-*.log: read on failure
    )
    if nats is not None:
        cluster.credentials = nats.enroll(cluster.ids())
    else:
        broker.enroll_fleet(cluster)
    for e in cluster.ids_for_enrollment():
        devices.enroll(e.device_id, group=group)
    selector = Selector.parse(f"group={group}")
    data = shared.root / "traffic.npz"
    from edgefleet.models.data import load_dataset

    ds = load_dataset("digits")
    np.savez(data, X=ds.x.astype(np.float32), y=ds.y)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    infos: dict[str, ServeInfo] = {}
    homes = {a: shared.home, b: home_b}

    def fleet(address: str, *args: str) -> CliResult:
        return cli("--coordinator", address, "--token", token, *args)

    async def leader() -> str:
        while True:
            lead = [r for r in await asyncio.to_thread(replicas.list) if r.leader]
            if lead:
                return lead[0].replica_id
            await asyncio.sleep(0.05)

    async def main() -> None:
        for (name, home), url in zip(((a, shared.home), (b, home_b)), replica_urls, strict=True):
            procs[name], infos[name] = await asyncio.to_thread(
                partial(serve_replica, home, name, url, verbose=nats is not None)
            )
        async with cluster:
            await cluster.wait(lambda: cluster.online() == N, 60, what="all online")
            async with asyncio.timeout(60):  # the replicas recorded their births
                while len(await asyncio.to_thread(devices.find, selector, online=True)) < N:
                    await asyncio.sleep(0.2)
            if nats is not None:  # spread over the nodes: device i on node i % 3 first
                ids = cluster.ids()
                on = [await asyncio.to_thread(nats.mqtt_clients, i) for i in range(3)]
                assert set(ids) <= set().union(*on)
                for i, clients in enumerate(on):
                    # (a node that refused a connect at once, JetStream busy, sent that
                    # device on to the next node of its list: most stay where planned)
                    mine = set(ids[i::3])
                    assert len(mine & clients) >= len(mine) // 2, (i, sorted(mine - clients))
                # the replicas' control clients on two different nodes
                coords = [
                    i for i, c in enumerate(on) if any(x.startswith("coordinator-") for x in c)
                ]
                assert len(coords) == 2, on
            async with asyncio.timeout(30):
                first = await leader()
            other = b if first == a else a
            # fleet status (through the follower) names both replicas and the leader
            st = await asyncio.to_thread(fleet, infos[other].grpc, "status", "--json")
            doc = json.loads(st.out)
            assert doc["leader"] == first
            listed = {r["replica_id"]: r["address"] for r in doc["replicas"]}
            assert {k: v for k, v in listed.items() if k in infos} == {
                n: i.grpc for n, i in infos.items()
            }  # (a replica killed by an earlier test stays listed for an hour)
            # a baseline through the follower: the leader's controller runs it
            plain = await asyncio.to_thread(
                fleet, infos[other].grpc, "deploy", "digits:1", "--to", f"group={group}",
                "--timeout", "90",
            )  # fmt: skip
            assert plain.code == 0 and f"{N} of {N} active" in plain.err, plain.err
            await cluster.traffic(data, rate=2.0)
            made = await asyncio.to_thread(
                fleet, infos[other].grpc,
                *("deploy", "digits:2", "--to", f"group={group}", "--canary", "10%"),
                *("--waves", "100%", "--bake", "6s", "--min-agreement", "0.5"),
                *("--min-samples", "5", "--no-watch", "--json"),
            )  # fmt: skip
            assert made.code == 0, made.err
            rid = json.loads(made.out)["rollout_id"]
            try:
                async with asyncio.timeout(90):
                    while (cur := await asyncio.to_thread(rollouts.get, rid)).current.state != (
                        "baking"
                    ):
                        await asyncio.sleep(0.05)
            except TimeoutError:
                what = await asyncio.to_thread(
                    snapshot, rid, rollouts, devices, replicas, selector, cluster, nats, homes
                )
                pytest.fail(f"rollout {rid}: the canary not baking within 90 s:\n{what}")
            # both replicas ingest telemetry: the shared subscription spreads the windows
            # (NATS: each gets every window; whichever commits first writes the row)
            got = {
                n: await asyncio.to_thread(counted, i.metrics, "received") for n, i in infos.items()
            }
            assert all(v > 0 for v in got.values()), got
            ingested = {n: await asyncio.to_thread(counted, i.metrics) for n, i in infos.items()}
            if nats is None:
                assert all(v > 0 for v in ingested.values()), ingested
            else:  # NATS refused the shared subscription: each replica took a plain one
                for home in homes.values():
                    assert (
                        "subscribing to ef/v1/dev/+/telemetry instead"
                        in (home / "serve.log").read_text()
                    )
            token_before = next(r.token for r in await asyncio.to_thread(replicas.list) if r.leader)
            killed_at = time.monotonic()
            lead_after, live = other, [other]  # who leads at the end; whose metrics count
            if fault == "kill":
                procs[first].send_signal(signal.SIGKILL)  # no cleanup of any kind
                await asyncio.to_thread(procs[first].wait)
            elif fault == "pause":
                procs[first].send_signal(signal.SIGSTOP)
            else:  # the broker node under the leader dies, not the leader
                assert nats is not None
                lead_after, live = first, [a, b]
                await asyncio.to_thread(nats.kill, 0 if first == a else 1)
            before = await asyncio.to_thread(rollouts.get, rid)
            assert (before.state, before.stage, before.current.state) == ("canary", 0, "baking")
            failover_s = 0.0
            if fault != "node":
                async with asyncio.timeout(4 * LEASE_S + 10):
                    while await leader() != other:
                        await asyncio.sleep(0.05)
                failover_s = time.monotonic() - killed_at
                now = {r.replica_id: r for r in await asyncio.to_thread(replicas.list)}
                assert now[other].leader and now[other].token > token_before
                assert not now[first].leader  # the dead one stays listed, its heartbeat ageing
            if fault == "pause":  # back from its pause: it must find out and follow
                procs[first].send_signal(signal.SIGCONT)
                log = homes[first] / "serve.log"
                async with asyncio.timeout(30):
                    while f"replica {first} stops leading" not in log.read_text():
                        await asyncio.sleep(0.1)
            try:
                async with asyncio.timeout(150):
                    while (cur := await asyncio.to_thread(rollouts.get, rid)).state not in (
                        "done", "rolled_back", "paused", "aborted",
                    ):  # fmt: skip
                        await asyncio.sleep(0.2)
            except TimeoutError:
                what = await asyncio.to_thread(
                    snapshot, rid, rollouts, devices, replicas, selector, cluster, nats, homes
                )
                pytest.fail(f"rollout {rid} not finished 150 s after the fault:\n{what}")
            assert cur.state == "done", (cur.state, cur.reason)
            # the bake kept its start across the failover
            assert cur.stages[0].bake_started_at == before.stages[0].bake_started_at
            devs = await asyncio.to_thread(rollouts.devices, rid)
            assert len(devs) == N
            assert {(d.phase, d.state) for d in devs} == {("active", "active")}
            # per-device update history: baseline, shadow, activation; nobody updated twice
            # or skipped
            gens = {d.device_id: d.desired_generation for d in devices.find(selector)}
            assert gens == dict.fromkeys(cluster.ids(), 3)
            assert {d.generation for d in devs if d.action == "activate"} == {3}
            await cluster.wait(
                lambda: cluster.active_versions() == {"digits:2": N}, 60, what="all on digits:2"
            )
            await cluster.traffic(data, rate=0)
            # telemetry: every window of every device stored once (none lost at the kill:
            # a window the dead replica took is sent again and lands on the survivor)
            windows: dict[str, list[int]] = {}
            dupes: list[object] = []
            async with asyncio.timeout(90):
                while True:
                    with db.engine.connect() as conn:
                        rows = conn.execute(
                            sa.text(
                                "SELECT device_id, seq, count(*) FROM telemetry "
                                "WHERE device_id LIKE :p GROUP BY device_id, seq"
                            ),
                            {"p": f"{case}-%"},
                        ).all()
                    dupes = [r for r in rows if r[2] != 1]
                    windows = {}
                    for dev, seq, _n in rows:
                        windows.setdefault(str(dev), []).append(int(seq))
                    gaps = {
                        d: sorted(set(range(1, max(s) + 1)) - set(s)) for d, s in windows.items()
                    }
                    if len(windows) == N and not any(gaps.values()):
                        break
                    await asyncio.sleep(1.0)
            assert not dupes
            assert min(len(s) for s in windows.values()) >= 5
            after = [await asyncio.to_thread(counted, infos[n].metrics) for n in live]
            assert sum(after) > sum(ingested[n] for n in live)
            if nats is not None:  # they got the windows the other one stored too, kept none
                dup = [
                    await asyncio.to_thread(counted, infos[n].metrics, "duplicated") for n in live
                ]
                assert sum(dup) > 0
            st = await asyncio.to_thread(fleet, infos[other].grpc, "status", "--json")
            doc = json.loads(st.out)
            assert doc["leader"] == lead_after
            assert [r["replica_id"] for r in doc["replicas"] if r["leader"]] == [lead_after]
            if fault == "node":
                assert nats is not None
                # one term throughout: no replica took over while the node was down
                now = {r.replica_id: r for r in await asyncio.to_thread(replicas.list)}
                assert now[first].leader and now[first].token == token_before
                # every device and both replicas now on the two surviving nodes
                on = [await asyncio.to_thread(nats.mqtt_clients, i) for i in nats.alive()]
                assert set(cluster.ids()) <= set().union(*on)
                assert sum(x.startswith("coordinator-") for c in on for x in c) == 2, on
                print(f"\nbroker node under leader {first} killed; it led on; ", end="")
            else:
                stale = next(r for r in doc["replicas"] if r["replica_id"] == first)
                assert stale["leader"] is False and stale["last_heartbeat_s"] >= 0
                print(
                    f"\nfailover ({case}): leader {first} lost, {other} leads after "
                    f"{failover_s:.2f}s (lease {LEASE_S:g}s); ",
                    end="",
                )
            print(f"{sum(len(s) for s in windows.values())} telemetry rows")

    try:
        if nats is not None:
            nats.start()
        asyncio.run(main())
    finally:
        for p in procs.values():
            _stop(p)
        if nats is not None:
            nats.stop()
        db.close()


def test_federated_calls_on_a_follower_name_the_leader_in_one_line(
    shared: Shared, broker: SecureBroker, cli: Cli
) -> None:
    """`fleet fl start` sent to a follower started with --fl: refused in one line naming
    the leader and its address (the leader's SuperLink runs the rounds; no Flower needed
    here: the leader is a lease the test holds). Reading runs works on the follower: `fl ls`,
    `fl show` and `fl watch` serve what the leader writes to the shared database."""
    import threading

    from edgefleet.cloud.client import read_token
    from edgefleet.cloud.fl.store import FlRun, FlStore
    from edgefleet.cloud.replicas.lease import LeaderLease

    settings = load_settings(home=shared.home)
    token = read_token(settings.token_path)
    broker.use_identities(IdentityStore(settings.identity_dir))
    db = Database(shared.db_url)
    lease = LeaderLease(db, "fl-leader", lease_s=120)
    proc: subprocess.Popen[bytes] | None = None
    try:
        assert lease.try_acquire() is not None
        ReplicaStore(db).heartbeat("fl-leader", "10.0.0.9:7443")
        proc, info = serve_replica(shared.home, "fl-follower", broker.coordinator_url, "--fl")
        r = cli("--coordinator", info.grpc, "--token", token, "fl", "start", "digits:1")
        lines = [line for line in r.err.splitlines() if line.strip()]
        assert r.code == 1 and len(lines) == 1, r.err
        assert lines[0] == (
            "error (unavailable): replica fl-follower does not lead: federated learning "
            "runs on the leader fl-leader at 10.0.0.9:7443; send it there "
            "(fleet --coordinator 10.0.0.9:7443 fl …)"
        ), lines[0]

        # a run as the leader's federation writes it, read through the follower
        runs = FlStore(db)
        run_id = f"fl-on-follower-{os.getpid()}"
        runs.create_run(
            FlRun(run_id, "digits", 1, "fedavg", 2, {}, "running", participants=("d1", "d2"))
        )
        runs.update_run(run_id, history_append={"round": 1, "accuracy": 0.91})
        via = ("--coordinator", info.grpc, "--token", token)
        listed = cli(*via, "fl", "ls", "--json")
        assert listed.code == 0, listed.err
        assert run_id in [x["run_id"] for x in json.loads(listed.out)]
        shown = cli(*via, "fl", "show", run_id, "--json")
        assert shown.code == 0, shown.err
        doc = json.loads(shown.out)
        assert doc["status"] == "running" and doc["participants"] == ["d1", "d2"]

        def leader_finishes() -> None:
            time.sleep(1.5)
            runs.update_run(run_id, history_append={"round": 2, "accuracy": 0.93})
            runs.update_run(run_id, status="succeeded", result_version=2)

        finisher = threading.Thread(target=leader_finishes)
        finisher.start()
        watched = cli(*via, "fl", "watch", run_id, "--json")
        finisher.join()
        assert watched.code == 0, watched.err
        done = json.loads(watched.out)
        assert done["status"] == "succeeded" and done["result"] == "digits:2"
        assert [h["round"] for h in done["history"]] == [1, 2]
    finally:
        if proc is not None:
            _stop(proc)
        lease.release()
        lease.close()
        ReplicaStore(db).remove("fl-leader")
        db.close()


def test_replica_mode_on_sqlite_is_refused_in_one_line(fleet_home: Path) -> None:
    from edgefleet.cloud.cli.main import run

    assert run(["--home", str(fleet_home), "init"]) == 0
    r = subprocess.run(
        [
            *(sys.executable, "-m", "edgefleet.cloud.cli.main", "--home", str(fleet_home)),
            *("serve", "--replica", "--broker", "mqtt://127.0.0.1:1", "--metrics-listen", "off"),
        ],
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
            "PYTHONPATH": str(REPO),
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "--replica needs a shared database: sqlite" in lines[0]
    assert "accepted: PostgreSQL" in lines[0]
