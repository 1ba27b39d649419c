"""The console's admin pages: accounts, the live network and request flow, the ledger
check and a summary of the gateway's configuration.

Every view is guarded by ``@signed_in("admin")``: a user or an operator gets the 403
page (the event stream too), a visitor the sign-in page. Every action calls the same
service function as the admin API (:mod:`tooti.admin.accounts_api`, ``POST
/admin/v1/peers/{id}/…``) and the CLI, so the console can do nothing they cannot.

Accounts
  * ``GET /console/admin/accounts`` (:func:`accounts_page`): every account (name, role,
    status, balance, earnings owed, created) and a form to create one;
    ``POST /console/admin/accounts`` (:func:`create_account`):
    :meth:`~tooti.accounts.service.AccountService.create_account`, then 303 to its page
    (a refused name re-renders the list with the service's message and status).
  * ``GET /console/admin/accounts/<id or name>`` (:func:`account_page`): the account, its
    API keys (prefixes only) and its actions, each a ``POST`` under the same path:
    ``/top-up`` (``amount`` in credits as a decimal string, ``memo``, and ``idem``: an
    idempotency key generated into the form when the page renders, so a form sent twice
    (a double click, a re-sent ``POST``) moves the money once:
    :meth:`~tooti.accounts.service.AccountService.top_up` with that key, as ``POST
    /admin/v1/credits/top-up``); ``/status`` (``active`` or ``suspended``: its keys stop
    or start working on every gateway within the key directory's poll); ``/login-link``
    (a one-time sign-in link, shown once as a full URL in a ``.secret-box`` of the ``200``
    answer: never in a redirect, the session or a log); ``/password`` (argon2id; it ends
    the account's console sessions); ``/logout`` (every console session of the account
    ended, on every gateway sharing the database); ``/keys/<key id>/revoke`` (scoped to
    the account: a key of another account is 404).

Network and requests
  * ``GET /console/admin/network`` (:func:`network_page`): every peer of this gateway
    (nodes, relays and the nodes behind relays), rendered on the server from the admin
    snapshot (so the page is useful without JavaScript), then kept current by
    ``console.js`` from :func:`events`; nodes have disable/enable and drain buttons,
    and ids disabled while not connected can be enabled.
    ``POST /console/admin/nodes/<id>/disable|enable|drain`` (:func:`node_action`):
    :class:`~tooti.admin.peer_control.PeerControl`, then 303 back with a message (an
    unknown id is the 404 page; a refusal such as draining a relayed node, 409, is
    the message).
  * ``GET /console/admin/requests`` (:func:`requests_page`): the live request flow,
    first rows from the bus's recent requests.
  * ``GET /console/admin/events`` (:func:`events`): server-sent events, the same as
    ``GET /admin/v1/events`` (what ``tooti tui`` reads): the snapshot
    (:meth:`~tooti.admin.api.AdminAPI.snapshot`), then every bus event, a keepalive
    comment after :data:`~tooti.admin.events.KEEPALIVE` seconds of silence, and a
    ``dropped`` event when the bus stops feeding the stream (the subscriber fell
    behind, or a drain closed the bus). The frames are :func:`tooti.admin.events.sse`'s.
    The stream has no response timeout (Quart's would cut it after 60 s); it ends
    when the client leaves (quart-trio cancels the response when the server reports
    the disconnect), and the bus subscription is released however it ends.

Ledger and configuration
  * ``GET /console/admin/ledger`` shows a button; ``POST /console/admin/ledger``
    (:func:`ledger_page`) runs the check (:func:`tooti.admin.accounts_api.ledger_report`,
    what ``GET /admin/v1/ledger/check`` answers) and shows ok or the violations, the
    warnings and the summary. The check only reads, but it scans the whole journal: a
    ``POST`` makes it an act of the admin (not of a reload, a prefetch or another
    site's page, which the CSRF check refuses).
  * ``GET /console/admin/config`` (:func:`config_page`): the gateway's settings now
    (after any reload), with no secret: the admin key and every join token or group
    API key appear only as "set" / "not set" (join tokens by name), the database as
    its kind and its URL without password or query (:func:`tooti.accounts.database.
    redact`), groups by name only.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import msgspec
import trio
from quart import Blueprint, Response, flash, g, render_template, request, session

from tooti.accounts.database import redact
from tooti.accounts.money import format_credits, parse_credits
from tooti.accounts.records import ADMIN_ACCOUNT, AccountInfo
from tooti.admin.accounts_api import ledger_report
from tooti.admin.api import PEER_ACTIONS
from tooti.admin.events import KEEPALIVE, sse
from tooti.console.guard import me, signed_in
from tooti.console.responses import redirect_to
from tooti.errors import APIError
from tooti.mesh.events import EventBus
from tooti.settings import GatewaySettings

log = logging.getLogger("tooti.console")
blueprint = Blueprint("admin", __name__)

ROLES = ("user", "operator", "admin")
LINK_TTLS = {"900": "15 minutes", "3600": "1 hour", "86400": "1 day", "604800": "7 days"}
"""Lifetimes a login link may be given from the console (seconds → label)."""
RECENT = 100
"""Requests the live request page renders before its stream takes over."""
MAX_TEXT = 256
"""Longest memo or idempotency key (as the admin API's)."""
PEER_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("id", "node", None), ("role", "role", None), ("state", "state", None),
    ("via", "via", None), ("group", "group", None), ("owner", "owner", None),
    ("models", "models", None), ("in_flight", "in flight", None),
    ("rtt_ms", "RTT ms", 1), ("ttft_ms", "TTFT ms", 0), ("tok_s", "tok/s", 1),
)
"""The peers table's columns: key, header, decimals. ``console.js``'s ``PEER_COLUMNS``
is the same list (a test compares them)."""
REQUEST_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("request_id", "request", None), ("account", "account", None),
    ("model", "model", None), ("node", "node", None), ("state", "phase", None),
    ("status", "status", None), ("prompt_tokens", "prompt", None),
    ("completion_tokens", "completion", None), ("ttft_ms", "TTFT ms", 1),
    ("latency_ms", "total ms", 1),
)
"""The requests table's columns, as ``console.js``'s ``REQUEST_COLUMNS``."""
SECRET_FIELDS = frozenset({"admin_key", "join_token", "join_tokens", "groups", "database"})
"""Settings the config page never shows as they are."""


