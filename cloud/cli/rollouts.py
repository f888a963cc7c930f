"""`fleet rollouts …`: list, show, watch, and pause / resume / abort / rollback by hand."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cloud.cli.context import client_of, coordinator_of, settings_of
from edgefleet.cloud.cli.output import emit_json, err, out
from edgefleet.protos.errors import FleetError

if TYPE_CHECKING:
    from edgefleet.cloud.rollouts import Rollout
    from edgefleet.cloud.services.api import FleetClient

app = typer.Typer(
    help="Staged rollouts: progress per stage and gate, and control by hand.",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
IdArg = Annotated[str, typer.Argument(metavar="ID", help="Rollout id (fleet rollouts ls).")]


def _reader(ctx: typer.Context) -> FleetClient:
    """The coordinator when one runs (or --coordinator), else the database in-process."""
    from edgefleet.cloud.config import ServeInfo

    settings = settings_of(ctx)
    live = settings.coordinator or ServeInfo.read(settings.serve_path)
    return coordinator_of(ctx) if live else client_of(ctx)


@app.command("ls")
def ls(
    ctx: typer.Context,
    active: Annotated[bool, typer.Option("--active", help="Only unfinished rollouts.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Rollouts, newest first."""
    from edgefleet.cloud.cli.rollout_view import print_rollouts, rollout_json

    found = _reader(ctx).list_rollouts(active_only=active)
    if as_json:
        emit_json([rollout_json(r) for r in found])
    else:
        print_rollouts(out, found)


@app.command("show")
def show(ctx: typer.Context, rollout_id: IdArg, as_json: JsonOpt = False) -> None:
    """One rollout: stages, gates, estimated finish, and every device's state."""
    from edgefleet.cloud.cli.rollout_view import print_rollout, rollout_json

    r, devices = _reader(ctx).get_rollout(rollout_id)
    if as_json:
        emit_json(rollout_json(r, devices))
    else:
        print_rollout(out, r, devices)


def watch_until_outcome(client: FleetClient, rollout_id: str) -> Rollout:
    """Draw the rollout live on stderr until it is final or paused; return it."""
    from rich.live import Live

    from edgefleet.cloud.cli.rollout_view import watch_view

    class _View:
        rollout: Rollout | None = None

        def __rich__(self) -> Any:
            return watch_view(self.rollout) if self.rollout else ""

    view = _View()
    last: Rollout | None = None
    # drawn live on a terminal only: piped, the outcome printed after it says it all
    live = Live(view, console=err, refresh_per_second=2, transient=False)
    with live if err.is_terminal else contextlib.nullcontext():
        for r in client.watch_rollout(rollout_id):
            view.rollout = last = r
            if r.final or r.state == "paused":
                break
    if last is None:
        raise FleetError(f"watch of rollout {rollout_id} ended without news")
    return last


@app.command("watch")
def watch(ctx: typer.Context, rollout_id: IdArg) -> None:
    """Live progress per stage and gate. Exit 0 done, 1 rolled back or aborted, 3 paused."""
    from edgefleet.cloud.cli.rollout_view import outcome_code

    r = watch_until_outcome(_reader(ctx), rollout_id)
    err.print(f"rollout {r.rollout_id}: {r.state}" + (f" ({r.reason})" if r.reason else ""))
    raise typer.Exit(outcome_code(r))


def _control(ctx: typer.Context, rollout_id: str, action: str, as_json: bool) -> None:
    from edgefleet.cloud.cli.rollout_view import rollout_json

    r = coordinator_of(ctx).control_rollout(rollout_id, action)
    if as_json:
        emit_json(rollout_json(r))
    err.print(f"rollout {r.rollout_id}: {r.state}" + (f" ({r.reason})" if r.reason else ""))


@app.command("pause")
def pause(ctx: typer.Context, rollout_id: IdArg, as_json: JsonOpt = False) -> None:
    """Stop moving forward; devices keep what they run (shadows keep evaluating)."""
    _control(ctx, rollout_id, "pause", as_json)


@app.command("resume")
def resume(ctx: typer.Context, rollout_id: IdArg, as_json: JsonOpt = False) -> None:
    """Carry on; after a failed gate the stage bakes again and its quality gates are re-judged."""
    _control(ctx, rollout_id, "resume", as_json)


@app.command("abort")
def abort(ctx: typer.Context, rollout_id: IdArg, as_json: JsonOpt = False) -> None:
    """Stop for good: shadows end; devices already switched keep the new version."""
    _control(ctx, rollout_id, "abort", as_json)


@app.command("rollback")
def rollback(ctx: typer.Context, rollout_id: IdArg, as_json: JsonOpt = False) -> None:
    """Every device the rollout touched goes back to what it ran before (no download)."""
    _control(ctx, rollout_id, "rollback", as_json)
