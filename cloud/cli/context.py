"""What the CLI callback hands to commands: unparsed settings, and a client on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer


@dataclass
class State:
    home: Path | None
    db_url: str | None
    artifacts: str | None
    s3_endpoint_url: str | None
    _client: Any = field(default=None, repr=False)


def client_of(ctx: typer.Context) -> Any:
    """The FleetClient for this invocation (built once, closed when the CLI exits)."""
    from cloud.client import LocalClient
    from cloud.config import load_settings

    state: State = ctx.find_root().obj
    if state._client is None:
        settings = load_settings(
            home=state.home,
            db_url=state.db_url,
            artifact_uri=state.artifacts,
            s3_endpoint_url=state.s3_endpoint_url,
        )
        state._client = LocalClient(settings)
        ctx.find_root().call_on_close(state._client.close)
    return state._client
