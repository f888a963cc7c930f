"""`fleet report`: static, self-contained HTML reports (the console's pages as files)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Self-contained HTML reports (charts and data inside the file), e.g. for a ticket.",
    no_args_is_help=True,
)

HtmlOpt = Annotated[
    Path,
    typer.Option(
        "--html", help="Write the report to this HTML file.", dir_okay=False, writable=True
    ),
]


def write_report(path: Path, html: str, what: str) -> None:
    from edgefleet.cloud.cli.output import err
    from edgefleet.cloud.console.report import write_html

    write_html(path, html)
    err.print(f"{what}: report written to {path} ({len(html.encode()) / 1024:.0f} KiB)")


@app.command("rollout")
def rollout(
    ctx: typer.Context,
    rollout_id: Annotated[
        str, typer.Argument(metavar="ID", help="Rollout id (fleet rollouts ls).")
    ],
    html: HtmlOpt,
) -> None:
    """A rollout: timeline per stage, gate values and thresholds, devices per state."""
    from edgefleet.cloud.cli.rollouts import _reader
    from edgefleet.cloud.console.report import rollout_html

    r, devices = _reader(ctx).get_rollout(rollout_id)
    write_report(html, rollout_html(r, devices), f"rollout {r.rollout_id} ({r.state})")
