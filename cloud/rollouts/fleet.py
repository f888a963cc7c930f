"""What the rollout controller needs from the fleet, and nothing more.

`cloud.coordinator.Coordinator` satisfies `RolloutFleet` over MQTT and the database;
the controller's unit tests use an in-memory fake (tests/unit/fake_fleet.py). The
controller keeps its own state in `RolloutStore`; through this protocol it only
plans, reads what devices reported, issues signed desired states and waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from edgefleet.cloud.devices import Device, Selector
from edgefleet.cloud.devices.store import Sign
from edgefleet.cloud.inbound import ShadowReport
from edgefleet.cloud.registry import ModelRef, ModelVersion, Variant
from edgefleet.cloud.selection import Plan


class RolloutFleet(Protocol):
    async def plan(self, ref: ModelRef, selector: Selector) -> Plan:
        """The version, and the variant each selected device would get."""
        ...

    async def get_version(self, ref: ModelRef) -> ModelVersion:
        """A registered version with its variants (signed manifests); `NotFound` if none."""
        ...

    async def prepare(
        self, variants: Sequence[Variant], targets: Mapping[str, str] | None = None
    ) -> None:
        """Make each variant's artifact ready to send to devices, and for `targets`
        ({device: artifact sha256}) the deltas from what each holds (cloud/deltas)."""
        ...

    def signer(
        self,
        manifests: Mapping[str, tuple[bytes, str]],
        *,
        rollout_id: str,
        action: str,
        sample_rate: float = 1.0,
    ) -> Sign:
        """Signs the desired state of {device: (signed manifest, artifact sha256)} for
        `action` (shadow | activate | rollback), given the generation `RolloutStore.issue`
        allocates."""
        ...

    async def publish_desired(self, signed: Mapping[str, bytes], *, window: int = 256) -> None:
        """Send each device its signed desired state (retained: a device offline now gets
        it when it reconnects)."""
        ...

    async def find_devices(self, device_ids: Sequence[str]) -> list[Device]:
        """These devices as last reported: online, active model, reported state."""
        ...

    def shadow_report(self, device_id: str) -> ShadowReport | None:
        """The device's latest shadow evaluation, if any."""
        ...

    async def changed(self, timeout: float) -> None:
        """Return when a device reported something, or after `timeout` seconds."""
        ...


__all__ = ["RolloutFleet"]
