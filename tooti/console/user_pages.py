"""The console's user pages: what every signed-in account sees of its own use.

Every view is guarded by ``@signed_in()`` (role "user": any account) and reads or acts
on the signed-in account only (:func:`~tooti.console.guard.me`); every id a view takes
is scoped to that account in the service call, so another account's id is answered
exactly like an unknown one (404).

* ``GET /console/`` (:func:`overview`): the balance (read again from the account
  record, not the session's copy), usage this UTC month (as ``GET /v1/me`` counts it),
  two stacked-bar charts of the last 30 UTC days per model (tokens, prompt plus
  completion, and credits charged; :func:`tooti.accounts.reports.usage_by_day` drawn by
  :func:`tooti.console.charts.stacked_bars`), the groups the account belongs to and how
  many active keys it has.
* ``GET /console/requests`` (:func:`requests_page`): the last 50 requests
  (:func:`tooti.accounts.reports.recent_requests`): time, model, node, endpoint,
  stream, status, tokens, cost in credits, time to first token and total time.
* ``GET /console/keys`` (:func:`keys_page`): the account's keys (never a secret: the
  visible prefix only) with their group, models, limits, budgets, expiry and state.
  ``POST /console/keys`` (:func:`create_key`) creates one through
  :meth:`~tooti.accounts.service.AccountService.create_key`, with the same cap on active
  keys as ``POST /v1/me/keys`` (:data:`~tooti.accounts.service.MAX_SELF_SERVICE_KEYS`),
  and answers 200 with the page showing the secret once in a ``.secret-box`` (never in a
  redirect, the session or a URL). A bad field re-renders the form with a message and
  status 400; nothing is created. The key is the account's own (not made with another
  key), so no narrowing applies, as for the admin API's ``POST /admin/v1/keys``.
  ``POST /console/keys/<id>/revoke`` (:func:`revoke_key`) revokes one of the account's
  own keys (``revoke_key(id, account_id=me)``: another account's id is 404).
* ``GET|POST /console/redeem`` (:func:`redeem_page`): an invite code (``ti-tooti-…``)
  joins its group, a credit code (``tc-tooti-…``) adds its amount: the same service
  calls as ``POST /v1/me/redeem``; a refused code re-renders the form with the
  service's message and status.
* ``GET /console/quickstart`` (:func:`quickstart`): copyable snippets (``curl``, the
  ``openai`` Python client, and the ``anthropic`` and ``ollama`` Python clients when the
  gateway mounts those fronts) using the gateway's address
  (:func:`~tooti.console.urls.site_url`: its public one, else as the browser reached
  it) and a placeholder for the key, and the models this account can use now. The
  console may not import the gateway (nor its ``/v1/models`` list), so the models
  are read from the registry: the live models of the public nodes (``""``)
  and of each node group the account belongs to (:meth:`~tooti.mesh.registry.Registry.
  live_in_group`). A key restricted to some models or to one group sees a subset of it.

Form fields of the key form: ``name``; ``expires`` (a duration such as ``3600``,
``90m``, ``12h``, ``30d``, ``4w``, or ``never``/empty); ``models`` (comma separated);
``group`` (one of the account's groups or empty for the public nodes); ``rpm``, ``tpm``,
``concurrency`` (whole numbers ≥ 0, empty: none); ``budget_day``, ``budget_month``
(credits, e.g. ``2.50``, into integer micro-units; empty: none). The form is read by
:func:`tooti.console.forms.parse_key_form` (the admin's key form too): budgets as the
admin API reads them, the expiry with the CLI's duration grammar.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, flash, g, render_template, request

from tooti import clock
from tooti.accounts import reports
from tooti.accounts.credentials import CREDIT_CODE, INVITE
from tooti.accounts.money import format_credits
from tooti.accounts.records import KeyInfo
from tooti.accounts.service import MAX_SELF_SERVICE_KEYS
from tooti.admin.accounts_api import expiry_of
from tooti.admin.self_service import month_start
from tooti.console.charts import by_day, last_days, stacked_bars
from tooti.console.forms import (
    FormError,
    budgets_text,
    key_form_values,
    key_state,
    limits_text,
    parse_key_form,
)
from tooti.console.guard import me, signed_in
from tooti.console.responses import redirect_to
from tooti.console.urls import site_url
from tooti.errors import APIError

blueprint = Blueprint("user", __name__)

CHART_DAYS = 30
RECENT = 50


# ------------------------------------------------------------ helpers

async def _keys_page(*, status: int = 200, error: str = "", created: str = "",
                     created_key: KeyInfo | None = None,
                     form: dict[str, str] | None = None) -> tuple[str, int]:
    account = me()
    now = clock.wall()
    keys = await g.ctx.accounts.list_keys(account.id)
    groups = await g.ctx.accounts.list_groups(account.id)
    rows = [{"key": key, "state": key_state(key, now), "limits": limits_text(key.limits),
             "budgets": budgets_text(key.limits)} for key in reversed(keys)]
    html = await render_template(
        "user_keys.html", rows=rows, groups=groups, error=error, created=created,
        created_key=created_key, form=form or {})
    return html, status


# ------------------------------------------------------------ pages

@blueprint.route("/console/", methods=["GET"])
@signed_in()
async def overview() -> str:
    """Balance, this month's usage, the charts of the last 30 days, groups, keys."""
    accounts = g.ctx.accounts
    account = await accounts.get_account(me().id)
    now = clock.wall()
    usage = await accounts.account_usage(account.id, month_start(now))
    days = last_days(CHART_DAYS, now)
    rows = await reports.usage_by_day(g.ctx.database, account.id, days=CHART_DAYS, now=now)
    tokens = stacked_bars(days, by_day([(r.day, r.model, r.prompt_tokens
                                         + r.completion_tokens) for r in rows], days),
                          label="tokens per day, per model")
    credits = stacked_bars(days, by_day([(r.day, r.model, r.charged) for r in rows], days),
                           label="credits charged per day, per model", fmt=format_credits)
    groups = await accounts.list_groups(account.id)
    keys = await accounts.list_keys(account.id)
    active = sum(1 for key in keys if key_state(key, now) == "active")
    held = await accounts.held(account.id)
    return await render_template(
        "user_overview.html", account=account, held=held, usage=usage, tokens_chart=tokens,
        credits_chart=credits, groups=groups, active_keys=active, total_keys=len(keys))


