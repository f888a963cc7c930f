"""`fleet db`: the coordinator database's schema (alembic migrations shipped in the package).

SQLAlchemy and alembic are imported by the commands, not by `fleet --help`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from edgefleet.cloud.cli.context import settings_of
from edgefleet.cloud.cli.output import emit_json, out

if TYPE_CHECKING:
    from edgefleet.cloud.db import Database

app = typer.Typer(
    help="The database schema: where it stands and upgrading it.", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _open(ctx: typer.Context) -> Database:
    from edgefleet.cloud.db import Database

    db = Database(settings_of(ctx).registry_url, check=False)
    ctx.find_root().call_on_close(db.close)
    return db


@app.command()
def upgrade(ctx: typer.Context) -> None:
    """Migrate the database to the schema this fleet needs (safe to run twice)."""
    db = _open(ctx)
    before, after = db.upgrade()
    if before.revision == after and not before.legacy:
        out.print(f"{db.name}: already at schema {after}")
    else:
        out.print(f"{db.name}: schema {before.describe()} -> {after}")


@app.command()
def current(ctx: typer.Context) -> None:
    """The database's schema revision ('empty' for a new database)."""
    out.print(_open(ctx).schema().describe())


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The database's schema, the one this fleet needs, and the revisions between."""
    from edgefleet.cloud import migrations

    db = _open(ctx)
    st, head = db.schema(), migrations.head()
    revs = migrations.revisions()
    order = [r for r, _ in revs]
    done = order.index(st.revision) + 1 if st.revision in order else 0
    if as_json:
        emit_json(
            {
                "database": db.url,
                "current": st.revision,
                "legacy": st.legacy,
                "head": head,
                "pending": order[done:],
            }
        )
        return
    out.print(f"database  {db.name}")
    out.print(f"current   {st.describe()}")
    out.print(f"head      {head}")
    for i, (rev, doc) in enumerate(revs):
        out.print(f"  {'applied' if i < done else 'pending'}  {rev}  {doc}")
    if st.revision == head and not st.legacy:
        out.print("up to date")
    else:
        out.print("run `fleet db upgrade`")
