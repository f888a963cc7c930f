"""DeviceStore against SQLite and PostgreSQL: enrolment, selectors, liveness, generations."""

from __future__ import annotations

import pytest

from edgefleet.cloud.devices import DeviceSpec, DeviceStore, Selector
from edgefleet.cloud.devices.store import Birth
from edgefleet.cloud.devices.values import (
    Accelerator,
    Capabilities,
    ReasonCode,
    Reported,
    ServedModel,
    UpdateState,
)
from edgefleet.protos.errors import AlreadyExists, InvalidArgument, NotFound


@pytest.fixture
def devices(registry_url: str) -> DeviceStore:
    store = DeviceStore(registry_url)
    yield store  # type: ignore[misc]
    store.close()


def test_enroll_list_and_select(devices: DeviceStore) -> None:
    devices.enroll("cam-1", group="lobby", tags={"site": "paris"})
    devices.enroll("cam-2", group="lobby", tags={"site": "lyon"})
    devices.enroll("gw-1", group="yard")
    with pytest.raises(AlreadyExists, match="'cam-1' is already enrolled"):
        devices.enroll("cam-1")
    ids = lambda sel: [d.device_id for d in devices.find(Selector.parse(sel))]  # noqa: E731
    assert ids("all") == ["cam-1", "cam-2", "gw-1"]
    assert ids("group=lobby") == ["cam-1", "cam-2"]
    assert ids("tag=site=lyon") == ["cam-2"]
    assert ids("device=gw-1,cam-1") == ["cam-1", "gw-1"]
    with pytest.raises(NotFound, match="not enrolled"):
        devices.get("cam-9")


def test_enroll_many_is_one_transaction_all_or_none(devices: DeviceStore) -> None:
    specs = [DeviceSpec(f"b-{i:04d}", "lab", {"n": str(i)}) for i in range(1200)]
    made = devices.enroll_many(specs)
    assert [d.device_id for d in made] == [s.device_id for s in specs]
    assert made[0] == devices.get("b-0000")  # what it returns is what a read gives
    assert devices.get("b-1199").tags == {"n": "1199"}
    assert len(devices.find(Selector.parse("group=lab"))) == 1200
    with pytest.raises(AlreadyExists, match=r"2 of these devices are already enrolled: 'b-0001'"):
        devices.enroll_many([DeviceSpec("c-1"), DeviceSpec("b-0001"), DeviceSpec("b-0002")])
    with pytest.raises(InvalidArgument, match=r"entry 2: device id 'no/slash'"):
        devices.enroll_many([DeviceSpec("c-1"), DeviceSpec("no/slash")])
    with pytest.raises(InvalidArgument, match=r"'c-1' is listed twice"):
        devices.enroll_many([DeviceSpec("c-1"), DeviceSpec("c-1")])
    with pytest.raises(InvalidArgument, match="no devices given"):
        devices.enroll_many([])
    assert devices.existing(["c-1", "b-0007", "zz"]) == ["b-0007"]
    got = devices.get_many(["b-1199", "b-0000"])  # in the order asked, in a few queries
    assert [d.device_id for d in got] == ["b-1199", "b-0000"] and got[0].tags == {"n": "1199"}
    assert len(devices.get_many([f"b-{i:04d}" for i in range(1200)])) == 1200
    with pytest.raises(NotFound, match=r"2 of these devices are not enrolled: 'zz', 'yy'"):
        devices.get_many(["b-0001", "zz", "yy"])
    assert len(devices.find()) == 1200


def test_status_reported_and_generations(devices: DeviceStore) -> None:
    devices.enroll("d1")
    caps = Capabilities("x86_64", ("onnxruntime",), (), Accelerator.CPU, 512, features=("fl",))
    assert devices.record_status("d1", Birth(True, boot_id="b1", capabilities=caps))
    assert not devices.record_status("ghost", Birth(True))
    d = devices.get("d1")
    assert d.online and d.capabilities == caps and d.last_seen is not None
    assert [x.device_id for x in devices.find(online=True)] == ["d1"]
    devices.record_status("d1", Birth(False))
    assert not devices.get("d1").online and devices.get("d1").capabilities == caps
    assert [devices.next_generation("d1") for _ in range(3)] == [1, 2, 3]
    devices.set_desired("d1", 3, b"signed", rollout_id="r1")
    assert devices.desired("d1") == b"signed" and devices.get("d1").rollout_id == "r1"
    m = ServedModel("m", 2, "int8", "a" * 64)
    lkg = ServedModel("m", 1, "fp32", "b" * 64)
    rep = Reported(
        "d1", 3, UpdateState.ACTIVE, ReasonCode.OK, "fine", m, lkg, 4, 4, "CPUExecutionProvider", 7
    )
    devices.record_reported("d1", rep)
    got = devices.get("d1")
    assert got.state == "active" and got.active == m
    assert got.reported == rep  # every field back as it went in


def test_unreached_desired_states_are_what_gets_reasserted(devices: DeviceStore) -> None:
    for d in ("d1", "d2", "d3", "d4"):
        devices.enroll(d)
    issued = devices.issue(["d1", "d2", "d3"], lambda d, g: f"{d}@{g}".encode(), rollout_id="r1")
    assert issued["d1"] == (1, b"d1@1")
    # d2 reached it, d3 failed it: both reported that generation; d1 never did; d4 has
    # nothing desired
    devices.record_reported("d2", Reported("d2", 1, UpdateState.ACTIVE, ReasonCode.OK))
    devices.record_reported("d3", Reported("d3", 1, UpdateState.FAILED, ReasonCode.LOAD_FAILED))
    assert devices.unreached() == {"d1": b"d1@1"}
    assert devices.unreached(["d2", "d4"]) == {} and devices.unreached([]) == {}
    devices.issue(["d2"], lambda d, g: f"{d}@{g}".encode(), rollout_id="r2")
    assert devices.unreached() == {"d1": b"d1@1", "d2": b"d2@2"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("everything", "accepted: all, group=G"),
        ("tag=site=a|", "empty alternative"),
        ("tag==x", "needs KEY=VALUE"),
        ("zone=a", "'zone' unknown"),
        ("device=a/b", "device id 'a/b'"),
    ],
)
def test_bad_selectors(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Selector.parse(text)
