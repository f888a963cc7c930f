"""The typed API the `fleet` CLI is written against, and its two adapters implement.

`FleetClient` is what works with or without a running coordinator: `LocalClient`
(in-process, over `Services`) and `GrpcClient` (through `fleet serve`) both implement
it. `CoordinatorClient` adds what only a running coordinator can do (its rollout
controller acts on rollouts); `GrpcClient` implements it. mypy checks every CLI
command against these protocols (`cloud.cli.context`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edgefleet.cloud.services.values import (
    EnrolledBatch,
    EnrollmentBundle,
    EpochProgress,
    FleetStatus,
)

if TYPE_CHECKING:
    from edgefleet.cloud.devices import Device, DeviceFilter, DeviceSpec, Selector
    from edgefleet.cloud.drift import Alert, DriftRow
    from edgefleet.cloud.pipeline import VerifyResult
    from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion
    from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice

#: what `quantize(progress=…)` is told: (step, done, total)
QuantizeProgress = Callable[[str, int, int], None]


class FleetClient(Protocol):
    """Models, devices, rollouts (read; plan as a dry run), drift: no coordinator needed."""

    def list_models(self) -> list[ModelSummary]: ...
    def list_versions(self, model: str) -> list[ModelVersion]: ...
    def get_version(self, ref: ModelRef) -> ModelVersion: ...
    def train(
        self,
        name: str,
        data: str,
        *,
        arch: str,
        epochs: int,
        seed: int,
        batch_size: int,
        lr: float,
        on_epoch: Callable[[EpochProgress], None] | None,
    ) -> ModelVersion: ...
    def quantize(
        self,
        ref: ModelRef,
        variants: Sequence[str],
        *,
        max_drop: float,
        force: bool,
        progress: QuantizeProgress,
    ) -> ModelVersion: ...
    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion:
        """Reads files on this machine: through a coordinator, InvalidArgument."""
        ...

    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]: ...
    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[VerifyResult]]: ...
    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]:
        """Writes files on this machine: through a coordinator, InvalidArgument."""
        ...

    def list_devices(
        self,
        selector: Selector | None,
        *,
        state: str | None = None,
        online_only: bool = False,
        where: DeviceFilter | None = None,
    ) -> list[Device]: ...
    def get_device(self, device_id: str) -> Device: ...
    def enroll_device(
        self, device_id: str, *, group: str, tags: Mapping[str, str]
    ) -> EnrollmentBundle: ...
    def enroll_devices(
        self, specs: Sequence[DeviceSpec], *, skip_existing: bool = False
    ) -> EnrolledBatch:
        """Many devices in one batch: one credential write, one broker reload. All or
        none: a bad, repeated or (without skip_existing) already enrolled id enrols none."""
        ...

    def reissue_devices(self, device_ids: Sequence[str]) -> EnrolledBatch:
        """New credentials (password + client certificate) for enrolled devices, their
        id, group, tags and history kept; the old ones stop working. All or none: an
        unknown or revoked id reissues none."""
        ...

    def status(self) -> FleetStatus: ...
    def create_rollout(
        self, ref: ModelRef, selector: Selector, policy: Policy | None, *, dry_run: bool
    ) -> tuple[Rollout, list[RolloutDevice]]:
        """In-process only a dry run (Unavailable otherwise): a rollout needs the
        coordinator's controller."""
        ...

    def list_rollouts(self, *, active_only: bool) -> list[Rollout]: ...
    def get_rollout(self, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]: ...
    def watch_rollout(self, rollout_id: str) -> Iterator[Rollout]: ...
    def drift(self, *, by: str, model: str | None) -> list[DriftRow]: ...
    def alerts(self, *, include_resolved: bool) -> list[Alert]: ...
    def close(self) -> None: ...


class CoordinatorClient(FleetClient, Protocol):
    """A running coordinator: its rollout controller creates rollouts and acts on them."""

    address: str

    def control_rollout(self, rollout_id: str, action: str) -> Rollout: ...
