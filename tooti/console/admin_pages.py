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
    Also on that page, so that the console can do what the admin CLI does:
    ``/limits`` (``rpm``, ``tpm``, ``concurrency``, empty = unlimited:
    :meth:`~tooti.accounts.service.AccountService.set_limits`, as ``tooti accounts
    limits``); ``/keys`` (an API key for the account, the user key form's fields read by
    :func:`tooti.console.forms.parse_key_form`, the group one the account belongs to;
    ``create_key`` as ``POST /admin/v1/keys`` / ``tooti keys create``, the secret shown
    once in the ``200`` answer); ``/join-tokens`` (operator and admin accounts: minted for
    their public nodes or a group they own, every group for an admin account, shown
    once, as ``tooti join-tokens create``) and ``/join-tokens/<id>/revoke`` (scoped to the
    account); ``/groups`` (a group owned by the operator or admin account, as ``tooti
    groups create --owner``); ``/redeem`` (an invite or credit code redeemed for the
    account, as ``tooti invites|credits redeem --account``; an unknown code is a 400).

Groups, credit codes, earnings and usage
  * ``GET /console/admin/groups`` (:func:`groups_page`): every group, its owner and
    member count, each linking to ``/console/groups/<name>`` (the operator page, which
    an admin may open for any group: members, invites, join tokens).
  * ``GET /console/admin/credits`` (:func:`credits_page`): every credit code (prefix,
    amount, created, expires, redeemed by and when), as ``tooti credits codes``;
    ``POST`` (:func:`create_code`): a single-use code (``amount`` in credits,
    ``expires`` a duration or never), made by the signed-in admin account through
    :meth:`~tooti.accounts.service.AccountService.create_credit_code`, shown once.
  * ``GET /console/admin/earnings?since=&until=`` (:func:`earnings_page`): per operator
    and per node, :func:`tooti.admin.accounts_api.earnings_report` (what ``GET
    /admin/v1/earnings`` answers), and what each is owed now;
    ``GET /console/admin/earnings.csv|.json``: :func:`tooti.admin.accounts_api.
    earnings_export` (the body of ``GET /admin/v1/earnings/export``);
    ``POST /console/admin/earnings/payout`` (:func:`payout`): ``account``, ``amount``
    and ``idem`` (rendered into the form as the top-up's, so a form sent twice pays
    once): :meth:`~tooti.accounts.service.AccountService.payout`.
  * ``GET /console/admin/usage`` (:func:`usage_page`) shows a button; ``POST`` runs
    :func:`tooti.billing.ledger.summarize`, the function ``tooti usage`` prints, per
    account, model, node, key, status and owner (six full scans of the usage table:
    on demand, as the ledger check, not on every page load).

Network and requests
  * ``GET /console/admin/network`` (:func:`network_page`): every peer of this gateway
    (nodes, relays and the nodes behind relays), rendered on the server from the admin
    snapshot (so the page is useful without JavaScript), then kept current by
    ``console.js`` from :func:`events`; nodes have disable/enable and drain buttons (no
    drain for a node behind a relay), relays a drain button (:func:`peer_actions`), and
    ids disabled while not connected can be enabled.
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
    behind, or a drain closed the bus): the frames of :func:`tooti.admin.events.
    event_frames` themselves (:func:`console_events`). The session is checked again
    every :data:`SESSION_CHECK` seconds: once it ended (signed out everywhere, a new
    password, a suspension, no longer an admin) the stream ends with a ``dropped``
    event, reason :data:`SESSION_ENDED`. The stream has no response timeout (Quart's
    would cut it after 60 s); it ends when the client leaves (quart-trio cancels the
    response when the server reports the disconnect), and the bus subscription is
    released however it ends.

