"""A real 3-node NATS cluster (JetStream, MQTT listener on every node) for the tests.

Each node has its own server_name, store dir, client, route and MQTT port on 127.0.0.1;
the routes name all three nodes. The MQTT streams are replicated on every node
(`stream_replicas`), so retained messages and sessions outlive one node. Users and
their subject permissions come from an `IdentityStore` through
`cloud.identity.nats` (what `fleet broker acl --format nats` writes), so devices use
their enrolled passwords and cannot touch another device's topics.

    with NatsCluster(tmp / "nats", identities, prefixes=["t-x"]) as cluster:
        cluster.mqtt_urls        # one per node
        cluster.mqtt_clients(0)  # MQTT client ids connected to node 0 (its /connz)
        cluster.kill(1)          # SIGKILL node 1
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edgefleet.cloud.broker import free_port
from edgefleet.cloud.identity import IdentityStore
from edgefleet.cloud.identity.nats import nats_authorization
from edgefleet.cloud.identity.passwords import bcrypt_hash
from edgefleet.protos.errors import FleetError, NotFound, Unavailable
from edgefleet.protos.topics import Topics
from edgefleet.protos.transport import MqttAccess, MqttSettings, MqttTransport, MqttVersion

NATS_SERVER = "/usr/sbin/nats-server"
HOST = "127.0.0.1"
#: the tests' own observer, with the coordinator's rights
WATCHER = "watcher@edgefleet"


def find_nats_server() -> str:
    path = shutil.which("nats-server") or (NATS_SERVER if os.path.exists(NATS_SERVER) else None)
    if path is None:
        raise NotFound("nats-server is not installed (Debian: apt-get install nats-server)")
    return path


def nats_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    # "nats-server: v2.9.10"
    return tuple(int(p) for p in out.stdout.strip().rsplit("v", 1)[-1].split(".")[:3])


@dataclass(frozen=True)
class Node:
    name: str
    client_port: int
    route_port: int
    mqtt_port: int
    http_port: int  # monitoring (/connz)
    store: Path
    conf: Path
    log: Path

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"


class NatsCluster:
    def __init__(
        self,
        root: Path,
        identities: IdentityStore,
        *,
        prefixes: Sequence[str] = ("ef/v1",),
        size: int = 3,
        auth_text: str | None = None,
    ) -> None:
        self.binary = find_nats_server()
        self.root = root
        self.identities = identities
        self.topics = [Topics(p) for p in prefixes]
        self.watcher_password = f"w-{uuid.uuid4().hex}"
        root.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            Node(
                name=f"n{i}",
                client_port=free_port(HOST),
                route_port=free_port(HOST),
                mqtt_port=free_port(HOST),
                http_port=free_port(HOST),
                store=root / f"n{i}" / "store",
                conf=root / f"n{i}" / "nats.conf",
                log=root / f"n{i}" / "nats.log",
            )
            for i in range(size)
        ]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.auth = root / "auth.conf"
        #: a given auth.conf (e.g. what `fleet broker acl --format nats` wrote) instead
        #: of one generated here (then the watcher has no user)
        self.auth_text = auth_text

    # -- configuration ------------------------------------------------------------------

    def write_auth(self) -> None:
        """(Re)write auth.conf from the identity store (every enrolled device)."""
        text = self.auth_text if self.auth_text is not None else self._auth()
        self.auth.write_text(text)
        for node in self.nodes:  # NATS resolves `include` next to the including file
            node.conf.parent.mkdir(parents=True, exist_ok=True)
            (node.conf.parent / "auth.conf").write_text(text)

    def _auth(self) -> str:
        own = self.identities.coordinator()
        return nats_authorization(
            self.identities.bcrypt_hashes(kind="device"),
            (own.username, bcrypt_hash(own.password)),
            topics=self.topics,
            extra={WATCHER: (bcrypt_hash(self.watcher_password), self.topics)},
        )

    def _conf(self, node: Node) -> str:
        routes = ", ".join(f"nats-route://{HOST}:{n.route_port}" for n in self.nodes)
        cluster = (
            f"cluster {{ name: edgefleet, listen: {HOST}:{node.route_port}, routes: [{routes}] }}"
            if len(self.nodes) > 1
            else ""
        )
        return "\n".join(
            [
                f"server_name: {node.name}",
                f"listen: {HOST}:{node.client_port}",
                f"http: {HOST}:{node.http_port}",
                f'jetstream {{ store_dir: "{node.store}" }}',
                cluster,
                # retained messages and sessions on every node: one may die
                f"mqtt {{ listen: {HOST}:{node.mqtt_port}, stream_replicas: {len(self.nodes)} }}",
                'include "auth.conf"',
                "",
            ]
        )

    # -- processes ------------------------------------------------------------------------

    def start(self, index: int | None = None, *, probe: bool = True) -> None:
        """Start every node (or one), then wait until the cluster stores retained messages
        (`probe`: needs the watcher, so not with a given `auth_text`)."""
        self.write_auth()
        for i in range(len(self.nodes)) if index is None else [index]:
            node = self.nodes[i]
            node.store.mkdir(parents=True, exist_ok=True)
            node.conf.write_text(self._conf(node))
            log = node.log.open("ab")
            self.procs[i] = subprocess.Popen(
                [self.binary, "-c", str(node.conf)], stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
        if probe:
            self.wait_ready()

    def kill(self, index: int) -> None:
        """SIGKILL one node (no clean shutdown of its connections or streams)."""
        proc = self.procs[index]
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            self.procs[index] = None

    def reload(self) -> None:
        """Rewrite auth.conf and have every live node reload it (SIGHUP)."""
        self.write_auth()
        for proc in self.procs:
            if proc is not None:
                proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for i, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.procs[i] = None

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every live node takes an MQTT connection and a retained QoS 1 message
        published on one node reaches a fresh subscriber on every other (JetStream has a
        meta leader and the MQTT streams exist with their replicas)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None:
                    raise Unavailable(
                        f"nats node {self.nodes[i].name} exited ({proc.returncode}): "
                        f"{self.nodes[i].log.read_text()[-2000:]}"
                    )
            try:
                asyncio.run(self._probe())
                return
            except (FleetError, OSError, TimeoutError) as e:
                last = e
                time.sleep(0.5)
        raise Unavailable(f"NATS cluster not ready in {timeout:g}s: {last}")

    async def _probe(self) -> None:
        live = self.alive()
        topic = f"{self.topics[0].prefix}/probe/{uuid.uuid4().hex[:8]}"
        payload = uuid.uuid4().hex.encode()
        pub = MqttTransport(self.watcher(f"probe-pub-{live[0]}", node=live[0]))
        async with asyncio.timeout(10), pub:
            await pub.wait_connected(timeout=5)
            await pub.publish(topic, payload, qos=1, retain=True)
            for i in live:
                sub = MqttTransport(self.watcher(f"probe-sub-{i}", node=i))
                async with sub:
                    await sub.wait_connected(timeout=5)
                    inbox = sub.messages()
                    await sub.subscribe(topic, qos=1)
                    async for msg in inbox:
                        if msg.payload == payload:
                            break
            await pub.publish(topic, b"", qos=1, retain=True)  # clear it

    # -- who and where --------------------------------------------------------------------

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    def mqtt_clients(self, index: int) -> set[str]:
        """The MQTT client ids connected to node `index` now (its monitoring /connz)."""
        url = f"http://{HOST}:{self.nodes[index].http_port}/connz?limit=100000"
        with urllib.request.urlopen(url, timeout=10) as r:
            conns = json.load(r)["connections"]
        return {c["mqtt_client"] for c in conns if c.get("mqtt_client")}

    def urls_from(self, index: int) -> list[str]:
        """Every node's URL, starting at node `index` (a device's multi-URL bundle)."""
        urls = self.mqtt_urls
        return urls[index:] + urls[:index]

    def coordinator(self, node: int = 0) -> MqttAccess:
        own = self.identities.coordinator()
        return MqttAccess(
            ",".join(self.urls_from(node)),
            username=own.username,
            password=own.password,
            mqtt_version=MqttVersion.V311,
        )

    def watcher(self, client_id: str, node: int = 0) -> MqttSettings:
        return MqttAccess(
            self.nodes[node].mqtt_url,
            username=WATCHER,
            password=self.watcher_password,
            mqtt_version=MqttVersion.V311,
        ).settings(client_id, connect_timeout=5.0, backoff_base=0.1, backoff_cap=0.5)

    def enroll(self, device_ids: Iterable[str]) -> dict[str, str]:
        """Credentials for these devices ({device id: password}); call before `start`
        or `reload` after."""
        return {d: c.password for d, c in self.identities.enroll_many(device_ids).items()}

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
