"""`LocalClient`: the `FleetClient` protocol in this process, for the `fleet` CLI.

A thin adapter over the application layer (`cloud.services`): the operations are
`FleetApp`'s over one `Services` (one database, the stores, the pipeline). What it adds:
state-changing calls are recorded in the audit log as `local:<unix user>` (given an
`Auditor`), and what needs a running coordinator (a real rollout) is refused with what
to do. `cloud.remote.GrpcClient` implements the same protocol through `fleet serve`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar, cast

from edgefleet.cloud.access.client import LOCAL_ACTIONS, Auditor, call_args
from edgefleet.cloud.config import CloudSettings, ServeInfo
from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion, RegistryStore
from edgefleet.cloud.services.api import QuantizeProgress
from edgefleet.cloud.services.fleet import FleetApp, coordinator_version
from edgefleet.cloud.services.setup import (
    create_token,
    ensure_admin_token,
    init_home,
    read_token,
)
from edgefleet.cloud.services.values import (
    BUNDLE_FORMAT,
    EnrolledBatch,
    EnrollmentBundle,
    EpochProgress,
    FleetStatus,
    InitResult,
)
from edgefleet.cloud.services.wiring import Services
from edgefleet.protos.errors import Unavailable

if TYPE_CHECKING:
    from edgefleet.cloud.db import Database
    from edgefleet.cloud.devices import Device, DeviceFilter, DeviceSpec, DeviceStore, Selector
    from edgefleet.cloud.drift import Alert, DriftMonitor, DriftRow
    from edgefleet.cloud.identity import DeviceCredential, IdentityStore
    from edgefleet.cloud.keys import KeyRing
    from edgefleet.cloud.pipeline import Pipeline, VerifyResult
    from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, RolloutStore

__all__ = [
    "BUNDLE_FORMAT",
    "EnrollmentBundle",
    "FleetStatus",
    "InitResult",
    "LocalClient",
    "coordinator_version",
    "create_token",
    "ensure_admin_token",
    "read_token",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _audited(
    fn: Callable[Concatenate[LocalClient, P], R],
) -> Callable[Concatenate[LocalClient, P], R]:
    """Record the call in the audit log (as LOCAL_ACTIONS names it) when there is an auditor."""
    action = LOCAL_ACTIONS[fn.__name__]

    def run(self: LocalClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.auditor is None:
            return fn(self, *args, **kwargs)
        named = call_args(fn, (self, *args), kwargs)
        named.pop("self", None)
        return cast(R, self.auditor.run(action, named, lambda: fn(self, *args, **kwargs)))

    functools.update_wrapper(run, fn)
    return run


def _no_progress(step: str, done: int, total: int) -> None:
    pass


class LocalClient:
    """All of it in-process: SQL registry, artifact store, pipeline, signing key."""

    def __init__(
        self,
        settings: CloudSettings,
        *,
        services: Services | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self.settings = settings
        self._owns_services = services is None
        self.services = services if services is not None else Services(settings)
        self.app = FleetApp(self.services)
        self.auditor = auditor

    # -- the parts (the services' own; kept here for tools and tests)

    @property
    def database(self) -> Database:
        return self.services.database

    @property
    def registry(self) -> RegistryStore:
        return self.services.registry

    @property
    def devices(self) -> DeviceStore:
        return self.services.devices

    @property
    def identities(self) -> IdentityStore:
        return self.services.identities

    @property
    def rollouts(self) -> RolloutStore:
        return self.services.rollouts

    @property
    def pipeline(self) -> Pipeline:
        return self.services.pipeline

    @property
    def keyring(self) -> KeyRing:
        return self.services.keyring

    @property
    def drift_monitor(self) -> DriftMonitor:
        return self.services.drift_monitor

    def init(self, *, root_passphrase: bytes | None = None) -> InitResult:
        """Create FLEET_HOME (`fleet init`)."""
        return init_home(self.services, root_passphrase=root_passphrase)

    # -- models

    def list_models(self) -> list[ModelSummary]:
        return self.app.list_models()

    def list_versions(self, model: str) -> list[ModelVersion]:
        return self.app.list_versions(model)

    def get_version(self, ref: ModelRef) -> ModelVersion:
        return self.app.get_version(ref)

    @_audited
    def train(
        self,
        name: str,
        data: str,
        *,
        arch: str,
        epochs: int = 20,
        seed: int = 0,
        batch_size: int = 64,
        lr: float = 3e-3,
        on_epoch: Callable[[EpochProgress], None] | None = None,
        options: Mapping[str, object] | None = None,
    ) -> ModelVersion:
        """`options` go to the architecture, e.g. {"hidden": [512, 448]} for a wider MLP."""
        return self.app.train(
            name,
            data,
            arch=arch,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            on_epoch=on_epoch,
            options=options,
        )

    @_audited
    def quantize(
        self,
        ref: ModelRef,
        variants: Sequence[str],
        *,
        max_drop: float | None = None,
        force: bool = False,
        progress: QuantizeProgress = _no_progress,
    ) -> ModelVersion:
        """`max_drop` None: the pipeline's default gate (`cloud.variants.DEFAULT_MAX_DROP`)."""
        return self.app.quantize(ref, variants, max_drop=max_drop, force=force, progress=progress)

    @_audited
    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion:
        return self.app.import_model(path, name, eval_data=eval_data)

    @_audited
    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]:
        return self.app.promote(ref, stage, archive_existing=archive_existing)

    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[VerifyResult]]:
        return self.app.verify(ref)

    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]:
        return self.app.export(ref, out, variants=variants)

    # -- devices

    def list_devices(
        self,
        selector: Selector | None,
        *,
        state: str | None = None,
        online_only: bool = False,
        where: DeviceFilter | None = None,
    ) -> list[Device]:
        return self.app.list_devices(selector, state=state, online_only=online_only, where=where)

    def get_device(self, device_id: str) -> Device:
        return self.app.get_device(device_id)

    @_audited
    def enroll_device(
        self,
        device_id: str,
        *,
        group: str,
        tags: Mapping[str, str],
        broker_url: str | None = None,
    ) -> EnrollmentBundle:
        """Enrol the device and issue its MQTT credential (a running `fleet serve` on this
        FLEET_HOME reloads its broker; this returns once it did)."""
        return self.app.enroll_device(
            device_id,
            group=group,
            tags=tags,
            broker_url=broker_url or self.app.advertised_broker(),
        )

    @_audited
    def enroll_devices(
        self,
        specs: Sequence[DeviceSpec],
        *,
        skip_existing: bool = False,
        broker_url: str | None = None,
    ) -> EnrolledBatch:
        """Enrol many devices in one batch (one credential write; a running `fleet serve`
        on this FLEET_HOME reloads its broker once; this returns once it did)."""
        return self.app.enroll_devices(
            specs,
            broker_url=broker_url or self.app.advertised_broker(),
            skip_existing=skip_existing,
        )

    @_audited
    def reissue_devices(
        self, device_ids: Sequence[str], *, broker_url: str | None = None
    ) -> EnrolledBatch:
        """New credentials for enrolled devices (one credential write; a running `fleet
        serve` on this FLEET_HOME reloads its broker once; this returns once it did)."""
        return self.app.reissue_devices(
            device_ids, broker_url=broker_url or self.app.advertised_broker()
        )

    def bundle(
        self, d: Device, *, broker_url: str, credential: DeviceCredential | None = None
    ) -> EnrollmentBundle:
        return self.app.bundle(d, broker_url=broker_url, credential=credential)

    def revoke_device(self, device_id: str, *, reason: str = "revoked") -> tuple[Device, list[str]]:
        return self.app.revoke_device(device_id, reason=reason)

    def advertised_broker(self) -> str:
        return self.app.advertised_broker()

    def status(self) -> FleetStatus:
        info = ServeInfo.read(self.settings.serve_path)
        return self.app.status(
            coordinator=info.grpc if info else "",
            broker_url=info.advertise_broker if info else self.settings.broker,
        )

    # -- rollouts

    def create_rollout(
        self, ref: ModelRef, selector: Selector, policy: Policy | None, *, dry_run: bool
    ) -> tuple[Rollout, list[RolloutDevice]]:
        """Only a dry run works in-process (it plans from the database); a real rollout
        needs the coordinator's controller."""
        if not dry_run:
            raise Unavailable(
                f"a rollout needs a running coordinator: start 'fleet serve' for "
                f"{self.settings.home_dir} or pass --coordinator HOST:PORT"
            )
        return self.app.plan_rollout(ref, selector, policy)

    def list_rollouts(self, *, active_only: bool) -> list[Rollout]:
        return self.app.list_rollouts(active_only=active_only)

    def get_rollout(self, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]:
        return self.app.get_rollout(rollout_id)

    def watch_rollout(self, rollout_id: str, *, interval: float = 0.5) -> Iterator[Rollout]:
        return self.app.watch_rollout(rollout_id, interval=interval)

    # -- drift

    def drift(self, *, by: str, model: str | None) -> list[DriftRow]:
        return self.app.drift(by=by, model=model)

    def alerts(self, *, include_resolved: bool) -> list[Alert]:
        return self.app.alerts(include_resolved=include_resolved)

    def close(self) -> None:
        if self._owns_services:
            self.services.close()
