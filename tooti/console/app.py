"""The console's quart-trio app and its mount on the gateway's station.

:class:`Console` builds one :class:`~quart_trio.QuartTrio` app with the page blueprints
(:mod:`~tooti.console.auth_pages`, :mod:`~tooti.console.user_pages`,
:mod:`~tooti.console.operator_pages`, :mod:`~tooti.console.admin_pages`) and serves it
as the station's handler for the ``/console`` prefix. The ``/v1`` hot path never enters
it: the station picks the handler by prefix, and the console's only cost to an API
request is that one more prefix is compared.

Every answer of the console (pages, static files, redirects, errors, the live event
stream) leaves through :meth:`Console.__call__`, which adds the headers no page may
lack: the request id, a Content-Security-Policy without inline scripts or styles
(``script-src 'self'``, ``style-src 'self'``, no frames, forms posting only to the
console), ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` (a login link in a
URL never leaves in a ``Referer``), ``Cross-Origin-Opener-Policy: same-origin`` (the
station adds ``X-Content-Type-Options: nosniff`` to every answer) and, except for
the static files, ``Cache-Control: no-store`` (a page holds a user's data).

Sessions are Quart's signed cookie (``tooti_console``: ``HttpOnly``, ``SameSite=Lax``,
``Path=/console``, ``Secure`` when the gateway serves TLS) holding only a random session
token, whose SHA-256 the database keeps (:class:`~tooti.accounts.console_sessions.
ConsoleSessions`): so a session can be ended on every gateway sharing the database (log
out everywhere, a password change, a suspension), and the signing key is the database's
(:meth:`~tooti.accounts.console_sessions.ConsoleSessions.secret_key`), shared by those
gateways. Forms carry a CSRF token checked before any view runs (:mod:`tooti.console.
guard`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from quart import g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tooti.accounts.money import format_credits
from tooti.console.context import ConsoleContext
from tooti.console.guard import SignedCookie, check_csrf, load_session, signed_in_account
from tooti.console.responses import error_page
from tooti.errors import APIError
from tooti.mesh.http import Headers, Receive, Scope, Send

log = logging.getLogger("tooti.console")

PREFIX = "/console"
COOKIE = "tooti_console"
MAX_FORM_BYTES = 64 * 1024
"""The largest form body a console page takes (413 beyond)."""
MAX_DISCARD_BYTES = 8 * 1024 * 1024
"""The most of an oversized body read (and dropped) so that its sender sees the 413."""
DISCARD_SECONDS = 10.0
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: Headers = [
    (b"content-security-policy", CSP),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
NO_STORE = (b"cache-control", b"no-store")
STATIC = PREFIX + "/static/"
HERE = Path(__file__).parent


class Console:
    """The console app of one gateway (mount :meth:`__call__` at :data:`PREFIX`)."""

    def __init__(self, ctx: ConsoleContext, *, secure_cookies: bool = False) -> None:
        """``secure_cookies``: mark the session cookie ``Secure`` (the gateway serves
        TLS, or sits behind a proxy that does)."""
        self.ctx = ctx
        app = QuartTrio(__name__, template_folder=str(HERE / "templates"),
                        static_folder=str(HERE / "static"), static_url_path=STATIC[:-1])
        app.config.update(
            SESSION_COOKIE_NAME=COOKIE, SESSION_COOKIE_HTTPONLY=True,
            SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_PATH=PREFIX,
            SESSION_COOKIE_SECURE=secure_cookies, SESSION_REFRESH_EACH_REQUEST=False,
            PERMANENT_SESSION_LIFETIME=timedelta(seconds=ctx.sessions.TTL),
            MAX_CONTENT_LENGTH=MAX_FORM_BYTES, MAX_FORM_MEMORY_SIZE=MAX_FORM_BYTES,
            MAX_FORM_PARTS=100, BODY_TIMEOUT=30,
            SEND_FILE_MAX_AGE_DEFAULT=timedelta(hours=1),
            TEMPLATES_AUTO_RELOAD=False, PROVIDE_AUTOMATIC_OPTIONS=False,
        )
        app.jinja_env.autoescape = True
        app.jinja_env.filters.update(credits=_credits, when=_when)
        app.session_interface = SignedCookie()
        self.app = app
        self._register()

    def _register(self) -> None:
        from tooti.console import admin_pages, auth_pages, operator_pages, user_pages

        app, ctx = self.app, self.ctx

        @app.before_request
        async def _before() -> None:
            g.ctx = ctx
            if request.path.startswith(STATIC):
                return
            await load_session()
            if request.method == "POST":
                await check_csrf()
                refuse_unstorable((await request.form).values())
            refuse_unstorable([*(request.view_args or {}).values(), *request.args.values()])

        @app.context_processor
        async def _globals() -> dict[str, Any]:
            return {"me": signed_in_account(), "csrf": g.get("csrf", ""),
                    "nav": request.path, "fronts": ctx.fronts}

        @app.errorhandler(APIError)
        async def _api_error(error: APIError) -> tuple[str, int, dict[str, str]]:
            return await error_page(error.status, error.message), error.status, {
                k: v for k, v in (error.headers or {}).items() if k.lower() == "retry-after"}

        @app.errorhandler(HTTPException)
        async def _http_error(error: HTTPException) -> tuple[str, int]:
            status = error.code or 500
            return await error_page(status, error.description or error.name), status

        @app.errorhandler(Exception)
        async def _bug(error: Exception) -> tuple[str, int]:
            log.error("console page %s failed: %s: %s", request.path,
                      type(error).__name__, error, exc_info=error)
            return await error_page(500, "the console failed to show this page; the "
                                    "gateway's log names the cause"), 500

        for blueprint in (auth_pages.blueprint, user_pages.blueprint,
                          operator_pages.blueprint, admin_pages.blueprint):
            app.register_blueprint(blueprint)

    async def start(self) -> None:
        """Before the first page: the signing key from the database (shared by every
        gateway on it), and Quart's start-up."""
        self.app.secret_key = await self.ctx.sessions.secret_key()
        # Quart's start-up runs before-serving functions (none yet). Its shutdown is not
        # called: the console starts no background task and holds nothing to release.
        await self.app.startup()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                       headers: Headers) -> None:
        """Serve one ``/console`` request (the station's handler), every answer with the
        request's headers and the security headers."""
        if scope["path"] == PREFIX:  # "/console" → "/console/"
            scope = {**scope, "path": PREFIX + "/", "raw_path": (PREFIX + "/").encode()}
        extra = [*headers, *SECURITY_HEADERS]
        if not scope["path"].startswith(STATIC):
            extra.append(NO_STORE)

        receive = await _past_oversized_body(scope, receive, extra)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)  # type: ignore[arg-type]


