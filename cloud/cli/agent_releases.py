"""`fleet agent releases …`: publish an agent release (the agent's wheels for one
platform), list them. Roll one out like a model: ``fleet deploy edgefleet-agent:N``."""

from __future__ import annotations

import platform as _platform
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cloud.cli.context import settings_of

app = typer.Typer(help="The device agent's own software.", no_args_is_help=True)
releases = typer.Typer(
    help="Agent releases: signed wheel sets, rolled out with `fleet deploy edgefleet-agent:N`.",
    no_args_is_help=True,
)
app.add_typer(releases, name="releases")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


if TYPE_CHECKING:
    from edgefleet.cloud.agent_releases import AgentRelease


def _release_json(r: AgentRelease) -> dict[str, object]:
    from dataclasses import asdict

    d = asdict(r)
    d["wheels"] = list(r.wheels)
    return d


@releases.command("publish")
def publish(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="DIR",
            help="Wheels: the edgefleet_agent wheel, and any dependency wheels to ship with it "
            "(fleet-agent wheelhouse, make dist).",
        ),
    ],
    version: Annotated[
        str, typer.Option("--version", help="The agent version the wheel in DIR has.")
    ],
    platform: Annotated[
        str,
        typer.Option("--platform", help="Device machine as `uname -m` prints it: x86_64, aarch64."),
    ] = _platform.machine(),
    as_json: JsonOpt = False,
) -> None:
    """Sign and store an agent release (a new version of `edgefleet-agent`)."""
    from edgefleet.cloud.agent_releases import publish as do_publish
    from edgefleet.cloud.cli.output import emit_json, out
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.signing import load_private_key

    settings = settings_of(ctx)
    client = LocalClient(settings)
    try:
        key = load_private_key(settings.signing_key_path, passphrase=settings.passphrase)
        r = do_publish(
            client.registry,
            client.pipeline.store,
            key,
            directory,
            agent_version=version,
            platform=platform,
        )
    finally:
        client.close()
    if as_json:
        emit_json(_release_json(r))
        return
    out.print(
        f"published {r.ref}: agent {r.agent_version} for {r.platform}, "
        f"{len(r.wheels)} wheel(s), {r.size / 1e6:.2f} MB, sha256 {r.sha256[:12]}…"
    )
    out.print(f"roll it out: fleet deploy {r.ref} --to all --canary 10%")


@releases.command("ls")
def ls(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Published agent releases, oldest first."""
    from edgefleet.cloud.agent_releases import list_releases
    from edgefleet.cloud.cli.output import emit_json, out
    from edgefleet.cloud.client import LocalClient

    client = LocalClient(settings_of(ctx))
    try:
        found = list_releases(client.registry)
    finally:
        client.close()
    if as_json:
        emit_json([_release_json(r) for r in found])
        return
    if not found:
        out.print("no agent releases (fleet agent releases publish DIR --version V)")
        return
    out.print(f"{'RELEASE':<22} {'AGENT':<12} {'PLATFORM':<10} {'SIZE':>9}  SHA256")
    for r in found:
        out.print(
            f"{r.ref:<22} {r.agent_version:<12} {r.platform:<10} "
            f"{r.size / 1e6:>7.2f}MB  {r.sha256[:12]}"
        )