Ledger and configuration
  * ``GET /console/admin/ledger`` shows a button; ``POST /console/admin/ledger``
    (:func:`ledger_page`) runs the check (:func:`tooti.admin.accounts_api.ledger_report`,
    what ``GET /admin/v1/ledger/check`` answers) and shows ok or the violations, the
    warnings and the summary. The check only reads, but it scans the whole journal: a
    ``POST`` makes it an act of the admin (not of a reload, a prefetch or another
    site's page, which the CSRF check refuses). ``POST /console/admin/ledger/replay``
    (:func:`ledger_replay`): :func:`tooti.billing.credits.replay_quarantine`, as ``POST
    /admin/v1/ledger/replay`` and ``tooti ledger replay``, then 303 with the counts.
  * ``GET /console/admin/config`` (:func:`config_page`): the gateway's settings now
    (after any reload), with no secret: the admin key and every join token or group
    API key appear only as "set" / "not set" (join tokens by name), the database as
    its kind and its URL without password or query (:func:`tooti.accounts.database.
    redact`), groups by name only.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import quote

import msgspec
import trio
from quart import Blueprint, Response, flash, g, render_template, request, session

from tooti import clock
from tooti.accounts.credentials import CREDIT_CODE, INVITE
from tooti.accounts.database import redact
from tooti.accounts.money import format_credits
from tooti.accounts.records import ADMIN_ACCOUNT, AccountInfo, GroupInfo, KeyInfo
from tooti.admin.accounts_api import (
    earnings_export,
    earnings_report,
    expiry_of,
    ledger_report,
    time_param,
)
from tooti.admin.api import PEER_ACTIONS
from tooti.admin.events import event_frames, sse
from tooti.billing.credits import replay_quarantine
from tooti.billing.ledger import summarize
from tooti.console.forms import (
    MAX_TEXT,
    FormError,
    amount_field,
    budgets_text,
    expiry_seconds,
    key_form_values,
    key_state,
    limits_text,
    parse_key_form,
    parse_limits,
    short_text,
    text_field,
)
from tooti.console.guard import me, signed_in
from tooti.console.responses import redirect_to
from tooti.console.urls import site_url
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
            "actions": peer_actions(str(row["role"]), str(row["state"]), str(row["via"]))}


def peer_actions(role: str, state: str, via: str) -> tuple[str, ...]:
    """The buttons of a peer's row, as ``console.js``'s ``peerActions`` (a test compares
    them). A node: disable (enable when disabled) and drain; a node behind a relay
    (``via``): no drain, which :class:`~tooti.admin.peer_control.PeerControl` refuses
    (409 ``relayed_node``: it shares the relay's tunnel), disable works. A relay: drain
    (its tunnel closes with every node behind it), and enable when disabled; no disable,
    which the control accepts but which routes nothing differently (a relay serves no
    model itself, the nodes behind it are routed as their own peers: disable those). A
    peer that is gone: none."""
    if state == "gone" or role not in ("node", "relay"):
        return ()
    if role == "relay":
        return ("enable", "drain") if state == "disabled" else ("drain",)
    first = "enable" if state == "disabled" else "disable"
    return (first,) if via else (first, "drain")


def request_row(summary: dict[str, Any]) -> dict[str, Any]:
    """One row of the requests table from a bus request summary."""
    return {"id": summary.get("request_id", ""), "state": summary.get("state", ""),
            "cells": [fmt(summary.get(key), digits) for key, _, digits in REQUEST_COLUMNS]}


def state_class(state: str) -> str:
    """The row class of a state (letters and ``_`` only, as ``console.js`` makes it)."""
    return "state-" + "".join(c for c in str(state) if c.isascii() and (c.islower()
                                                                        or c == "_"))


def _path_id(text: str, what: str) -> str:
    """An id or name from a page's path: one holding a control character is no id (404,
    as the admin API's :func:`~tooti.admin.accounts_api.path_part`; PostgreSQL text
    cannot even hold a NUL)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise APIError(404, f"no {what} holds a control character", code="not_found")
    return text


async def _account(ident: str) -> AccountInfo:
    """The account of a page's path (id or name; 404 if none)."""
    account = await g.ctx.accounts.find_account(_path_id(ident, "account"))
    if account is None:
        raise APIError(404, f"no account '{ident}'", code="not_found")
    return account


