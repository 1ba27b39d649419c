"""The console's operator pages: an operator's nodes, groups and earnings.

Every page here is for operator accounts (``@signed_in("operator")``; an admin sees
them too, acting as its own account), and every action calls the service function the
admin API and ``/v1/me`` self-service call (:class:`~tooti.accounts.service.
AccountService`, :mod:`tooti.accounts.earnings`, :mod:`tooti.accounts.reports`), so the
console holds no state of its own.

* ``GET /console/nodes``: the nodes bound to the account
  (:func:`~tooti.accounts.reports.nodes_of`, plus live peers whose owner is the account)
  joined with the registry's live peers (state, models with their advertised prices in
  credits per 1M tokens, load = in flight / capacity, the gateway's measured TTFT and
  tokens/s per model); a bound node without a live session is shown ``offline``. A
  stacked bar chart of what each node earned per UTC day over the last 30 days. The
  account's join tokens (name, group, prefix, created, revoked).
  ``POST /console/nodes/tokens`` mints one (optionally for a group the account owns):
  the answer is the page itself with the token shown once in a ``.secret-box`` and the
  ``tooti run --role node --peer …`` line to use it; ``POST /console/nodes/tokens/<id>/
  revoke`` revokes one of the account's tokens (another account's id: 404).
* ``GET /console/groups``: the groups the account owns (with member counts);
  ``POST /console/groups`` creates one (then 303 to its page).
* ``GET /console/groups/<name>``: one group, for its owner or an admin only (anyone
  else: 404, as for an unknown name): members (``…/members/<id>/remove``), invite codes
  (prefix, uses of max uses, expiry, revoked; ``…/invites`` creates one, shown once;
  ``…/invites/<id>/revoke``, the id checked to be one of this group's invites first),
  and ``…/tokens`` mints a join token for the group (shown once). A group's join tokens
  are always its owner's, even when an admin mints one (the nodes joining with it earn
  for the owner), and the page lists the owner's tokens for the group.
* ``GET /console/earnings?since=&until=``: earned per node and per day in the period
  (dates ``YYYY-MM-DD`` or Unix seconds, as the admin API reads them; default: the last
  30 days), owed now (its earnings book) and paid out so far.
  ``GET /console/earnings.csv`` and ``.json``: the rows of ``GET /admin/v1/earnings/
  export`` (:func:`~tooti.accounts.earnings.payouts`: earned in the range, owed, paid),
  read for the signed-in operator only (``owner=``: its usage rows, its books, never
  another operator's).

Secrets (join tokens, invite codes) exist only in the answer of the POST that created
them: never in a redirect, the session, a URL or a listing (listings show the prefix).
Money is integer micro-units, rendered with the ``credits`` filter; advertised prices
are the node's own numbers (credits per 1M tokens) converted to micro-units per 1M
tokens as billing converts them (:func:`_price`), so they are shown exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import trio
from quart import Blueprint, Response, flash, g, render_template, request

from tooti import clock
from tooti.accounts import earnings, reports
from tooti.accounts.money import format_credits
from tooti.accounts.records import AccountInfo, GroupInfo, InviteInfo
from tooti.admin.accounts_api import expiry_of, listing, time_param
from tooti.billing.pipeline import advertised_price
from tooti.console import charts
from tooti.console.forms import MAX_NAME, clipped, int_field
from tooti.console.guard import me, signed_in
from tooti.console.responses import redirect_to
from tooti.console.urls import tunnel_url
from tooti.errors import APIError

log = logging.getLogger("tooti.console")
blueprint = Blueprint("operator", __name__)

DAYS = 30
"""Days the nodes page's earnings chart and the earnings page's default period cover."""
MAX_USES = 10**6
"""Most uses an invite made in the console may have (the service allows more)."""
MAX_EXPIRY_DAYS = 3650
EMPTY_CSV = "owner_id,earned,owed,paid\n"
"""The export's header when there is no row (as ``GET /admin/v1/earnings/export``)."""


# ------------------------------------------------------------ helpers

def _not_found(what: str) -> APIError:
    return APIError(404, f"no {what}", code="not_found")


