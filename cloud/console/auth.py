"""Who is asking: the console takes the same API tokens and roles as FleetService.

A request carries its token as `Authorization: Bearer TOKEN` (scripts, tests) or in
the HttpOnly, SameSite=Strict cookie the login form sets. Without a valid token a
page redirects to /login and anything else (live fragments, POSTs) gets 401. A
viewer reads everything; changing things (rollout pause/resume/abort) needs the
role the gRPC method needs (`cloud.access.roles`), and each such call is audited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from edgefleet.cloud.access.model import Caller, role_allows
from edgefleet.cloud.access.store import AccessStore

COOKIE = "fleet_console"
#: paths anyone may fetch: the login form and the vendored static files
PUBLIC = ("/login", "/static/", "/healthz")


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE, "")


async def authenticate(tokens: AccessStore, secret: str, peer: str) -> Caller | None:
    if not secret:
        return None
    token = await asyncio.to_thread(tokens.authenticate, secret)
    if token is None:
        return None
    return Caller(who=token.name, role=token.role, peer=peer)


def caller_of(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller


def can(request: Request, role: str) -> bool:
    return role_allows(caller_of(request).role, role)


class TokenAuth:
    """ASGI middleware: sets `request.state.caller` or refuses the request."""

    def __init__(self, app: ASGIApp, *, tokens: AccessStore) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(PUBLIC):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        caller = await authenticate(self.tokens, bearer(request), peer)
        if caller is None:
            await self._refuse(request)(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    @staticmethod
    def _refuse(request: Request) -> Response:
        page = request.method == "GET" and "hx-request" not in request.headers
        if page and "text/html" in request.headers.get("accept", ""):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return PlainTextResponse(
            "401 unauthenticated: send a valid API token (Authorization: Bearer TOKEN) "
            "or sign in at /login",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="edgefleet console"'},
        )


Handler = Callable[[Request], Awaitable[Response]]


def requires(role: str, action: str, audit: Any) -> Callable[[Handler], Handler]:
    """Wrap a state-changing handler: 403 below `role`; every call (refused ones too) is
    recorded through `audit(request, action, result, message)`."""

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            caller = caller_of(request)
            if not role_allows(caller.role, role):
                message = f"{action} needs role {role}; token {caller.who!r} is {caller.role}"
                await audit(request, action, "PERMISSION_DENIED", message)
                return PlainTextResponse(f"403 permission denied: {message}", status_code=403)
            return await handler(request)

        return guarded

    return wrap
