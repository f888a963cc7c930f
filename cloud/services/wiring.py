"""`Services`: the coordinator's parts wired once from `CloudSettings`.

One `Database` (one engine) for the settings' URL, shared by every store; the artifact
store, the pipeline over both, the key ring and the signing key. Each part is made on
first use and closed by `close()`; a part that needs an initialised FLEET_HOME raises
`NotFound` ("run 'fleet init'") until there is one. Both adapters (`LocalClient`,
the `FleetService` servicer via `FleetApp`) and `fleet serve` take their parts from here.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.access import AccessStore, open_access_store
from edgefleet.cloud.artifacts import ArtifactStore, open_artifact_store
from edgefleet.cloud.config import CloudSettings
from edgefleet.cloud.db import Database
from edgefleet.cloud.devices import DeviceStore
from edgefleet.cloud.identity import IdentityStore
from edgefleet.cloud.keys import KeyRing
from edgefleet.cloud.registry import RegistryStore, open_registry
from edgefleet.cloud.rollouts import RolloutStore
from edgefleet.cloud.signing import load_private_key
from edgefleet.protos.errors import NotFound

if TYPE_CHECKING:
    from edgefleet.cloud.drift import DriftMonitor
    from edgefleet.cloud.drift.alerts import AlertStore
    from edgefleet.cloud.fl.store import FlStore
    from edgefleet.cloud.pipeline import Pipeline
    from edgefleet.cloud.telemetry.store import TelemetryStore


class Services:
    """The parts of one coordinator (or one CLI process without one), made once each."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings

    def require_init(self) -> None:
        """NotFound unless FLEET_HOME was made by `fleet init` (its signing key exists)."""
        if not self.settings.signing_key_path.exists():
            raise NotFound(
                f"{self.settings.home_dir} is not initialised (no signing key): "
                "run 'fleet init' first"
            )

    @cached_property
    def database(self) -> Database:
        """The one database (one engine) every store here shares; schema checked on open."""
        self.require_init()
        return Database(self.settings.registry_url)

    @cached_property
    def registry(self) -> RegistryStore:
        return open_registry(self.database)

    @cached_property
    def devices(self) -> DeviceStore:
        return DeviceStore(self.database)

    @cached_property
    def rollouts(self) -> RolloutStore:
        return RolloutStore(self.database)

    @cached_property
    def telemetry(self) -> TelemetryStore:
        from edgefleet.cloud.telemetry.store import TelemetryStore  # cloud.telemetry: MQTT

        return TelemetryStore(self.database)

    @cached_property
    def alerts(self) -> AlertStore:
        from edgefleet.cloud.drift.alerts import AlertStore  # cloud.drift: numpy

        return AlertStore(self.database)

    @cached_property
    def access(self) -> AccessStore:
        """Tokens and the audit log."""
        return open_access_store(self.database)

    @cached_property
    def fl_store(self) -> FlStore:
        from edgefleet.cloud.fl.store import FlStore

        return FlStore(self.database)

    @cached_property
    def identities(self) -> IdentityStore:
        self.require_init()
        return IdentityStore(self.settings.identity_dir)

    @cached_property
    def artifacts(self) -> ArtifactStore:
        s = self.settings
        return open_artifact_store(s.artifacts, s3_endpoint_url=s.s3_endpoint_url)

    @cached_property
    def pipeline(self) -> Pipeline:
        from edgefleet.cloud.pipeline import Pipeline  # numpy, the quantizers

        return Pipeline(self.registry, self.artifacts, self.signing_key)

    @cached_property
    def drift_monitor(self) -> DriftMonitor:
        from edgefleet.cloud.drift import DriftMonitor  # numpy

        s = self.settings
        return DriftMonitor(
            telemetry=self.telemetry,
            alerts=self.alerts,
            registry=self.registry,
            devices=self.devices,
            threshold=s.drift_threshold,
            window_s=s.drift_window,
        )

    @property
    def keyring(self) -> KeyRing:
        """FLEET_HOME's keys (read from disk on each use: `fleet keys` changes them)."""
        return KeyRing(self.settings.keys_dir)

    def signing_key(self) -> Ed25519PrivateKey:
        """The online signing key, read (and decrypted) when a signature is made."""
        s = self.settings
        return load_private_key(s.signing_key_path, passphrase=s.passphrase)

    def close(self) -> None:
        """Close what was opened: the stores borrow the database, so it goes last."""
        for name in (
            "registry",
            "devices",
            "rollouts",
            "telemetry",
            "alerts",
            "access",
            "fl_store",
        ):
            part = self.__dict__.pop(name, None)
            if part is not None:
                part.close()
        self.__dict__.pop("drift_monitor", None)
        self.__dict__.pop("pipeline", None)
        db: Database | None = self.__dict__.pop("database", None)
        if db is not None:
            db.close()
