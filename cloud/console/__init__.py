"""The fleet console: a browser view of the fleet served by `fleet serve --ui-listen`.

Modules: `queries` (aggregated SQL), `pages` (what each page shows), `charts` (chart
specs drawn by uPlot in the browser), `auth` (API tokens and roles, as FleetService),
`app` (the Starlette routes), `server` (uvicorn in the coordinator's loop) and
`report` (the same pages as self-contained HTML files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.cloud.console.server import ConsoleServer

if TYPE_CHECKING:
    from edgefleet.cloud.access import AccessStore
    from edgefleet.cloud.rollouts.controller import RolloutController
    from edgefleet.cloud.services.wiring import Services


async def start_console(
    listen: str,
    *,
    services: Services,
    tokens: AccessStore,
    controller: RolloutController | None = None,
    refresh_s: float = 2.0,
) -> ConsoleServer | None:
    """Start the console on `listen` (HOST:PORT; "" or "off": none) for `fleet serve`."""
    if listen.strip().lower() in ("", "off", "none"):
        return None
    from edgefleet.cloud.console.app import Console, build_app
    from edgefleet.cloud.console.queries import ConsoleQueries

    console = Console(
        queries=ConsoleQueries(services.database),
        local=services,
        tokens=tokens,
        controller=controller,
        refresh_s=refresh_s,
    )
    server = ConsoleServer(build_app(console), listen)
    await server.start()
    return server


__all__ = ["ConsoleServer", "start_console"]