async def _my_group(name: str) -> GroupInfo:
    """The group ``name`` if the signed-in account owns it (or is an admin); 404 else,
    exactly like an unknown name, so names of other operators' groups reveal nothing."""
    account = me()
    try:
        group = await g.ctx.accounts.get_group(name)
    except APIError as error:
        if error.status == 404:
            raise _not_found(f"group {name}") from None
        raise
    if group.owner_id != account.id and account.role != "admin":
        raise _not_found(f"group {name}")
    return group


async def _owned_groups(account: AccountInfo) -> list[GroupInfo]:
    """The groups ``account`` owns (not those it only belongs to)."""
    return [group for group in await g.ctx.accounts.list_groups(account.id)
            if group.owner_id == account.id]


# ------------------------------------------------------------ nodes

@dataclass
class ModelRow:
    """One model a live node serves, as the nodes page shows it."""

    name: str
    price_input: int
    """Micro-units per 1M tokens (:func:`_price`), rendered with ``credits``."""
    price_output: int
    in_flight: int
    capacity: int
    ttft_ms: float | None
    tokens_per_s: float | None
    state: str


@dataclass
class NodeRow:
    """One of the operator's nodes: bound, live, or both."""

    node_id: str
    group: str
    bound_at: float | None
    state: str
    """The peer's state (``live``, ``disabled``, ``draining``, …) or ``offline``."""
    connected_at: float | None = None
    in_flight: int = 0
    models: list[ModelRow] = field(default_factory=list)


