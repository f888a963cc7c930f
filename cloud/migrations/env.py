"""Alembic environment for the coordinator's database (run by `edgefleet.cloud.migrations`).

The connection comes from `config.attributes["connection"]` (programmatic runs) or,
for `alembic revision --autogenerate` from the command line, from the URL given with
`-x url=sqlite:///…`. SQLite gets batch mode (ALTER TABLE by copy).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context

from edgefleet.cloud.db import normalize_url
from edgefleet.cloud.schema import metadata


def _include(obj: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
    # tables that are not ours (a shared PostgreSQL database) are left alone
    return not (kind == "table" and reflected and compare_to is None)


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        include_object=_include,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


config = context.config
conn = config.attributes.get("connection")
if conn is not None:
    _run(conn)
else:
    url = context.get_x_argument(as_dictionary=True).get("url", "")
    engine = sa.create_engine(normalize_url(url))
    with engine.begin() as c:
        _run(c)
    engine.dispose()
