"""Credential records under FLEET_HOME/keys/mqtt: the CA, the coordinator's own
credential, and per device a password hash and a certificate serial.

Only hashes are kept for devices; the plaintext password and the private key go into the
enrolment bundle once. `credentials.json` is rewritten atomically under a file lock, so
`fleet devices enroll` in a shell and a running `fleet serve` can both update it.

Cost: a write rewrites every user (O(N), compact JSON through the C encoder: ~10 ms at
10,000 users), so many devices go through `enroll_many` (one write per batch). Reads are
served from the last parse while the file is unchanged (same inode, mtime and size), so
`write_broker_material`'s several reads parse it at most once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.cloud.identity.acl import COORDINATOR_USER
from edgefleet.cloud.identity.ca import LOOPBACK_NAMES, FleetCA, cert_names, write_private
from edgefleet.cloud.identity.passwords import bcrypt_hash, hash_password, new_password
from edgefleet.protos.errors import NotFound
from edgefleet.protos.topics import check_device_id


@dataclass(frozen=True)
class DeviceCredential:
    """What a device gets at enrolment (plaintext: goes into its bundle only)."""

    device_id: str
    username: str
    password: str
    cert_pem: str
    key_pem: str
    ca_pem: str


@dataclass(frozen=True)
class ClientFiles:
    """A credential as files, for the coordinator's own MQTT clients."""

    username: str
    password: str
    ca_file: str
    cert_file: str
    key_file: str


class IdentityStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.ca = FleetCA(directory)
        self._records = directory / "credentials.json"
        self._version = directory / "version"
        self._lock = directory / ".lock"
        #: (inode, mtime ns, size, version) of credentials.json -> its parsed content
        self._cache: tuple[tuple[int, int, int, int], dict[str, Any]] | None = None

    # -- records --------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The records to change, under the lock; written back (and the version moved on)
        when the block ends without an exception. Change user records by assigning new
        dicts: the ones read are shared with the read cache."""
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = self._read()
            data = {
                **current,
                "users": dict(current["users"]),
                "revoked_serials": list(current["revoked_serials"]),
            }
            yield data
            write_private(
                self._records, json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
            )
            # after the records: whoever sees the new version reads the new records
            version = max(self._read_version() + 1, time.time_ns())
            write_private(self._version, str(version).encode())
            self._cache = (self._key(), data)
        finally:
            os.close(fd)

    def _key(self) -> tuple[int, int, int, int]:
        """What identifies one write of the records (the version: an inode number reused
        within one file-time tick at the same size still reads as a change)."""
        st = self._records.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size, self._read_version()

    def _read(self) -> dict[str, Any]:
        """The records (parsed again only when the file changed); treat as read-only."""
        try:
            key = self._key()
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            data: dict[str, Any] = json.loads(self._records.read_bytes())
        except FileNotFoundError:
            return {"users": {}, "revoked_serials": []}
        data.setdefault("users", {})
        data.setdefault("revoked_serials", [])
        self._cache = (key, data)
        return data

    # -- the running broker's view ---------------------------------------------------

    def version(self) -> int:
        """Grows with every write of the records (a counter that is at least the time in
        ns, so versions compare with the mtimes older homes used). Two writes in one
        file-time tick still get two versions."""
        return self._read_version()

    def _read_version(self) -> int:
        try:
            return int(self._version.read_text() or 0)
        except (FileNotFoundError, ValueError):
            pass
        try:  # a home from before the version file: the records' mtime
            return self._records.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def applied(self) -> int:
        """The version a running `fleet serve`'s broker last applied (0: none yet)."""
        try:
            return int((self.directory / "applied").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def mark_applied(self, version: int) -> None:
        """Called by `fleet serve` once its broker runs with the records of `version`."""
        write_private(self.directory / "applied", str(version).encode())

    def wait_applied(self, version: int, *, timeout: float = 10.0) -> bool:
        """Wait until a running `fleet serve` applied `version` (True), or `timeout`
        passed (False). Returns True at once where no managed broker ever applied any."""
        applied = self.directory / "applied"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if int(applied.read_text() or 0) >= version:
                    return True
            except FileNotFoundError:
                return True
            except ValueError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def users(self) -> dict[str, dict[str, Any]]:
        """Every user's record (copies: the parsed records are shared with the cache)."""
        return {u: dict(r) for u, r in self._read()["users"].items()}

    def password_hashes(self, *, kind: str) -> dict[str, str]:
        """{username: $7$ hash} of the live (not revoked) users of `kind`."""
        return {
            u: str(r["hash"])
            for u, r in self._read()["users"].items()
            if r.get("kind") == kind and not r.get("revoked")
        }

    def bcrypt_hashes(self, *, kind: str) -> dict[str, str]:
        """{username: bcrypt hash} of the live users of `kind` that have one (for a NATS
        broker, `identity.nats`; devices enrolled before it have none)."""
        return {
            u: str(r["bcrypt"])
            for u, r in self._read()["users"].items()
            if r.get("kind") == kind and not r.get("revoked") and r.get("bcrypt")
        }

    def revoked_serials(self) -> list[int]:
        return [int(s) for s in self._read()["revoked_serials"]]

    # -- devices --------------------------------------------------------------------

    def enroll(self, device_id: str) -> DeviceCredential:
        """A new password and client certificate for `device_id`. Enrolling again
        replaces both: the previous certificate is revoked."""
        return self.enroll_many([device_id])[device_id]

    def enroll_many(self, device_ids: Iterable[str]) -> dict[str, DeviceCredential]:
        """`enroll` for many devices with one write of the records. Every id is checked
        before anything is issued (InvalidArgument names the first bad one)."""
        ids = [check_device_id(d) for d in dict.fromkeys(device_ids)]
        issued = {device_id: (new_password(), self.ca.issue(device_id)) for device_id in ids}
        with self._locked() as data:
            for device_id, (password, cert) in issued.items():
                old = data["users"].get(device_id)
                if old and old.get("serial"):
                    data["revoked_serials"].append(int(old["serial"]))
                data["users"][device_id] = {
                    "kind": "device",
                    "hash": hash_password(password),
                    "bcrypt": bcrypt_hash(password),
                    "serial": cert.serial,
                    "revoked": False,
                }
        ca_pem = self.ca.cert_pem
        return {
            device_id: DeviceCredential(
                device_id=device_id,
                username=device_id,
                password=password,
                cert_pem=cert.cert_pem,
                key_pem=cert.key_pem,
                ca_pem=ca_pem,
            )
            for device_id, (password, cert) in issued.items()
        }

    def revoke(self, device_id: str) -> bool:
        """Remove the device's password entry and put its certificate on the CRL.
        False when it was already revoked."""
        return self.revoke_many([device_id])[device_id]

    def revoke_many(self, device_ids: Iterable[str]) -> dict[str, bool]:
        """`revoke` for many devices with one write: {device id: newly revoked}. NotFound
        (and nothing revoked) when one of them has no credential."""
        out: dict[str, bool] = {}
        with self._locked() as data:
            for device_id in dict.fromkeys(device_ids):
                rec = data["users"].get(device_id)
                if rec is None or rec.get("kind") != "device":
                    raise NotFound(f"device {device_id!r} has no MQTT credential")
                if rec.get("revoked"):
                    out[device_id] = False
                    continue
                data["users"][device_id] = {**rec, "revoked": True}
                if rec.get("serial"):
                    data["revoked_serials"].append(int(rec["serial"]))
                out[device_id] = True
        return out

    def crl_pem(self) -> str:
        return self.ca.crl(self.revoked_serials())

    # -- the coordinator -------------------------------------------------------------

    def coordinator(self) -> ClientFiles:
        """The coordinator's credential (password + client certificate), made on first use."""
        secret = self.directory / "coordinator.secret"
        cert = self.directory / "coordinator.pem"
        key = self.directory / "coordinator.key"
        if not secret.exists() or not cert.exists():
            password = new_password()
            issued = self.ca.issue(COORDINATOR_USER)
            write_private(key, issued.key_pem.encode())
            cert.write_text(issued.cert_pem)
            with self._locked() as data:
                data["users"][COORDINATOR_USER] = {
                    "kind": "coordinator",
                    "hash": hash_password(password),
                    "serial": issued.serial,
                    "revoked": False,
                }
            write_private(secret, password.encode())
        return ClientFiles(
            username=COORDINATOR_USER,
            password=secret.read_text().strip(),
            ca_file=str(self.ca.cert_path),
            cert_file=str(cert),
            key_file=str(key),
        )

    def server_cert(self, hosts: Iterable[str]) -> tuple[Path, Path]:
        """The broker's certificate (server.pem, server.key), valid for loopback and `hosts`;
        issued again when a host is missing from it."""
        names = [*LOOPBACK_NAMES, *(h.strip("[]") for h in hosts if h)]
        names = [n for n in dict.fromkeys(names) if n not in ("0.0.0.0", "::")]
        cert = self.directory / "server.pem"
        key = self.directory / "server.key"
        if not cert.exists() or not set(names) <= cert_names(cert.read_bytes()):
            issued = self.ca.issue("edgefleet MQTT broker", server_hosts=names)
            write_private(key, issued.key_pem.encode())
            cert.write_text(issued.cert_pem)
        return cert, key
