"""A real Mosquitto with identities on, as the tests' `broker` fixture hands it out.

Anonymous access is off, as in `fleet serve`: devices use `url` with their password
(`credentials_for(device_id)`), or `tls_url` with their client certificate
(`tls_credentials_for`); the coordinator and test watchers use `coordinator()`.
Tests with their own topic prefix call `allow_prefix(prefix)` (or pass it to
`credentials_for`) so the generated ACLs cover it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from edgefleet.cloud.broker import ManagedBroker, free_port
from edgefleet.cloud.identity import DeviceCredential, IdentityStore, write_broker_material
from edgefleet.cloud.identity.material import BrokerAuth
from edgefleet.protos.topics import PREFIX, Topics
from edgefleet.protos.transport import MqttAccess, MqttSettings


class SecureBroker:
    def __init__(self, root: Path, *, persistence: bool = True, tls_host: str = "127.0.0.1"):
        self.root = root
        self.identities = IdentityStore(root / "keys")
        #: the default prefix, and "test" so the coordinator's credential covers the
        #: test/<random> prefixes tests make up (devices under those need allow_prefix)
        self.prefixes: list[str] = [PREFIX, "test"]
        self.tls_host = tls_host
        self.tls_port = free_port(tls_host)
        self._creds: dict[str, DeviceCredential] = {}
        self.broker = ManagedBroker(root / "mqtt", persistence=persistence, auth=self._material())

    def _material(self) -> BrokerAuth:
        return write_broker_material(
            self.identities,
            self.root / "mqtt" / "auth",
            topics=[Topics(p) for p in self.prefixes],
            tls_listeners=[(self.tls_host, self.tls_port)],
        )

    def apply(self) -> None:
        """Rewrite the identity files and SIGHUP the broker (sessions stay)."""
        self._material()
        self.broker.reload()

    # -- where ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.tls_host}:{self.tls_port}"

    @property
    def coordinator_url(self) -> str:
        return self.broker.coordinator_url

    # -- who --------------------------------------------------------------------------

    def allow_prefix(self, prefix: str) -> None:
        if prefix not in self.prefixes:
            self.prefixes.append(prefix)
            self.apply()

    def coordinator(self) -> MqttAccess:
        own = self.identities.coordinator()
        return MqttAccess(self.coordinator_url, username=own.username, password=own.password)

    def watcher(self, name: str = "watch") -> MqttSettings:
        """Settings for a test's own observer (the coordinator's rights, its own client id)."""
        return self.coordinator().settings(f"{name}-{uuid.uuid4().hex[:6]}")

    def enroll(self, device_id: str, *, prefix: str | None = None) -> DeviceCredential:
        """The device's credential, issued on first use (the broker reloaded)."""
        if prefix is not None:
            self.allow_prefix(prefix)
        cred = self._creds.get(device_id)
        if cred is None:
            cred = self._creds[device_id] = self.identities.enroll(device_id)
            self.apply()
        return cred

    def password_for(self, device_id: str) -> str:
        return self.enroll(device_id).password

    def passwords(self, device_ids: Iterable[str], *, prefix: str | None = None) -> dict[str, str]:
        """Credentials for many devices with one reload: {device id: password}."""
        if prefix is not None and prefix not in self.prefixes:
            self.prefixes.append(prefix)
        new = [d for d in dict.fromkeys(device_ids) if d not in self._creds]
        self._creds.update(self.identities.enroll_many(new))
        self.apply()
        return {d: c.password for d, c in self._creds.items()}

    def enroll_fleet(self, fleet: Any, *, prefix: str | None = None) -> None:
        """Give a SimulatedFleet / SimCluster its devices' passwords (and allow `prefix`)."""
        ids = [e.device_id for e in fleet.ids_for_enrollment()]
        got = self.passwords(ids, prefix=prefix)
        fleet.credentials = {d: got[d] for d in ids}

    def credentials_for(self, device_id: str, *, prefix: str | None = None) -> MqttAccess:
        cred = self.enroll(device_id, prefix=prefix)
        return MqttAccess(self.url, username=device_id, password=cred.password)

    def agent_settings(self, device_id: str, *, prefix: str | None = None) -> dict[str, Any]:
        """broker_url/username/password for AgentSettings(**…)."""
        a = self.credentials_for(device_id, prefix=prefix)
        return {"broker_url": a.url, "username": a.username, "password": a.password}

    def tls_credentials_for(self, device_id: str) -> MqttAccess:
        cred = self.enroll(device_id)
        d = self.root / "devices" / device_id
        d.mkdir(parents=True, exist_ok=True)
        (d / "client.pem").write_text(cred.cert_pem)
        (d / "client.key").write_text(cred.key_pem)
        return MqttAccess(
            self.tls_url,
            ca_file=str(self.identities.ca.cert_path),
            cert_file=str(d / "client.pem"),
            key_file=str(d / "client.key"),
        )

    def use_identities(self, identities: IdentityStore) -> None:
        """Take the credentials from `identities` (e.g. a FLEET_HOME's, for a `fleet serve
        --broker` against this broker: what `fleet broker acl` hands an operator)."""
        self.identities = identities
        self._creds.clear()
        self.apply()

    def revoke(self, device_id: str) -> None:
        self.identities.revoke(device_id)
        self._creds.pop(device_id, None)
        self.apply()

    # -- the broker process -------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:  # start/stop/restart/pid/port/host/log_path…
        return getattr(self.broker, name)

    def __enter__(self) -> SecureBroker:
        self.broker.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.broker.stop()
