"""Signing keys with a lifecycle, end to end: a real agent enrolled with the root key
and key list from its bundle, a real Mosquitto, the real coordinator, `fleet keys`.

A key rotated while the device was offline reaches it on reconnect (retained key
list) and the update signed with the new key activates; a key revoked while it was
offline makes it refuse what that key signed, with the reason reported; forged and
old key lists are refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.agent import Agent
from edgefleet.agent.config import config_from_bundle
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.keys import KeyRing
from edgefleet.cloud.registry import ModelRef
from edgefleet.protos.fleet.v1 import device_pb2
from edgefleet.protos.keys import sign_key_list
from edgefleet.protos.manifest import SignedManifest
from edgefleet.protos.transport import MqttTransport
from tests.conftest import Cli
from tests.support.e2e import AGENT_CPU, Version, local_coordinator, train, wait_born
from tests.support.identity import SecureBroker


def _train(home: Path) -> None:
    train(home, *(Version(epochs=1, seed=seed) for seed in (0, 1, 2)))


def test_rotation_and_revocation_reach_a_device_that_was_offline(
    fleet_home: Path, cli: Cli, broker: SecureBroker, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    _train(fleet_home)  # versions 1-3, all signed by the first online key
    settings = load_settings(home=fleet_home)
    client = LocalClient(settings)
    ring = KeyRing(settings.keys_dir)
    first_key = ring.key_list().current
    assert first_key is not None
    devices = DeviceStore(settings.registry_url)
    bundle = client.bundle(devices.enroll("k1"), broker_url=broker.url)
    agent_settings = config_from_bundle(
        json.dumps(bundle.to_json()).encode(), state_dir=tmp_path / "k1", listen=""
    ).model_copy(update=broker.agent_settings("k1"))  # the test broker's own credential
    assert agent_settings.root_public_key_pem and agent_settings.key_list

    async def main() -> None:
        async with local_coordinator(
            client,
            devices,
            broker.coordinator(),
            key_list=ring.key_list_bytes,
            gather=0.05,
        ) as coord:
            agent: Agent | None = None
            stop = asyncio.Event()
            task: asyncio.Task[None] | None = None

            async def start() -> Agent:
                nonlocal task, stop
                a = Agent(agent_settings, capabilities=AGENT_CPU, durable=False, want_interval=0.3)
                stop = asyncio.Event()
                ready = asyncio.Event()
                task = asyncio.create_task(a.run(stop.wait, ready=ready))
                await ready.wait()
                await a.transport.wait_connected(timeout=10)
                return a

            async def halt() -> None:
                stop.set()
                assert task is not None
                await task

            async def deploy(version: int) -> dict[str, Any]:
                await wait_born(devices, "k1")
                out = await coord.deploy(ModelRef("digits", version), Selector.parse("all"))
                assert [t.device_id for t in out.targets] == ["k1"]
                return {"gen": out.targets[0].generation}

            async def settled(gen: int) -> dict[str, Any]:
                async with asyncio.timeout(60):
                    while True:
                        d = await asyncio.to_thread(devices.get, "k1")
                        rep = d.reported
                        if (
                            rep
                            and rep.generation == gen
                            and rep.state
                            in (
                                "active",
                                "failed",
                            )
                        ):
                            return dataclasses.asdict(rep)
                        await coord.changed(0.3)

            # enrolled and online: v1 with the first key
            agent = await start()
            d = await deploy(1)
            assert (await settled(d["gen"]))["state"] == "active"
            await halt()

            # offline: the key rotates, v2 is deployed signed by the new key (retained)
            r = cli("keys", "rotate")
            assert r.code == 0, r.err
            new_key = ring.key_list().current
            assert new_key is not None and new_key.key_id != first_key.key_id
            d = await deploy(2)
            desired = await asyncio.to_thread(devices.desired, "k1")
            env = device_pb2.SignedDesiredState.FromString(desired)
            assert env.key_id == new_key.key_id  # signed by the rotated key
            agent = await start()
            rep = await settled(d["gen"])
            assert rep["state"] == "active", rep
            assert agent.holder.active is not None and agent.holder.active.ref.version == 2
            assert agent.updater.trust.keys.version == 2
            await halt()

            # offline again: the first key (which signed v3's manifest) is revoked
            r = cli("keys", "revoke", first_key.key_id)
            assert r.code == 0, r.err
            d = await deploy(3)
            agent = await start()
            rep = await settled(d["gen"])
            assert rep["state"] == "failed" and rep["reason"] == "key_revoked", rep
            assert first_key.key_id in rep["detail"]
            assert agent.holder.active is not None and agent.holder.active.ref.version == 2
            held = agent.updater.trust.keys
            assert held.version == 3 and first_key.key_id in held.revoked

            # key lists from anyone but the root, or older ones, are refused
            # published with the coordinator's rights (devices may not write the keys
            # topic at all): the agent must still refuse what the root did not sign
            async with MqttTransport(broker.watcher("forger")) as t:
                await t.wait_connected(timeout=10)
                forged = sign_key_list(held.successor(), Ed25519PrivateKey.generate())
                await t.publish(coord.topics.keys(), forged, qos=1)
                async with asyncio.timeout(10):
                    while not agent.updater.refused["key_list_bad"]:
                        await asyncio.sleep(0.05)
                assert agent.updater.trust.keys.version == 3
            await halt()
            # the agent keeps the newest list across restarts: the bundle's v1 is not
            # taken back, and neither is v2 replayed
            agent = await start()
            assert agent.updater.trust.keys.version == 3

            await halt()

    try:
        asyncio.run(asyncio.wait_for(main(), 240))
    finally:
        devices.close()
        client.close()


def test_manifests_signed_before_a_rotation_still_verify_and_name_their_key(
    fleet_home: Path, cli: Cli
) -> None:
    assert cli("init").code == 0
    client = LocalClient(load_settings(home=fleet_home))
    client.train(
        "digits", "digits", arch="mlp", epochs=1, seed=0, batch_size=64, lr=3e-3, on_epoch=None
    )
    mv = client.registry.get_version(ModelRef("digits", 1))
    signed_by = SignedManifest.from_bytes(mv.variants[0].signed_manifest).key_id
    client.close()
    assert cli("keys", "rotate").code == 0
    r = cli("models", "verify", "digits:1")
    assert r.code == 0, r.err
    assert f"key {signed_by}" in r.out
    # what is registered from now on is signed by the new key
    client = LocalClient(load_settings(home=fleet_home))
    client.train(
        "digits", "digits", arch="mlp", epochs=1, seed=1, batch_size=64, lr=3e-3, on_epoch=None
    )
    mv2 = client.registry.get_version(ModelRef("digits", 2))
    current = KeyRing(fleet_home / "keys").key_list().current
    client.close()
    assert current is not None and current.key_id != signed_by
    assert SignedManifest.from_bytes(mv2.variants[0].signed_manifest).key_id == current.key_id
    assert f"key {current.key_id}" in cli("models", "verify", "digits:2").out
    r = cli("keys", "ls", "--json")
    roles = {k["key_id"]: k["role"] for k in json.loads(r.out)["keys"]}
    assert roles[signed_by] == "listed" and list(roles.values()).count("signing") == 1
    # revoked: verify says so
    assert cli("keys", "revoke", signed_by).code == 0
    r = cli("models", "verify", "digits:1")
    assert r.code != 0 and "revoked" in r.out + r.err


@pytest.mark.parametrize("passphrase", ["correct horse"])
def test_an_encrypted_root_key_needs_its_passphrase(
    fleet_home: Path, cli: Cli, passphrase: str
) -> None:
    assert cli("init", "--root-passphrase", passphrase).code == 0
    assert b"ENCRYPTED" in (fleet_home / "keys" / "root.key").read_bytes()
    r = cli("keys", "rotate")
    assert r.code == 1 and "encrypted" in r.err
    r = cli("keys", "rotate", "--root-passphrase", "wrong")
    assert r.code == 1 and "wrong passphrase" in r.err
    assert cli("keys", "rotate", "--root-passphrase", passphrase).code == 0
    # the root kept offline: moved away, named with --root-key
    offline = fleet_home.parent / "usb" / "root.key"
    offline.parent.mkdir()
    (fleet_home / "keys" / "root.key").rename(offline)
    r = cli("keys", "rotate", "--root-passphrase", passphrase)
    assert r.code == 1 and "--root-key" in r.err
    r = cli("keys", "rotate", "--root-key", str(offline), "--root-passphrase", passphrase)
    assert r.code == 0, r.err
    assert json.loads(cli("keys", "ls", "--json").out)["version"] == 3


def test_a_key_list_publish_cut_off_at_start_is_published_after_the_reconnect(
    fleet_home: Path, cli: Cli, broker: SecureBroker
) -> None:
    """A busy cluster node (NATS: JetStream cannot store the retained message in time)
    closes the coordinator's connection before acknowledging its key list: the
    coordinator starts anyway, reconnects and publishes it then (it used to exit)."""
    from edgefleet.protos.transport import MqttAccess, broker_address
    from tests.support.mqtt_proxy import CuttingProxy

    assert cli("init").code == 0
    settings = load_settings(home=fleet_home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    ring = KeyRing(settings.keys_dir)
    own = broker.coordinator()

    async def main() -> None:
        _host, port = broker_address(broker.coordinator_url)
        async with CuttingProxy(port, cut_topic="ef/v1/keys") as proxy:
            via = MqttAccess(proxy.url, username=own.username, password=own.password)
            async with local_coordinator(client, devices, via, key_list=ring.key_list_bytes):
                assert proxy.cuts == 1
                got: list[bytes] = []
                watcher = MqttTransport(broker.watcher("keys"))
                await watcher.subscribe("ef/v1/keys")
                async with watcher, asyncio.timeout(30):
                    inbox = watcher.messages()
                    while not got or got[-1] != ring.key_list_bytes():
                        got.append((await anext(inbox)).payload)
                assert proxy.connections >= 2  # it came back through the proxy

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        devices.close()
        client.close()