def _account_path(account: AccountInfo) -> str:
    return "/console/admin/accounts/" + quote(account.id, safe="")


# ------------------------------------------------------------ accounts

async def _accounts_page(*, status: int = 200, error: str = "",
                         form: dict[str, str] | None = None) -> tuple[str, int]:
    accounts = await g.ctx.accounts.list_accounts()
    held = await g.ctx.accounts.held_by_account()
    html = await render_template("admin_accounts.html", accounts=accounts, roles=ROLES,
                                 held=held,
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
                        link: str = "", link_expires: str = "", key_secret: str = "",
                        key_made: KeyInfo | None = None, token_secret: str = "",
                        key_form: dict[str, str] | None = None) -> tuple[str, int]:
    """The account's page, with a new idempotency key in its top-up form; a secret made
    by the ``POST`` being answered (login link, API key, join token) is shown once."""
    accounts = g.ctx.accounts
    account = await accounts.get_account(account.id)  # the balance now
    keys = await accounts.list_keys(account.id)
    now = clock.wall()
    operates = account.role in ("operator", "admin")
    groups = await accounts.list_groups(account.id)
    html = await render_template(
        "admin_account.html", account=account, held=await accounts.held(account.id),
        keys=list(reversed(keys)),
        path=_account_path(account), idem=f"console-{secrets.token_hex(12)}",
        error=error, link=link, link_expires=link_expires, link_ttls=LINK_TTLS,
        has_password=await g.ctx.passwords.has_password(account.id),
        min_length=g.ctx.passwords.MIN_LENGTH, is_admin_account=account.id == ADMIN_ACCOUNT,
        key_paths={k.id: quote(k.id, safe="") for k in keys},
        key_rows={k.id: {"state": key_state(k, now), "limits": limits_text(k.limits),
                         "budgets": budgets_text(k.limits)} for k in keys},
        key_secret=key_secret, key_made=key_made, key_form=key_form or {},
        groups=groups, group_paths={grp.id: _group_path(grp) for grp in groups},
        token_groups=await _token_groups(account) if operates else [],
        operates=operates, token_secret=token_secret,
        tokens=list(reversed(await accounts.list_join_tokens(account.id))) if operates
        else [], limits=account.limits)
    return html, status


def _group_path(group: GroupInfo) -> str:
    """The operator page of a group (where an admin manages any group)."""
    return "/console/groups/" + quote(group.name, safe="")


async def _token_groups(account: AccountInfo) -> list[GroupInfo]:
    """The groups a join token of ``account`` may admit nodes into: those it owns, or
    every group for an admin account (as the service allows)."""
    every = await g.ctx.accounts.list_groups()
    return every if account.role == "admin" else [
        grp for grp in every if grp.owner_id == account.id]


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
        idem = short_text(form.get("idem", ""), "idempotency key", required=True)
        memo = short_text(form.get("memo", ""), "memo")
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
        url = f"{site_url()}/console/login/link?token={quote(secret, safe='')}"
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
    key = await g.ctx.accounts.revoke_key(_path_id(key_id, "key"), account_id=account.id)
    log.info("console: %s revoked key %s of %s", me().name, key.prefix, account.name)
    await flash(f"Key {key.prefix}… revoked.", "ok")
    return redirect_to(_account_path(account))


