"""Secrets at rest: FLEET_HOME modes, the passphrase-encrypted signing key, FleetService TLS choice."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgefleet.protos.errors import InvalidArgument, Unauthenticated


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_makes_home_private_and_serve_tightens_a_loose_one(tmp_path: Path) -> None:
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings
    from edgefleet.cloud.home import secure_home

    settings = load_settings(home=tmp_path / "home")
    LocalClient(settings).init()
    home = settings.home_dir
    assert _mode(home) == 0o700
    assert _mode(home / "keys") == 0o700
    for f in ("registry.db", "config.toml", "keys/signing.key", "keys/token"):
        assert _mode(home / f) == 0o600, f
    # a home made with a loose umask (or by an older version) is fixed on the next start
    os.chmod(home, 0o755)
    os.chmod(home / "registry.db", 0o644)
    os.chmod(home / "keys" / "signing.key", 0o640)
    assert secure_home(settings) == 3
    assert (_mode(home), _mode(home / "registry.db")) == (0o700, 0o600)
    assert _mode(home / "keys" / "signing.key") == 0o600
    assert secure_home(settings) == 0


def test_signing_key_with_a_passphrase(tmp_path: Path) -> None:
    from edgefleet.cloud.signing import create_keypair, is_encrypted, load_private_key

    key, pub = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    assert create_keypair(key, pub, passphrase=b"correct horse")
    assert is_encrypted(key) and _mode(key) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    with pytest.raises(Unauthenticated, match="is encrypted: set FLEET_SIGNING_PASSPHRASE"):
        load_private_key(key)
    with pytest.raises(Unauthenticated, match="does not open it"):
        load_private_key(key, passphrase=b"wrong")
    loaded = load_private_key(key, passphrase=b"correct horse")
    assert loaded.public_key().public_bytes_raw() == (
        load_private_key(key, passphrase=b"correct horse").public_key().public_bytes_raw()
    )
    plain_key = tmp_path / "p" / "signing.key"
    create_keypair(plain_key, tmp_path / "p" / "signing.pub")
    assert not is_encrypted(plain_key)
    load_private_key(plain_key, passphrase=b"ignored for a plain key")


def test_fleet_init_encrypts_with_the_env_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet.cloud.cli.main import run
    from edgefleet.cloud.signing import is_encrypted

    monkeypatch.setenv("FLEET_SIGNING_PASSPHRASE", "s3cret phrase")
    home = tmp_path / "home"
    assert run(["--home", str(home), "init", "--encrypt-key"]) == 0
    assert is_encrypted(home / "keys" / "signing.key")
    # commands that sign find the passphrase in the environment
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import load_settings

    client = LocalClient(load_settings(home=home))
    assert client.pipeline._signing_key() is not None  # opens with FLEET_SIGNING_PASSPHRASE
    monkeypatch.delenv("FLEET_SIGNING_PASSPHRASE")
    with pytest.raises(Unauthenticated):
        LocalClient(load_settings(home=home)).pipeline._signing_key()


def test_grpc_tls_is_on_off_loopback_and_off_on_loopback_unless_asked(tmp_path: Path) -> None:
    from edgefleet.cloud.grpc_tls import client_roots, server_tls

    d = tmp_path / "tls"
    assert server_tls(listen="127.0.0.1:7443", cert="", key="", force=None, tls_dir=d) is None
    assert not d.exists()
    made = server_tls(listen="10.9.8.7:7443", cert="", key="", force=None, tls_dir=d)
    assert made is not None and made.ca == d / "ca.crt"
    assert _mode(made.key) == 0o600 and _mode(d) == 0o700
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.9.8.7" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    asked = server_tls(listen="127.0.0.1:0", cert="", key="", force=True, tls_dir=d)
    assert asked is not None
    with pytest.raises(InvalidArgument, match="off loopback needs TLS"):
        server_tls(listen="10.9.8.7:7443", cert="", key="", force=False, tls_dir=d)
    with pytest.raises(InvalidArgument, match="go together"):
        server_tls(listen="10.9.8.7:7443", cert=str(made.cert), key="", force=None, tls_dir=d)
    given = server_tls(
        listen="10.9.8.7:7443", cert=str(made.cert), key=str(made.key), force=None, tls_dir=d
    )
    assert given is not None and given.ca is None
    # the CLI: loopback plain, elsewhere TLS with FLEET_HOME's CA, --ca wins
    home_ca = d / "ca.crt"
    kw = {"serve_ca": None, "serve_tls": False, "home_ca": home_ca}
    assert client_roots("127.0.0.1:7443", ca="", **kw) == (False, None)  # type: ignore[arg-type]
    assert client_roots("fleet.lan:7443", ca="", **kw) == (True, home_ca.read_bytes())  # type: ignore[arg-type]
    assert client_roots("127.0.0.1:7443", ca=str(home_ca), **kw)[0]  # type: ignore[arg-type]
    assert client_roots(
        "127.0.0.1:7443", ca="", serve_ca=str(home_ca), serve_tls=True, home_ca=home_ca
    ) == (True, home_ca.read_bytes())
