"""`fleet drift` and `fleet alerts`: PSI of live traffic against each version's reference."""

from __future__ import annotations

from typing import Annotated

import typer

from edgefleet.cloud.cli.context import client_of
from edgefleet.cloud.cli.output import alert_json, drift_json, emit_json, print_alerts, print_drift

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def drift(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Only NAME or NAME:VERSION.")
    ] = None,
    by: Annotated[
        str, typer.Option("--by", help="Rows per device, group or fleet (fleet rows always).")
    ] = "group",
    as_json: JsonOpt = False,
) -> None:
    """PSI of recent live traffic against each version's reference (inputs and predictions)."""
    rows = client_of(ctx).drift(by=by, model=model)
    if as_json:
        emit_json([drift_json(r) for r in rows])
    else:
        print_drift(rows)


def alerts(
    ctx: typer.Context,
    include_resolved: Annotated[
        bool, typer.Option("--all", help="Resolved alerts too (default: open ones).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Drift alerts: a device or group whose PSI went above the threshold."""
    found = client_of(ctx).alerts(include_resolved=include_resolved)
    if as_json:
        emit_json([alert_json(a) for a in found])
    else:
        print_alerts(found)