def _price(value: object) -> int:
    """A node's advertised price (credits per 1M tokens) as integer micro-units per 1M
    tokens, converted by the billing pipeline's own
    :func:`~tooti.billing.pipeline.advertised_price`, so the page shows exactly what a
    request is charged at; anything not a number is zero."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return advertised_price(float(value))


def _node_rows(owner: AccountInfo, bound: list[reports.OwnedNode]) -> list[NodeRow]:
    """The bound nodes and the live peers the account owns, live state joined in."""
    peers = g.ctx.registry.peers
    rows: dict[str, NodeRow] = {}
    for node in bound:
        rows[node.node_id] = NodeRow(node.node_id, node.group, node.bound_at, "offline")
    for peer in list(peers.values()):
        if peer.owner == owner.id and peer.role == "node" and peer.id not in rows:
            rows[peer.id] = NodeRow(peer.id, peer.group, None, "offline")
    for row in rows.values():
        peer = peers.get(row.node_id)
        if peer is None or peer.owner != owner.id:
            continue
        view: dict[str, Any] = peer.describe()
        row.state = str(view["state"])
        row.connected_at = view.get("connected_at")
        row.in_flight = int(view.get("in_flight") or 0)
        row.group = row.group or str(view.get("group") or "")
        for name, info in view["per_model"].items():
            price = info.get("price") or {}
            row.models.append(ModelRow(
                name=str(name), price_input=_price(price.get("input")),
                price_output=_price(price.get("output")),
                in_flight=int(info.get("in_flight") or 0),
                capacity=int(info.get("capacity") or 0), ttft_ms=info.get("ttft_ms"),
                tokens_per_s=info.get("tokens_per_s"),
                state=str(info.get("state") or "ok")))
    return sorted(rows.values(), key=lambda r: (r.state == "offline", r.node_id))


async def _nodes_page(secret: str = "", secret_token: Any = None, error: str = "",
                      status: int = 200) -> tuple[str, int]:
    account = me()
    ctx = g.ctx
    now = clock.wall()
    bound = await reports.nodes_of(ctx.database, account.id)
    days = charts.last_days(DAYS, now)
    per_day = await reports.earnings_by_day(ctx.database, account.id, days=DAYS, now=now)
    chart = charts.stacked_bars(
        days, charts.by_day([(d.day, d.node_id, d.earned) for d in per_day], days),
        label="credits earned per day per node", fmt=format_credits)
    tokens = await ctx.accounts.list_join_tokens(account.id)
    html = await render_template(
        "operator_nodes.html", nodes=_node_rows(account, bound), chart=chart,
        earned_30d=sum(d.earned for d in per_day), tokens=tokens,
        groups=await _owned_groups(account), secret=secret, secret_token=secret_token,
        peer_url=tunnel_url(), error=error)
    return html, status


@blueprint.route("/console/nodes", methods=["GET"])
@signed_in("operator")
async def nodes() -> tuple[str, int]:
    return await _nodes_page()


@blueprint.route("/console/nodes/tokens", methods=["POST"])
@signed_in("operator")
async def mint_token() -> tuple[str, int]:
    """Mint a join token (for the account's public nodes, or one of its groups)."""
    form = await request.form
    group = clipped(form, "group")
    owner = me().id
    if group:  # another operator's group: 404, not the service's 403
        owner = (await _my_group(group)).owner_id  # the group's tokens are its owner's
    secret, token = await g.ctx.accounts.create_join_token(
        owner, group=group, name=clipped(form, "name"))
    log.info("console: %s minted join token %s", me().name, token.id)
    return await _nodes_page(secret=secret, secret_token=token)


@blueprint.route("/console/nodes/tokens/<token_id>/revoke", methods=["POST"])
@signed_in("operator")
async def revoke_token(token_id: str) -> Response:
    token = await g.ctx.accounts.revoke_join_token(token_id, account_id=me().id)
    await flash(f"Join token {token.prefix}… revoked: no node can join with it now.", "ok")
    return redirect_to("/console/nodes")


# ------------------------------------------------------------ groups

@blueprint.route("/console/groups", methods=["GET", "POST"])
@signed_in("operator")
async def groups() -> Response | tuple[str, int]:
    account = me()
    error = ""
    if request.method == "POST":
        form = await request.form
        name = clipped(form, "name", MAX_NAME + 1)
        try:
            group = await g.ctx.accounts.create_group(
                account.id, name, public_nodes=form.get("public_nodes") == "on")
        except APIError as refused:
            if refused.status not in (400, 409):
                raise
            error = refused.message
        else:
            log.info("console: %s created group %s", account.name, group.name)
            await flash(f"Group {group.name} created.", "ok")
            return redirect_to(f"/console/groups/{group.name}")
    html = await render_template("operator_groups.html",
                                 groups=await _owned_groups(account), error=error)
    return html, 400 if error else 200


async def _group_page(group: GroupInfo, *, secret: str = "", secret_kind: str = "",
                      error: str = "", status: int = 200) -> tuple[str, int]:
    ctx = g.ctx
    html = await render_template(
        "operator_group.html", group=group, members=await ctx.accounts.members(group.id),
        invites=await ctx.accounts.list_invites(group.id),
        tokens=[t for t in await ctx.accounts.list_join_tokens(group.owner_id)
                if t.group == group.name],
        secret=secret, secret_kind=secret_kind, peer_url=tunnel_url(), error=error,
        now=clock.wall(), max_uses=MAX_USES, max_days=MAX_EXPIRY_DAYS)
    return html, status


@blueprint.route("/console/groups/<name>", methods=["GET"])
@signed_in("operator")
async def group_page(name: str) -> tuple[str, int]:
    return await _group_page(await _my_group(name))


@blueprint.route("/console/groups/<name>/invites", methods=["POST"])
@signed_in("operator")
async def create_invite(name: str) -> tuple[str, int]:
    group = await _my_group(name)
    form = await request.form
    try:
        max_uses = int_field(form, "max_uses", 1, MAX_USES, 1)
        days = int_field(form, "expires_days", 1, MAX_EXPIRY_DAYS, None)
    except ValueError as bad:
        return await _group_page(group, error=str(bad), status=400)
    assert max_uses is not None
    secret, invite = await g.ctx.accounts.create_invite(
        group.id, me().id, max_uses=max_uses,
        expires_at=expiry_of(None if days is None else days * 86400, None))
    log.info("console: %s created invite %s to %s", me().name, invite.id, group.name)
    return await _group_page(group, secret=secret, secret_kind="invite")


async def _invite_of(group: GroupInfo, invite_id: str) -> InviteInfo:
    for invite in await g.ctx.accounts.list_invites(group.id):
        if invite.id == invite_id:
            return invite
    raise _not_found(f"invite {invite_id}")


@blueprint.route("/console/groups/<name>/invites/<invite_id>/revoke", methods=["POST"])
@signed_in("operator")
async def revoke_invite(name: str, invite_id: str) -> Response:
    group = await _my_group(name)
    invite = await _invite_of(group, invite_id)  # only this group's invites
    await g.ctx.accounts.revoke_invite(invite.id)
    await flash(f"Invite {invite.prefix}… revoked.", "ok")
    return redirect_to(f"/console/groups/{group.name}")


@blueprint.route("/console/groups/<name>/members/<account_id>/remove", methods=["POST"])
@signed_in("operator")
async def remove_member(name: str, account_id: str) -> Response:
    group = await _my_group(name)
    await g.ctx.accounts.remove_member(group.id, account_id)
    await flash("Member removed from the group.", "ok")
    return redirect_to(f"/console/groups/{group.name}")


@blueprint.route("/console/groups/<name>/tokens", methods=["POST"])
@signed_in("operator")
async def group_token(name: str) -> tuple[str, int]:
    group = await _my_group(name)
    form = await request.form
    secret, token = await g.ctx.accounts.create_join_token(
        group.owner_id, group=group.id, name=clipped(form, "name"))
    log.info("console: %s minted join token %s for %s", me().name, token.id, group.name)
    return await _group_page(group, secret=secret, secret_kind="token")


# ------------------------------------------------------------ earnings

def _period(args: Mapping[str, str], now: float) -> tuple[float | None, float | None]:
    """``since``/``until`` of the query (the admin API's reading; ``since`` defaults to
    the start of the UTC day :data:`DAYS` - 1 days ago)."""
    since = time_param(args, "since")
    until = time_param(args, "until")
    if since is None and "since" not in args:
        first = charts.last_days(DAYS, now)[0]
        since = datetime.fromisoformat(first).replace(tzinfo=UTC).timestamp()
    return since, until


@blueprint.route("/console/earnings", methods=["GET"])
@signed_in("operator")
async def earnings_page() -> tuple[str, int]:
    account = me()
    db = g.ctx.database
    now = clock.wall()
    since, until = _period(request.args, now)
    nodes_rows = await trio.to_thread.run_sync(lambda: earnings.by_node(
        db, since=since, until=until, owner=account.id))
    mine = await trio.to_thread.run_sync(lambda: earnings.payouts(
        db, since=since, until=until, owner=account.id))
    per_day = await reports.earnings_by_day(db, account.id, days=DAYS, now=now)
    html = await render_template(
        "operator_earnings.html", nodes=nodes_rows, per_day=list(reversed(per_day)),
        owed=mine[0].owed if mine else 0, paid=mine[0].paid if mine else 0,
        earned=sum(row.earned for row in nodes_rows),
        since=since, until=until, since_text=request.args.get("since", "")[:40],
        until_text=request.args.get("until", "")[:40], days=DAYS)
    return html, 200


async def _export(fmt: str) -> Response:
    """The admin export's rows (earned in the period, owed, paid), this operator's only."""
    account = me()
    db = g.ctx.database
    since, until = _period(request.args, clock.wall())
    mine = await trio.to_thread.run_sync(lambda: earnings.payouts(
        db, since=since, until=until, owner=account.id))
    headers = {"content-disposition": f'attachment; filename="earnings-{account.name}.{fmt}"'}
    if fmt == "json":
        body = msgspec.json.encode(listing(earnings.export_json(mine)))
        return Response(body, status=200, content_type="application/json", headers=headers)
    text = earnings.export_csv(mine) or EMPTY_CSV
    return Response(text, status=200, content_type="text/csv; charset=utf-8",
                    headers=headers)


@blueprint.route("/console/earnings.csv", methods=["GET"])
@signed_in("operator")
async def earnings_csv() -> Response:
    return await _export("csv")


@blueprint.route("/console/earnings.json", methods=["GET"])
@signed_in("operator")
async def earnings_json() -> Response:
    return await _export("json")

