"""`fleet audit ls`: who did what, when, from where, and how it ended."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cloud.cli.output import emit_json, out
from edgefleet.cloud.cli.tokens import access_of
from edgefleet.protos.errors import InvalidArgument

if TYPE_CHECKING:
    from edgefleet.cloud.access import AuditEntry

app = typer.Typer(help="The audit log of state-changing operator actions.", no_args_is_help=True)


def parse_since(text: str, *, now: datetime) -> datetime:
    """A duration back from `now` (30m, 2h, 1d) or an ISO 8601 time (UTC if no zone)."""
    from edgefleet.cloud.devices.filters import parse_duration

    try:
        return now - timedelta(seconds=parse_duration(text, option="--since"))
    except InvalidArgument:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"--since {text!r} is neither a duration nor a time; accepted e.g. 30m, 2h, 1d, "
            "2026-11-29T06:00:00Z"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def entry_json(e: AuditEntry) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "at": e.at.isoformat() if e.at else None,
        "who": e.who,
        "role": e.role,
        "action": e.action,
        "args": e.args,
        "result": e.result,
        "message": e.message,
        "peer": e.peer,
    }


@app.command("ls")
def ls(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option("--since", help="Only entries newer: 30m, 2h, 1d or ISO time.")
    ] = None,
    who: Annotated[
        str | None, typer.Option("--who", help="Only this caller (token name or local:USER).")
    ] = None,
    action: Annotated[
        str | None, typer.Option("--action", help="Only this action, e.g. Deploy, Promote.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List audit entries, oldest first (the newest LIMIT that match)."""
    from rich.table import Table

    from edgefleet.cloud.access import AuditFilter

    where = AuditFilter(
        since=parse_since(since, now=datetime.now(timezone.utc)) if since else None,
        who=who or "",
        action=action or "",
        limit=limit,
    )
    entries = access_of(ctx).audit(where)
    if as_json:
        emit_json([entry_json(e) for e in entries])
        return
    t = Table(box=None, pad_edge=False)
    for col in ("WHEN", "WHO", "ACTION", "RESULT", "ARGS", "PEER"):
        t.add_column(col)
    for e in entries:
        result = e.result if e.ok else f"{e.result}: {e.message}"
        t.add_row(
            f"{e.at:%Y-%m-%d %H:%M:%S}" if e.at else "",
            e.who,
            e.action,
            result,
            json.dumps(e.args, sort_keys=True)[:80],
            e.peer,
        )
    out.print(t)