@blueprint.route("/console/requests", methods=["GET"])
@signed_in()
async def requests_page() -> str:
    """The account's last 50 requests."""
    rows = await reports.recent_requests(g.ctx.database, me().id, limit=RECENT)
    return await render_template("user_requests.html", rows=rows, limit=RECENT)


@blueprint.route("/console/keys", methods=["GET"])
@signed_in()
async def keys_page() -> tuple[str, int]:
    """The account's keys and the form to create one."""
    return await _keys_page()


@blueprint.route("/console/keys", methods=["POST"])
@signed_in()
async def create_key() -> tuple[str, int]:
    """Create a key; the answer shows its secret once."""
    account = me()
    form = key_form_values(await request.form)
    try:
        parsed = parse_key_form(form, [found.name for found in
                                       await g.ctx.accounts.list_groups(account.id)])
    except FormError as exc:
        return await _keys_page(status=400, error=str(exc), form=form)
    try:
        secret, key = await g.ctx.accounts.create_key(
            account.id, parsed.name, group=parsed.group, models=parsed.models,
            limits=parsed.limits, expires_at=expiry_of(parsed.expires, None),
            max_active=MAX_SELF_SERVICE_KEYS)
    except APIError as exc:
        return await _keys_page(status=exc.status, error=exc.message, form=form)
    return await _keys_page(created=secret, created_key=key)


@blueprint.route("/console/keys/<key_id>/revoke", methods=["POST"])
@signed_in()
async def revoke_key(key_id: str) -> Any:
    """Revoke one of the account's own keys (another's: 404)."""
    key = await g.ctx.accounts.revoke_key(key_id, account_id=me().id)
    await flash(f"Key {key.name or key.prefix} revoked.", "ok")
    return redirect_to("/console/keys")


@blueprint.route("/console/redeem", methods=["GET", "POST"])
@signed_in()
async def redeem_page() -> Any:
    """Redeem an invite code or a credit code (as ``POST /v1/me/redeem``)."""
    if request.method == "GET":
        return await render_template("user_redeem.html", error="")
    account = me()
    code = str((await request.form).get("code", "")).strip()
    try:
        if code.startswith(INVITE):
            group = await g.ctx.accounts.redeem_invite(code, account.id)
            await flash(f"You joined the group {group.name}: a key of that group now "
                        "reaches its nodes.", "ok")
        elif code.startswith(CREDIT_CODE):
            balance = await g.ctx.accounts.redeem_credit_code(code, account.id)
            await flash(f"Credit added: your balance is now {format_credits(balance)} "
                        "credits.", "ok")
        else:
            raise APIError(400, f"not an invite code ({INVITE}…) or a credit code "
                           f"({CREDIT_CODE}…)", param="code", code="invalid_code")
    except APIError as exc:
        return await render_template("user_redeem.html", error=exc.message), exc.status
    return redirect_to("/console/redeem")


@blueprint.route("/console/quickstart", methods=["GET"])
@signed_in()
async def quickstart() -> str:
    """Copyable snippets for this gateway, and the models this account can use."""
    account = me()
    groups = await g.ctx.accounts.list_groups(account.id)
    registry = g.ctx.registry
    models: set[str] = set()
    for group in ["", *(found.name for found in groups)]:
        models.update(registry.live_in_group(group))
    base = site_url()
    model = min(models) if models else "MODEL"
    return await render_template(
        "user_quickstart.html", base=base, models=sorted(models), model=model,
        anthropic="anthropic" in g.ctx.fronts, ollama="ollama" in g.ctx.fronts)
