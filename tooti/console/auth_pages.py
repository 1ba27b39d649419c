"""Signing in and out of the console, and the account's own password.

* ``GET/POST /console/login``: name and password (argon2, with the lockout of
  :class:`~tooti.accounts.passwords.Passwords`: a wrong password, an unknown name and a
  name without a password get the same answer; a locked account gets 429 with
  ``Retry-After``).
* ``GET /console/login/link?token=…``: a one-time sign-in link (``tooti accounts
  login-link NAME``) shows a button; the ``POST`` spends the link. Spending it on the
  ``GET`` would let a chat app's link preview sign itself in and burn the link.
* ``POST /console/logout``; ``POST /console/logout/everywhere`` ends every session of
  the account on every gateway sharing the database.
* ``GET /console/account``, ``POST /console/account/password``: set or change the
  password (the current one is asked for when one is set); it ends every other session.

Every sign-in starts a new session token (the one a visitor's cookie had, if any, is
never promoted: no session fixation), and the cookie is re-issued with it.
"""

from __future__ import annotations

import logging
import math

from quart import Blueprint, Response, flash, g, render_template, request, session

from tooti.accounts.passwords import LoginRefused
from tooti.accounts.records import AccountInfo
from tooti.console.guard import me, signed_in, signed_in_account
from tooti.console.responses import redirect_to
from tooti.errors import APIError

log = logging.getLogger("tooti.console")
blueprint = Blueprint("auth", __name__)
MAX_NAME = 64


async def start_session(account: AccountInfo) -> None:
    """Sign ``account`` in on this browser: a new session token in a new cookie (a
    session the browser still had, of any account, ends)."""
    if g.get("session_token"):
        await g.ctx.sessions.revoke(g.session_token)
    token, csrf = await g.ctx.sessions.create(account.id)
    session.clear()
    session["sid"] = token
    session.permanent = True
    g.me, g.csrf, g.session_token = account, csrf, token


def _refusal(refused: LoginRefused) -> tuple[str, int, dict[str, str]]:
    """The message, status and headers of a refused sign-in."""
    if refused.reason == "locked":
        wait = max(1, math.ceil(refused.retry_after))
        return (f"Too many failed sign-ins: this account is locked for "
                f"{math.ceil(wait / 60)} more minute(s).", 429, {"retry-after": str(wait)})
    if refused.reason == "suspended":
        return "This account is suspended.", 403, {}
    if refused.reason == "link":
        return ("This sign-in link is not valid: it was used, it expired, or it was "
                "mistyped. Ask for a new one.", 400, {})
    return "Wrong account name or password.", 401, {}


@blueprint.route("/console/login", methods=["GET", "POST"])
async def login() -> Response | tuple[str, int, dict[str, str]] | str:
    if request.method == "GET":
        if signed_in_account() is not None:
            return redirect_to("/console/")
        return await render_template("login.html", error="", name="")
    form = await request.form
    name = form.get("name", "").strip()[:MAX_NAME]
    password = form.get("password", "")
    try:
        account = await g.ctx.passwords.check(name, password)
    except LoginRefused as refused:
        message, status, headers = _refusal(refused)
        # Not the name: people type passwords into name fields.
        log.info("console sign-in refused: %s", refused.reason)
        return await render_template("login.html", error=message, name=name), status, headers
    await start_session(account)
    log.info("console sign-in: %s (%s)", account.name, account.role)
    return redirect_to("/console/")


@blueprint.route("/console/login/link", methods=["GET", "POST"])
async def login_link() -> Response | tuple[str, int] | str:
    if request.method == "GET":
        token = request.args.get("token", "")
        if not token:
            return await render_template("login_link.html", token="",
                                         error="This page needs the link's token."), 400
        if not await g.ctx.links.usable(token):
            message, status, _ = _refusal(LoginRefused("link"))
            return await render_template("login_link.html", token="", error=message), status
        return await render_template("login_link.html", token=token, error="")
    form = await request.form
    try:
        account = await g.ctx.links.consume(form.get("token", ""))
    except LoginRefused as refused:
        message, status, _ = _refusal(refused)
        return await render_template("login_link.html", token="", error=message), status
    await start_session(account)
    log.info("console sign-in by link: %s (%s)", account.name, account.role)
    if not await g.ctx.passwords.has_password(account.id):
        await flash("Signed in with a link. Set a password to sign in next time.", "info")
        return redirect_to("/console/account")
    return redirect_to("/console/")


@blueprint.route("/console/logout", methods=["POST"])
async def logout() -> Response:
    if g.session_token:
        await g.ctx.sessions.revoke(g.session_token)
    session.clear()
    return redirect_to("/console/login")


@blueprint.route("/console/logout/everywhere", methods=["POST"])
@signed_in()
async def logout_everywhere() -> Response:
    revoked = await g.ctx.sessions.revoke_all(me().id)
    log.info("console: %s signed out everywhere (%d sessions)", me().name, revoked)
    session.clear()
    return redirect_to("/console/login")


@blueprint.route("/console/account", methods=["GET"])
@signed_in()
async def account() -> str:
    return await _account_page("")


async def _account_page(error: str) -> str:
    return await render_template(
        "account.html", error=error,
        has_password=await g.ctx.passwords.has_password(me().id),
        min_length=g.ctx.passwords.MIN_LENGTH)


@blueprint.route("/console/account/password", methods=["POST"])
@signed_in()
async def set_password() -> Response | tuple[str, int]:
    form = await request.form
    account = me()
    password, again = form.get("password", ""), form.get("again", "")
    if password != again:
        return await _account_page("The two new passwords differ."), 400
    if await g.ctx.passwords.has_password(account.id):
        try:
            await g.ctx.passwords.check(account.name, form.get("current", ""))
        except LoginRefused as refused:
            message = ("The current password is wrong." if refused.reason == "credentials"
                       else _refusal(refused)[0])
            return await _account_page(message), 403 if refused.reason != "locked" else 429
    try:
        await g.ctx.passwords.set_password(account.id, password)
    except ValueError as bad:
        return await _account_page(str(bad)), 400
    except APIError as refused:
        return await _account_page(refused.message), refused.status
    await start_session(account)  # the change ended every session, this one too
    await flash("Password saved. Other browsers are signed out.", "ok")
    return redirect_to("/console/")
