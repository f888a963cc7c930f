"""Key material for the SuperLink: a private CA, its server certificate, node keys.

Everything lives under FLEET_HOME/fl/tls and is made on first use: a CA (EC P-384,
10 years) whose certificate devices get in their enrolment bundle, and a server
certificate it signs for the names devices dial (loopback always, plus the host
of the advertised SuperLink address). SuperNode authentication keys are EC P-384
pairs in OpenSSH format, what `flower-supernode --auth-supernode-private-key`
and `flwr supernode register` take.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.cloud.identity.ca import LOOPBACK_NAMES, cert_names, key_pem, san, write_private


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private_openssh: str  # PEM "OPENSSH PRIVATE KEY"
    public_openssh: str  # "ecdsa-sha2-nistp384 AAAA…"


def ensure_tls(
    directory: Path,
    *,
    hosts: Iterable[str] = (),
    ca_name: str = "edgefleet FL CA",
    server_name: str = "edgefleet superlink",
) -> TlsFiles:
    """The CA and a server certificate valid for loopback and `hosts` (made if missing)."""
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key_path = directory / "ca.key"
    if not files.ca_cert.exists() or not ca_key_path.exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA384())
        )
        write_private(ca_key_path, key_pem(ca_key))
        files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        files.server_cert.unlink(missing_ok=True)
    wanted = set(LOOPBACK_NAMES) | {h for h in hosts if h}
    have = files.server_cert.exists() and files.server_key.exists()
    if have and wanted <= cert_names(files.server_cert.read_bytes()):
        return files
    ca_key_loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    assert isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(san(sorted(wanted))), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key_loaded, hashes.SHA384())
    )
    write_private(files.server_key, key_pem(key))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def new_node_key() -> NodeKey:
    """A SuperNode authentication key pair (EC P-384, OpenSSH encodings)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return NodeKey(private, public)