class FormError(ValueError):
    """A field of an admin form is not valid (the page is re-rendered with status 400)."""


# ------------------------------------------------------------ helpers

def fmt(value: Any, digits: int | None = None) -> str:
    """A table cell as ``console.js``'s ``fmt`` writes it (an en dash for nothing)."""
    if value is None or value == "":
        return "\u2013"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and digits is not None:
        return f"{value:.{digits}f}"
    return str(value)


def _measured(peer: dict[str, Any], key: str) -> float | None:
    """The best of a peer's models by the gateway's measurement (lowest TTFT, highest
    tok/s), as ``console.js``'s ``measured``."""
    values = [info.get(key) for info in (peer.get("per_model") or {}).values()]
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return None
    return min(numbers) if key == "ttft_ms" else max(numbers)


def peer_row(peer: dict[str, Any]) -> dict[str, Any]:
    """One row of the peers table from a peer's admin view (:meth:`Peer.describe`),
    as ``console.js``'s ``peerFromDescribe`` makes it."""
    row = {
        "id": peer.get("id", ""), "role": peer.get("role", ""), "via": peer.get("via") or "",
        "state": peer.get("state") or "live", "group": peer.get("group") or "",
        "owner": peer.get("owner") or "", "models": ", ".join(peer.get("models") or ()),
        "in_flight": peer.get("in_flight") or 0, "rtt_ms": peer.get("rtt_ms"),
        "ttft_ms": _measured(peer, "ttft_ms"), "tok_s": _measured(peer, "tokens_per_s"),
    }
    return {"cells": [fmt(row[key], digits) for key, _, digits in PEER_COLUMNS],
            "id": row["id"], "state": row["state"], "role": row["role"],
            "path": quote(str(row["id"]), safe=""),
            "actions": (("enable", "drain") if row["state"] == "disabled"
                        else ("disable", "drain"))
            if row["role"] == "node" and row["state"] != "gone" else ()}


