"""The application layer's wiring: one Database (one engine) per URL for every store,
parts made once, the adapters sharing them, and the in-process audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cloud.access.client import Auditor
from edgefleet.cloud.access.model import AuditFilter
from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import CloudSettings, load_settings
from edgefleet.cloud.db import DatabaseUser
from edgefleet.cloud.devices import Selector
from edgefleet.cloud.registry import ModelRef
from edgefleet.cloud.services.fleet import FleetApp
from edgefleet.cloud.services.wiring import Services
from edgefleet.protos.errors import AlreadyExists, NotFound, Unavailable


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> CloudSettings:
    settings = load_settings(home=tmp_path_factory.mktemp("services") / "home")
    client = LocalClient(settings)
    client.init()
    client.close()
    return settings


@pytest.fixture()
def services(settings: CloudSettings) -> Iterator[Services]:
    s = Services(settings)
    yield s
    s.close()


def test_every_store_shares_one_database_and_engine(services: Services) -> None:
    stores = [
        services.registry,
        services.devices,
        services.rollouts,
        services.telemetry,
        services.alerts,
        services.access,
        services.fl_store,
    ]
    db = services.database
    for store in stores:
        assert isinstance(store, DatabaseUser)
        assert store._db is db, type(store).__name__
    assert {id(store._db.engine) for store in stores} == {id(db.engine)}
    # the pipeline and the drift monitor use the same parts, not copies
    assert services.pipeline.registry is services.registry
    assert services.pipeline.store is services.artifacts
    assert services.drift_monitor.telemetry is services.telemetry
    # made once: asking again gives the same objects
    assert services.registry is stores[0] and services.database is db


def test_close_disposes_the_one_engine_and_later_use_opens_a_new_one(
    services: Services,
) -> None:
    first = services.database
    services.devices.find()
    services.close()
    assert first.engine.pool.checkedout() == 0
    again = services.devices
    assert again._db is services.database is not first
    assert again.find() == []


def test_an_uninitialised_home_is_refused_before_a_database_is_made(tmp_path: Path) -> None:
    services = Services(load_settings(home=tmp_path / "nowhere"))
    with pytest.raises(NotFound, match=r"nowhere is not initialised .*run 'fleet init'"):
        services.registry.list_models()
    assert not (tmp_path / "nowhere").exists()


def test_local_client_adapts_the_services_it_is_given(services: Services) -> None:
    client = LocalClient(services.settings, services=services)
    assert client.registry is services.registry and client.devices is services.devices
    assert client.list_models() == []
    with pytest.raises(NotFound, match="digits"):
        client.get_version(ModelRef.parse("digits:1"))
    with pytest.raises(Unavailable, match="a rollout needs a running coordinator"):
        client.create_rollout(
            ModelRef.parse("digits:1"), Selector.parse("all"), None, dry_run=False
        )
    client.close()  # borrowed: the services stay open
    assert services.devices.find() == []


def test_enrolment_is_audited_in_the_shared_database(services: Services) -> None:
    auditor = Auditor(lambda: services.access, "local:tester")
    client = LocalClient(services.settings, services=services, auditor=auditor)
    app = FleetApp(services)
    bundle = client.enroll_device(
        "cam-1", group="lab", tags={"site": "a"}, broker_url="mqtt://127.0.0.1:1"
    )
    assert (bundle.device_id, bundle.group, bundle.broker_url) == (
        "cam-1",
        "lab",
        "mqtt://127.0.0.1:1",
    )
    assert bundle.password and bundle.client_certificate
    with pytest.raises(AlreadyExists, match="cam-1"):
        client.enroll_device("cam-1", group="lab", tags={}, broker_url="mqtt://127.0.0.1:1")
    assert [d.device_id for d in app.list_devices(Selector.parse("group=lab"))] == ["cam-1"]
    entries = services.access.audit(AuditFilter(action="EnrollDevice"))
    assert [(e.who, e.result, e.args.get("device_id")) for e in entries][-2:] == [
        ("local:tester", "ok", "cam-1"),
        ("local:tester", "ALREADY_EXISTS", "cam-1"),
    ]
    status = app.status(coordinator="", broker_url="mqtt://b")
    assert (status.devices, status.online, status.broker_url) == (1, 0, "mqtt://b")
