"""Who is signed in to the console, what they may see, and CSRF.

* :func:`load_session` runs before every page: the signed cookie's session token is
  looked up in the database (:class:`~tooti.accounts.console_sessions.ConsoleSessions`),
  so a session revoked on any gateway (log out everywhere, a password change, a
  suspended account) ends at its next page. It sets ``g.me`` (the
  :class:`~tooti.accounts.records.AccountInfo`) and ``g.csrf``; a visitor without a
  session gets a per-browser CSRF token for the sign-in forms, kept in the signed cookie.
* :func:`check_csrf` runs before every ``POST``: the form's ``csrf`` field must equal the
  session's token (compared in constant time), and a browser's ``Origin`` (or, without
  one, ``Sec-Fetch-Site``) must be this console's own. ``Origin: null`` counts as none:
  under the console's ``Referrer-Policy: no-referrer`` a browser sends it on every form
  of the console itself, and ``Sec-Fetch-Site`` still tells a foreign page's form.
  Anything else is 403 before the view runs.
* :func:`signed_in` guards a view: 303 to the sign-in page without a session, 403 for a
  role below the page's (``user`` < ``operator`` < ``admin``). Every view that takes an
  id checks it against ``g.me`` itself (a service call scoped to the account), so an id
  of another account's resource is answered like an unknown one.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from quart import g, request, session
from quart.sessions import SecureCookieSessionInterface

from tooti.accounts.records import AccountInfo
from tooti.console.responses import redirect_to
from tooti.errors import APIError

P = ParamSpec("P")
R = TypeVar("R")
RANK = {"user": 0, "operator": 1, "admin": 2}
"""Roles in order: a page for a role is open to the roles above it."""


class SignedCookie(SecureCookieSessionInterface):
    """Quart's signed session cookie, with HMAC-SHA256 and a salt of the console's own."""

    digest_method = staticmethod(hashlib.sha256)
    salt = "tooti-console-session"


async def load_session() -> None:
    """Resolve the cookie's session (see the module docstring)."""
    g.me = None
    g.session_token = ""
    token = session.get("sid")
    if isinstance(token, str) and token:
        info = await g.ctx.sessions.lookup(token)
        if info is not None:
            g.me, g.csrf, g.session_token = info.account, info.csrf, token
            return
        session.pop("sid", None)  # ended elsewhere: a stale cookie is dropped
    pre = session.get("pre")
    if not isinstance(pre, str) or len(pre) < 32:
        pre = secrets.token_urlsafe(32)
        session["pre"] = pre
    g.csrf = pre


def signed_in_account() -> AccountInfo | None:
    """The account signed in for this request (None: a visitor)."""
    me = g.get("me")
    return me if isinstance(me, AccountInfo) else None


async def check_csrf() -> None:
    """Refuse a ``POST`` whose CSRF token or origin is not this console's (403)."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        if urlsplit(origin).netloc.lower() != request.host.lower():
            raise APIError(403, "this form was sent from another site", code="csrf")
    elif request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise APIError(403, "this form was sent from another site", code="csrf")
    form = await request.form
    given = form.get("csrf", "")
    expected = g.get("csrf", "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(403, "this form has expired or was not sent by this console; "
                       "reload the page and try again", code="csrf")


def signed_in(role: str = "user") -> Callable[[Callable[P, Awaitable[R]]],
                                               Callable[P, Awaitable[Any]]]:
    """Guard a view: it runs only for a signed-in account of ``role`` or above."""
    needed = RANK[role]

    def wrap(view: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[Any]]:
        @functools.wraps(view)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            me = signed_in_account()
            if me is None:
                return redirect_to("/console/login")
            if RANK.get(me.role, -1) < needed:
                raise APIError(403, f"this page is for {role}s", code="forbidden")
            return await view(*args, **kwargs)

        return guarded

    return wrap


def me() -> AccountInfo:
    """The signed-in account of a guarded view."""
    account = signed_in_account()
    assert account is not None, "only for views under @signed_in"
    return account