@blueprint.route("/console/admin/accounts/<ident>/limits", methods=["POST"])
@signed_in("admin")
async def set_limits(ident: str) -> Response | tuple[str, int]:
    """Replace the account's limits (``rpm``, ``tpm``, ``concurrency``; empty:
    unlimited), as ``PATCH /admin/v1/accounts/{id}`` ``{limits}`` and ``tooti accounts
    limits``."""
    form = await request.form

    async def run(account: AccountInfo) -> None:
        limits = parse_limits(form)
        await g.ctx.accounts.set_limits(account.id, limits)
        log.info("console: %s set the limits of %s", me().name, account.name)
        await flash(f"Limits of {account.name}: {limits_text(limits)}.", "ok")

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/keys", methods=["POST"])
@signed_in("admin")
async def create_key(ident: str) -> Response | tuple[str, int]:
    """A new API key for the account (as ``POST /admin/v1/keys`` and ``tooti keys
    create``), its secret shown once in the answer. The fields are the user key form's
    (:data:`~tooti.console.forms.KEY_FIELDS`), read by :func:`~tooti.console.forms.
    parse_key_form`; the group must be one the account belongs to (else 400, nothing
    made)."""
    form = key_form_values(await request.form)
    account = await _account(ident)
    try:
        parsed = parse_key_form(
            form, [found.name for found in await g.ctx.accounts.list_groups(account.id)],
            member=f"{account.name} is")
        secret, key = await g.ctx.accounts.create_key(
            account.id, parsed.name, group=parsed.group, models=parsed.models,
            limits=parsed.limits, expires_at=expiry_of(parsed.expires, None))
    except FormError as bad:
        return await _account_page(account, status=400, error=str(bad), key_form=form)
    except APIError as refused:
        if refused.status == 404:
            raise
        return await _account_page(account, status=refused.status, error=refused.message,
                                   key_form=form)
    log.info("console: %s created key %s for %s", me().name, key.prefix, account.name)
    return await _account_page(account, key_secret=secret, key_made=key)


@blueprint.route("/console/admin/accounts/<ident>/join-tokens", methods=["POST"])
@signed_in("admin")
async def mint_join_token(ident: str) -> Response | tuple[str, int]:
    """A join token for the account's nodes (``group``: empty for its public nodes, or
    one of :func:`_token_groups`), as ``POST /admin/v1/join-tokens`` and ``tooti
    join-tokens create``; shown once in the answer."""
    form = await request.form

    async def run(account: AccountInfo) -> tuple[str, int]:
        name = text_field(form.get("name", ""), "name")
        group = text_field(form.get("group", ""), "group")
        if group and group not in {grp.name for grp in await _token_groups(account)}:
            raise FormError(f"group: {account.name} owns no group {group!r}")
        secret, token = await g.ctx.accounts.create_join_token(account.id, group=group,
                                                               name=name)
        log.info("console: %s minted join token %s for %s", me().name, token.id,
                 account.name)
        return await _account_page(account, token_secret=secret)

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/join-tokens/<token_id>/revoke",
                 methods=["POST"])
@signed_in("admin")
async def revoke_join_token(ident: str, token_id: str) -> Response:
    """Revoke one of the account's join tokens (as ``DELETE /admin/v1/join-tokens/{id}``,
    scoped to the account of the page: another account's token is 404)."""
    account = await _account(ident)
    token = await g.ctx.accounts.revoke_join_token(_path_id(token_id, "join token"),
                                                   account_id=account.id)
    log.info("console: %s revoked join token %s of %s", me().name, token.id, account.name)
    await flash(f"Join token {token.prefix}… revoked: no node can join with it now.", "ok")
    return redirect_to(_account_path(account))


@blueprint.route("/console/admin/accounts/<ident>/groups", methods=["POST"])
@signed_in("admin")
async def create_group(ident: str) -> Response | tuple[str, int]:
    """A group owned by this (operator or admin) account, as ``POST /admin/v1/groups``
    and ``tooti groups create --owner``; ``public_nodes``: ``yes`` (the default) or
    ``no``."""
    form = await request.form

    async def run(account: AccountInfo) -> None:
        name = text_field(form.get("name", ""), "name")
        public = form.get("public_nodes", "yes")
        if public not in ("yes", "no"):
            raise FormError("public nodes: yes or no")
        group = await g.ctx.accounts.create_group(account.id, name,
                                                  public_nodes=public == "yes")
        log.info("console: %s created group %s owned by %s", me().name, group.name,
                 account.name)
        await flash(f"Group {group.name} created, owned by {account.name}.", "ok")

    return await _act(ident, run)


