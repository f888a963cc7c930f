"""What end-to-end tests set up again and again: a trained FLEET_HOME, a coordinator over a
test's own stores, and the waits for devices to come online.

Plain functions, for tests/e2e (whose conftest.py wraps `trained_home` in the `make_home`
fixture) and tests/faults alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.capabilities import Capabilities
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.signing import load_private_key
from edgefleet.protos.transport import MqttAccess

#: what a CPU-only agent claims: ONNX Runtime on its CPU provider
AGENT_CPU = Capabilities(
    machine="x86_64",
    runtimes=("onnxruntime",),
    providers=("CPUExecutionProvider",),
    accelerator="cpu",
    memory_mb=0,
)


@dataclass(frozen=True)
class Version:
    """One version of ``digits`` to register: an MLP trained on the digits set for `epochs`
    from `seed`, then quantized to `variants` (accuracy drop up to `max_drop`)."""

    epochs: int = 3
    seed: int = 0
    variants: tuple[str, ...] = ()
    max_drop: float = 100.0


def train(home: Path, *versions: Version) -> None:
    """Register `versions` in an initialised FLEET_HOME, in order (the next free numbers)."""
    client = LocalClient(load_settings(home=home))
    try:
        for v in versions:
            mv = client.train(
                "digits",
                "digits",
                arch="mlp",
                epochs=v.epochs,
                seed=v.seed,
                batch_size=64,
                lr=3e-3,
                on_epoch=None,
            )
            if v.variants:
                client.quantize(
                    ModelRef("digits", mv.version),
                    list(v.variants),
                    max_drop=v.max_drop,
                    force=False,
                    progress=lambda *_: None,
                )
    finally:
        client.close()


def trained_home(root: Path, *versions: Version) -> Path:
    """``root/home``: initialised as `fleet init` does (config, registry, keys, token),
    holding digits:1… as `versions` say."""
    home = root / "home"
    client = LocalClient(load_settings(home=home))
    try:
        client.init()
    finally:
        client.close()
    train(home, *versions)
    return home


def local_coordinator(
    client: LocalClient, devices: DeviceStore, broker_url: str | MqttAccess, **options: Any
) -> Coordinator:
    """A coordinator over the test's own stores (the client's registry and artifact store,
    `devices`), signing with the home's key; `options` as `Coordinator` takes them."""
    key_path = client.settings.signing_key_path
    return Coordinator(
        broker_url=broker_url,
        registry=client.registry,
        store=client.pipeline.store,
        devices=devices,
        signing_key=lambda: load_private_key(key_path),
        **options,
    )


async def wait_online(
    devices: DeviceStore,
    n: int,
    selector: Selector | None = None,
    *,
    interval: float = 0.1,
    timeout: float | None = None,
) -> None:
    """Until at least `n` (selected) devices are online: their births are recorded."""
    async with asyncio.timeout(timeout):
        while len(await asyncio.to_thread(devices.find, selector, online=True)) < n:
            await asyncio.sleep(interval)


async def wait_born(devices: DeviceStore, device_id: str, *, interval: float = 0.05) -> None:
    """Until the coordinator has recorded the device's capabilities (its first birth)."""
    while (await asyncio.to_thread(devices.get, device_id)).capabilities is None:
        await asyncio.sleep(interval)
