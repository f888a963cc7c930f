"""The fleet console: a browser view of the fleet served by `fleet serve --ui-listen`.

Modules: `queries` (aggregated SQL), `pages` (what each page shows), `charts` (chart
specs drawn by uPlot in the browser), `auth` (API tokens and roles, as FleetService),
`app` (the Starlette routes), `server` (uvicorn in the coordinator's loop) and
`report` (the same pages as self-contained HTML files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.cloud.console.server import ConsoleServer, check_ui_listen

if TYPE_CHECKING:
    from edgefleet.cloud.access import AccessStore
    from edgefleet.cloud.grpc_tls import ServerTls
    from edgefleet.cloud.rollouts.controller import RolloutController
    from edgefleet.cloud.services.wiring import Services


def console_enabled(listen: str) -> bool:
    """Whether `--ui-listen` asks for a console ("", "off" and "none" do not)."""
    return listen.strip().lower() not in ("", "off", "none")


async def start_console(
    listen: str,
    *,
    services: Services,
    tokens: AccessStore,
    controller: RolloutController | None = None,
    refresh_s: float = 2.0,
    tls: ServerTls | None = None,
) -> ConsoleServer | None:
    """Start the console on `listen` (HOST:PORT; "" or "off": none) for `fleet serve`,
    over HTTPS when given `tls`."""
    if not console_enabled(listen):
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
    server = ConsoleServer(build_app(console), listen, tls=tls)
    await server.start()
    return server


__all__ = ["ConsoleServer", "check_ui_listen", "console_enabled", "start_console"]