@blueprint.route("/console/admin/accounts/<ident>/redeem", methods=["POST"])
@signed_in("admin")
async def redeem(ident: str) -> Response | tuple[str, int]:
    """Redeem an invite code (joins its group) or a credit code (adds its amount) for
    the account, as ``POST /admin/v1/invites/redeem`` / ``/credits/redeem`` and ``tooti
    invites|credits redeem CODE --account``."""
    form = await request.form

    async def run(account: AccountInfo) -> None:
        code = short_text(form.get("code", ""), "code", required=True)
        try:
            if code.startswith(INVITE):
                group = await g.ctx.accounts.redeem_invite(code, account.id)
                message = f"{account.name} joined the group {group.name}."
            elif code.startswith(CREDIT_CODE):
                balance = await g.ctx.accounts.redeem_credit_code(code, account.id)
                message = (f"Credit code redeemed for {account.name}: balance now "
                           f"{format_credits(balance)} credits.")
            else:
                raise FormError(f"code: not an invite code ({INVITE}…) or a credit code "
                                f"({CREDIT_CODE}…)")
        except APIError as refused:  # an unknown code: a bad field, not a missing page
            if refused.status != 404:
                raise
            raise FormError(f"code: {refused.message}") from None
        log.info("console: %s redeemed a code for %s", me().name, account.name)
        await flash(message, "ok")

    return await _act(ident, run)


# ------------------------------------------------------------ groups

@blueprint.route("/console/admin/groups", methods=["GET"])
@signed_in("admin")
async def groups_page() -> str:
    """Every group with its owner and member count; each opens the group's page
    (``/console/groups/<name>``, where an admin manages any group), as ``tooti groups
    list``."""
    groups = await g.ctx.accounts.list_groups()
    names = {a.id: a for a in await g.ctx.accounts.list_accounts()}
    return await render_template(
        "admin_groups.html", groups=groups, owners=names,
        paths={grp.id: _group_path(grp) for grp in groups},
        owner_paths={a.id: _account_path(a) for a in names.values()})


# ------------------------------------------------------------ credit codes

async def _credits_page(*, status: int = 200, error: str = "", secret: str = "",
                        form: dict[str, str] | None = None) -> tuple[str, int]:
    codes = await g.ctx.accounts.list_credit_codes()
    names = {a.id: a.name for a in await g.ctx.accounts.list_accounts()}
    html = await render_template("admin_credits.html", codes=list(reversed(codes)),
                                 names=names, error=error, secret=secret, form=form or {})
    return html, status


@blueprint.route("/console/admin/credits", methods=["GET"])
@signed_in("admin")
async def credits_page() -> tuple[str, int]:
    """Every credit code (prefix, amount, created, expires, redeemed by and when), as
    ``tooti credits codes``, and the form to make one."""
    return await _credits_page()


@blueprint.route("/console/admin/credits", methods=["POST"])
@signed_in("admin")
async def create_code() -> tuple[str, int]:
    """A single-use credit code (``amount`` in credits, ``expires`` a duration or
    never), as ``POST /admin/v1/credits/codes`` and ``tooti credits code``; shown once
    in the answer."""
    raw = await request.form
    form = {"amount": str(raw.get("amount", ""))[:32], "expires": str(raw.get("expires", ""))[:32]}
    try:
        amount = amount_field(form["amount"])
        seconds = expiry_seconds(form["expires"])
        secret, code = await g.ctx.accounts.create_credit_code(
            amount, me().id, expires_at=expiry_of(seconds, None))
    except FormError as bad:
        return await _credits_page(status=400, error=str(bad), form=form)
    except APIError as refused:
        return await _credits_page(status=refused.status, error=refused.message, form=form)
    log.info("console: %s made credit code %s (%s credits)", me().name, code.prefix,
             format_credits(code.amount))
    return await _credits_page(secret=secret)


# ------------------------------------------------------------ earnings and payouts