def request_row(summary: dict[str, Any]) -> dict[str, Any]:
    """One row of the requests table from a bus request summary."""
    return {"id": summary.get("request_id", ""), "state": summary.get("state", ""),
            "cells": [fmt(summary.get(key), digits) for key, _, digits in REQUEST_COLUMNS]}


def state_class(state: str) -> str:
    """The row class of a state (letters and ``_`` only, as ``console.js`` makes it)."""
    return "state-" + "".join(c for c in str(state) if c.isascii() and (c.islower()
                                                                        or c == "_"))


def _text(value: str, field: str, *, required: bool = False) -> str:
    value = value.strip()
    if required and not value:
        raise FormError(f"{field}: required")
    if len(value) > MAX_TEXT or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise FormError(f"{field}: at most {MAX_TEXT} characters, no control characters")
    return value


def amount_field(text: str) -> int:
    """Credits as a decimal string (``"12.5"``) → positive micro-units."""
    try:
        value = parse_credits(text)
    except ValueError as exc:
        raise FormError(f"amount: {exc}") from None
    if value <= 0:
        raise FormError("amount: more than zero credits")
    return value


async def _account(ident: str) -> AccountInfo:
    """The account of a page's path (id or name; 404 if none)."""
    account = await g.ctx.accounts.find_account(ident)
    if account is None:
        raise APIError(404, f"no account '{ident}'", code="not_found")
    return account


def _account_path(account: AccountInfo) -> str:
    return "/console/admin/accounts/" + quote(account.id, safe="")


# ------------------------------------------------------------ accounts

async def _accounts_page(*, status: int = 200, error: str = "",
                         form: dict[str, str] | None = None) -> tuple[str, int]:
    accounts = await g.ctx.accounts.list_accounts()
    html = await render_template("admin_accounts.html", accounts=accounts, roles=ROLES,
                                 error=error, form=form or {},
                                 paths={a.id: _account_path(a) for a in accounts})
    return html, status


@blueprint.route("/console/admin/accounts", methods=["GET"])
@signed_in("admin")
async def accounts_page() -> tuple[str, int]:
    """Every account and the form to create one."""
    return await _accounts_page()


@blueprint.route("/console/admin/accounts", methods=["POST"])
@signed_in("admin")
async def create_account() -> Response | tuple[str, int]:
    """A new account (``name``, ``role``), as ``POST /admin/v1/accounts``."""
    form = await request.form
    name, role = form.get("name", "").strip(), form.get("role", "user")
    try:
        account = await g.ctx.accounts.create_account(name, role)
    except APIError as refused:
        if refused.status not in (400, 409):
            raise
        return await _accounts_page(status=refused.status, error=refused.message,
                                    form={"name": name[:64], "role": role})
    log.info("console: %s created account %s (%s)", me().name, account.name, account.role)
    await flash(f"Account {account.name} ({account.role}) created.", "ok")
    return redirect_to(_account_path(account))


async def _account_page(account: AccountInfo, *, status: int = 200, error: str = "",
                        link: str = "", link_expires: str = "") -> tuple[str, int]:
    """The account's page, with a new idempotency key in its top-up form."""
    account = await g.ctx.accounts.get_account(account.id)  # the balance now
    keys = await g.ctx.accounts.list_keys(account.id)
    html = await render_template(
        "admin_account.html", account=account, keys=list(reversed(keys)),
        path=_account_path(account), idem=f"console-{secrets.token_hex(12)}",
        error=error, link=link, link_expires=link_expires, link_ttls=LINK_TTLS,
        has_password=await g.ctx.passwords.has_password(account.id),
        min_length=g.ctx.passwords.MIN_LENGTH, is_admin_account=account.id == ADMIN_ACCOUNT,
        key_paths={k.id: quote(k.id, safe="") for k in keys})
    return html, status


@blueprint.route("/console/admin/accounts/<ident>", methods=["GET"])
@signed_in("admin")
async def account_page(ident: str) -> tuple[str, int]:
    """One account: its figures, keys and actions."""
    return await _account_page(await _account(ident))


