"""`fleet broker …`: the identity material for a broker the coordinator does not run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cloud.cli.context import services_of
from edgefleet.cloud.cli.output import err
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
) -> None:
    """Write the ACL, password, CA/server certificate and CRL files for your own broker
    (Mosquitto: see docs/operators.md) from the enrolled devices' credentials."""
    from edgefleet.cloud.identity import write_broker_material
    from edgefleet.cloud.identity.material import write_single_listener

    identities = services_of(ctx).identities
    hosts = [h.strip() for h in listen.split(",") if h.strip()]
    auth = write_broker_material(identities, out, topics=Topics(prefix), tls_hosts=hosts)
    combined = write_single_listener(identities, auth, topics=Topics(prefix))
    err.print(
        f"wrote {auth.device_acl.name}, {auth.device_passwd.name}, {auth.coordinator_acl.name}, "
        f"{auth.coordinator_passwd.name}, {combined.name}, ca.pem, server.pem/.key, crl.pem "
        f"and mosquitto.conf to {out}"
    )