async def _earnings_page(*, status: int = 200, error: str = "",
                         form: dict[str, str] | None = None) -> tuple[str, int]:
    """Per operator and per node earnings in the period (``?since=&until=``, as ``GET
    /admin/v1/earnings`` reads them), owed now, and the payout form."""
    args = request.args
    since, until = time_param(args, "since"), time_param(args, "until")
    report = await earnings_report(g.ctx.database, since, until)
    accounts = await g.ctx.accounts.list_accounts()
    by_id = {a.id: a for a in accounts}
    payable = [a for a in accounts if a.role in ("operator", "admin") or a.earnings]
    html = await render_template(
        "admin_earnings.html", report=report, accounts=by_id, payable=payable,
        paths={a.id: _account_path(a) for a in accounts},
        idem=f"console-{secrets.token_hex(12)}", error=error, form=form or {},
        since_text=args.get("since", "")[:40], until_text=args.get("until", "")[:40],
        query=request.query_string.decode("latin-1"))
    return html, status


@blueprint.route("/console/admin/earnings", methods=["GET"])
@signed_in("admin")
async def earnings_page() -> tuple[str, int]:
    """Every operator's earnings per node, and what each is owed."""
    return await _earnings_page()


@blueprint.route("/console/admin/earnings/payout", methods=["POST"])
@signed_in("admin")
async def payout() -> Response | tuple[str, int]:
    """Record a payout of an operator's earnings (``account``, ``amount`` in credits,
    ``idem``: the idempotency key rendered into the form, so a form sent twice pays
    once), as ``POST /admin/v1/earnings/payouts`` and ``tooti earnings payout``."""
    raw = await request.form
    form = {name: str(raw.get(name, ""))[:MAX_TEXT] for name in ("account", "amount", "idem")}
    try:
        amount = amount_field(form["amount"])
        idem = short_text(form["idem"], "idempotency key", required=True)
        ident = short_text(form["account"], "account", required=True)
        account = await g.ctx.accounts.find_account(ident)
        if account is None:
            raise FormError(f"account: no account {ident!r}")
        left = await g.ctx.accounts.payout(account.id, amount, idem_key=idem)
    except FormError as bad:
        return await _earnings_page(status=400, error=str(bad), form=form)
    except APIError as refused:
        return await _earnings_page(status=refused.status, error=refused.message, form=form)
    log.info("console: %s paid out to %s (form %s)", me().name, account.name, idem)
    await flash(f"Payout of {format_credits(amount)} credits to {account.name} recorded "
                f"(sent twice, it counts once); {format_credits(left)} credits unpaid "
                "left.", "ok")
    return redirect_to("/console/admin/earnings")


async def _earnings_export(fmt: str) -> Response:
    """The payout export of every operator (as ``GET /admin/v1/earnings/export``)."""
    args = request.args
    body, content_type = await earnings_export(
        g.ctx.database, fmt, time_param(args, "since"), time_param(args, "until"))
    return Response(body, status=200, content_type=content_type.decode(), headers={
        "content-disposition": f'attachment; filename="earnings.{fmt}"'})


@blueprint.route("/console/admin/earnings.csv", methods=["GET"])
@signed_in("admin")
async def earnings_csv() -> Response:
    return await _earnings_export("csv")


@blueprint.route("/console/admin/earnings.json", methods=["GET"])
@signed_in("admin")
async def earnings_json() -> Response:
    return await _earnings_export("json")


# ------------------------------------------------------------ usage

USAGE_GROUPINGS = ("account", "model", "node", "key", "status", "owner")
"""The groupings of the usage page, each one table of ``tooti usage --by``."""


