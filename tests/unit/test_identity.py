"""The identity material: CA and certificates, Mosquitto password hashes, ACLs, records."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.cloud.identity import (
    COORDINATOR_USER,
    IdentityStore,
    device_acl,
    hash_password,
    verify_password,
    write_broker_material,
)
from edgefleet.cloud.identity.acl import coordinator_acl
from edgefleet.protos.errors import InvalidArgument, NotFound
from edgefleet.protos.topics import Topics
from tests.conftest import Cli


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_password_hash_matches_mosquitto_passwd() -> None:
    # written by `mosquitto_passwd -c -b pw alice secret` (Mosquitto 2.0.11)
    line = (
        "alice:$7$101$E6Qt6yxcGi0KB4J+$G/ABBIpHb1CoatEhoGACE1GTYk5Aywr10gbMgBGw9+C3Bn9NQHNQ6uQy"
        "pncpZVodD/MUE6PW6D9VIkyae8Wpcg=="
    )
    stored = line.split(":", 1)[1]
    salt = base64.b64decode("E6Qt6yxcGi0KB4J+")
    assert hash_password("secret", salt=salt) == stored
    assert verify_password("secret", stored)
    assert not verify_password("Secret", stored)
    fresh = hash_password("secret")
    assert fresh.startswith("$7$101$") and fresh != stored  # random salt
    with pytest.raises(InvalidArgument, match=r"\$7\$"):
        verify_password("x", "$6$abc$def")


def test_ca_issues_client_and_server_certificates_that_chain(tmp_path: Path) -> None:
    ids = IdentityStore(tmp_path / "keys")
    assert _mode(tmp_path / "keys") == 0o700
    assert _mode(ids.ca.key_path) == 0o600
    ca = x509.load_pem_x509_certificate(ids.ca.cert_path.read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    cred = ids.enroll("cam-1")
    cert = x509.load_pem_x509_certificate(cred.cert_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert cred.username == "cam-1" and len(cred.password) >= 40
    server, key = ids.server_cert(["10.9.8.7", "fleet.example"])
    assert _mode(key) == 0o600
    sc = x509.load_pem_x509_certificate(server.read_bytes())
    sc.verify_directly_issued_by(ca)
    sans = sc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.IPAddress)} | set(
        sans.get_values_for_type(x509.DNSName)
    )
    assert {"127.0.0.1", "localhost", "10.9.8.7", "fleet.example"} <= names
    # the same hosts again: the certificate is kept; a new host: issued again
    assert ids.server_cert(["10.9.8.7"])[0].read_bytes() == server.read_bytes()
    again, _ = ids.server_cert(["10.9.8.8"])
    assert "10.9.8.8" in {
        str(v)
        for v in x509.load_pem_x509_certificate(again.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.IPAddress)
    }


def test_revocation_puts_the_serial_on_the_crl_and_drops_the_password(tmp_path: Path) -> None:
    ids = IdentityStore(tmp_path / "keys")
    a, b = ids.enroll("a"), ids.enroll("b")
    serial_a = x509.load_pem_x509_certificate(a.cert_pem.encode()).serial_number
    assert set(ids.password_hashes(kind="device")) == {"a", "b"}
    assert ids.revoke("a") is True
    assert ids.revoke("a") is False
    assert set(ids.password_hashes(kind="device")) == {"b"}
    crl = x509.load_pem_x509_crl(ids.crl_pem().encode())
    assert crl.get_revoked_certificate_by_serial_number(serial_a) is not None
    serial_b = x509.load_pem_x509_certificate(b.cert_pem.encode()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(serial_b) is None
    with pytest.raises(NotFound, match="ghost"):
        ids.revoke("ghost")
    # enrolling again replaces the credential and revokes the old certificate
    b2 = ids.enroll("b")
    assert b2.password != b.password
    crl = x509.load_pem_x509_crl(ids.crl_pem().encode())
    assert crl.get_revoked_certificate_by_serial_number(serial_b) is not None
    assert verify_password(b2.password, ids.password_hashes(kind="device")["b"])
    records = json.loads((tmp_path / "keys" / "credentials.json").read_text())
    assert b2.password not in json.dumps(records)  # only hashes are kept
    assert _mode(tmp_path / "keys" / "credentials.json") == 0o600


def test_device_acl_scopes_each_device_to_its_own_topics() -> None:
    acl = device_acl([Topics("ef/v1"), Topics("t/x")], revoked=["gone"])
    lines = acl.splitlines()
    for prefix in ("ef/v1", "t/x"):
        for kind in ("status", "reported", "telemetry", "shadow"):
            assert f"pattern write {prefix}/dev/%u/{kind}" in lines
        assert f"pattern read {prefix}/dev/%u/desired" in lines
        assert f"pattern read {prefix}/dev/%u/ack" in lines
        assert f"pattern read {prefix}/art/+/chunk" in lines
        assert f"pattern write {prefix}/art/+/want" in lines
        assert f"pattern read {prefix}/keys" in lines
    # nothing a device may touch outside its own id, except the shared artifact/keys topics
    for line in lines:
        if line.startswith("pattern"):
            _, access, topic = line.split()
            assert "%u" in topic or "/art/+/" in topic or topic.endswith("/keys"), line
            assert "#" not in topic
            assert not (access in ("write", "readwrite") and topic.endswith("/desired"))
    assert lines[lines.index("user gone") + 1] == "topic deny #"
    coord = coordinator_acl(Topics("ef/v1"))
    assert f"user {COORDINATOR_USER}" in coord
    assert "topic read $share/+/ef/v1/#" in coord


def test_broker_material_files(tmp_path: Path) -> None:
    ids = IdentityStore(tmp_path / "keys")
    ids.enroll("d1")
    auth = write_broker_material(
        ids, tmp_path / "auth", topics=Topics(), tls_listeners=[("10.1.2.3", 8883)]
    )
    assert _mode(auth.directory) == 0o700
    for p in (auth.device_passwd, auth.coordinator_passwd, auth.server_key, auth.device_acl):
        assert _mode(p) == 0o600
    assert auth.device_passwd.read_text().startswith("d1:$7$101$")
    assert auth.coordinator_passwd.read_text().startswith(f"{COORDINATOR_USER}:$7$")
    assert "d1" not in auth.coordinator_passwd.read_text()
    sc = x509.load_pem_x509_certificate(auth.server_cert.read_bytes())
    sans = sc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.1.2.3" in {str(v) for v in sans.get_values_for_type(x509.IPAddress)}


def test_agent_enrol_stores_credentials_0600(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgefleet.agent.config import config_from_bundle

    ids = IdentityStore(tmp_path / "keys")
    cred = ids.enroll("edge-1")
    pub = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    bundle = {
        "device_id": "edge-1",
        "broker_url": "mqtts://10.0.0.1:8883",
        "signing_public_key": pub,
        "username": cred.username,
        "password": cred.password,
        "ca_certificate": cred.ca_pem,
        "client_certificate": cred.cert_pem,
        "client_key": cred.key_pem,
    }
    s = config_from_bundle(json.dumps(bundle).encode(), state_dir=tmp_path / "st", listen="")
    assert s.cert_file and s.key_file and s.ca_file
    assert Path(s.key_file).read_text() == cred.key_pem
    assert _mode(Path(s.key_file)) == 0o600 and _mode(Path(s.cert_file)) == 0o600
    assert _mode(Path(s.key_file).parent) == 0o700
    assert s.password == cred.password
    bad = dict(bundle, client_key=None)
    with pytest.raises(InvalidArgument, match="without the other"):
        config_from_bundle(json.dumps(bad).encode(), state_dir=tmp_path / "st2", listen="")


def test_enrol_bundles_carry_a_credential_and_broker_acl_writes_the_material(
    cli: Cli, fleet_home: Path, tmp_path: Path
) -> None:
    assert cli("init").code == 0
    out = tmp_path / "cam.json"
    r = cli("devices", "enroll", "cam-1", "--out", str(out))
    assert r.code == 0, r.err
    bundle = json.loads(out.read_text())
    assert bundle["username"] == "cam-1" and bundle["password"]
    cert = x509.load_pem_x509_certificate(bundle["client_certificate"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    # enrolling the id again is refused and leaves the device's credential valid
    # a bundle holds a private key and a password: never printed unless asked for
    unasked = cli("devices", "enroll", "cam-2")
    assert unasked.code == 1 and "--out FILE (mode 0600), or print it with --out -" in unasked.err
    assert "BEGIN" not in unasked.out
    again = cli("devices", "enroll", "cam-1", "--out", "-")
    assert again.code != 0 and "already enrolled" in again.err
    ids = IdentityStore(fleet_home / "keys" / "mqtt")
    assert verify_password(bundle["password"], ids.password_hashes(kind="device")["cam-1"])

    material = tmp_path / "material"
    r = cli("broker", "acl", "--out", str(material), "--tls-host", "mq.example")
    assert r.code == 0, r.err
    for name in ("devices.acl", "devices.passwd", "all.acl", "all.passwd", "mosquitto.conf"):
        assert (material / name).exists(), name
    assert (material / "devices.passwd").read_text().startswith("cam-1:$7$")
    assert f"{COORDINATOR_USER}:$7$" in (material / "all.passwd").read_text()
    assert "use_username_as_clientid true" in (material / "mosquitto.conf").read_text()
    assert bundle["password"] not in "".join(p.read_text() for p in material.iterdir())

    assert cli("devices", "revoke", "cam-1").code == 0
    assert json.loads(cli("devices", "show", "cam-1", "--json").out)["state"] == "revoked"
    cli("broker", "acl", "--out", str(material))
    assert "cam-1" not in (material / "devices.passwd").read_text()
    assert "user cam-1\ntopic deny #" in (material / "devices.acl").read_text()


def test_versions_grow_with_every_write_and_another_store_sees_them(tmp_path: Path) -> None:
    a, b = IdentityStore(tmp_path / "keys"), IdentityStore(tmp_path / "keys")
    versions = [a.version()]
    for d in ("x1", "x2", "x3"):  # back to back: within one file-time tick, often
        a.enroll(d)
        versions.append(a.version())
    assert versions == sorted(set(versions))  # strictly growing
    assert set(b.password_hashes(kind="device")) == {"x1", "x2", "x3"}  # read, not cached
    b.revoke_many(["x1", "x2"])
    assert set(a.password_hashes(kind="device")) == {"x3"}
    assert a.version() > versions[-1]
    with pytest.raises(NotFound, match="'ghost' has no MQTT credential"):
        a.revoke_many(["x3", "ghost"])
    assert set(a.password_hashes(kind="device")) == {"x3"}  # all or none


def test_a_batch_applies_the_credentials_once(tmp_path: Path) -> None:
    """One batch, one apply (its real broker files written once); an apply that finds its
    change applied already does nothing; concurrent single enrolments share applies."""
    import threading

    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.devices import DeviceSpec
    from edgefleet.cloud.identity import CredentialApplier

    client = LocalClient(load_settings(home=tmp_path / "home"))
    client.init()
    ids = client.identities
    ids.coordinator()  # as `fleet serve` makes it before its broker starts
    auth_dir = tmp_path / "auth"

    def rewrite() -> None:
        write_broker_material(ids, auth_dir, topics=Topics())

    applier = CredentialApplier(ids, rewrite)
    client.app.apply_credentials = applier
    try:
        batch = client.enroll_devices([DeviceSpec(f"u-{i:02d}") for i in range(30)], broker_url="-")
        assert len(batch.bundles) == 30
        assert applier.applies == 1
        assert ids.applied() == ids.version()
        users = {ln.split(":")[0] for ln in (auth_dir / "devices.passwd").read_text().splitlines()}
        assert users == {f"u-{i:02d}" for i in range(30)}
        assert applier() is False and applier.applies == 1  # nothing new: nothing applied

        def one(i: int) -> None:
            client.enroll_device(f"s-{i}", group="", tags={}, broker_url="-")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 2 <= applier.applies <= 9
        assert ids.applied() == ids.version()
        passwd = (auth_dir / "devices.passwd").read_text()
        assert all(f"s-{i}:$7$" in passwd for i in range(8))
    finally:
        client.close()
