"""Fault campaigns share one FLEET_HOME with two trained versions of a small model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.cloud.client import LocalClient
from edgefleet.cloud.config import CloudSettings, load_settings
from edgefleet.cloud.coordinator import Coordinator
from edgefleet.cloud.devices import DeviceStore
from edgefleet.protos.transport import MqttAccess
from tests.support.e2e import Version, local_coordinator, trained_home


@pytest.fixture(scope="session")
def fault_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits v1 and v2 (fp32 ONNX, ~69 KB each): the update the campaigns interrupt."""
    return trained_home(
        tmp_path_factory.mktemp("faults"), Version(epochs=1, seed=0), Version(epochs=1, seed=1)
    )


@dataclass
class Cloud:
    """The coordinator's parts on a test's own database, over the session's registry."""

    settings: CloudSettings
    client: LocalClient
    devices: DeviceStore

    def coordinator(self, broker_url: str | MqttAccess, **kw: Any) -> Coordinator:
        return local_coordinator(
            self.client,
            self.devices,
            broker_url,
            chunk_size=8 * 1024,
            gather=0.05,
            **kw,
        )

    def close(self) -> None:
        self.devices.close()
        self.client.close()


def cloud(fault_home: Path, tmp: Path) -> Cloud:
    settings = load_settings(home=fault_home, db_url=f"sqlite:///{tmp / 'fleet.db'}")
    return Cloud(
        settings, LocalClient(load_settings(home=fault_home)), DeviceStore(settings.registry_url)
    )
