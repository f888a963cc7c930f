"""The files a Mosquitto broker needs to enforce identities, written from an IdentityStore.

Layout (per_listener_settings true):

- the coordinator's listener (loopback): coordinator.passwd + coordinator.acl; client ids
  are free there, so the coordinator's clients (control loop, telemetry, replicas) may
  each use their own;
- the device listener on loopback: devices.passwd + devices.acl, client id forced to the
  username (= device id) so no client can take over another device's session;
- TLS listeners (`--mqtt-listen`): client certificate required (CN = device id = username
  = client id), the CRL of revoked certificates, devices.acl.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.cloud.identity.acl import coordinator_acl, device_acl
from edgefleet.cloud.identity.passwords import hash_password, new_password, password_file
from edgefleet.cloud.identity.store import IdentityStore
from edgefleet.protos.topics import Topics


@dataclass(frozen=True)
class BrokerAuth:
    """Paths of the identity files one broker reads (see module doc)."""

    directory: Path
    tls_listeners: tuple[tuple[str, int], ...] = field(default=())

    @property
    def device_passwd(self) -> Path:
        return self.directory / "devices.passwd"

    @property
    def device_acl(self) -> Path:
        return self.directory / "devices.acl"

    @property
    def coordinator_passwd(self) -> Path:
        return self.directory / "coordinator.passwd"

    @property
    def coordinator_acl(self) -> Path:
        return self.directory / "coordinator.acl"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def crl_file(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def probe_secret(self) -> Path:
        """A throwaway user of the coordinator listener, new at every write: once it
        can log in, the broker has read this version of the files."""
        return self.directory / "probe.secret"


PROBE_USER = "reload-probe@edgefleet"


def _write(path: Path, text: str, *, owner: tuple[int, int] | None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def _mosquitto_owner() -> tuple[int, int] | None:
    """Mosquitto started as root drops to the 'mosquitto' user before it reads these."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pw = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def write_broker_material(
    identities: IdentityStore,
    directory: Path,
    *,
    topics: Topics | Sequence[Topics],
    tls_listeners: Iterable[tuple[str, int]] = (),
    tls_hosts: Iterable[str] = (),
) -> BrokerAuth:
    """Write (or rewrite, before a reload) the password, ACL, certificate and CRL files.
    Several `topics` prefixes may share one broker (tests give each their own)."""
    listeners = tuple(tls_listeners)
    auth = BrokerAuth(directory, listeners)
    owner = _mosquitto_owner()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    if owner is not None:
        os.chown(directory, *owner)
    identities.coordinator()  # made on first use
    _write(
        auth.device_passwd,
        password_file(identities.password_hashes(kind="device")),
        owner=owner,
    )
    probe = new_password()
    _write(auth.probe_secret, probe, owner=None)
    _write(
        auth.coordinator_passwd,
        password_file(
            {**identities.password_hashes(kind="coordinator"), PROBE_USER: hash_password(probe)}
        ),
        owner=owner,
    )
    revoked = [
        u for u, r in identities.users().items() if r.get("kind") == "device" and r.get("revoked")
    ]
    _write(auth.device_acl, device_acl(topics, revoked=revoked), owner=owner)
    _write(auth.coordinator_acl, coordinator_acl(topics), owner=owner)
    _write(auth.ca_file, identities.ca.cert_pem, owner=owner)
    _write(auth.crl_file, identities.crl_pem(), owner=owner)
    cert, key = identities.server_cert([*(h for h, _ in listeners), *tls_hosts])
    _write(auth.server_cert, cert.read_text(), owner=owner)
    _write(auth.server_key, key.read_text(), owner=owner)
    return auth


def write_single_listener(identities: IdentityStore, auth: BrokerAuth, *, topics: Topics) -> Path:
    """For your own broker: one password file and one ACL holding devices and the
    coordinator (brokers without per-listener files), and an example mosquitto.conf with
    the three listeners `fleet serve` would run. Returns the combined ACL's path."""
    owner = _mosquitto_owner()
    hashes = {
        **identities.password_hashes(kind="device"),
        **identities.password_hashes(kind="coordinator"),
    }
    _write(auth.directory / "all.passwd", password_file(hashes), owner=owner)
    combined = auth.directory / "all.acl"
    revoked = [
        u for u, r in identities.users().items() if r.get("kind") == "device" and r.get("revoked")
    ]
    _write(
        combined,
        coordinator_acl(topics) + "\n" + device_acl(topics, revoked=revoked),
        owner=owner,
    )
    d = auth.directory
    conf = f"""# example: Mosquitto 2.0 with edgefleet identities (see docs/operators.md)
per_listener_settings true

# the coordinator (loopback or a private network only)
listener 1884 127.0.0.1
allow_anonymous false
password_file {d / "coordinator.passwd"}
acl_file {d / "coordinator.acl"}

# devices with a password (client id forced to the username = device id)
listener 1883
allow_anonymous false
password_file {d / "devices.passwd"}
acl_file {d / "devices.acl"}
use_username_as_clientid true

# devices with their client certificate (CN = device id)
listener 8883
cafile {d / "ca.pem"}
certfile {d / "server.pem"}
keyfile {d / "server.key"}
crlfile {d / "crl.pem"}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
allow_anonymous false
acl_file {d / "devices.acl"}
"""
    _write(d / "mosquitto.conf", conf, owner=owner)
    return combined
