"""Devices get the managed broker's small in-flight window (2 by default, which bounds
its memory during a broadcast); coordinator-side clients ask for a wider one with the
MQTT 5 Receive Maximum (`MqttSettings.receive_maximum`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edgefleet.cloud.broker import DEFAULT_MAX_INFLIGHT, ManagedBroker
from edgefleet.protos.transport import Message, MqttSettings, MqttTransport


def test_receive_maximum_widens_one_clients_window(tmp_path: Path) -> None:
    async def main(url: str) -> tuple[int, int]:
        gate = asyncio.Event()
        seen: dict[str, int] = {"device": 0, "coordinator": 0}

        def holder(name: str) -> MqttTransport:
            async def on_message(_m: Message) -> None:
                seen[name] += 1
                await gate.wait()  # no PUBACK until the gate opens (flow control)

            return MqttTransport(
                MqttSettings(
                    url=url,
                    client_id=name,
                    flow_control=True,
                    receive_maximum=20 if name == "coordinator" else 0,
                ),
                on_message=on_message,
            )

        device, coord = holder("device"), holder("coordinator")
        pub = MqttTransport(MqttSettings(url=url, client_id="pub"))
        for t in (device, coord):
            await t.subscribe("t/x", qos=1)
        async with device, coord, pub:
            for t in (device, coord, pub):
                await t.wait_connected(timeout=10)
            for i in range(30):
                await pub.publish("t/x", str(i).encode(), qos=1)

            def held(t: MqttTransport, name: str) -> int:
                return seen[name] + t.backlog  # delivered, none acknowledged

            async with asyncio.timeout(30):
                while held(coord, "coordinator") < 20:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # would the device's broker window let more through?
            out = held(device, "device"), held(coord, "coordinator")
            gate.set()
            return out

    with ManagedBroker(tmp_path / "b", persistence=False) as broker:
        device, coordinator = asyncio.run(main(broker.url))
    assert device == DEFAULT_MAX_INFLIGHT
    assert coordinator == 20