async def _act(ident: str, action: Callable[[AccountInfo], Any]) -> Response | tuple[str, int]:
    """Run ``action`` on the account; a refused form re-renders its page (400, or the
    service's 403/409/410), an unknown account is the 404 page."""
    account = await _account(ident)
    try:
        result = await action(account)
    except FormError as bad:
        return await _account_page(account, status=400, error=str(bad))
    except APIError as refused:
        if refused.status == 404:
            raise
        return await _account_page(account, status=refused.status, error=refused.message)
    if isinstance(result, Response | tuple):
        return result
    return redirect_to(_account_path(account))


@blueprint.route("/console/admin/accounts/<ident>/top-up", methods=["POST"])
@signed_in("admin")
async def top_up(ident: str) -> Response | tuple[str, int]:
    """Credit the account (as ``POST /admin/v1/credits/top-up``), once per form."""
    form = await request.form

    async def run(account: AccountInfo) -> None:
        amount = amount_field(form.get("amount", ""))
        idem = _text(form.get("idem", ""), "idempotency key", required=True)
        memo = _text(form.get("memo", ""), "memo")
        balance = await g.ctx.accounts.top_up(account.id, amount, idem_key=idem, memo=memo)
        log.info("console: %s topped up %s (form %s)", me().name, account.name, idem)
        await flash(f"Top-up of {form.get('amount', '').strip()} credits to {account.name} "
                    f"recorded (sent twice, it counts once). Balance now "
                    f"{format_credits(balance)} credits.", "ok")

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/status", methods=["POST"])
@signed_in("admin")
async def set_status(ident: str) -> Response | tuple[str, int]:
    """Suspend or reactivate the account (as ``PATCH /admin/v1/accounts/{id}``)."""
    form = await request.form

    async def run(account: AccountInfo) -> None:
        status = form.get("status", "")
        if status not in ("active", "suspended"):
            raise FormError("status: active or suspended")
        await g.ctx.accounts.set_status(account.id, status)
        log.info("console: %s set %s %s", me().name, account.name, status)
        await flash(f"{account.name} is {status}" + (
            ": its API keys and console sessions stop working." if status == "suspended"
            else "."), "ok")

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/login-link", methods=["POST"])
@signed_in("admin")
async def login_link(ident: str) -> Response | tuple[str, int]:
    """A one-time sign-in link, shown once in the answer (as ``POST
    /admin/v1/accounts/{id}/login-link`` and ``tooti accounts login-link``)."""
    form = await request.form

    async def run(account: AccountInfo) -> tuple[str, int]:
        ttl = form.get("ttl", "900")
        if ttl not in LINK_TTLS:
            raise FormError(f"lifetime: one of {', '.join(LINK_TTLS.values())}")
        secret = await g.ctx.links.mint(account.id, by_account=me().id, ttl=int(ttl))
        log.info("console: %s made a login link for %s", me().name, account.name)
        url = f"{request.host_url}console/login/link?token={quote(secret, safe='')}"
        return await _account_page(account, link=url, link_expires=LINK_TTLS[ttl])

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/password", methods=["POST"])
@signed_in("admin")
async def set_password(ident: str) -> Response | tuple[str, int]:
    """Set the account's password (as ``PUT /admin/v1/accounts/{id}/password``); it
    ends every console session of the account."""
    form = await request.form

    async def run(account: AccountInfo) -> Response | None:
        password, again = form.get("password", ""), form.get("again", "")
        if password != again:
            raise FormError("The two passwords differ.")
        try:
            await g.ctx.passwords.set_password(account.id, password)
        except ValueError as bad:
            raise FormError(str(bad)) from None
        log.info("console: %s set the password of %s", me().name, account.name)
        if account.id == me().id:  # this session ended with the others
            session.clear()
            return redirect_to("/console/login")
        await flash(f"Password of {account.name} set; its console sessions ended.", "ok")
        return None

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/logout", methods=["POST"])
@signed_in("admin")
async def logout(ident: str) -> Response | tuple[str, int]:
    """End every console session of the account (as ``POST
    /admin/v1/accounts/{id}/logout``)."""

    async def run(account: AccountInfo) -> Response | None:
        revoked = await g.ctx.sessions.revoke_all(account.id)
        log.info("console: %s signed %s out everywhere (%d)", me().name, account.name,
                 revoked)
        if account.id == me().id:
            session.clear()
            return redirect_to("/console/login")
        await flash(f"{account.name} is signed out everywhere ({revoked} session(s) "
                    "ended).", "ok")
        return None

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/keys/<key_id>/revoke", methods=["POST"])
@signed_in("admin")
async def revoke_key(ident: str, key_id: str) -> Response | tuple[str, int]:
    """Revoke one of the account's keys (as ``DELETE /admin/v1/keys/{id}``, scoped to
    the account of the page: another account's key is 404)."""
    account = await _account(ident)
    key = await g.ctx.accounts.revoke_key(key_id, account_id=account.id)
    log.info("console: %s revoked key %s of %s", me().name, key.prefix, account.name)
    await flash(f"Key {key.prefix}… revoked.", "ok")
    return redirect_to(_account_path(account))


