"""`make demo`: the main job, start to finish, on embedded defaults, then cleanup.

A fresh FLEET_HOME under .demo/ (SQLite, file:// store, new signing key): train
and quantize the digits CNN, start a coordinator with its own Mosquitto on
loopback, start 20 simulated devices with mixed hardware profiles (real agent
code), deploy, watch them activate, run predictions through one device's local
gRPC API and compare on-device accuracy with the cloud's. Lives in `simulator`
because it drives both sides; `cloud` and `agent` still never import each other.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
from pathlib import Path

DEVICES = 20


def step(title: str) -> None:
    sys.stderr.write(f"\n\033[1m== {title}\033[0m\n" if sys.stderr.isatty() else f"\n== {title}\n")


def pipeline(home: Path, root: Path) -> int:
    from edgefleet.cloud.cli.main import run

    h = ["--home", str(home)]
    steps = [
        ("fleet init", [*h, "init"]),
        (
            "fleet train --model digits --arch cnn",
            [*h, "train", "--model", "digits", "--arch", "cnn"],
        ),
        ("fleet quantize digits:1", [*h, "quantize", "digits:1"]),
        ("fleet models show digits:1", [*h, "models", "show", "digits:1"]),
        ("fleet models verify digits:1", [*h, "models", "verify", "digits:1"]),
    ]
    for title, argv in steps:
        step(title)
        code = run(argv)
        if code != 0:
            sys.stderr.write(f"demo: '{title}' failed with exit code {code}\n")
            return code
    return 0


async def fleet(home: Path, root: Path) -> int:
    import grpc
    import numpy as np
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from edgefleet.agent.serde import decode_predict_response, encode_predict_request
    from edgefleet.cloud.broker import ManagedBroker
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.coordinator import Coordinator
    from edgefleet.cloud.devices import DeviceStore, Selector
    from edgefleet.cloud.evaluation import EvalSet
    from edgefleet.cloud.identity import BrokerAuth, write_broker_material
    from edgefleet.cloud.registry import ModelRef
    from edgefleet.cloud.signing import load_private_key
    from edgefleet.protos.fleet.v1 import inference_pb2_grpc
    from edgefleet.protos.topics import Topics
    from edgefleet.protos.transport import MqttAccess
    from edgefleet.simulator.fleet import SimulatedFleet

    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    settings = load_settings(home=home)
    client = LocalClient(settings)
    devices = DeviceStore(settings.registry_url)
    broker_dir = root / "broker"
    broker_dir.mkdir(parents=True)
    broker_dir.chmod(0o777)
    step("coordinator: Mosquitto on loopback (identities on) + MQTT coordinator")

    def material() -> BrokerAuth:
        return write_broker_material(client.identities, broker_dir / "auth", topics=Topics())

    own = client.identities.coordinator()
    with ManagedBroker(broker_dir, auth=material()) as broker:
        err.print(f"broker {broker.url} (anonymous access off)")
        async with Coordinator(
            broker_url=MqttAccess(
                broker.coordinator_url, username=own.username, password=own.password
            ),
            registry=client.registry,
            store=client.pipeline.store,
            devices=devices,
            signing_key=lambda: load_private_key(settings.signing_key_path),
            chunk_size=16 * 1024,
        ) as coord:
            step(f"{DEVICES} simulated devices (mixed profiles: cpu, gpu, npu, litert)")
            sim = SimulatedFleet(
                DEVICES,
                broker_url=broker.url,
                public_key_pem=settings.public_key_path.read_text(),
                state_root=root / "devices",
                profile="mixed",
                seed=0,
                id_prefix="demo",
                listen_first=True,
            )
            passwords: dict[str, str] = {}
            for e in sim.ids_for_enrollment():
                b = client.enroll_device(e.device_id, group=e.group, tags=e.tags)
                passwords[e.device_id] = b.password or ""
            sim.credentials = passwords
            material()
            broker.reload()  # the new devices' credentials
            async with sim:
                while len(await asyncio.to_thread(devices.find, online=True)) < DEVICES:
                    await asyncio.sleep(0.1)
                err.print(f"{DEVICES} devices online: {dict(sorted(sim_profiles(sim).items()))}")
                step("fleet deploy digits:1 --to all")
                outcome = await coord.deploy(ModelRef("digits", 1), Selector.parse("all"))
                with Progress(
                    TextColumn("devices active"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=err,
                ) as bar:
                    task = bar.add_task("deploy", total=len(outcome.targets))
                    async with asyncio.timeout(120):
                        while True:
                            states = sim.states()
                            bar.update(task, completed=states.get("active", 0))
                            if states.get("active", 0) + states.get("failed", 0) >= len(
                                outcome.targets
                            ):
                                break
                            await asyncio.sleep(0.1)
                settled = await coord.wait_settled(outcome, timeout=30)
                t = Table(box=None, pad_edge=False)
                for col in ("DEVICE", "PROFILE", "VARIANT", "STATE", "PROVIDER"):
                    t.add_column(col)
                for tg in outcome.targets:
                    d = settled[tg.device_id]
                    t.add_row(
                        tg.device_id,
                        d.group,
                        tg.variant,
                        d.state,
                        str(d.reported.get("provider", "")),
                    )
                out.print(t)
                sent = sum(
                    coord.broadcaster.stats(s).bytes_sent
                    for s in {x.sha256 for x in outcome.targets}
                )
                size = sum(
                    coord.broadcaster.stats(s).size for s in {x.sha256 for x in outcome.targets}
                )
                err.print(
                    f"coordinator sent {sent:,} bytes for {len({x.sha256 for x in outcome.targets})} "
                    f"artifacts of {size:,} bytes to {len(outcome.targets)} devices"
                )
                step("predictions through one device's local gRPC API")
                first = sim.devices[0]
                mv = client.registry.get_version(ModelRef("digits", 1))
                assert mv.evalset_sha256
                ev = EvalSet.from_bytes(client.pipeline.store.get(mv.evalset_sha256))
                async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as ch:
                    stub = inference_pb2_grpc.InferenceServiceStub(ch)
                    resp = decode_predict_response(await stub.Predict(encode_predict_request(ev.x)))
                assert resp.model is not None and ev.y is not None
                on_device = float((np.asarray(resp.output).argmax(1) == ev.y).mean())
                cloud = mv.variant(resp.model.variant).accuracy
                out.print(f"{first.device_id} serves {resp.model} ({first.profile.name} profile)")
                out.print(
                    f"on-device accuracy {on_device:.2%} on {len(ev.x)} holdout digits; "
                    f"cloud evaluation of {resp.model.variant}: {cloud:.2%}"
                )
                failed = [
                    tg.device_id
                    for tg in outcome.targets
                    if settled[tg.device_id].state != "active"
                ]
    devices.close()
    client.close()
    if failed:
        sys.stderr.write(f"demo: {len(failed)} devices did not activate: {', '.join(failed)}\n")
        return 1
    return 0


def sim_profiles(sim: object) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(d.profile.name for d in sim.devices))  # type: ignore[attr-defined]


def main() -> int:
    logging.basicConfig(
        level=logging.ERROR, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    root = Path(".demo").resolve()
    shutil.rmtree(root, ignore_errors=True)
    home = root / "home"
    code = pipeline(home, root)
    if code:
        return code
    code = asyncio.run(fleet(home, root))
    sys.stderr.write(
        f"\ndemo {'done' if code == 0 else 'FAILED'}: state in {root} (delete it to clean up)\n"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
