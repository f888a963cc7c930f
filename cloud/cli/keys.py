"""`fleet keys …`: the root-signed list of signing keys: list, rotate, revoke.

These read and write FLEET_HOME/keys directly (run them on the coordinator host);
a running `fleet serve` publishes the new key list to devices within seconds.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cloud.cli.context import settings_of
from edgefleet.cloud.cli.output import emit_json, err, out

if TYPE_CHECKING:
    from edgefleet.cloud.keys import KeyRing

app = typer.Typer(
    help="Signing keys: the root-signed key list devices trust; rotation and revocation.",
    no_args_is_help=True,
)

RootKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--root-key",
        envvar="FLEET_ROOT_KEY",
        help="The root private key, where you keep it offline (default FLEET_HOME/keys/root.key).",
    ),
]
PassphraseOpt = Annotated[
    str | None,
    typer.Option(
        "--root-passphrase",
        envvar="FLEET_ROOT_PASSPHRASE",
        help="Passphrase of an encrypted root key.",
    ),
]


def _ring(ctx: typer.Context, root_key: Path | None = None) -> KeyRing:
    from edgefleet.cloud.keys import KeyRing

    return KeyRing(settings_of(ctx).keys_dir, root_key=root_key)


def _audited(ctx: typer.Context, action: str, args: dict[str, object], work: Any) -> Any:
    """Run `work()` and record it in the audit log as the local user (`fleet audit ls`)."""
    from edgefleet.cloud.access.client import Auditor, local_user

    auditor = Auditor(settings_of(ctx).registry_url, local_user())
    try:
        return auditor.run(action, dict(args), work)
    finally:
        auditor.close()


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


@app.command("ls")
def ls(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The root key, the key signing now, keys still accepted, revoked and retired ones."""
    from rich.table import Table

    ring = _ring(ctx)
    rows = ring.ls()
    version = ring.key_list().version
    if as_json:
        emit_json(
            {
                "version": version,
                "keys": [
                    {
                        "key_id": r.key_id,
                        "role": r.role,
                        "created_at_ms": r.created_at_ms,
                        "not_after_ms": r.not_after_ms,
                    }
                    for r in rows
                ],
            }
        )
        return
    t = Table(box=None, pad_edge=False, title=f"key list version {version}", title_justify="left")
    for c in ("KEY ID", "ROLE", "CREATED", "NOT AFTER"):
        t.add_column(c)
    for r in rows:
        t.add_row(r.key_id, r.role, _when(r.created_at_ms), _when(r.not_after_ms))
    out.print(t)


@app.command("rotate")
def rotate(
    ctx: typer.Context,
    root_key: RootKeyOpt = None,
    root_passphrase: PassphraseOpt = None,
    expires_days: Annotated[
        float,
        typer.Option("--expires-days", help="Devices refuse the new key after this; 0: never."),
    ] = 0.0,
) -> None:
    """A new online signing key, in a new key list signed by the root key. The old key
    stays accepted (what it signed keeps working) until `fleet keys revoke`."""
    ring = _ring(ctx, root_key)
    kl, kid = _audited(
        ctx,
        "RotateKeys",
        {"expires_days": expires_days},
        lambda: ring.rotate(
            passphrase=root_passphrase.encode() if root_passphrase else None,
            expires_days=expires_days,
        ),
    )
    out.print(f"signing key {kid} (key list version {kl.version})")
    err.print("a running 'fleet serve' publishes the new key list to devices (retained)")


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="Key id, as `fleet keys ls` shows it.")],
    root_key: RootKeyOpt = None,
    root_passphrase: PassphraseOpt = None,
) -> None:
    """Devices refuse anything signed by KEY_ID, also those offline now (on reconnect).
    Revoking the key that signs now rotates to a new one first."""
    ring = _ring(ctx, root_key)
    kl, kid = _audited(
        ctx,
        "RevokeKey",
        {"key_id": key_id},
        lambda: ring.revoke(
            key_id, passphrase=root_passphrase.encode() if root_passphrase else None
        ),
    )
    out.print(f"revoked {key_id}; signing key {kid} (key list version {kl.version})")
    err.print(
        "variants signed by the revoked key are refused by devices: re-register or "
        "re-quantize them to sign them with the current key"
    )