# ------------------------------------------------------------ network and requests

@blueprint.route("/console/admin/network", methods=["GET"])
@signed_in("admin")
async def network_page() -> str:
    """Every peer, live (server-rendered first, then the event stream)."""
    registry = g.ctx.registry
    snapshot = g.ctx.admin.snapshot()
    rows = [peer_row(peer) for peer in snapshot["peers"]]
    offline = sorted((node_id, at) for node_id, at in registry.disabled_ids.items()
                     if node_id not in registry.peers)
    return await render_template(
        "admin_network.html", rows=rows, columns=PEER_COLUMNS, queued=snapshot["queued"],
        offline=[{"id": node_id, "path": quote(node_id, safe=""), "since": at}
                 for node_id, at in offline], state_class=state_class)


@blueprint.route("/console/admin/nodes/<node_id>/<action>", methods=["POST"])
@signed_in("admin")
async def node_action(node_id: str, action: str) -> Response:
    """Disable, enable or drain a node (as ``POST /admin/v1/peers/{id}/{action}``)."""
    if action not in PEER_ACTIONS:
        raise APIError(404, f"no node action '{action}'", code="not_found")
    control = g.ctx.peer_control
    try:
        view = getattr(control, action)(node_id)
    except APIError as refused:
        if refused.status == 404:
            raise
        await flash(refused.message, "error")
        return redirect_to("/console/admin/network")
    log.info("console: %s: %s node %s", me().name, action, node_id)
    await flash(f"Node {node_id}: {action}d, now {view.get('state', '?')}.", "ok")
    return redirect_to("/console/admin/network")


@blueprint.route("/console/admin/requests", methods=["GET"])
@signed_in("admin")
async def requests_page() -> str:
    """The live request flow (the newest first)."""
    recent = g.ctx.registry.bus.recent_requests(RECENT)
    return await render_template("admin_requests.html", columns=REQUEST_COLUMNS,
                                 rows=[request_row(r) for r in recent],
                                 state_class=state_class)


async def event_stream(snapshot: Callable[[], dict[str, Any]], bus: EventBus
                       ) -> AsyncIterator[bytes]:
    """The frames of ``GET /admin/v1/events`` (:func:`tooti.admin.events.stream_events`)
    as an async iterator for a Quart response: subscribed before the snapshot is
    taken (nothing is missed), released however the stream ends."""
    sub = bus.subscribe()
    try:
        yield sse("snapshot", snapshot())
        while True:
            with trio.move_on_after(KEEPALIVE) as idle:  # never yield inside the scope
                try:
                    event = await sub.receive.receive()
                except trio.EndOfChannel:
                    break
            if idle.cancelled_caught:
                yield b": keepalive\n\n"
                continue
            yield sse(event.kind, event.to_dict(), event.seq)
        yield sse("dropped", {"reason": sub.reason or "bus closed"})
    finally:
        bus.unsubscribe(sub)


@blueprint.route("/console/admin/events", methods=["GET"])
@signed_in("admin")
async def events() -> Response:
    """The snapshot, then every bus event, as server-sent events (what the live tables
    follow)."""
    response = Response(event_stream(g.ctx.admin.snapshot, g.ctx.registry.bus),
                        status=200, mimetype="text/event-stream",
                        headers={"x-accel-buffering": "no"})
    response.timeout = None  # Quart's default would cut it
    return response


