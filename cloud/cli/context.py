"""What the CLI callback hands to commands: the options, and on demand the settings,
the application's parts and a client, each built once per invocation and closed when
the CLI exits.

With `--coordinator HOST:PORT` (or FLEET_COORDINATOR) commands go through a
`GrpcClient` to that `fleet serve`; otherwise they run in-process (`LocalClient`).
Commands that need the coordinator's rollout controller (`deploy`, `rollouts pause`…)
fall back to the `fleet serve` recorded in FLEET_HOME/serve.json.

Everything is typed: `client_of` gives a `FleetClient`, `coordinator_of` a
`GrpcClient` (a `CoordinatorClient`), so mypy checks every command against the
application layer's protocols (cloud/services/api.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgefleet.cloud.grpc_tls import client_roots
from edgefleet.protos.errors import Unavailable

if TYPE_CHECKING:
    from edgefleet.cloud.access.client import Auditor
    from edgefleet.cloud.client import LocalClient
    from edgefleet.cloud.config import CloudSettings
    from edgefleet.cloud.remote import GrpcClient
    from edgefleet.cloud.services.api import FleetClient
    from edgefleet.cloud.services.wiring import Services


@dataclass
class State:
    """The root context's object: the global options and what was built from them."""

    home: Path | None
    db_url: str | None
    artifacts: str | None
    s3_endpoint_url: str | None
    coordinator: str | None = None
    token: str | None = None
    ca: str | None = None
    _settings: CloudSettings | None = field(default=None, repr=False)
    _services: Services | None = field(default=None, repr=False)
    _local: LocalClient | None = field(default=None, repr=False)
    _client: FleetClient | None = field(default=None, repr=False)
    _remotes: dict[str, GrpcClient] = field(default_factory=dict, repr=False)


def state_of(ctx: typer.Context) -> State:
    state = ctx.find_root().obj
    assert isinstance(state, State), "the fleet callback sets the root context's State"
    return state


def settings_of(ctx: typer.Context, **serve_options: object) -> CloudSettings:
    """The settings for this invocation (flags > FLEET_* > config.toml), built once."""
    from edgefleet.cloud.config import load_settings

    state = state_of(ctx)
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
    return state._settings


def services_of(ctx: typer.Context) -> Services:
    """This FLEET_HOME's parts (one database, the stores, pipeline, keys), made once
    (each on first use; one that needs an initialised FLEET_HOME raises NotFound)."""
    from edgefleet.cloud.services.wiring import Services

    state = state_of(ctx)
    if state._services is None:
        services = Services(settings_of(ctx))
        state._services = services
        ctx.find_root().call_on_close(services.close)
    return state._services


def auditor_of(ctx: typer.Context) -> Auditor:
    """Records this invocation's state-changing actions as local:<unix user>."""
    from edgefleet.cloud.access.client import Auditor, local_user

    services = services_of(ctx)
    return Auditor(lambda: services.access, local_user())


def local_of(ctx: typer.Context) -> LocalClient:
    """The in-process client over `services_of` (audited), whatever --coordinator says."""
    from edgefleet.cloud.client import LocalClient

    state = state_of(ctx)
    if state._local is None:
        services = services_of(ctx)
        state._local = LocalClient(services.settings, services=services, auditor=auditor_of(ctx))
    return state._local


def _remote(ctx: typer.Context, settings: CloudSettings, address: str) -> GrpcClient:
    """The one GrpcClient of this invocation for `address`."""
    state = state_of(ctx)
    if address not in state._remotes:
        state._remotes[address] = _connect(ctx, settings, address)
    return state._remotes[address]


def _connect(ctx: typer.Context, settings: CloudSettings, address: str) -> GrpcClient:
    from edgefleet.cloud.client import read_token
    from edgefleet.cloud.config import ServeInfo
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


def remote_of(ctx: typer.Context) -> GrpcClient | None:
    """A GrpcClient for --coordinator (None without it)."""
    settings = settings_of(ctx)
    return _remote(ctx, settings, settings.coordinator) if settings.coordinator else None


def client_of(ctx: typer.Context) -> FleetClient:
    """The FleetClient for this invocation: --coordinator's, else in-process."""
    state = state_of(ctx)
    if state._client is None:
        settings = settings_of(ctx)
        if settings.coordinator:
            state._client = _remote(ctx, settings, settings.coordinator)
        else:
            state._client = local_of(ctx)
    return state._client


def coordinator_of(ctx: typer.Context) -> GrpcClient:
    """A client for a running coordinator: --coordinator, else FLEET_HOME/serve.json."""
    from edgefleet.cloud.config import ServeInfo

    settings = settings_of(ctx)
    if settings.coordinator:
        return _remote(ctx, settings, settings.coordinator)
    info = ServeInfo.read(settings.serve_path)
    if info is None:
        raise Unavailable(
            f"no coordinator running for {settings.home_dir} (no live serve.json): "
            "start 'fleet serve' or pass --coordinator HOST:PORT"
        )
    return _remote(ctx, settings, info.grpc)
