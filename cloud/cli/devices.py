"""`fleet devices …`: list, show, enroll, reissue, revoke."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.cloud.cli.context import auditor_of, client_of, local_of
from edgefleet.cloud.cli.enrol import (
    DEFAULT_BATCH,
    BundleFolder,
    check_all,
    counted_ids,
    enrol_in_batches,
    ids_from_file,
)
from edgefleet.cloud.cli.fl import enroll_fl
from edgefleet.cloud.cli.output import device_json, emit_json, err, print_device, print_devices
from edgefleet.protos.errors import InvalidArgument, Unavailable

app = typer.Typer(
    help="Enrolled devices: state, capabilities, enrolment.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
FromFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--from-file",
        "-f",
        help="Device ids, one per line ('#' comments, blank lines skipped); '-': stdin.",
    ),
]


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
    device_ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="[ID]...", help="[A-Za-z0-9._-], 1-64 chars each."),
    ] = None,
    from_file: FromFileOpt = None,
    count: Annotated[
        int | None,
        typer.Option("--count", "-n", min=1, help="Enrol N devices named PREFIX-0000 … ."),
    ] = None,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Id prefix for --count (PREFIX-0000, …).")
    ] = None,
    start: Annotated[int, typer.Option("--start", min=0, help="First number for --count.")] = 0,
    group: Annotated[str, typer.Option("--group", "-g", help="Group for selectors.")] = "",
    tag: Annotated[
        list[str] | None, typer.Option("--tag", "-t", help="KEY=VALUE (repeatable).")
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="One device: write its enrolment bundle to this file (mode 0600); '-': "
            "stdout. Several: a folder, one ID.json per device (mode 0600, folder 0700). "
            "Required: a bundle holds the device's private key and password.",
        ),
    ] = None,
    skip_existing: Annotated[
        bool,
        typer.Option(
            "--skip-existing",
            help="Several devices: leave those enrolled before as they are (their "
            "credentials stay valid, their bundles are not rewritten) and enrol the others; "
            "without it one such id enrols none.",
        ),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            help="Devices per enrolment call: each batch is one credential write and one "
            "broker reload, all or nothing.",
        ),
    ] = DEFAULT_BATCH,
    fl: Annotated[
        bool,
        typer.Option(
            "--fl",
            help="Also enrol it for federated learning: the bundle carries a SuperNode key "
            "the coordinator's SuperLink accepts, and the SuperLink's CA and address "
            "(one device at a time).",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Several devices: print what was enrolled as JSON.")
    ] = False,
) -> None:
    """Enrol devices and write their enrolment bundles (JSON) for `fleet-agent enroll`.

    One ID: its bundle goes to --out FILE. Several (IDs, --from-file, --count with
    --prefix): enrolled in batches (one credential write and one broker reload each, all
    or nothing), bundles written to the --out folder."""
    tags = parse_tags(tag)
    ids = _ids(device_ids or [], from_file, count, prefix, start)
    many = len(ids) != 1 or from_file is not None or count is not None
    if not many:
        _enroll_one(ctx, ids[0], group=group, tags=tags, out_file=out_file, fl=fl)
        return
    if fl:
        raise InvalidArgument(
            f"--fl enrols one device at a time ({len(ids)} given): enrol them, then "
            "'fleet devices enroll ID --fl' each … or 'fleet fl enroll ID'"
        )
    if out_file is None or str(out_file) == "-":
        raise InvalidArgument(
            f"the bundles of {len(ids)} devices hold their private keys and passwords: "
            "write them to a folder with --out DIR (one ID.json each, mode 0600)"
        )
    check_all(ids)
    folder = BundleFolder(out_file)
    folder.prepare(ids, keep_existing=skip_existing)
    client = client_of(ctx)

    def progress(done: int, total: int) -> None:
        if total > batch_size:
            err.print(f"{done}/{total} devices")

    outcome = enrol_in_batches(
        lambda specs: client.enroll_devices(specs, skip_existing=skip_existing),
        ids,
        group=group,
        tags=tags,
        folder=folder,
        batch_size=batch_size,
        progress=progress,
    )
    if as_json:
        emit_json(
            {
                "enrolled": outcome.enrolled,
                "existing": outcome.existing,
                "out": str(out_file),
                "batches": outcome.batches,
            }
        )
    skipped = (
        f"; {len(outcome.existing)} enrolled before, left as they were" if outcome.existing else ""
    )
    err.print(
        f"enrolled {len(outcome.enrolled)} devices in {outcome.batches} "
        f"batch{'es' if outcome.batches != 1 else ''}; bundles written to {out_file}/ID.json"
        f"{f' (broker {outcome.broker_url})' if outcome.broker_url else ''}{skipped}"
    )


@app.command()
def reissue(
    ctx: typer.Context,
    device_ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="[ID]...", help="Enrolled devices (not revoked ones)."),
    ] = None,
    from_file: FromFileOpt = None,
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="One device: its new bundle to this file (mode 0600; an old bundle there "
            "is replaced); '-': stdout. Several: a folder, one ID.json per device.",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            help="Devices per call: one credential write and one "
            "broker reload each, all or nothing.",
        ),
    ] = DEFAULT_BATCH,
    as_json: Annotated[
        bool, typer.Option("--json", help="Several devices: print what was reissued as JSON.")
    ] = False,
) -> None:
    """New credentials for enrolled devices: a lost or leaked bundle, a re-flashed device,
    an enrolment whose answer broke off. Each keeps its id, group, tags, state and history;
    its old password stops working at once (a session on it is cut) and its old
    certificate goes on the CRL. Install the new bundle on the device with
    'fleet-agent enroll BUNDLE --force'."""
    ids = _ids(device_ids or [], from_file, None, None, 0, verb="reissue")
    check_all(ids, done="reissued")
    client = client_of(ctx)
    if len(ids) == 1 and from_file is None:
        if out_file is None:
            raise InvalidArgument(
                f"the new bundle for {ids[0]} holds its private key and password: write it "
                "with --out FILE (mode 0600), or print it with --out -"
            )
        text = write_bundle(
            out_file,
            lambda: json.dumps(client.reissue_devices(ids).bundles[0].to_json(), indent=2),
            what="reissued",
        )
        if text is not None:
            err.print(f"reissued {ids[0]}; bundle written to {out_file}")
        return
    if out_file is None or str(out_file) == "-":
        raise InvalidArgument(
            f"the bundles of {len(ids)} devices hold their private keys and passwords: "
            "write them to a folder with --out DIR (one ID.json each, mode 0600)"
        )
    folder = BundleFolder(out_file)
    folder.prepare(ids, keep_existing=True)  # their old bundles are replaced
    outcome = enrol_in_batches(
        lambda specs: client.reissue_devices([s.device_id for s in specs]),
        ids,
        group="",
        tags={},
        folder=folder,
        batch_size=batch_size,
        verb="reissued",
    )
    if as_json:
        emit_json({"reissued": outcome.enrolled, "out": str(out_file), "batches": outcome.batches})
    err.print(f"reissued {len(outcome.enrolled)} devices; bundles written to {out_file}/ID.json")


def _ids(
    given: list[str],
    from_file: Path | None,
    count: int | None,
    prefix: str | None,
    start: int,
    *,
    verb: str = "enrol",
) -> list[str]:
    if (count is None) != (prefix is None):
        raise InvalidArgument("--count and --prefix go together: e.g. --count 100 --prefix cam")
    ids = list(given)
    if from_file is not None:
        ids += ids_from_file(from_file)
    if count is not None and prefix is not None:
        ids += counted_ids(prefix, count, start)
    if not ids:
        raise InvalidArgument(
            f"no devices to {verb}: give IDs"
            + (
                ", --from-file FILE or --count N --prefix P"
                if verb == "enrol"
                else " or --from-file FILE"
            )
        )
    return ids


def _enroll_one(
    ctx: typer.Context,
    device_id: str,
    *,
    group: str,
    tags: dict[str, str],
    out_file: Path | None,
    fl: bool,
) -> None:
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

    text = write_bundle(out_file, bundle_text, what="enrolled")
    if text is None:
        return
    broker = json.loads(text)["broker_url"]
    err.print(f"enrolled {device_id}; bundle written to {out_file} (broker {broker})")


def write_bundle(out_file: Path, produce: Callable[[], str], *, what: str) -> str | None:
    """`produce()`'s bundle to `out_file` (mode 0600) or stdout ('-': returns None). The
    file is opened first: a bundle that cannot be written must not leave a device
    `what` (enrolled, reissued) without it."""
    if str(out_file) == "-":
        typer.echo(produce())
        return None
    existed = out_file.exists()
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as e:
        raise Unavailable(
            f"cannot write the bundle to {out_file}: {e.strerror}; nothing was {what}"
        ) from None
    with os.fdopen(fd, "w") as f:
        try:
            text = produce()
        except BaseException:
            if not existed:
                out_file.unlink(missing_ok=True)
            raise
        f.truncate(0)
        f.write(text + "\n")
    os.chmod(out_file, 0o600)
    return text