# ------------------------------------------------------------ ledger and config

@blueprint.route("/console/admin/ledger", methods=["GET", "POST"])
@signed_in("admin")
async def ledger_page() -> str:
    """The ledger check (on ``POST``), as ``GET /admin/v1/ledger/check``."""
    report = None
    if request.method == "POST":
        report = await ledger_report(g.ctx.database)
        log.info("console: %s ran the ledger check: %s", me().name,
                 "ok" if report["ok"] else f"{len(report['violations'])} violation(s)")
    summary = [] if report is None else [
        (name, value) for name, value in report["summary"].items()
        if not name.endswith("_micros")]
    return await render_template("admin_ledger.html", report=report, summary=summary)


def _set(value: object) -> str:
    return "set" if value else "not set"


def database_summary(url: str) -> str:
    """The database as the config page shows it: its kind and where, never a password
    (:func:`redact`) nor the URL's query or fragment (they may carry ``password=``)."""
    if url.startswith(("postgresql://", "postgres://")):
        bare = url.split("#", 1)[0].split("?", 1)[0]
        return f"PostgreSQL: {redact(bare)}" + (
            " (options not shown)" if len(bare) < len(url) else "")
    if not url:
        return "SQLite: tooti.sqlite3 in the data directory"
    return f"SQLite: {url.removeprefix('sqlite://')}"


def config_sections(settings: GatewaySettings, *, roles: list[str],
                    routing_policy: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The config page's sections: ``(title, [(setting, value as shown)])``. Secrets are
    shown as "set" / "not set" only; limits are every number and switch of the
    gateway's settings (no string can leak through them)."""
    join_tokens = sorted(settings.join_tokens)
    general = [
        ("roles", ", ".join(roles) or "-"),
        ("listen", settings.listen),
        ("TLS certificate", settings.tls_cert or "none (plain HTTP)"),
        ("TLS key file", settings.tls_key or "none"),
        ("auth", settings.auth or "unset (open on loopback only)"),
        ("admin key", _set(settings.admin_key)),
        ("join token (default)", _set(settings.join_token)),
        ("more join tokens", f"{len(join_tokens)} set: {', '.join(join_tokens)}"
         if join_tokens else "none"),
        ("database", database_summary(settings.database)),
        ("gateway id", settings.gateway_id or "generated (in the data directory)"),
        ("routing policy", routing_policy or "-"),
        ("console", "on" if settings.console else "off"),
    ]
    limits = []
    for field in msgspec.structs.fields(GatewaySettings):
        value = getattr(settings, field.name)
        if isinstance(value, bool | int | float) and field.name not in SECRET_FIELDS \
                and field.name != "console":  # in the first section
            limits.append((field.name, str(value).lower() if isinstance(value, bool)
                           else str(value)))
    groups = [(name, "configured group (join tokens and API keys not shown)")
              for name in sorted(settings.groups)]
    aliases = [(alias, _alias_text(target)) for alias, target in sorted(
        settings.aliases.items())]
    cors = [("allow origins", ", ".join(settings.cors.allow_origins) or "none (off)"),
            ("max age", str(settings.cors.max_age))]
    return [("Gateway", general), ("Limits and timeouts", limits),
            ("Groups", groups), ("Aliases", aliases), ("CORS", cors)]


def _alias_text(target: Any) -> str:
    """An alias's tiers as ``a | b, c`` (tiers separated by ``|``)."""
    if isinstance(target, str):
        return target
    tiers = getattr(target, "tiers", None)
    if tiers is not None:
        return " | ".join(", ".join(tier) for tier in tiers)
    if isinstance(target, list | tuple):
        return ", ".join(str(t) for t in target)
    return str(target)


@blueprint.route("/console/admin/config", methods=["GET"])
@signed_in("admin")
async def config_page() -> str:
    """A summary of the gateway's settings now, with no secret."""
    ctx = g.ctx
    sections = config_sections(
        ctx.settings(), roles=list(ctx.admin.station.roles),
        routing_policy=ctx.routing_policy())
    return await render_template("admin_config.html", sections=sections,
                                 gateway_id=ctx.gateway_id)
