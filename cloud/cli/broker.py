"""`fleet broker …`: the identity material for a broker the coordinator does not run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cloud.cli.context import services_of
from edgefleet.cloud.cli.output import err
from edgefleet.protos.errors import InvalidArgument
from edgefleet.protos.topics import Topics

app = typer.Typer(help="MQTT broker identity material (ACLs, passwords, certificates).")


@app.command("acl")
def acl(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write the files to (made 0700).")
    ],
    listen: Annotated[
        str,
        typer.Option(
            "--tls-host",
            help="Host name(s) or IPs devices dial, comma-separated: put in the broker "
            "certificate's SANs.",
        ),
    ] = "",
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix.")] = "ef/v1",
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="mosquitto: ACL, password and TLS files; nats: auth.conf (users with "
            "subject permissions) to include in every node of a NATS cluster.",
        ),
    ] = "mosquitto",
) -> None:
    """Write the ACL, password, CA/server certificate and CRL files for your own broker
    (Mosquitto or NATS: see docs/operators.md) from the enrolled devices' credentials."""
    from edgefleet.cloud.identity import write_broker_material
    from edgefleet.cloud.identity.material import write_single_listener
    from edgefleet.cloud.identity.nats import nats_config

    if fmt not in ("mosquitto", "nats"):
        raise InvalidArgument(f"broker file format {fmt!r}; accepted: mosquitto, nats")
    identities = services_of(ctx).identities
    if fmt == "nats":
        text = nats_config(identities, topics=Topics(prefix))
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = out / "auth.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        err.print(f"wrote {path}: include it in every NATS node's config, then reload them")
        return
    hosts = [h.strip() for h in listen.split(",") if h.strip()]
    auth = write_broker_material(identities, out, topics=Topics(prefix), tls_hosts=hosts)
    combined = write_single_listener(identities, auth, topics=Topics(prefix))
    err.print(
        f"wrote {auth.device_acl.name}, {auth.device_passwd.name}, {auth.coordinator_acl.name}, "
        f"{auth.coordinator_passwd.name}, {combined.name}, ca.pem, server.pem/.key, crl.pem "
        f"and mosquitto.conf to {out}"
    )