async def _past_oversized_body(scope: Scope, receive: Receive, extra: Headers) -> Receive:
    """A body declared over :data:`MAX_FORM_BYTES` (which Quart answers 413 without
    reading it) is read and dropped first, up to :data:`MAX_DISCARD_BYTES` within
    :data:`DISCARD_SECONDS`: else the client, still sending it, would wait on a
    connection that reads no more, and never see the 413 page. A longer or slower body
    is not waited for: the 413 then closes the connection (``connection: close``)."""
    declared = next((value for name, value in scope.get("headers", ())
                     if name.lower() == b"content-length"), None)
    try:
        size = int(declared) if declared is not None else 0
    except ValueError:
        return receive
    if size <= MAX_FORM_BYTES:
        return receive
    complete = False
    if size <= MAX_DISCARD_BYTES:
        with trio.move_on_after(DISCARD_SECONDS):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    complete = message["type"] == "http.request"
                    break
    if not complete:
        extra.append((b"connection", b"close"))
        return receive
    done = False

    async def after_body() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return await receive()

    return after_body


def _credits(micros: int | None) -> str:
    """Integer micro-units as credits, exactly (``12500000`` → ``12.5``)."""
    return "-" if micros is None else format_credits(int(micros))


def _when(ts: float | None) -> str:
    """A Unix time as UTC ``YYYY-MM-DD HH:MM:SS`` (``-`` for none, or one beyond the
    calendar's years 1 to 9999)."""
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return "-"


def refuse_unstorable(values: Iterable[Any]) -> None:
    """400 for a path part, query or form value holding a NUL character: no database
    text holds one (PostgreSQL refuses it), and no name, id or amount has one."""
    if any(isinstance(value, str) and "\x00" in value for value in values):
        raise APIError(400, "a value holds a NUL character", code="invalid_value")
