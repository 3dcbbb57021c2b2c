"""The feedback page as a Starlette app over a :class:`~layerfed.serve.page.FeedbackPage`.

``GET /`` is the page (server-rendered; ``static/page.js`` adds the interactions),
``GET /panel`` the side panel as an HTML fragment, ``/api/*`` JSON. Every request
passes the access rules of :mod:`layerfed.serve.security` first; every ``POST``
carries the CSRF token. An event is journalled (fsynced) before its response is
sent, so what the page shows as saved is on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from layerfed.clients.events import FieldError
from layerfed.serve.errors import RequestError
from layerfed.serve.page import FeedbackPage
from layerfed.serve.security import (
    AUTH_COOKIE,
    CSRF_COOKIE,
    Access,
    read_json,
    same_site_path,
)

__all__ = ["DEFAULT_MAX_BODY", "DEFAULT_POLL_MS", "create_app"]

log = logging.getLogger("layerfed")
HERE = Path(__file__).resolve().parent
DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_POLL_MS = 5000
"""How often the page asks for the instance's slot versions (a new committed one shows)."""
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, **extra}}, status_code=status)


class _Gate:
    """ASGI middleware: access rules, token login, CSRF on unsafe methods, security headers."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            login = self._login(request)
            if login is not None:
                await login(scope, receive, send)
                return
            self.access.check_client(request)
            if request.method in _UNSAFE:
                self.access.check_csrf(request)
        except RequestError as e:
            await _error(e.status, e.message)(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in _HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)

    def _login(self, request: Request) -> Response | None:
        """``GET /?token=...``: set the session cookie and drop the token from the URL."""
        given = request.query_params.get("token")
        if given is None or request.method != "GET" or self.access.token is None:
            return None
        if not self.access.token_matches(given):
            raise RequestError(401, "wrong token")
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        # scope["path"], not request.url.path: urlsplit drops tabs and newlines ("/\t/x" -> "//x")
        path = same_site_path(str(request.scope.get("path", "/")))
        target = path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            AUTH_COOKIE, self.access.session_cookie(), httponly=True, samesite="strict"
        )
        return response


Handler = Callable[[Request], Awaitable[Response]]


def _routes(page: FeedbackPage, access: Access, max_body: int, poll_ms: int) -> list[Route | Mount]:
    templates = Jinja2Templates(directory=str(HERE / "templates"))

    async def index(request: Request) -> Response:
        csrf = request.cookies.get(CSRF_COOKIE)
        if not access.csrf_valid(csrf):
            csrf = access.new_csrf()
        panel = await run_in_threadpool(page.panel)
        entries, total = await run_in_threadpool(page.history)
        context = {
            "csrf": csrf,
            "panel": panel,
            "entries": entries,
            "total": total,
            "turns": [t.as_json() for t in page.turns],
            "poll_ms": poll_ms,
        }
        response = templates.TemplateResponse(request, "index.html", context)
        response.set_cookie(CSRF_COOKIE, str(csrf), httponly=True, samesite="strict")
        return response

    async def panel(request: Request) -> Response:
        view = await run_in_threadpool(page.panel)
        entries, total = await run_in_threadpool(page.history)
        context = {"panel": view, "entries": entries, "total": total}
        return templates.TemplateResponse(request, "panel.html", context)

    async def versions(request: Request) -> Response:
        return JSONResponse({"versions": await run_in_threadpool(page.versions)})

    async def explain(request: Request) -> Response:
        panel = await run_in_threadpool(page.panel)
        return PlainTextResponse(panel.explain)

    async def turns(request: Request) -> Response:
        return JSONResponse({"turns": [t.as_json() for t in page.turns]})

    async def generate(request: Request) -> Response:
        data = await read_json(request, max_body)
        turn = await run_in_threadpool(
            page.ask,
            data.get("prompt"),
            top_k=data.get("top_k"),
            max_new_tokens=data.get("max_new_tokens"),
        )
        return JSONResponse(turn.as_json())

    async def pair(request: Request) -> Response:
        data = await read_json(request, max_body)
        first, second = await run_in_threadpool(page.pair, data.get("prompt"))
        return JSONResponse({"a": first.as_json(), "b": second.as_json()})

    async def feedback(request: Request) -> Response:
        data = await read_json(request, max_body)
        given = await run_in_threadpool(page.give, data)
        return JSONResponse({"seq": given.seq, "kind": given.kind, "summary": given.summary})

    async def journal(request: Request) -> Response:
        entries = await run_in_threadpool(page.journal.entries)
        counts = await run_in_threadpool(page.journal.counts)
        rows = [
            {
                "seq": e.seq,
                "kind": e.event.kind,
                "status": e.status,
                "run_id": e.run_id,
                "round": e.round,
                "event": e.event.model_dump(mode="json"),
            }
            for e in entries
        ]
        bad = await run_in_threadpool(page.journal.quarantined)
        quarantined = [{"seq": q.seq, "kind": q.kind, "reason": q.reason} for q in bad]
        return JSONResponse({"counts": counts, "entries": rows, "quarantined": quarantined})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    return [
        Route("/", index),
        Route("/panel", panel),
        Route("/healthz", health),
        Route("/favicon.ico", favicon),
        Route("/explain", explain),
        Route("/api/turns", turns),
        Route("/api/versions", versions),
        Route("/api/journal", journal),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/pair", pair, methods=["POST"]),
        Route("/api/feedback", feedback, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return _error(exc.status, exc.message)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FieldError)
    got = exc.got if isinstance(exc.got, str | int | float | bool | None) else repr(exc.got)
    return _error(400, str(exc), field=exc.field, expected=exc.expected, got=got)


async def _crash(request: Request, exc: Exception) -> Response:
    log.exception("page: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error (logged on the server); nothing was recorded")


def create_app(
    page: FeedbackPage,
    *,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    access: Access | None = None,
    poll_ms: int = DEFAULT_POLL_MS,
) -> ASGIApp:
    """The page's ASGI app. Without ``token`` it answers loopback clients only.

    ``poll_ms``: how often the browser asks for slot versions (0: never).
    """
    rules = access or Access(token)
    app = Starlette(
        routes=_routes(page, rules, max_body, poll_ms),
        exception_handlers={RequestError: _bad_request, FieldError: _invalid, Exception: _crash},
    )
    app.state.page = page
    return _Gate(app, rules)
