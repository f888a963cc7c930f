"""TLS for FleetService and the console: the server's credentials and how the CLI decides
to verify them.

`fleet serve` serves TLS when given `--grpc-tls-cert/--grpc-tls-key`, and otherwise
with a certificate it makes itself (FLEET_HOME/tls: a private CA and a server
certificate for loopback, this host's names and the listen addresses) whenever the
gRPC listener is not loopback, or when asked with `--grpc-tls`. Loopback stays plain
by default. The console (`--ui-listen`, `--ui-tls*`) follows the same rule with the same
generated certificate: a token typed into its login form never crosses a network in
clear. The CLI verifies against `--ca` / FLEET_CA, else the CA a local `fleet serve`
recorded in serve.json, else FLEET_HOME/tls/ca.crt, else the system roots.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protos.errors import InvalidArgument, NotFound

WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(address: str) -> str:
    host, _sep, _port = address.rpartition(":")
    return host.strip("[]")


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    ca: Path | None  # the CA to give clients when we made the certificate; None when given

    def credentials(self) -> object:
        import grpc

        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())])


def host_names(listen_host: str) -> list[str]:
    """Names a generated certificate should hold: this host's and the listen address."""
    names = {socket.gethostname(), socket.getfqdn()}
    if listen_host not in WILDCARDS:
        names.add(listen_host.strip("[]"))
    else:
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None):
                names.add(str(info[4][0]))
        except OSError:
            pass
    return sorted(n for n in names if n and "%" not in n)


def server_tls(
    *,
    listen: str,
    cert: str,
    key: str,
    force: bool | None,
    tls_dir: Path,
    flag: str = "grpc",
    what: str = "FleetService",
    hosts: Callable[[], Iterable[str]] | None = None,
) -> ServerTls | None:
    """The TLS `what` serves on `listen`, or None for plain (loopback and not asked).

    `flag`: the option prefix errors name (`--{flag}-tls-cert`, `--no-{flag}-tls`);
    `hosts`: the names a generated certificate holds, called only when TLS is served
    with one (the names can mean DNS lookups) (default: this host's and `listen`'s;
    `fleet serve` gives the union over its listeners, so they share one certificate).
    """
    if bool(cert) != bool(key):
        raise InvalidArgument(
            f"--{flag}-tls-cert and --{flag}-tls-key go together: give both PEM files, or "
            "neither for a generated certificate"
        )
    if cert:
        for p in (cert, key):
            if not Path(p).is_file():
                raise NotFound(f"TLS file {p} not found (--{flag}-tls-cert/--{flag}-tls-key)")
        return ServerTls(Path(cert), Path(key), None)
    host = split_host(listen)
    if force is False:
        if not is_loopback(host):
            raise InvalidArgument(
                f"--no-{flag}-tls with --{flag}-listen {listen}: {what} off loopback needs TLS "
                "(the API token would cross the network in clear)"
            )
        return None
    if force is None and is_loopback(host):
        return None
    from edgefleet.cloud.fl.tls import ensure_tls

    files = ensure_tls(
        tls_dir,
        hosts=host_names(host) if hosts is None else hosts(),
        ca_name="edgefleet FleetService CA",
        server_name="edgefleet coordinator",
    )
    return ServerTls(files.server_cert, files.server_key, files.ca_cert)


def client_roots(
    address: str, *, ca: str, serve_ca: str | None, serve_tls: bool, home_ca: Path
) -> tuple[bool, bytes | None]:
    """(use TLS, root certificates; None: the system's) for a CLI call to `address`.

    `serve_tls`/`serve_ca`: what the local serve.json says, when it names `address`
    (`serve_ca` None when serve.json is not about `address`).
    """
    if ca:
        try:
            return True, Path(ca).expanduser().read_bytes()
        except OSError as e:
            raise NotFound(f"CA file {ca} (--ca / FLEET_CA) unreadable: {e.strerror}") from None
    if serve_ca is not None:
        if not serve_tls:
            return False, None
        return True, (Path(serve_ca).read_bytes() if serve_ca else None)
    if is_loopback(split_host(address)):
        return False, None
    return True, (home_ca.read_bytes() if home_ca.is_file() else None)
