"""Drift end to end: real agents (simulator) on a real Mosquitto, telemetry through the
real TelemetrySubscriber into the database, the coordinator's drift monitor, alerts,
`/metrics` and the CLI.

Two groups of devices serve digits:1 with live labelled traffic; the input stream of
one group is shifted (`SimulatedFleet.drift`): that group, and only it, gets drift
alerts; when the drift ends they resolve.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.cloud.broker import find_mosquitto
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import load_settings
from edgefleet.cloud.devices import DeviceStore, Selector
from edgefleet.cloud.monitoring import Monitoring
from edgefleet.cloud.registry import ModelRef
from edgefleet.protos.errors import NotFound
from edgefleet.protos.manifest import SignedManifest, decode_manifest
from edgefleet.simulator.fleet import SimulatedFleet
from edgefleet.simulator.traffic import Traffic
from tests.conftest import Cli
from tests.e2e.conftest import MakeHome
from tests.support.e2e import Version, local_coordinator, wait_online
from tests.support.identity import SecureBroker

try:
    find_mosquitto()
except NotFound:
    pytest.skip("mosquitto is not installed", allow_module_level=True)

GROUPS = {"north": 3, "south": 3}


@pytest.fixture(scope="module")
def home(make_home: MakeHome) -> Path:
    return make_home("drift", Version(epochs=3))


def test_every_variant_ships_a_drift_reference(home: Path) -> None:
    client = LocalClient(load_settings(home=home))
    try:
        mv = client.get_version(ModelRef("digits", 1))
        for v in mv.variants:
            ref = decode_manifest(SignedManifest.from_bytes(v.signed_manifest).manifest_bytes).drift
            assert ref is not None and ref.samples == mv.metrics["holdout_samples"]
            assert len(ref.predictions) == 10
    finally:
        client.close()


def _open(monitoring: Monitoring) -> list[tuple[str, str]]:
    assert monitoring.alerts is not None
    return sorted({(a.scope, a.subject) for a in monitoring.alerts.find()})


def test_drift_injected_into_one_group_alerts_that_group_only(
    home: Path, broker: SecureBroker, tmp_path: Path, cli: Cli
) -> None:
    from edgefleet.models.data import load_dataset

    settings = load_settings(home=home)
    ds = load_dataset("digits")
    x, y = ds.x.astype(np.float32), ds.y

    async def main() -> None:
        client = LocalClient(settings)
        devices = DeviceStore(settings.registry_url)
        fleet = SimulatedFleet(
            sum(GROUPS.values()),
            broker_url=broker.url,
            public_key_pem=settings.public_key_path.read_text(),
            state_root=tmp_path / "devices",
            profile="gpu",
            id_prefix="drift",
            want_interval=0.5,
            telemetry_interval=0.5,
        )
        broker.enroll_fleet(fleet)
        ids = fleet.ids()
        members = {"north": ids[: GROUPS["north"]], "south": ids[GROUPS["north"] :]}
        for group, group_ids in members.items():
            for i in group_ids:
                devices.enroll(i, group=group)
        try:
            async with (
                fleet,
                local_coordinator(
                    client,
                    devices,
                    broker.coordinator(),
                    chunk_size=16 * 1024,
                    gather=0.05,
                ) as coord,
                Monitoring(
                    db=settings.registry_url,
                    broker_url=broker.coordinator(),
                    home=str(home),
                    devices=devices,
                    registry=client.registry,
                    metrics_listen="127.0.0.1:0",
                    drift_window=5.0,
                    drift_interval=0.5,
                ) as monitoring,
            ):
                drift = monitoring.drift
                assert drift is not None
                await wait_online(devices, len(ids), timeout=30)
                out = await coord.deploy(ModelRef("digits", 1), Selector.parse("all"))
                settled = await coord.wait_settled(out, timeout=60)
                assert {d.state for d in settled.values()} == {"active"}

                async def until(pred: object, what: str, timeout: float = 40) -> None:
                    deadline = time.monotonic() + timeout
                    while not pred():  # type: ignore[operator]
                        assert time.monotonic() < deadline, (
                            f"{what}: alerts {_open(monitoring)}, last "
                            f"{[(r.scope, r.subject, r.rows, r.input_psi) for r in drift.last]}"
                        )
                        await asyncio.sleep(0.2)

                def groups_scored() -> bool:
                    return {r.subject for r in drift.last if r.scope == "group" and r.enough} == {
                        "north",
                        "south",
                    }

                async with Traffic(fleet.devices, x, y, rate=50):
                    # clean traffic: both groups scored, nothing drifts
                    await until(groups_scored, "both groups scored")
                    await asyncio.sleep(2.0)
                    assert _open(monitoring) == []
                    assert all(not r.drifting for r in drift.last), drift.last

                    fleet.drift(members["south"], shift=4.0)
                    await until(
                        lambda: ("group", "south") in _open(monitoring), "south group alert"
                    )
                    await asyncio.sleep(2.0)  # a few more evaluations: north stays clean
                    opened = _open(monitoring)
                    assert [s for scope, s in opened if scope == "group"] == ["south"]
                    assert {s for scope, s in opened if scope == "device"} <= set(members["south"])
                    rows = {(r.scope, r.subject): r for r in drift.last}
                    assert rows[("group", "south")].inputs["mean"] > 1.0
                    assert not rows[("group", "north")].drifting
                    assert rows[("fleet", "*")].drifting  # reported fleet-wide, not alerted

                    metrics = await asyncio.to_thread(
                        lambda: (
                            urllib.request.urlopen(monitoring.metrics_url, timeout=10)
                            .read()
                            .decode()
                        )
                    )
                    samples = [
                        smp for f in text_string_to_metric_families(metrics) for smp in f.samples
                    ]

                    def value(name: str, **labels: str) -> float:
                        found = [
                            smp.value
                            for smp in samples
                            if smp.name == name
                            and all(smp.labels.get(k) == v for k, v in labels.items())
                        ]
                        assert len(found) == 1, (name, labels, found)
                        return found[0]

                    south = {"scope": "group", "subject": "south", "model": "digits"}
                    assert value("edgefleet_drift_psi", **south, version="1", metric="inputs") > 0.2
                    assert value("edgefleet_drift_alerts_open", scope="group") >= 1
                    # the devices' latency histograms, summed into one in seconds per variant
                    count = value("edgefleet_inference_latency_seconds_count", version="1")
                    assert count > 0
                    assert (
                        value("edgefleet_inference_latency_seconds_bucket", version="1", le="+Inf")
                        == count
                    )
                    assert value("edgefleet_inference_latency_seconds_sum", version="1") > 0
                    assert value("edgefleet_telemetry_written_total") > 0

                    fleet.drift(members["south"])  # the sensors are fixed
                    await until(lambda: _open(monitoring) == [], "alerts resolved")
        finally:
            devices.close()
            client.close()

    asyncio.run(main())

    # the CLI reads the same tables
    h = ("--home", str(home))
    r = cli(*h, "alerts", "--all", "--json")
    assert r.code == 0, r.err
    alerts = json.loads(r.out)
    assert {a["subject"] for a in alerts if a["scope"] == "group"} == {"south"}
    assert {a["state"] for a in alerts} == {"resolved"}
    for a in alerts:  # ISO 8601 UTC like every other --json
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", a["first_seen"])
        assert a["resolved"].endswith("Z") and "first_seen_ms" not in a
    r = cli(*h, "alerts")
    assert r.code == 0 and "no drift alerts" in r.err
    r = cli(*h, "drift", "--by", "group", "--model", "digits:1", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)
    assert {(x["scope"], x["subject"]) for x in rows} == {
        ("fleet", "*"),
        ("group", "north"),
        ("group", "south"),
    }
    r = cli(*h, "drift", "--by", "team")
    assert r.code == 1 and "--by 'team' unknown; accepted: device, group, fleet" in r.err