@blueprint.route("/console/admin/usage", methods=["GET", "POST"])
@signed_in("admin")
async def usage_page() -> str:
    """The usage summary ``tooti usage`` prints (:func:`tooti.billing.ledger.summarize`):
    requests, tokens, cost and charged per account, model, node, key, status, owner.

    Computed on ``POST`` only (a button; ``GET`` shows the button), as the ledger check:
    each grouping is a full scan of the usage table, six per summary, which grows with
    every request ever served. A ``GET`` that a reload, a prefetch or an open tab repeats
    must not cost that; a ``POST`` is an act of the admin (and another site's page cannot
    send it: the CSRF check). Bounding the period instead would show a different figure
    than ``tooti usage`` prints, so the page keeps the CLI's totals and runs on demand."""
    tables: list[tuple[str, Any]] = []
    names: dict[str, str] = {}
    if request.method == "POST":
        db = g.ctx.database
        tables = [(by, await trio.to_thread.run_sync(summarize, db, by))
                  for by in USAGE_GROUPINGS]
        names = {a.id: a.name for a in await g.ctx.accounts.list_accounts()}
        log.info("console: %s ran the usage summary", me().name)
    return await render_template("admin_usage.html", tables=tables, names=names,
                                 ran=request.method == "POST")


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
    """Disable, enable or drain a node or a relay (as ``POST
    /admin/v1/peers/{id}/{action}``)."""
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


SESSION_CHECK = 15.0
"""Seconds between re-checks of an open event stream's session (read when the stream
checks, so a test may lower it)."""
SESSION_ENDED = "session ended: sign in again"
"""The ``dropped`` reason of a stream whose session ended (or is no longer an admin's)."""


async def console_events(snapshot: Callable[[], dict[str, Any]], bus: EventBus,
                         still_admin: Callable[[], Awaitable[bool]]
                         ) -> AsyncIterator[bytes]:
    """The frames of ``GET /admin/v1/events`` (:func:`tooti.admin.events.event_frames`,
    closed however this ends, so the bus subscription is released), as long as the
    console session that opened the stream is valid: before a frame goes out, once
    :data:`SESSION_CHECK` seconds passed since the last check (on :func:`tooti.clock.
    now`), ``still_admin()`` is asked; if the session ended (signed out everywhere, a
    password change, a suspension, the role lowered) the stream ends with a ``dropped``
    event saying so. A silent stream sends a keepalive every
    :data:`~tooti.admin.events.KEEPALIVE` seconds, so such a stream ends within
    ``SESSION_CHECK + KEEPALIVE`` seconds even when nothing happens."""
    checked = clock.now()
    async with aclosing(event_frames(snapshot, bus)) as frames:
        async for frame in frames:
            if clock.now() - checked >= SESSION_CHECK:
                if not await still_admin():
                    yield sse("dropped", {"reason": SESSION_ENDED})
                    return
                checked = clock.now()
            yield frame


@blueprint.route("/console/admin/events", methods=["GET"])
@signed_in("admin")
async def events() -> Response:
    """The snapshot, then every bus event, as server-sent events (what the live tables
    follow), while the session lasts (:func:`console_events`)."""
    sessions, token = g.ctx.sessions, g.session_token

    async def still_admin() -> bool:  # no request context needed: the stream outlives g
        info = await sessions.lookup(token)
        return info is not None and info.account.role == "admin"

    response = Response(console_events(g.ctx.admin.snapshot, g.ctx.registry.bus,
                                       still_admin),
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


@blueprint.route("/console/admin/ledger/replay", methods=["POST"])
@signed_in("admin")
async def ledger_replay() -> Response:
    """Bill the quarantined requests again, idempotently (:func:`tooti.billing.credits.
    replay_quarantine`), as ``POST /admin/v1/ledger/replay`` and ``tooti ledger
    replay``; the counts (and the first refusals) as the message."""
    report = await replay_quarantine(g.ctx.database)
    log.info("console: %s replayed the quarantine: %d replayed, %d already, %d failed",
             me().name, len(report.replayed), len(report.already), len(report.failed))
    await flash(f"Replayed {len(report.replayed)} quarantined request(s) "
                f"({len(report.already)} were billed before), {len(report.failed)} still "
                "refused" + (": " + "; ".join(report.failed[:5]) if report.failed else "."),
                "error" if report.failed else "ok")
    return redirect_to("/console/admin/ledger")


def _set(value: object) -> str:
    return "set" if value else "not set"


def database_summary(url: str) -> str:
    """The database as the config page shows it: its kind and where, never a password
    (:func:`redact`, which masks the query's too)."""
    if url.startswith(("postgresql://", "postgres://")):
        return f"PostgreSQL: {redact(url)}"
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
