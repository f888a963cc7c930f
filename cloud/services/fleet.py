"""`FleetApp`: the operations that need no running coordinator, over `Services`.

Blocking (the servicer runs them in worker threads). `LocalClient` adapts them for the
CLI in-process (audit, and what a CLI without a coordinator must refuse); the
`FleetService` servicer adapts them for gRPC. Both therefore answer the same.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import edgefleet
from edgefleet.cloud.config import DEFAULT_MQTT_PORT, ServeInfo
from edgefleet.cloud.devices import Device, DeviceFilter, DeviceSpec, Selector
from edgefleet.cloud.devices.store import already_enrolled, check_batch_ids, some_devices
from edgefleet.cloud.identity import DeviceCredential
from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion
from edgefleet.cloud.replicas import ReplicaInfo
from edgefleet.cloud.replicas.registry import ReplicaStore
from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice
from edgefleet.cloud.services.api import QuantizeProgress
from edgefleet.cloud.services.values import (
    EnrolledBatch,
    EnrollmentBundle,
    EpochProgress,
    FleetStatus,
)
from edgefleet.cloud.services.wiring import Services
from edgefleet.cloud.signing import load_public
from edgefleet.protos.errors import AlreadyExists, Conflict, FleetError, NotFound
from edgefleet.protos.manifest import key_id
from edgefleet.protos.topics import check_device_id

if TYPE_CHECKING:
    from edgefleet.cloud.drift import Alert, DriftRow
    from edgefleet.cloud.pipeline import VerifyResult

logger = logging.getLogger(__name__)


def coordinator_version() -> str:
    return edgefleet.__version__


class FleetApp:
    """Models, devices, rollouts as stored, drift: one coordinator's data, typed."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        #: set by `fleet serve` for its own broker: apply changed credentials now
        self.apply_credentials: Callable[[], object] | None = None

    # -- models

    def list_models(self) -> list[ModelSummary]:
        return self.services.registry.list_models()

    def list_versions(self, model: str) -> list[ModelVersion]:
        return self.services.registry.list_versions(model)

    def get_version(self, ref: ModelRef) -> ModelVersion:
        return self.services.registry.get_version(ref)

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
        options: Mapping[str, object] | None = None,
    ) -> ModelVersion:
        """`options` go to the architecture, e.g. {"hidden": [512, 448]} for a wider MLP."""
        return self.services.pipeline.train(
            name,
            data,
            arch=arch,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            options=dict(options) if options is not None else None,
            on_epoch=on_epoch,
        )

    def quantize(
        self,
        ref: ModelRef,
        variants: Sequence[str],
        *,
        max_drop: float | None,
        force: bool,
        progress: QuantizeProgress,
    ) -> ModelVersion:
        """`max_drop` None: the pipeline's default accuracy gate."""
        pipeline = self.services.pipeline
        if max_drop is None:
            return pipeline.quantize(ref, variants, force=force, progress=progress)
        return pipeline.quantize(ref, variants, max_drop=max_drop, force=force, progress=progress)

    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion:
        return self.services.pipeline.import_model(path, name, eval_data=eval_data)

    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]:
        registry = self.services.registry
        mv = registry.get_version(ref)
        return registry.set_stage(mv.model, mv.version, stage, archive_existing=archive_existing)

    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[VerifyResult]]:
        s = self.settings
        if not s.keys_dir.joinpath("keylist.pb").exists():  # a home from before key lists
            pub = load_public(s.public_key_path)
            return self.services.pipeline.verify(ref, {key_id(pub): pub})
        ring = self.services.keyring
        return self.services.pipeline.verify(
            ref, ring.public_keys(), revoked=ring.key_list().revoked
        )

    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]:
        return self.services.pipeline.export(ref, out, variants=variants)

    # -- devices

    def list_devices(
        self,
        selector: Selector | None,
        *,
        state: str | None = None,
        online_only: bool = False,
        where: DeviceFilter | None = None,
    ) -> list[Device]:
        found = self.services.devices.find(selector, online=True if online_only else None)
        if state:
            found = [d for d in found if d.state == state.lower()]
        if where is not None:
            now = datetime.now(UTC)
            found = [d for d in found if where.matches(d, now=now)]
        return found

    def get_device(self, device_id: str) -> Device:
        return self.services.devices.get(device_id)

    def enroll_device(
        self, device_id: str, *, group: str, tags: Mapping[str, str], broker_url: str
    ) -> EnrollmentBundle:
        """Enrol the device and issue its MQTT credential (password + client certificate;
        a running `fleet serve` reloads its broker when the credentials change)."""
        devices, identities = self.services.devices, self.services.identities
        check_device_id(device_id)
        try:
            devices.get(device_id)
        except NotFound:
            pass
        else:  # before a credential is issued: an existing device's must stay valid
            raise AlreadyExists(f"device {device_id!r} is already enrolled")
        cred = identities.enroll(device_id)
        try:
            d = devices.enroll(device_id, group=group, tags=tags)
        except AlreadyExists:  # enrolled meanwhile by someone else: theirs stands
            raise
        except BaseException:
            identities.revoke(device_id)
            raise
        self._wait_broker()
        return self.bundle(d, broker_url=broker_url, credential=cred)

    def _wait_broker(self) -> None:
        """With a `fleet serve` running here: return once its broker applied the change."""
        if self.apply_credentials is not None:  # inside `fleet serve`
            self.apply_credentials()
            return
        if ServeInfo.read(self.settings.serve_path) is None:
            return
        identities = self.services.identities
        if not identities.wait_applied(identities.version()):
            logger.warning(
                "the running coordinator's broker has not applied the new credentials yet"
            )

    def enroll_devices(
        self, specs: Sequence[DeviceSpec], *, broker_url: str, skip_existing: bool = False
    ) -> EnrolledBatch:
        """Enrol many devices at once: one write of the credential records, one database
        transaction, one broker apply (a running `fleet serve` reloads once per batch).

        All or nothing: a bad or repeated id (InvalidArgument, naming it and what is
        accepted) or an id enrolled before (AlreadyExists) enrols none. With
        `skip_existing`, ids enrolled before are left as they are (their credentials
        stay valid) and listed in the answer; the others are enrolled."""
        devices, identities = self.services.devices, self.services.identities
        ids = check_batch_ids(s.device_id for s in specs)
        known = devices.existing(ids)
        if known and not skip_existing:
            raise AlreadyExists(
                f"{already_enrolled(known)}; nothing was enrolled (--skip-existing leaves "
                "devices enrolled before as they are and enrols the others)"
            )
        skip = set(known)
        todo = [s for s in specs if s.device_id not in skip]
        if not todo:
            return EnrolledBatch(bundles=(), existing=tuple(known))
        creds = identities.enroll_many(s.device_id for s in todo)
        try:
            enrolled = devices.enroll_many(todo)
        except BaseException:
            # undo ours; ids someone else enrolled meanwhile keep the device they made
            with contextlib.suppress(FleetError):
                skip |= set(devices.existing([s.device_id for s in todo]))
            identities.revoke_many(s.device_id for s in todo if s.device_id not in skip)
            raise
        self._wait_broker()
        common = self._bundle_common(broker_url)
        logger.info("enrolled %d devices in one batch (%d existed)", len(enrolled), len(known))
        return EnrolledBatch(
            bundles=tuple(self._bundle(d, common, creds[d.device_id]) for d in enrolled),
            existing=tuple(known),
        )

    def reissue_devices(self, device_ids: Sequence[str], *, broker_url: str) -> EnrolledBatch:
        """New credentials for enrolled devices, which keep their id, group, tags, state
        and history: a new password and client certificate each, in one credential write
        and one broker apply. The old password stops working at that reload (a session
        open on it is cut); the old certificate goes on the CRL, so it cannot connect
        again (a TLS session already open on it lasts until it disconnects: the CRL is
        checked at the handshake). For a lost bundle, a re-flashed device or an enrolment
        answer that broke off. All or nothing: an unknown or revoked id reissues none."""
        ids = check_batch_ids(device_ids, done="reissued")
        found = self.services.devices.get_many(ids)
        revoked = [d.device_id for d in found if d.revoked_at is not None]
        if revoked:
            raise Conflict(
                f"{some_devices(revoked, 'revoked')}; revocation is for good (enrol a "
                "replacement under a new id); nothing was reissued"
            )
        creds = self.services.identities.enroll_many(ids)
        self._wait_broker()
        common = self._bundle_common(broker_url)
        logger.info("reissued the credentials of %d devices", len(found))
        return EnrolledBatch(
            bundles=tuple(self._bundle(d, common, creds[d.device_id]) for d in found),
            existing=(),
        )

    def bundle(
        self, d: Device, *, broker_url: str, credential: DeviceCredential | None = None
    ) -> EnrollmentBundle:
        return self._bundle(d, self._bundle_common(broker_url), credential)

    def _bundle_common(self, broker_url: str) -> dict[str, str]:
        """The fields every device's bundle shares (read once per batch)."""
        ring = self.services.keyring
        ring.ensure()  # a FLEET_HOME from before key lists gets its root key now
        return {
            "root_public_key": ring.root_pub_path.read_text(),
            "key_list": base64.b64encode(ring.key_list_bytes()).decode(),
            "broker_url": broker_url,
            "signing_public_key": self.settings.public_key_path.read_text(),
        }

    @staticmethod
    def _bundle(
        d: Device, common: Mapping[str, str], credential: DeviceCredential | None
    ) -> EnrollmentBundle:
        return EnrollmentBundle(
            root_public_key=common["root_public_key"],
            key_list=common["key_list"],
            device_id=d.device_id,
            broker_url=common["broker_url"],
            signing_public_key=common["signing_public_key"],
            group=d.group,
            tags=dict(d.tags),
            username=credential.username if credential else None,
            password=credential.password if credential else None,
            ca_certificate=credential.ca_pem if credential else None,
            client_certificate=credential.cert_pem if credential else None,
            client_key=credential.key_pem if credential else None,
        )

    def revoke_device(self, device_id: str, *, reason: str = "revoked") -> tuple[Device, list[str]]:
        """Remove the device's MQTT credential (password entry gone, certificate on the CRL;
        a running `fleet serve` reloads its broker), mark it revoked and close its open
        rollout states. Returns the device and the rollouts whose states were closed."""
        devices = self.services.devices
        devices.get(device_id)  # NotFound first
        try:
            self.services.identities.revoke(device_id)
        except FleetError as e:  # enrolled before identities existed: nothing to remove
            logger.warning("%s", e)
        d = devices.revoke(device_id)
        self._wait_broker()
        closed = self.services.rollouts.close_device(
            device_id, reason=reason, detail=f"device {device_id} was {reason} by an operator"
        )
        return d, closed

    def advertised_broker(self) -> str:
        """The broker URL devices should use: flag/env, else the running `fleet serve`'s."""
        s = self.settings
        if s.advertise_broker:
            return s.advertise_broker
        info = ServeInfo.read(s.serve_path)
        if info is not None:
            return info.advertise_broker
        if s.broker:
            return s.broker
        url = f"mqtt://127.0.0.1:{s.mqtt_port or DEFAULT_MQTT_PORT}"
        logger.warning(
            "no coordinator running and no --advertise-broker: bundle names %s "
            "(the default managed broker; devices elsewhere need --advertise-broker)",
            url,
        )
        return url

    def status(self, *, coordinator: str, broker_url: str) -> FleetStatus:
        devices = self.services.devices.find()
        by_state: dict[str, int] = {}
        for d in devices:
            by_state[d.state] = by_state.get(d.state, 0) + 1
        return FleetStatus(
            coordinator=coordinator,
            coordinator_version=coordinator_version(),
            broker_url=broker_url,
            devices=len(devices),
            online=sum(1 for d in devices if d.online),
            by_state=by_state,
            replicas=tuple(self.replicas()),
        )

    def replicas(self) -> list[ReplicaInfo]:
        """The coordinator replicas sharing this database (none unless --replica)."""
        return ReplicaStore(self.services.database).list()

    # -- rollouts, as stored

    def plan_rollout(
        self, ref: ModelRef, selector: Selector, policy: Policy | None
    ) -> tuple[Rollout, list[RolloutDevice]]:
        """What a rollout would do, planned from the database (a dry run; nothing stored)."""
        from edgefleet.cloud.coordinator import plan_deploy  # the MQTT side (paho)
        from edgefleet.cloud.rollouts.controller import build_rollout

        plan = plan_deploy(self.services.registry, self.services.devices, ref, selector)
        return build_rollout(
            plan, selector, policy or Policy.all_at_once(), now=time.time(), dry_run=True
        )

    def list_rollouts(self, *, active_only: bool) -> list[Rollout]:
        return self.services.rollouts.find(active_only=active_only)

    def get_rollout(self, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]:
        rollouts = self.services.rollouts
        return rollouts.get(rollout_id), rollouts.devices(rollout_id)

    def watch_rollout(self, rollout_id: str, *, interval: float = 0.5) -> Iterator[Rollout]:
        """The rollout now, then whenever it changes, until it is final (polls the database)."""
        last: Rollout | None = None
        while True:
            r = self.services.rollouts.get(rollout_id)
            if last is None or changed(last, r):
                last = r
                yield r
            if r.final:
                return
            time.sleep(interval)

    # -- drift

    def drift(self, *, by: str, model: str | None) -> list[DriftRow]:
        """PSI now, from the telemetry in the database (what `fleet serve` alerts on)."""
        from edgefleet.cloud.drift.monitor import check_by, parse_model  # numpy

        check_by(by)
        name, version = parse_model(model)
        return self.services.drift_monitor.report(by=by, model=name, version=version)

    def alerts(self, *, include_resolved: bool) -> list[Alert]:
        return self.services.alerts.find(open_only=not include_resolved)


def changed(before: Rollout, now: Rollout) -> bool:
    """Whether a watcher should hear of `now` (a new `updated_at` alone is no change)."""
    return now.with_changes(updated_at=0) != before.with_changes(updated_at=0)
