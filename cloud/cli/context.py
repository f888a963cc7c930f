"""What the CLI callback hands to commands: unparsed settings, and a client on demand.

With `--coordinator HOST:PORT` (or FLEET_COORDINATOR) commands go through a
`GrpcClient` to that `fleet serve`; otherwise they run in-process (`LocalClient`).
Commands that need the coordinator's MQTT side (`deploy`) fall back to the
`fleet serve` recorded in FLEET_HOME/serve.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from edgefleet.cloud.config import CloudSettings


@dataclass
class State:
    home: Path | None
    db_url: str | None
    artifacts: str | None
    s3_endpoint_url: str | None
    coordinator: str | None = None
    token: str | None = None
    ca: str | None = None
    _client: Any = field(default=None, repr=False)
    _settings: Any = field(default=None, repr=False)


def settings_of(ctx: typer.Context, **serve_options: Any) -> CloudSettings:
    """The settings for this invocation (flags > FLEET_* > config.toml), built once."""
    from edgefleet.cloud.config import load_settings

    state: State = ctx.find_root().obj
    if state._settings is None or serve_options:
        state._settings = load_settings(
            home=state.home,
            db_url=state.db_url,
            artifact_uri=state.artifacts,
            s3_endpoint_url=state.s3_endpoint_url,
            coordinator=state.coordinator,
            token=state.token,
            ca=state.ca,
            **serve_options,
        )
    settings: CloudSettings = state._settings
    return settings


def _remote(ctx: typer.Context, settings: CloudSettings, address: str) -> Any:
    from edgefleet.cloud.client import read_token
    from edgefleet.cloud.config import ServeInfo
    from edgefleet.cloud.grpc_tls import client_roots
    from edgefleet.cloud.remote import GrpcClient

    token = settings.token or read_token(settings.token_path)
    info = ServeInfo.read(settings.serve_path)
    mine = info is not None and info.grpc == address
    tls, roots = client_roots(
        address,
        ca=settings.ca,
        serve_ca=(info.grpc_ca if info is not None and mine else None),
        serve_tls=bool(info is not None and mine and info.grpc_tls),
        home_ca=settings.grpc_tls_dir / "ca.crt",
    )
    client = GrpcClient(address, token, tls=tls, root_certificates=roots)
    ctx.find_root().call_on_close(client.close)
    return client


def remote_of(ctx: typer.Context) -> Any:
    """A GrpcClient for --coordinator (None without it)."""
    settings = settings_of(ctx)
    return _remote(ctx, settings, settings.coordinator) if settings.coordinator else None


def client_of(ctx: typer.Context) -> Any:
    """The FleetClient for this invocation (built once, closed when the CLI exits)."""
    from edgefleet.cloud.client import LocalClient

    state: State = ctx.find_root().obj
    if state._client is None:
        settings = settings_of(ctx)
        if settings.coordinator:
            state._client = _remote(ctx, settings, settings.coordinator)
        else:
            from edgefleet.cloud.access.client import AuditedClient, Auditor, local_user

            local = LocalClient(settings)
            state._client = AuditedClient(local, Auditor(settings.registry_url, local_user()))
            ctx.find_root().call_on_close(state._client.close)
    return state._client


def coordinator_of(ctx: typer.Context) -> Any:
    """A client for a running coordinator: --coordinator, else FLEET_HOME/serve.json."""
    from edgefleet.cloud.config import ServeInfo
    from edgefleet.protos.errors import Unavailable

    settings = settings_of(ctx)
    if settings.coordinator:
        return client_of(ctx)
    info = ServeInfo.read(settings.serve_path)
    if info is None:
        raise Unavailable(
            f"no coordinator running for {settings.home_dir} (no live serve.json): "
            "start 'fleet serve' or pass --coordinator HOST:PORT"
        )
    return _remote(ctx, settings, info.grpc)
