"""`fleet tokens …`: named API tokens with roles (create prints the secret once)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cloud.cli.context import remote_of, services_of
from edgefleet.cloud.cli.output import emit_json, err, out

if TYPE_CHECKING:
    from edgefleet.cloud.access import Token

app = typer.Typer(
    help="Named API tokens: viewer (read), operator (deploy, rollouts, promote, fl), "
    "admin (tokens, keys, devices).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def access_of(ctx: typer.Context) -> Any:
    """Through --coordinator when given (AccessService), else on the database here
    (recorded in the audit log as local:<user>)."""
    from edgefleet.cloud.access.client import GrpcAccess, LocalAccess, local_user

    remote = remote_of(ctx)
    if remote is not None:
        return GrpcAccess(remote)
    services = services_of(ctx)
    services.require_init()
    return LocalAccess(lambda: services.access, local_user())


def token_json(t: Token) -> dict[str, Any]:
    return {
        "name": t.name,
        "role": t.role,
        "active": t.active,
        "created_at": t.created_at.isoformat(),
        "created_by": t.created_by,
        "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
        "revoked_by": t.revoked_by,
    }


@app.command()
def create(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Argument(help="a-z 0-9 . _ -, up to 63 characters, e.g. ci-viewer.")
    ],
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")],
) -> None:
    """Create a token; its secret goes to stdout once (only its SHA-256 is kept)."""
    from edgefleet.cloud.access import check_role, check_token_name

    check_token_name(name)
    check_role(role)
    token, secret = access_of(ctx).create_token(name, role)
    typer.echo(secret)
    err.print(
        f"token {token.name!r} ({token.role}) created; the secret above is shown only now: "
        "pass it as --token / FLEET_TOKEN"
    )


@app.command("ls")
def ls(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets), revoked ones included."""
    from rich.table import Table

    tokens = access_of(ctx).list_tokens()
    if as_json:
        emit_json([token_json(t) for t in tokens])
        return
    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "ROLE", "STATE", "CREATED", "BY"):
        t.add_column(col)
    for tok in tokens:
        state = "active" if tok.active else f"revoked {tok.revoked_at:%Y-%m-%d %H:%M}"
        t.add_row(tok.name, tok.role, state, f"{tok.created_at:%Y-%m-%d %H:%M}", tok.created_by)
    out.print(t)


@app.command()
def revoke(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Token to revoke.")]
) -> None:
    """Revoke a token: calls carrying it are refused from now on."""
    token = access_of(ctx).revoke_token(name)
    err.print(f"token {token.name!r} ({token.role}) revoked")
