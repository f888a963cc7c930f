"""The console's Starlette app: server-rendered pages (Jinja2), live by htmx polling.

Every page puts what changes inside `<main id="live">`; htmx fetches the same URL
every `refresh_s` seconds and swaps that element (filters and buttons stay put), and
static/console.js draws each embedded chart spec with uPlot once it lands.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edgefleet.cloud.access.model import OPERATOR, AuditEntry
from edgefleet.cloud.access.store import AccessStore
from edgefleet.cloud.console import charts, pages
from edgefleet.cloud.console.auth import (
    COOKIE,
    TokenAuth,
    authenticate,
    caller_of,
    can,
    requires,
)
from edgefleet.cloud.console.queries import PAGE, ConsoleQueries, DeviceFilter
from edgefleet.cloud.services.wiring import Services
from edgefleet.protos.errors import Conflict, FleetError, NotFound

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC = HERE / "static"
#: how many points the drift-over-time chart scores (each one a window of telemetry)
DRIFT_POINTS = 12


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = pages.when
    env.globals["static_text"] = lambda name: (STATIC / name).read_text()
    return env


@dataclass(frozen=True)
class Console:
    """What the console reads and acts on; `controller` is None outside `fleet serve`."""

    queries: ConsoleQueries
    local: Services  # registry, rollouts, drift monitor, database
    tokens: AccessStore
    controller: Any = None
    refresh_s: float = 2.0


def build_app(console: Console) -> Starlette:
    env = templates()
    local = console.local

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        caller = getattr(request.state, "caller", None)
        html = env.get_template(name).render(
            request=request,
            caller=caller,
            can_operate=caller is not None and can(request, OPERATOR),
            refresh_s=console.refresh_s,
            standalone=False,
            path=request.url.path,
            live_url=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
            **context,
        )
        return HTMLResponse(html, status_code=status)

    async def run(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def not_found(request: Request, what: str) -> Response:
        return render(request, "error.html", status=404, message=what)

    # -- sign in ----------------------------------------------------------------------

    async def login(request: Request) -> Response:
        target = request.query_params.get("next", "/")
        if request.method == "GET":
            return render(request, "login.html", target=target, error="")
        form = await request.form()
        secret = str(form.get("token", "")).strip()
        target = str(form.get("next", "/"))
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        peer = request.client.host if request.client else ""
        caller = await authenticate(console.tokens, secret, peer)
        if caller is None:
            return render(
                request,
                "login.html",
                status=401,
                target=target,
                error="That token is not valid (revoked, mistyped, or of another coordinator).",
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            secret,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    # -- pages ------------------------------------------------------------------------

    async def overview(request: Request) -> Response:
        o = await run(console.queries.overview)
        return render(request, "overview.html", **pages.overview_page(o))

    async def devices(request: Request) -> Response:
        q = request.query_params
        online = {"yes": True, "no": False}.get(q.get("online", ""))
        try:
            page = max(1, int(q.get("page", "1")))
            per = int(q.get("per_page", str(PAGE)))
        except ValueError:
            return PlainTextResponse("page and per_page must be whole numbers", status_code=400)
        f = DeviceFilter(
            q=q.get("q", "").strip(),
            group=q.get("group", ""),
            online=online,
            state=q.get("state", ""),
            model=q.get("model", "").strip(),
            page=page,
            per_page=per,
        )
        found = await run(console.queries.devices, f)
        return render(request, "devices.html", p=found, f=f)

    async def device(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        d = await run(console.queries.device, device_id)
        if d is None:
            return not_found(request, f"device {device_id!r} is not enrolled")
        times = [w.window_end_ms / 1000.0 for w in d.telemetry]
        made = [
            charts.over_time(
                "device-latency",
                "Latency per telemetry window (ms)",
                times,
                {"p50": [w.p50_ms for w in d.telemetry], "p95": [w.p95_ms for w in d.telemetry]},
                ylabel="ms",
            ),
            charts.over_time(
                "device-predictions",
                "Predictions and errors per window",
                times,
                {
                    "predictions": [float(w.predictions) for w in d.telemetry],
                    "errors": [float(w.errors) for w in d.telemetry],
                },
            ),
        ]
        return render(request, "device.html", d=d, charts=made)

    async def models(request: Request) -> Response:
        def load() -> list[tuple[Any, list[Any]]]:
            reg = local.registry
            return [(m, reg.list_versions(m.name)) for m in reg.list_models()]

        return render(request, "models.html", models=await run(load))

    async def version(request: Request) -> Response:
        from edgefleet.cloud.registry import ModelRef

        name, number = request.path_params["name"], request.path_params["version"]
        try:
            mv = await run(local.registry.get_version, ModelRef(name, int(number)))
        except (NotFound, ValueError):
            return not_found(request, f"model version {name}:{number} is not registered")
        latency = await run(console.queries.latency, mv.model, mv.version)
        return render(request, "version.html", **pages.version_page(mv, latency))

    async def rollouts(request: Request) -> Response:
        found = await run(local.rollouts.find, active_only=False)
        return render(request, "rollouts.html", rollouts=found[:200])

    async def rollout(request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        try:
            r = await run(local.rollouts.get, rollout_id)
        except NotFound:
            return not_found(request, f"rollout {rollout_id!r} does not exist")
        counts = await run(console.queries.rollout_counts, rollout_id)
        return render(request, "rollout.html", **pages.rollout_page(r, counts))

    async def audit(request: Request, action: str, result: str, message: str) -> None:
        caller = caller_of(request)
        entry = AuditEntry(
            who=caller.who,
            action=action,
            args={"rollout_id": request.path_params.get("rollout_id", ""), "via": "console"},
            result=result,
            message=message,
            role=caller.role,
            peer=caller.peer,
        )
        try:
            await run(console.tokens.record, entry)
        except FleetError:
            logger.exception("could not record %s by %s in the audit log", action, caller.who)

    @requires(OPERATOR, "ControlRollout", audit)
    async def control(request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        form = await request.form()
        action = str(form.get("action", ""))
        if console.controller is None:
            return PlainTextResponse("503 no rollout controller runs here", status_code=503)
        try:
            await console.controller.control(rollout_id, action)
        except FleetError as e:
            await audit(request, "ControlRollout", type(e).__name__, str(e))
            status = {NotFound: 404, Conflict: 409}.get(type(e), 400)
            return PlainTextResponse(f"{e}", status_code=status)
        await audit(request, "ControlRollout", "ok", action)
        return RedirectResponse(f"/rollouts/{rollout_id}", status_code=303)

    #: drift scored at past points in time does not change: kept by time (a few minutes'
    #: worth), so a refresh scores only the newest point and "now"
    scored: dict[int, list[Any]] = {}
    scoring = threading.Lock()

    async def drift(request: Request) -> Response:
        monitor = local.drift_monitor

        def group_rows(t_ms: int) -> list[Any]:
            return [r for r in monitor.report(by="group", now_ms=t_ms) if r.scope == "group"]

        def load() -> tuple[list[tuple[float, list[Any]]], list[Any]]:
            now = time.time()
            step_ms = max(1, int(monitor.window_s * 1000 / 2))
            last = int(now * 1000) // step_ms * step_ms  # points on a fixed grid
            points = [last - i * step_ms for i in range(DRIFT_POINTS - 2, -1, -1)]
            settled = int(now * 1000) - step_ms  # telemetry may still arrive for later points
            with scoring:
                history = []
                for t_ms in points:
                    rows = scored.get(t_ms)
                    if rows is None:
                        rows = group_rows(t_ms)
                        if t_ms < settled:
                            scored[t_ms] = rows
                    history.append((t_ms / 1000.0, rows))
                for t_ms in [t for t in scored if t < points[0]]:
                    del scored[t_ms]
            history.append((now, group_rows(int(now * 1000))))
            return history, monitor.alerts.find(open_only=True)

        history, alerts = await run(load)
        return render(
            request,
            "drift.html",
            window_s=monitor.window_s,
            **pages.drift_page(history, alerts, threshold=monitor.threshold),
        )

    def fl_store() -> Any:
        from edgefleet.cloud.fl.store import FlStore

        return FlStore(local.database)

    async def fl_runs(request: Request) -> Response:
        runs = await run(lambda: fl_store().list_runs(limit=100))
        return render(request, "fl.html", runs=runs)

    async def fl_run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            found = await run(lambda: fl_store().get_run(run_id))
        except NotFound:
            return not_found(request, f"federated run {run_id!r} does not exist")
        return render(request, "fl_run.html", **pages.fl_run_page(found))

    routes = [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/", overview),
        Route("/devices", devices),
        Route("/devices/{device_id:str}", device),
        Route("/models", models),
        Route("/models/{name:str}/{version:int}", version),
        Route("/rollouts", rollouts),
        Route("/rollouts/{rollout_id:str}", rollout),
        Route("/rollouts/{rollout_id:str}/control", control, methods=["POST"]),
        Route("/drift", drift),
        Route("/fl", fl_runs),
        Route("/fl/{run_id:str}", fl_run),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(TokenAuth, tokens=console.tokens)])
