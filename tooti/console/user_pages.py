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
  gateway mounts those fronts) using the gateway's URL as the browser reached it
  (``request.host_url``) and a placeholder for the key, and the models this account can
  use now. The console may not import the gateway (nor its ``/v1/models`` list), so
  the models are read from the registry: the live models of the public nodes (``""``)
  and of each node group the account belongs to (:meth:`~tooti.mesh.registry.Registry.
  live_in_group`). A key restricted to some models or to one group sees a subset of it.

Form fields of the key form: ``name``; ``expires`` (a duration such as ``3600``,
``90m``, ``12h``, ``30d``, ``4w``, or ``never``/empty); ``models`` (comma separated);
``group`` (one of the account's groups or empty for the public nodes); ``rpm``, ``tpm``,
``concurrency`` (whole numbers ≥ 0, empty: none); ``budget_day``, ``budget_month``
(credits, e.g. ``2.50``, parsed by :func:`tooti.accounts.money.parse_credits` into
integer micro-units; empty: none). The duration grammar is the CLI's (``tooti accounts
keys create --expires-in``); it is re-stated here because the console may not import
the CLI (layering).
"""

from __future__ import annotations

import re
from typing import Any

from quart import Blueprint, flash, g, render_template, request

from tooti import clock
from tooti.accounts import reports
from tooti.accounts.credentials import CREDIT_CODE, INVITE
from tooti.accounts.durations import parse_duration
from tooti.accounts.money import MAX_AMOUNT, format_credits, parse_credits
from tooti.accounts.records import KeyInfo, Limits
from tooti.accounts.service import MAX_SELF_SERVICE_KEYS
from tooti.admin.accounts_api import expiry_of
from tooti.admin.self_service import month_start
from tooti.console.charts import by_day, last_days, stacked_bars
from tooti.console.guard import me, signed_in
from tooti.console.responses import redirect_to
from tooti.errors import APIError

blueprint = Blueprint("user", __name__)

CHART_DAYS = 30
RECENT = 50
MAX_NAME = 64
MAX_EXPIRY = 100 * 365 * 86400
"""The longest expiry a key may be given (as the admin API's ``expires_in``)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
KEY_FIELDS = ("name", "expires", "models", "group", "rpm", "tpm", "concurrency",
              "budget_day", "budget_month")


class FormError(ValueError):
    """A field of a console form is not valid (re-rendered with status 400)."""


# ------------------------------------------------------------ parsing

def expiry_seconds(text: str) -> int | None:
    """``"30d"`` → seconds (:func:`tooti.accounts.durations.parse_duration`, the CLI's
    grammar); ``""``/``"never"`` → None (no expiry); at most :data:`MAX_EXPIRY`."""
    text = text.strip().lower()
    if text in ("", "never"):
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as bad:
        raise FormError(f"expiry: {bad}, or never") from None
    if seconds > MAX_EXPIRY:
        raise FormError("expiry: at most 100 years")
    return seconds


def whole_number(text: str, field: str) -> int | None:
    """A limit: empty → None, else ASCII digits in ``0 … MAX_AMOUNT``."""
    text = text.strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or int(text) > MAX_AMOUNT:
        raise FormError(f"{field}: a whole number of 0 or more (or empty for no limit)")
    return int(text)


def budget(text: str, field: str) -> int | None:
    """A budget in credits: empty → None, else positive micro-units."""
    text = text.strip()
    if not text:
        return None
    try:
        value = parse_credits(text)
    except ValueError as exc:
        raise FormError(f"{field}: {exc}") from None
    if value <= 0:
        raise FormError(f"{field}: more than zero credits (or empty for no budget)")
    return value


def text_field(text: str, field: str) -> str:
    """A short single-line text (a name, a model id, a group)."""
    text = text.strip()
    if len(text) > MAX_NAME or _CONTROL.search(text):
        raise FormError(f"{field}: at most {MAX_NAME} characters, no control characters")
    return text


def model_list(text: str) -> tuple[str, ...]:
    """Comma-separated model ids (empty: every model)."""
    names = [text_field(part, "models") for part in text.split(",")]
    return tuple(dict.fromkeys(name for name in names if name))


# ------------------------------------------------------------ helpers

def key_state(key: KeyInfo, now: float) -> str:
    """``revoked``, ``expired`` or ``active``."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def limits_text(limits: Limits) -> str:
    """The rate limits of a key as a short text (``-``: none)."""
    parts = [f"{name} {value}" for name, value in (
        ("rpm", limits.rpm), ("tpm", limits.tpm), ("concurrency", limits.concurrency))
        if value is not None]
    return ", ".join(parts) or "-"


def budgets_text(limits: Limits) -> str:
    """The budgets of a key in credits (``-``: none)."""
    parts = [f"{format_credits(value)} / {name}" for name, value in (
        ("day", limits.budget_day), ("month", limits.budget_month)) if value is not None]
    return ", ".join(parts) or "-"


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
    raw = await request.form
    form = {name: str(raw.get(name, "")) for name in KEY_FIELDS}
    try:
        name = text_field(form["name"], "name")
        seconds = expiry_seconds(form["expires"])
        models = model_list(form["models"])
        group = text_field(form["group"], "group")
        limits = Limits(rpm=whole_number(form["rpm"], "rpm"),
                        tpm=whole_number(form["tpm"], "tpm"),
                        concurrency=whole_number(form["concurrency"], "concurrency"),
                        budget_day=budget(form["budget_day"], "daily budget"),
                        budget_month=budget(form["budget_month"], "monthly budget"))
        if group and group not in {
                found.name for found in await g.ctx.accounts.list_groups(account.id)}:
            raise FormError(f"group: you are not a member of a group {group!r}")
    except FormError as exc:
        return await _keys_page(status=400, error=str(exc), form=form)
    try:
        secret, key = await g.ctx.accounts.create_key(
            account.id, name, group=group, models=models, limits=limits,
            expires_at=expiry_of(seconds, None), max_active=MAX_SELF_SERVICE_KEYS)
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
    base = request.host_url.rstrip("/")
    model = min(models) if models else "MODEL"
    return await render_template(
        "user_quickstart.html", base=base, models=sorted(models), model=model,
        anthropic="anthropic" in g.ctx.fronts, ollama="ollama" in g.ctx.fronts)
