"""`fleet devices …`: list, show, enroll."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cloud.cli.context import auditor_of, client_of, local_of
from edgefleet.cloud.cli.fl import enroll_fl
from edgefleet.cloud.cli.output import device_json, emit_json, err, print_device, print_devices
from edgefleet.protos.errors import InvalidArgument, Unavailable

app = typer.Typer(
    help="Enrolled devices: state, capabilities, enrolment.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def parse_tags(items: list[str] | None) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"tag {item!r} is not KEY=VALUE; e.g. --tag site=lab")
        tags[key.strip()] = value.strip()
    return tags


@app.command("ls")
def ls(
    ctx: typer.Context,
    selector: Annotated[
        str | None,
        typer.Option("--selector", "-s", help="all, group=G, tag=KEY=VALUE or device=ID[,ID…]."),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state", help="Only devices in this update state, e.g. active, failed, enrolled."
        ),
    ] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Only this group.")] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Only devices serving NAME or NAME:VERSION."),
    ] = None,
    online: Annotated[bool, typer.Option("--online", help="Only devices online now.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Only devices offline now.")] = False,
    stale: Annotated[
        str | None,
        typer.Option(
            "--stale", help="Only devices last seen longer ago than this (30s, 5m, 2h, 1d)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List enrolled devices, optionally filtered."""
    from edgefleet.cloud.devices import DeviceFilter, Selector

    sel = Selector.parse(selector) if selector else None
    where = DeviceFilter.parse(
        state=state, group=group, version=version, online=online, offline=offline, stale=stale
    )
    devices = client_of(ctx).list_devices(sel, where=where)
    if as_json:
        emit_json([device_json(d) for d in devices])
    else:
        print_devices(devices)


@app.command()
def show(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonOpt = False,
) -> None:
    """Show one device: state, active model, capabilities."""
    d = client_of(ctx).get_device(device_id)
    if as_json:
        emit_json(device_json(d))
    else:
        print_device(d)


def _revoke(ctx: typer.Context, device_id: str, reason: str) -> None:
    local = local_of(ctx)
    d, closed = auditor_of(ctx).run(
        "RevokeDevice",
        {"device_id": device_id, "reason": reason},
        lambda: local.revoke_device(device_id, reason=reason),
    )
    err.print(
        f"{reason} {d.device_id}: MQTT credential removed (a running 'fleet serve' reloads "
        f"its broker); open rollout states closed: {', '.join(closed) or 'none'}"
    )


@app.command()
def revoke(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Revoke a device: its password and certificate stop working, its session is cut,
    its open rollout states are closed; it stays listed as revoked."""
    _revoke(ctx, device_id, "revoked")


@app.command("rm")
def rm(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Remove a device: revoke it (see 'revoke'); it stays in the database as removed
    so its history and rollouts still read."""
    _revoke(ctx, device_id, "removed")


@app.command()
def enroll(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID", help="[A-Za-z0-9._-], 1-64 chars.")],
    group: Annotated[str, typer.Option("--group", "-g", help="Group for selectors.")] = "",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="KEY=VALUE (repeatable).")
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write the enrolment bundle here (mode 0600); '-': stdout. Required: a bundle "
            "holds the device's private key and password.",
        ),
    ] = None,
    fl: Annotated[
        bool,
        typer.Option(
            "--fl",
            help="Also enrol it for federated learning: the bundle carries a SuperNode key "
            "the coordinator's SuperLink accepts, and the SuperLink's CA and address.",
        ),
    ] = False,
) -> None:
    """Enrol a device and write its enrolment bundle (JSON) for `fleet-agent enroll`."""
    tags = parse_tags(tag)
    if out_file is None:
        raise InvalidArgument(
            f"the bundle for {device_id} holds its private key and password: write it with "
            "--out FILE (mode 0600), or print it with --out -"
        )
    client = client_of(ctx)

    def bundle_text() -> str:
        bundle = client.enroll_device(device_id, group=group, tags=tags).to_json()
        if fl:
            bundle["fl"] = enroll_fl(ctx, device_id).to_json()
        return json.dumps(bundle, indent=2)

    if str(out_file) == "-":
        typer.echo(bundle_text())
        return
    # open the file first: a bundle that cannot be written must not leave a device enrolled
    existed = out_file.exists()
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise Unavailable(f"cannot write the bundle to {out_file}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        try:
            text = bundle_text()
        except BaseException:
            if not existed:
                out_file.unlink(missing_ok=True)
            raise
        f.write(text + "\n")
    broker = json.loads(text)["broker_url"]
    err.print(f"enrolled {device_id}; bundle written to {out_file} (broker {broker})")
