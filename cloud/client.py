"""FleetClient: what the `fleet` CLI talks to.

`LocalClient` runs everything in this process against the stores named in the
settings. `cloud.remote.GrpcClient` talks to a running `fleet serve` over
FleetService and implements the same protocol, so commands print the same in
both modes. Deploying needs the coordinator's MQTT connection, so only the
gRPC client can do it.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import edgefleet
from edgefleet.cloud.config import DEFAULT_MQTT_PORT, CloudSettings, ServeInfo, write_config
from edgefleet.cloud.registry import ModelRef, ModelSummary, ModelVersion, RegistryStore

if TYPE_CHECKING:
    from edgefleet.cloud.db import Database
    from edgefleet.cloud.devices import Device, DeviceFilter, DeviceStore, Selector
    from edgefleet.cloud.drift import Alert, DriftMonitor, DriftRow
    from edgefleet.cloud.identity import DeviceCredential, IdentityStore
    from edgefleet.cloud.replicas import ReplicaInfo
    from edgefleet.cloud.rollouts import Policy, Rollout, RolloutDevice, RolloutStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitResult:
    home: Path
    created_key: bool
    key_id: str
    registry: str
    artifacts: str
    config: Path
    created_token: bool = False
    root_key_id: str = ""
    created_root: bool = False


BUNDLE_FORMAT = "edgefleet-enrollment/v1"


@dataclass(frozen=True)
class EnrollmentBundle:
    """Everything a device needs to join (fleet.v1.EnrollmentBundle as JSON)."""

    device_id: str
    broker_url: str
    signing_public_key: str  # PEM: the only key the device trusts
    topic_prefix: str = "ef/v1"
    group: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    ca_certificate: str | None = None  # PEM, for mqtts:// with a private CA
    client_certificate: str | None = field(default=None, repr=False)  # PEM, CN = device id
    client_key: str | None = field(default=None, repr=False)  # PEM
    root_public_key: str = ""  # PEM: the root of the key list
    key_list: str = ""  # base64 SignedKeyList: the online keys the device accepts

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "device_id": self.device_id,
            "broker_url": self.broker_url,
            "username": self.username,
            "password": self.password,
            "signing_public_key": self.signing_public_key,
            "ca_certificate": self.ca_certificate,
            "client_certificate": self.client_certificate,
            "client_key": self.client_key,
            "topic_prefix": self.topic_prefix,
            "group": self.group,
            "tags": dict(self.tags),
            "root_public_key": self.root_public_key,
            "key_list": self.key_list,
        }


@dataclass(frozen=True)
class FleetStatus:
    coordinator: str  # HOST:PORT, or "" when none is running
    coordinator_version: str
    broker_url: str
    devices: int
    online: int
    by_state: Mapping[str, int]
    #: `fleet serve --replica`: every replica with a row, the leader first
    replicas: tuple[ReplicaInfo, ...] = ()


class FleetClient(Protocol):
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
        on_epoch: Callable[[Any], None] | None,
    ) -> ModelVersion: ...
    def quantize(
        self,
        ref: ModelRef,
        variants: Sequence[str],
        *,
        max_drop: float,
        force: bool,
        progress: Callable[[str, int, int], None],
    ) -> ModelVersion: ...
    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion: ...
    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]: ...
    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[Any]]: ...
    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]: ...
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
    def status(self) -> FleetStatus: ...
    def create_rollout(
        self, ref: ModelRef, selector: Selector, policy: Policy | None, *, dry_run: bool
    ) -> tuple[Rollout, list[RolloutDevice]]: ...
    def list_rollouts(self, *, active_only: bool) -> list[Rollout]: ...
    def get_rollout(self, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]: ...
    def watch_rollout(self, rollout_id: str) -> Iterator[Rollout]: ...
    def control_rollout(self, rollout_id: str, action: str) -> Rollout: ...
    def drift(self, *, by: str, model: str | None) -> list[DriftRow]: ...
    def alerts(self, *, include_resolved: bool) -> list[Alert]: ...
    def close(self) -> None: ...


class LocalClient:
    """All of it in-process: SQL registry, artifact store, pipeline, signing key."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        #: set by `fleet serve` for its own broker: apply changed credentials now
        self.apply_credentials: Callable[[], None] | None = None

    @cached_property
    def database(self) -> Database:
        """The one database (one engine) every store here shares; schema checked on open."""
        from edgefleet.cloud.db import Database

        self._require_init()
        return Database(self.settings.registry_url)

    @cached_property
    def registry(self) -> RegistryStore:
        from edgefleet.cloud.registry import open_registry

        return open_registry(self.database)

    @cached_property
    def devices(self) -> DeviceStore:
        from edgefleet.cloud.devices import DeviceStore

        return DeviceStore(self.database)

    @cached_property
    def identities(self) -> IdentityStore:
        from edgefleet.cloud.identity import IdentityStore

        self._require_init()
        return IdentityStore(self.settings.identity_dir)

    @cached_property
    def rollouts(self) -> RolloutStore:
        from edgefleet.cloud.rollouts import RolloutStore

        return RolloutStore(self.database)

    @cached_property
    def pipeline(self) -> Any:
        from edgefleet.cloud.artifacts import open_artifact_store
        from edgefleet.cloud.pipeline import Pipeline
        from edgefleet.cloud.signing import load_private_key

        store = open_artifact_store(
            self.settings.artifacts, s3_endpoint_url=self.settings.s3_endpoint_url
        )
        return Pipeline(
            self.registry,
            store,
            lambda: load_private_key(
                self.settings.signing_key_path, passphrase=self.settings.passphrase
            ),
        )

    def _require_init(self) -> None:
        from edgefleet.protos.errors import NotFound

        if not self.settings.signing_key_path.exists():
            raise NotFound(
                f"{self.settings.home_dir} is not initialised (no signing key): run 'fleet init' first"
            )

    @property
    def keyring(self) -> Any:
        """FLEET_HOME's keys (`cloud.keys.KeyRing`)."""
        from edgefleet.cloud.keys import KeyRing

        return KeyRing(self.settings.keys_dir)

    def init(self, *, root_passphrase: bytes | None = None) -> InitResult:
        """Create FLEET_HOME; everything made here is private to its owner (umask 077)."""
        old = os.umask(0o077)
        try:
            return self._init(root_passphrase=root_passphrase)
        finally:
            os.umask(old)

    def _init(self, *, root_passphrase: bytes | None) -> InitResult:
        from edgefleet.cloud.artifacts import open_artifact_store
        from edgefleet.cloud.db import Database
        from edgefleet.cloud.signing import create_keypair, load_public
        from edgefleet.protos.errors import Unavailable
        from edgefleet.protos.manifest import key_id

        s = self.settings
        fresh = not s.home_dir.exists()
        try:
            s.home_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise Unavailable(f"cannot create FLEET_HOME {s.home_dir}: {e.strerror}") from None
        try:
            # check the stores before writing anything: a bad URL leaves nothing behind;
            # an empty database gets the current schema (migrations), an old one is refused
            store = open_artifact_store(s.artifacts, s3_endpoint_url=s.s3_endpoint_url)
            store.check()
            Database(s.registry_url).close()
            created = create_keypair(s.signing_key_path, s.public_key_path, passphrase=s.passphrase)
            created_root = self.keyring.ensure(passphrase=root_passphrase)
            created_token = create_token(s.token_path)
            ensure_admin_token(s)
            cfg = write_config(s)
            from edgefleet.cloud.home import secure_home

            secure_home(s)
        except BaseException:
            if fresh:  # a failed first init leaves no half-made FLEET_HOME behind
                import shutil

                shutil.rmtree(s.home_dir, ignore_errors=True)
            raise
        return InitResult(
            home=s.home_dir,
            created_key=created,
            key_id=key_id(load_public(s.public_key_path)),
            registry=_redact(s.registry_url),
            artifacts=s.artifacts,
            config=cfg,
            created_token=created_token,
            root_key_id=key_id(self.keyring.root_public()),
            created_root=created_root,
        )

    def list_models(self) -> list[ModelSummary]:
        return self.registry.list_models()

    def list_versions(self, model: str) -> list[ModelVersion]:
        return self.registry.list_versions(model)

    def get_version(self, ref: ModelRef) -> ModelVersion:
        return self.registry.get_version(ref)

    def train(self, name: str, data: str, **kw: Any) -> ModelVersion:
        return self.pipeline.train(name, data, **kw)  # type: ignore[no-any-return]

    def quantize(self, ref: ModelRef, variants: Sequence[str], **kw: Any) -> ModelVersion:
        return self.pipeline.quantize(ref, variants, **kw)  # type: ignore[no-any-return]

    def import_model(self, path: Path, name: str, *, eval_data: Path | None) -> ModelVersion:
        return self.pipeline.import_model(path, name, eval_data=eval_data)  # type: ignore[no-any-return]

    def promote(
        self, ref: ModelRef, stage: str, *, archive_existing: bool
    ) -> tuple[ModelVersion, list[int]]:
        mv = self.registry.get_version(ref)
        return self.registry.set_stage(
            mv.model, mv.version, stage, archive_existing=archive_existing
        )

    def verify(self, ref: ModelRef) -> tuple[ModelVersion, list[Any]]:
        from edgefleet.cloud.signing import load_public

        ring = self.keyring
        if not self.settings.keys_dir.joinpath("keylist.pb").exists():  # before key lists
            from edgefleet.protos.manifest import key_id

            pub = load_public(self.settings.public_key_path)
            return self.pipeline.verify(ref, {key_id(pub): pub})  # type: ignore[no-any-return]
        return self.pipeline.verify(  # type: ignore[no-any-return]
            ref, ring.public_keys(), revoked=ring.key_list().revoked
        )

    def export(self, ref: ModelRef, out: Path, *, variants: Sequence[str]) -> list[Path]:
        return self.pipeline.export(ref, out, variants=variants)  # type: ignore[no-any-return]

    # -- devices ------------------------------------------------------------------

    def list_devices(
        self,
        selector: Selector | None,
        *,
        state: str | None = None,
        online_only: bool = False,
        where: DeviceFilter | None = None,
    ) -> list[Device]:
        found = self.devices.find(selector, online=True if online_only else None)
        if state:
            found = [d for d in found if d.state == state.lower()]
        if where is not None:
            from datetime import datetime

            now = datetime.now(UTC)
            found = [d for d in found if where.matches(d, now=now)]
        return found

    def get_device(self, device_id: str) -> Device:
        return self.devices.get(device_id)

    def enroll_device(
        self,
        device_id: str,
        *,
        group: str,
        tags: Mapping[str, str],
        broker_url: str | None = None,
    ) -> EnrollmentBundle:
        """Enrol the device and issue its MQTT credential (password + client certificate;
        a running `fleet serve` reloads its broker when the credentials change)."""
        from edgefleet.protos.errors import AlreadyExists, NotFound
        from edgefleet.protos.topics import check_device_id

        check_device_id(device_id)
        try:
            self.devices.get(device_id)
        except NotFound:
            pass
        else:  # before a credential is issued: an existing device's must stay valid
            raise AlreadyExists(f"device {device_id!r} is already enrolled")
        cred = self.identities.enroll(device_id)
        try:
            d = self.devices.enroll(device_id, group=group, tags=tags)
        except AlreadyExists:  # enrolled meanwhile by someone else: theirs stands
            raise
        except BaseException:
            self.identities.revoke(device_id)
            raise
        self._wait_broker()
        return self.bundle(d, broker_url=broker_url or self.advertised_broker(), credential=cred)

    def _wait_broker(self) -> None:
        """With a `fleet serve` running here: return once its broker applied the change."""
        if self.apply_credentials is not None:  # inside `fleet serve`
            self.apply_credentials()
            return
        if ServeInfo.read(self.settings.serve_path) is None:
            return
        if not self.identities.wait_applied(self.identities.version()):
            logger.warning(
                "the running coordinator's broker has not applied the new credentials yet"
            )

    def bundle(
        self, d: Device, *, broker_url: str, credential: DeviceCredential | None = None
    ) -> EnrollmentBundle:
        import base64

        ring = self.keyring
        ring.ensure()  # a FLEET_HOME from before key lists gets its root key now
        return EnrollmentBundle(
            root_public_key=ring.root_pub_path.read_text(),
            key_list=base64.b64encode(ring.key_list_bytes()).decode(),
            device_id=d.device_id,
            broker_url=broker_url,
            signing_public_key=self.settings.public_key_path.read_text(),
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
        self.devices.get(device_id)  # NotFound first
        try:
            self.identities.revoke(device_id)
        except Exception as e:  # enrolled before identities existed: nothing to remove
            logger.warning("%s", e)
        d = self.devices.revoke(device_id)
        self._wait_broker()
        closed = self.rollouts.close_device(
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

    def create_rollout(
        self, ref: ModelRef, selector: Selector, policy: Policy | None, *, dry_run: bool
    ) -> tuple[Rollout, list[RolloutDevice]]:
        """Only a dry run works in-process (it plans from the database); a real rollout
        needs the coordinator's controller."""
        import time

        from edgefleet.cloud.coordinator import plan_deploy
        from edgefleet.cloud.rollouts import Policy
        from edgefleet.cloud.rollouts.controller import build_rollout
        from edgefleet.protos.errors import Unavailable

        if not dry_run:
            raise Unavailable(
                f"a rollout needs a running coordinator: start 'fleet serve' for "
                f"{self.settings.home_dir} or pass --coordinator HOST:PORT"
            )
        plan = plan_deploy(self.registry, self.devices, ref, selector)
        return build_rollout(
            plan, selector, policy or Policy.all_at_once(), now=time.time(), dry_run=True
        )

    def list_rollouts(self, *, active_only: bool) -> list[Rollout]:
        return self.rollouts.find(active_only=active_only)

    def get_rollout(self, rollout_id: str) -> tuple[Rollout, list[RolloutDevice]]:
        return self.rollouts.get(rollout_id), self.rollouts.devices(rollout_id)

    def watch_rollout(self, rollout_id: str, *, interval: float = 0.5) -> Iterator[Rollout]:
        """The rollout now, then whenever it changes, until it is final (polls the database)."""
        import time

        last: Rollout | None = None
        while True:
            r = self.rollouts.get(rollout_id)
            if last is None or r.with_changes(updated_at=0) != last.with_changes(updated_at=0):
                last = r
                yield r
            if r.final:
                return
            time.sleep(interval)

    def control_rollout(self, rollout_id: str, action: str) -> Rollout:
        from edgefleet.protos.errors import Unavailable

        self.rollouts.get(rollout_id)  # NotFound first
        raise Unavailable(
            f"'{action}' is carried out by the coordinator's rollout controller: start "
            f"'fleet serve' for {self.settings.home_dir} or pass --coordinator HOST:PORT"
        )

    # -- drift --------------------------------------------------------------------

    @cached_property
    def drift_monitor(self) -> DriftMonitor:
        from edgefleet.cloud.drift import AlertStore, DriftMonitor
        from edgefleet.cloud.telemetry import TelemetryStore

        s = self.settings
        return DriftMonitor(
            telemetry=TelemetryStore(self.database),
            alerts=AlertStore(self.database),
            registry=self.registry,
            devices=self.devices,
            threshold=s.drift_threshold,
            window_s=s.drift_window,
        )

    def drift(self, *, by: str, model: str | None) -> list[DriftRow]:
        """PSI now, from the telemetry in the database (what `fleet serve` alerts on)."""
        from edgefleet.cloud.drift.monitor import check_by, parse_model

        check_by(by)
        name, version = parse_model(model)
        return self.drift_monitor.report(by=by, model=name, version=version)

    def alerts(self, *, include_resolved: bool) -> list[Alert]:
        return self.drift_monitor.alerts.find(open_only=not include_resolved)

    def status(self) -> FleetStatus:
        info = ServeInfo.read(self.settings.serve_path)
        devices = self.devices.find()
        by_state: dict[str, int] = {}
        for d in devices:
            by_state[d.state] = by_state.get(d.state, 0) + 1
        return FleetStatus(
            coordinator=info.grpc if info else "",
            coordinator_version=coordinator_version(),
            broker_url=(info.advertise_broker if info else self.settings.broker),
            devices=len(devices),
            online=sum(1 for d in devices if d.online),
            by_state=by_state,
            replicas=tuple(self.replicas()),
        )

    def replicas(self) -> list[ReplicaInfo]:
        """The coordinator replicas sharing this database (none unless --replica)."""
        from edgefleet.cloud.replicas.registry import ReplicaStore

        return ReplicaStore(self.database).list()

    def close(self) -> None:
        if "registry" in self.__dict__:
            self.registry.close()
        if "devices" in self.__dict__:
            self.devices.close()
        if "rollouts" in self.__dict__:
            self.rollouts.close()
        if "drift_monitor" in self.__dict__:
            self.drift_monitor.telemetry.close()
            self.drift_monitor.alerts.close()
        if "database" in self.__dict__:
            self.database.close()


def create_token(path: Path) -> bool:
    """Write a new API token (32 random bytes, urlsafe, mode 0600) unless one exists."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return True


def ensure_admin_token(settings: CloudSettings) -> bool:
    """Make FLEET_HOME/keys/token the admin token named `admin` in the database, unless a
    token of that name exists (also a revoked one); whether it did."""
    from edgefleet.cloud.access import open_access_store
    from edgefleet.cloud.access.model import ADMIN, ADMIN_TOKEN_NAME

    if not settings.token_path.exists():
        return False
    secret = read_token(settings.token_path)
    store = open_access_store(settings.registry_url)
    try:
        made = store.ensure_token(ADMIN_TOKEN_NAME, ADMIN, secret, created_by="fleet init")
        token = store.authenticate(secret)
    finally:
        store.close()
    if made:
        logger.info("%s registered as the admin token %r", settings.token_path, ADMIN_TOKEN_NAME)
    elif token is None or not token.active:
        logger.warning(
            "%s is not an active token of this coordinator (token %r has another secret or was "
            "revoked): on this host, 'fleet tokens create NAME --role admin' makes a new one",
            settings.token_path,
            ADMIN_TOKEN_NAME,
        )
    return made


def read_token(path: Path) -> str:
    from edgefleet.protos.errors import Unauthenticated

    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise Unauthenticated(
            f"no API token at {path}: run 'fleet init' there, or pass --token / FLEET_TOKEN"
        ) from None
    except OSError as e:
        raise Unauthenticated(f"cannot read API token {path}: {e.strerror}") from None
    if not token:
        raise Unauthenticated(f"API token file {path} is empty: run 'fleet init' to recreate it")
    return token


def coordinator_version() -> str:
    return edgefleet.__version__


def _redact(url: str) -> str:
    from edgefleet.cloud.db import normalize_url

    return normalize_url(url).render_as_string(hide_password=True)
