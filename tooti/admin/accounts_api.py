"""The accounts part of the admin HTTP API: accounts, API keys, groups, invites, join
tokens, credits, earnings and the ledger check, under ``/admin/v1/`` beside the routes
of :mod:`tooti.admin.api` (same admin key, same :func:`~tooti.admin.api.check_admin`).

Routes (every one needs the admin key; bodies are JSON objects, unknown fields refused):

* ``POST /admin/v1/accounts`` ``{name, role}`` → 201 the account;
  ``GET /admin/v1/accounts``; ``GET /admin/v1/accounts/{id or name}`` (both with
  ``held``: the account's credit gateways hold in open leases for its requests, which
  with ``balance`` is what it can spend, as ``/v1/me`` and the console show it);
  ``PATCH /admin/v1/accounts/{id or name}`` ``{status?, limits?: {rpm, tpm, concurrency}}``.
* ``POST /admin/v1/accounts/{id or name}/login-link`` ``{ttl?}`` (seconds, default 900)
  → 201 ``{link, path, url, expires_at}``: a one-time console login link (shown once;
  :mod:`tooti.accounts.login_links`), ``path`` the console URL path that uses it,
  ``url`` the whole link on the gateway's public address (``network.public_url``; null
  when none is set);
  ``PUT /admin/v1/accounts/{id or name}/password`` ``{password}`` → 204 (argon2id,
  :mod:`tooti.accounts.passwords`; logs the account out of the console everywhere);
  ``POST /admin/v1/accounts/{id or name}/logout`` → ``{revoked: n}`` (every console
  session of the account ended).
* ``POST /admin/v1/keys`` ``{account, name, group, models, expires_in | expires_at, rpm,
  tpm, concurrency, budget_day | budget_day_micros, budget_month | budget_month_micros}`` →
  201 the key with its secret in ``key`` (the only time it is ever shown);
  ``GET /admin/v1/keys?account=``; ``DELETE /admin/v1/keys/{id}``.
* ``POST /admin/v1/groups`` ``{name, owner, public_nodes}``; ``GET /admin/v1/groups
  ?account=``; ``GET /admin/v1/groups/{name}``; ``GET /admin/v1/groups/{name}/members``;
  ``DELETE /admin/v1/groups/{name}/members/{account}``.
* ``POST /admin/v1/invites`` ``{group, max_uses, expires_in | expires_at}`` → 201 with the
  code in ``code`` (shown once); ``GET /admin/v1/invites?group=``;
  ``DELETE /admin/v1/invites/{id}``; ``POST /admin/v1/invites/redeem`` ``{code, account}``.
* ``POST /admin/v1/join-tokens`` ``{account, group, name}`` → 201 with ``token`` (once);
  ``GET /admin/v1/join-tokens?account=``; ``DELETE /admin/v1/join-tokens/{id}``.
* ``POST /admin/v1/credits/top-up`` ``{account, amount | amount_micros, idem_key?, memo?}``
  (a retried top-up with the same ``idem_key`` moves nothing; a key used before for
  another account or amount is a 409 ``idempotency_conflict``; without one a new key is
  generated and returned, so such a request cannot be retried safely: send one, as
  ``tooti credits top-up`` does); ``POST /admin/v1/credits/codes`` ``{amount | amount_micros,
  expires_in | expires_at}`` → 201 with ``code`` (once); ``GET /admin/v1/credits/codes``;
  ``POST /admin/v1/credits/redeem`` ``{code, account}``.
* ``GET /admin/v1/earnings?since=&until=`` (per operator and node);
  ``GET /admin/v1/earnings/export?format=csv|json&since=&until=``;
  ``POST /admin/v1/earnings/payouts`` ``{account, amount | amount_micros, idem_key?}``
  (idempotency as for top-ups).
* ``GET /admin/v1/ledger/check`` → ``{ok, violations, summary}``.
* ``POST /admin/v1/ledger/replay`` → ``{replayed, already, failed}``: writes the requests
  in ``usage_quarantine`` again, idempotently (:func:`tooti.billing.credits.replay_quarantine`).

Money: amounts in requests are either ``amount``, a decimal string of credits (``"12.5"``),
or ``amount_micros``, an integer of micro-units (1 credit = 1,000,000); never a float.
Every amount in a response is both: ``"balance_micros": 12500000, "balance": "12.5"``.

Refusals are OpenAI error objects (:class:`tooti.errors.APIError`): 400 naming the bad
field in ``param``, 401 without the admin key, 404 for an unknown id, 405 for a method a
route does not take, 413 past :data:`MAX_BODY` bytes. The service's own refusals (403,
409, 410) pass through as they are.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
import trio

from tooti import clock
from tooti.accounts.database import Database
from tooti.accounts.money import MAX_AMOUNT, format_credits, parse_credits
from tooti.accounts.records import (
    ADMIN_ACCOUNT,
    AccountInfo,
    CreditCodeInfo,
    GroupInfo,
    InviteInfo,
    JoinTokenInfo,
    KeyInfo,
    Limits,
)
from tooti.accounts.sign_in import SignIn
from tooti.admin.api import check_admin
from tooti.errors import APIError
from tooti.mesh.http import Headers, Receive, Scope, Send, read_body, send_bytes, send_json
from tooti.mesh.station import Station

if TYPE_CHECKING:
    from tooti.accounts.service import AccountService

PREFIX = "/admin/v1/"
MAX_BODY = 64 * 1024
"""The largest request body the accounts routes read (bytes)."""
BODY_SECONDS = 10.0
T = TypeVar("T")
LOGIN_LINK_PATH = "/console/login/link"
"""The console page a login link opens (``?token=<link>``)."""
SUMMARY_COUNTS = frozenset({"open_leases"})
"""Members of the ledger summary that are counts, not amounts."""

_NO_CONTROL = r"\A[^\x00-\x1f\x7f]*\Z"
"""Names hold no control character (PostgreSQL text cannot hold a NUL, and a newline in
a name would forge a line of a log or a table)."""
_NO_NUL = r"\A[^\x00]*\Z"
Name = Annotated[str, msgspec.Meta(max_length=64, pattern=_NO_CONTROL)]
Text = Annotated[str, msgspec.Meta(max_length=256, pattern=_NO_NUL)]
Count = Annotated[int, msgspec.Meta(ge=1, le=10**12)]
Seconds = Annotated[int, msgspec.Meta(ge=1, le=100 * 365 * 86400)]
Limit = Annotated[int, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
Micros = Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
Credits = Annotated[str, msgspec.Meta(max_length=32)]


# ------------------------------------------------------------ request bodies

class LimitsBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-account limits (None = unlimited)."""

    rpm: Limit | None = None
    tpm: Limit | None = None
    concurrency: Limit | None = None


class AccountCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    role: Literal["admin", "operator", "user"] = "user"


class AccountPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    status: Literal["active", "suspended"] | None = None
    limits: LimitsBody | None = None


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    """A body that must be empty (or ``{}``)."""


class LoginLinkCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ttl: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] = 900


class PasswordSet(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    password: Annotated[str, msgspec.Meta(max_length=1024)]


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a new API key may do (the self-service body; the admin one adds ``account``)."""

    name: Name = ""
    group: Name = ""
    models: Annotated[list[Name], msgspec.Meta(max_length=256)] = []
    expires_in: Seconds | None = None
    expires_at: float | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None
    concurrency: Limit | None = None
    budget_day: Credits | None = None
    budget_day_micros: Micros | None = None
    budget_month: Credits | None = None
    budget_month_micros: Micros | None = None


class KeyCreate(KeySpec, kw_only=True):
    account: Name


class GroupSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    public_nodes: bool = True


class GroupCreate(GroupSpec, kw_only=True):
    owner: Name


class InviteSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_uses: Count = 1
    expires_in: Seconds | None = None
    expires_at: float | None = None


class InviteCreate(InviteSpec, kw_only=True):
    group: Name


class JoinTokenSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    group: Name = ""
    name: Name = ""


class JoinTokenCreate(JoinTokenSpec, kw_only=True):
    account: Name


class TopUp(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account: Name
    amount: Credits | None = None
    amount_micros: Micros | None = None
    idem_key: Text | None = None
    memo: Text = ""


class CodeCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    amount: Credits | None = None
    amount_micros: Micros | None = None
    expires_in: Seconds | None = None
    expires_at: float | None = None


class Redeem(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    code: Text
    account: Name


class Payout(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    account: Name
    amount: Credits | None = None
    amount_micros: Micros | None = None
    idem_key: Text | None = None


# ------------------------------------------------------------ parsing helpers

_AT = re.compile(r"at `\$((?:\.[A-Za-z_][\w-]*|\[\d+\])+)`")
_FIELD = re.compile(r"field `([^`]+)`")


def _param_of(message: str) -> str | None:
    """The field a msgspec validation message names (``rpm``, ``limits.rpm``)."""
    at = _AT.search(message)
    path = at.group(1).lstrip(".") if at else ""
    field = _FIELD.search(message)
    if field is not None:  # unknown or missing field, inside the object at ``path``
        return f"{path}.{field.group(1)}" if path else field.group(1)
    return path or None


def decode_body(raw: bytes, kind: type[T]) -> T:
    """``raw`` (a JSON object; empty = ``{}``) as ``kind``; 400 naming the bad field."""
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        raise APIError(400, f"invalid request body: {message}", param=_param_of(message),
                       code="invalid_request") from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}",
                       code="invalid_json") from None


async def read_json(scope: Scope, receive: Receive, kind: type[T]) -> T:
    """Read (at most :data:`MAX_BODY` bytes) and decode a request body."""
    return decode_body(await read_body(scope, receive, MAX_BODY, BODY_SECONDS), kind)


def amount_of(amount: str | None, micros: int | None, field: str = "amount") -> int:
    """The micro-units of ``amount`` (decimal credits) or ``<field>_micros``: exactly one,
    positive; 400 naming the field otherwise."""
    if (amount is None) == (micros is None):
        raise APIError(400, f"give exactly one of {field} (credits, e.g. \"12.5\") or "
                       f"{field}_micros (an integer)", param=field, code="invalid_request")
    if micros is not None:
        return micros
    assert amount is not None
    try:
        value = parse_credits(amount)
    except ValueError as exc:
        raise APIError(400, str(exc), param=field, code="invalid_request") from None
    if value <= 0:
        raise APIError(400, f"{field} must be more than zero", param=field,
                       code="invalid_request")
    return value


def optional_amount(amount: str | None, micros: int | None, field: str) -> int | None:
    """Like :func:`amount_of`, but neither given is None (no budget)."""
    if amount is None and micros is None:
        return None
    return amount_of(amount, micros, field)


def expiry_of(expires_in: int | None, expires_at: float | None) -> float | None:
    """An expiry as a Unix time, from seconds from now or a time (not both)."""
    if expires_in is not None and expires_at is not None:
        raise APIError(400, "give expires_in or expires_at, not both", param="expires_at",
                       code="invalid_request")
    if expires_in is not None:
        return clock.wall() + expires_in
    if expires_at is not None and expires_at <= clock.wall():
        raise APIError(400, "expires_at is in the past", param="expires_at",
                       code="invalid_request")
    return expires_at


def key_limits(spec: KeySpec) -> Limits:
    return Limits(
        rpm=spec.rpm, tpm=spec.tpm, concurrency=spec.concurrency,
        budget_day=optional_amount(spec.budget_day, spec.budget_day_micros, "budget_day"),
        budget_month=optional_amount(spec.budget_month, spec.budget_month_micros,
                                     "budget_month"),
    )


def query(scope: Scope) -> dict[str, str]:
    """The query string's parameters (the last value of each)."""
    parsed = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    params = {name: values[-1] for name, values in parsed.items()}
    for name, value in params.items():
        if "\x00" in value:  # no id, name or time holds one (PostgreSQL text cannot)
            raise APIError(400, f"the {name} parameter holds a NUL character", param=name,
                           code="invalid_request")
    return params


def time_param(params: Mapping[str, str], name: str) -> float | None:
    """A time query parameter: Unix seconds or an ISO 8601 date/time (UTC if no zone)."""
    text = params.get(name, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise APIError(400, f"{name} must be a finite time", param=name,
                           code="invalid_request")
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise APIError(400, f"{name} must be Unix seconds or an ISO 8601 date",
                       param=name, code="invalid_request") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def path_part(text: str) -> str:
    """A percent-decoded path segment (an id or name); 404 if it holds a control
    character, as no id or name does (and PostgreSQL text cannot hold a NUL)."""
    part = unquote(text)
    if re.search(_NO_CONTROL, part) is None:
        raise APIError(404, "no id or name holds a control character", code="not_found")
    return part


# ------------------------------------------------------------ responses

def money(name: str, micros: int) -> dict[str, Any]:
    """``{"<name>_micros": 12500000, "<name>": "12.5"}``."""
    return {f"{name}_micros": micros, name: format_credits(micros)}


def limits_json(limits: Limits) -> dict[str, Any]:
    out: dict[str, Any] = {"rpm": limits.rpm, "tpm": limits.tpm,
                           "concurrency": limits.concurrency}
    for budget in ("budget_day", "budget_month"):
        value = getattr(limits, budget)
        out |= money(budget, value) if value is not None else {
            budget: None, f"{budget}_micros": None}
    return out


def account_json(account: AccountInfo) -> dict[str, Any]:
    return {"object": "account", "id": account.id, "name": account.name,
            "role": account.role, "status": account.status,
            **money("balance", account.balance), **money("earnings", account.earnings),
            "limits": limits_json(account.limits), "created_at": account.created_at}


def key_json(key: KeyInfo, secret: str | None = None) -> dict[str, Any]:
    out = {"object": "api_key", "id": key.id, "account_id": key.account_id,
           "name": key.name, "prefix": key.prefix, "group": key.group,
           "models": list(key.models), "limits": limits_json(key.limits),
           "created_at": key.created_at, "expires_at": key.expires_at,
           "revoked_at": key.revoked_at}
    if secret is not None:
        out["key"] = secret
    return out


def group_json(group: GroupInfo) -> dict[str, Any]:
    return {"object": "group", "id": group.id, "name": group.name,
            "owner_id": group.owner_id, "public_nodes": group.public_nodes,
            "members": group.members, "created_at": group.created_at}


def invite_json(invite: InviteInfo, secret: str | None = None) -> dict[str, Any]:
    out = {"object": "invite", "id": invite.id, "group_id": invite.group_id,
           "prefix": invite.prefix, "max_uses": invite.max_uses, "uses": invite.uses,
           "expires_at": invite.expires_at, "created_by": invite.created_by,
           "created_at": invite.created_at, "revoked_at": invite.revoked_at}
    if secret is not None:
        out["code"] = secret
    return out


def join_token_json(token: JoinTokenInfo, secret: str | None = None) -> dict[str, Any]:
    out = {"object": "join_token", "id": token.id, "account_id": token.account_id,
           "group": token.group, "name": token.name, "prefix": token.prefix,
           "created_at": token.created_at, "revoked_at": token.revoked_at}
    if secret is not None:
        out["token"] = secret
    return out


def code_json(code: CreditCodeInfo, secret: str | None = None) -> dict[str, Any]:
    out = {"object": "credit_code", "id": code.id, "prefix": code.prefix,
           **money("amount", code.amount), "created_by": code.created_by,
           "created_at": code.created_at, "expires_at": code.expires_at,
           "redeemed_by": code.redeemed_by, "redeemed_at": code.redeemed_at}
    if secret is not None:
        out["code"] = secret
    return out


def listing(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": items}


# ------------------------------------------------------------ reports (H2's modules)

async def ledger_report(database: Database) -> dict[str, Any]:
    """``{ok, violations, warnings, summary}`` of :mod:`tooti.accounts.ledger_check`; the
    summary's amounts as micro-units and credits (``issued_micros``, ``issued``)."""
    from tooti.accounts import ledger_check

    report = await trio.to_thread.run_sync(ledger_check.check_report, database)
    totals = await trio.to_thread.run_sync(ledger_check.summary, database)
    summary: dict[str, Any] = {}
    for name, value in totals.items():
        summary |= {name: value} if name in SUMMARY_COUNTS else money(name, value)
    return {"ok": not report.violations, "violations": list(report.violations),
            "warnings": list(report.warnings), "summary": summary}


MONEY_FIELDS = ("earned", "fee", "owed", "paid")


def _money_row(row: Any) -> dict[str, Any]:
    """An earnings record as JSON: its amounts as micro-units and credits."""
    record: dict[str, Any] = msgspec.to_builtins(row)
    for name in MONEY_FIELDS:
        if name in record:
            record |= money(name, record.pop(name))
    return record


async def earnings_report(database: Database, since: float | None, until: float | None,
                          account_id: str | None = None) -> dict[str, Any]:
    """Per operator and per node earnings charged in ``[since, until)``
    (:mod:`tooti.accounts.earnings`); ``account_id`` keeps one operator's."""
    from tooti.accounts import earnings

    operators = await trio.to_thread.run_sync(lambda: earnings.by_operator(
        database, since=since, until=until, owner=account_id))
    nodes = await trio.to_thread.run_sync(lambda: earnings.by_node(
        database, since=since, until=until, owner=account_id))
    return {"object": "earnings", "since": since, "until": until,
            "operators": [_money_row(row) for row in operators],
            "nodes": [_money_row(row) for row in nodes]}


async def earnings_export(database: Database, fmt: str, since: float | None,
                          until: float | None) -> tuple[bytes, bytes]:
    """The payout rows (:func:`tooti.accounts.earnings.payouts`: earned in the range, owed
    now, paid so far, per operator) as ``(body, content type)``, CSV or JSON."""
    from tooti.accounts import earnings

    rows = await trio.to_thread.run_sync(lambda: earnings.payouts(
        database, since=since, until=until))
    if fmt == "json":
        return (msgspec.json.encode(listing(earnings.export_json(rows))),
                b"application/json")
    text = earnings.export_csv(rows) or "owner_id,earned,owed,paid\n"
    return text.encode(), b"text/csv; charset=utf-8"


# ------------------------------------------------------------ routing

class RawBody(msgspec.Struct, frozen=True):
    """A handler's answer that is not JSON (the CSV export)."""

    body: bytes
    content_type: bytes


RouteHandler = Callable[..., Awaitable[tuple[int, Any]]]
Route = tuple[str, re.Pattern[str], str]


def _route(method: str, pattern: str, name: str) -> Route:
    return method, re.compile(pattern.replace("{}", "([^/]+)") + r"/?\Z"), name


class Router:
    """Method and path patterns → handler names of one object; 404 for an unknown path,
    405 for a known one with another method."""

    def __init__(self, owner: object, routes: list[Route]) -> None:
        self.owner = owner
        self.routes = routes

    def find(self, method: str, path: str) -> tuple[RouteHandler, list[str]]:
        allowed: list[str] = []
        for route_method, pattern, name in self.routes:
            match = pattern.match(path)
            if match is None:
                continue
            if route_method == method:
                return getattr(self.owner, name), [path_part(g) for g in match.groups()]
            allowed.append(route_method)
        if allowed:
            raise APIError(405, f"use {' or '.join(sorted(set(allowed)))} on {path}",
                           code="method_not_allowed")
        raise APIError(404, f"no route for {method} {path}", code="not_found")


_ROUTES = [
    _route("POST", "/admin/v1/accounts", "create_account"),
    _route("GET", "/admin/v1/accounts", "list_accounts"),
    _route("GET", "/admin/v1/accounts/{}", "get_account"),
    _route("PATCH", "/admin/v1/accounts/{}", "patch_account"),
    _route("POST", "/admin/v1/accounts/{}/login-link", "login_link"),
    _route("PUT", "/admin/v1/accounts/{}/password", "set_password"),
    _route("POST", "/admin/v1/accounts/{}/logout", "logout"),
    _route("POST", "/admin/v1/keys", "create_key"),
    _route("GET", "/admin/v1/keys", "list_keys"),
    _route("DELETE", "/admin/v1/keys/{}", "revoke_key"),
    _route("POST", "/admin/v1/groups", "create_group"),
    _route("GET", "/admin/v1/groups", "list_groups"),
    _route("GET", "/admin/v1/groups/{}", "get_group"),
    _route("GET", "/admin/v1/groups/{}/members", "members"),
    _route("DELETE", "/admin/v1/groups/{}/members/{}", "remove_member"),
    _route("POST", "/admin/v1/invites", "create_invite"),
    _route("GET", "/admin/v1/invites", "list_invites"),
    _route("POST", "/admin/v1/invites/redeem", "redeem_invite"),
    _route("DELETE", "/admin/v1/invites/{}", "revoke_invite"),
    _route("POST", "/admin/v1/join-tokens", "create_join_token"),
    _route("GET", "/admin/v1/join-tokens", "list_join_tokens"),
    _route("DELETE", "/admin/v1/join-tokens/{}", "revoke_join_token"),
    _route("POST", "/admin/v1/credits/top-up", "top_up"),
    _route("POST", "/admin/v1/credits/codes", "create_code"),
    _route("GET", "/admin/v1/credits/codes", "list_codes"),
    _route("POST", "/admin/v1/credits/redeem", "redeem_code"),
    _route("GET", "/admin/v1/earnings", "earnings"),
    _route("GET", "/admin/v1/earnings/export", "export"),
    _route("POST", "/admin/v1/earnings/payouts", "payout"),
    _route("GET", "/admin/v1/ledger/check", "ledger_check"),
    _route("POST", "/admin/v1/ledger/replay", "ledger_replay"),
]
MOUNTS = ("accounts", "keys", "groups", "invites", "join-tokens", "credits", "earnings",
          "ledger")


def public_origin(public_url: str) -> str:
    """The HTTP origin of a gateway's public tunnel URL (``network.public_url``:
    ``wss://gw.example/…`` → ``https://gw.example``, ``ws`` → ``http``); ``""`` when
    none is set. What links handed to people are built on (never a request's ``Host``)."""
    public = urlsplit(public_url)
    if not public.netloc:
        return ""
    scheme = "https" if public.scheme in ("wss", "https") else "http"
    return f"{scheme}://{public.netloc}"


class AccountsAPI:
    """The accounts routes of the admin API on one station (see the module docstring)."""

    def __init__(self, station: Station, service: AccountService,
                 database: Database, sign_in: SignIn | None = None) -> None:
        """``sign_in``: the gateway's passwords, links and sessions (shared with its
        console); built on ``database`` when not given."""
        self.station = station
        self.service = service
        self.database = database
        self.router = Router(self, _ROUTES)
        sign_in = sign_in or SignIn.of(database)
        self.passwords = sign_in.passwords
        self.links = sign_in.links
        self.sessions = sign_in.sessions

    def mount(self) -> None:
        """Serve the routes on the station (their prefixes are longer than the admin
        API's ``/admin/v1/``, so they win whichever is mounted first)."""
        for name in MOUNTS:
            self.station.mount(PREFIX + name, self.handle)

    async def handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     headers: Headers) -> None:
        check_admin(self.station.admin_auth, scope)
        handler, args = self.router.find(scope["method"], scope["path"])
        status, body = await handler(scope, receive, *args)
        if isinstance(body, RawBody):
            await send_bytes(send, status, body.body, headers, body.content_type)
        elif body is None:  # 204
            await send_bytes(send, status, b"", headers)
        else:
            await send_json(send, status, body, headers)

    async def _account(self, id_or_name: str) -> AccountInfo:
        """An account by id or name; 404 if there is none."""
        account = await self.service.find_account(id_or_name)
        if account is None:
            raise APIError(404, f"no account '{id_or_name}'", param="account",
                           code="not_found")
        return account

    # ------------------------------------------------------------ accounts

    async def create_account(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, AccountCreate)
        return 201, await self._with_held(
            await self.service.create_account(body.name, body.role))

    async def list_accounts(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        held = await self.service.held_by_account()
        return 200, listing([{**account_json(a), **money("held", held.get(a.id, 0))}
                             for a in await self.service.list_accounts()])

    async def get_account(self, scope: Scope, receive: Receive, ident: str
                          ) -> tuple[int, Any]:
        return 200, await self._with_held(await self._account(ident))

    async def _with_held(self, account: AccountInfo) -> dict[str, Any]:
        """An account's answer: :func:`account_json` and what gateways hold for it."""
        return {**account_json(account), **money("held", await self.service.held(account.id))}

    async def patch_account(self, scope: Scope, receive: Receive, ident: str
                            ) -> tuple[int, Any]:
        body = await read_json(scope, receive, AccountPatch)
        account = await self._account(ident)
        if body.status is not None:
            await self.service.set_status(account.id, body.status)
        if body.limits is not None:
            await self.service.set_limits(account.id, Limits(
                rpm=body.limits.rpm, tpm=body.limits.tpm,
                concurrency=body.limits.concurrency))
        return 200, await self._with_held(await self.service.get_account(account.id))

    async def login_link(self, scope: Scope, receive: Receive, ident: str
                         ) -> tuple[int, Any]:
        body = await read_json(scope, receive, LoginLinkCreate)
        account = await self._account(ident)
        secret = await self.links.mint(account.id, by_account=ADMIN_ACCOUNT, ttl=body.ttl)
        path = f"{LOGIN_LINK_PATH}?token={secret}"
        site = public_origin(self.station.network.public_url)
        return 201, {"object": "login_link", "account_id": account.id,
                     "account": account.name, "link": secret, "path": path,
                     "url": site + path if site else None,
                     "expires_at": clock.wall() + body.ttl}

    async def set_password(self, scope: Scope, receive: Receive, ident: str
                           ) -> tuple[int, Any]:
        body = await read_json(scope, receive, PasswordSet)
        account = await self._account(ident)
        try:
            await self.passwords.set_password(account.id, body.password)
        except ValueError as exc:
            raise APIError(400, str(exc), param="password", code="invalid_request") from None
        return 204, None

    async def logout(self, scope: Scope, receive: Receive, ident: str) -> tuple[int, Any]:
        await read_json(scope, receive, Empty)
        account = await self._account(ident)
        return 200, {"account_id": account.id,
                     "revoked": await self.sessions.revoke_all(account.id)}

    # ------------------------------------------------------------ keys

    async def create_key(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, KeyCreate)
        account = await self._account(body.account)
        secret, key = await self.service.create_key(
            account.id, body.name, group=body.group, models=tuple(body.models),
            limits=key_limits(body), expires_at=expiry_of(body.expires_in, body.expires_at))
        return 201, key_json(key, secret)

    async def list_keys(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        ident = query(scope).get("account")
        account_id = (await self._account(ident)).id if ident else None
        return 200, listing([key_json(k) for k in await self.service.list_keys(account_id)])

    async def revoke_key(self, scope: Scope, receive: Receive, key_id: str
                         ) -> tuple[int, Any]:
        await self.service.revoke_key(key_id)
        return 200, {"id": key_id, "object": "api_key", "revoked": True}

    # ------------------------------------------------------------ groups

    async def create_group(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, GroupCreate)
        owner = await self._account(body.owner)
        return 201, group_json(await self.service.create_group(
            owner.id, body.name, public_nodes=body.public_nodes))

    async def list_groups(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        ident = query(scope).get("account")
        account_id = (await self._account(ident)).id if ident else None
        return 200, listing([group_json(g) for g in await self.service.list_groups(account_id)])

    async def get_group(self, scope: Scope, receive: Receive, group: str) -> tuple[int, Any]:
        return 200, group_json(await self.service.get_group(group))

    async def members(self, scope: Scope, receive: Receive, group: str) -> tuple[int, Any]:
        return 200, listing([account_json(a) for a in await self.service.members(group)])

    async def remove_member(self, scope: Scope, receive: Receive, group: str, ident: str
                            ) -> tuple[int, Any]:
        account = await self._account(ident)
        await self.service.remove_member(group, account.id)
        return 200, {"group": group, "account_id": account.id, "removed": True}

    # ------------------------------------------------------------ invites

    async def create_invite(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, InviteCreate)
        secret, invite = await self.service.create_invite(
            body.group, ADMIN_ACCOUNT, max_uses=body.max_uses,
            expires_at=expiry_of(body.expires_in, body.expires_at))
        return 201, invite_json(invite, secret)

    async def list_invites(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        group = query(scope).get("group")
        if not group:
            raise APIError(400, "say which group: ?group=NAME", param="group",
                           code="invalid_request")
        return 200, listing([invite_json(i) for i in await self.service.list_invites(group)])

    async def revoke_invite(self, scope: Scope, receive: Receive, invite_id: str
                            ) -> tuple[int, Any]:
        await self.service.revoke_invite(invite_id)
        return 200, {"id": invite_id, "object": "invite", "revoked": True}

    async def redeem_invite(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, Redeem)
        account = await self._account(body.account)
        group = await self.service.redeem_invite(body.code, account.id)
        return 200, {"account_id": account.id, "group": group_json(group)}

    # ------------------------------------------------------------ join tokens

    async def create_join_token(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, JoinTokenCreate)
        account = await self._account(body.account)
        secret, token = await self.service.create_join_token(
            account.id, group=body.group, name=body.name)
        return 201, join_token_json(token, secret)

    async def list_join_tokens(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        ident = query(scope).get("account")
        account_id = (await self._account(ident)).id if ident else None
        return 200, listing([join_token_json(t)
                             for t in await self.service.list_join_tokens(account_id)])

    async def revoke_join_token(self, scope: Scope, receive: Receive, token_id: str
                                ) -> tuple[int, Any]:
        await self.service.revoke_join_token(token_id)
        return 200, {"id": token_id, "object": "join_token", "revoked": True}

    # ------------------------------------------------------------ credits

    async def top_up(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, TopUp)
        amount = amount_of(body.amount, body.amount_micros)
        account = await self._account(body.account)
        idem = body.idem_key or secrets.token_hex(12)
        balance = await self.service.top_up(account.id, amount, idem_key=idem,
                                            memo=body.memo)
        return 200, {"account_id": account.id, "idem_key": idem, **money("amount", amount),
                     **money("balance", balance)}

    async def create_code(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, CodeCreate)
        amount = amount_of(body.amount, body.amount_micros)
        secret, code = await self.service.create_credit_code(
            amount, ADMIN_ACCOUNT, expires_at=expiry_of(body.expires_in, body.expires_at))
        return 201, code_json(code, secret)

    async def list_codes(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        return 200, listing([code_json(c) for c in await self.service.list_credit_codes()])

    async def redeem_code(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, Redeem)
        account = await self._account(body.account)
        balance = await self.service.redeem_credit_code(body.code, account.id)
        return 200, {"account_id": account.id, **money("balance", balance)}

    # ------------------------------------------------------------ earnings and ledger

    async def earnings(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        params = query(scope)
        ident = params.get("account")
        account_id = (await self._account(ident)).id if ident else None
        return 200, await earnings_report(self.database, time_param(params, "since"),
                                          time_param(params, "until"), account_id)

    async def export(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        params = query(scope)
        fmt = params.get("format", "csv")
        if fmt not in ("csv", "json"):
            raise APIError(400, "format must be csv or json", param="format",
                           code="invalid_request")
        body, content_type = await earnings_export(
            self.database, fmt, time_param(params, "since"), time_param(params, "until"))
        return 200, RawBody(body, content_type)

    async def payout(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        body = await read_json(scope, receive, Payout)
        amount = amount_of(body.amount, body.amount_micros)
        account = await self._account(body.account)
        idem = body.idem_key or secrets.token_hex(12)
        left = await self.service.payout(account.id, amount, idem_key=idem)
        return 200, {"account_id": account.id, "idem_key": idem, **money("amount", amount),
                     **money("earnings", left)}

    async def ledger_check(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        return 200, await ledger_report(self.database)

    async def ledger_replay(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        from tooti.billing.credits import replay_quarantine

        report = await replay_quarantine(self.database)
        return 200, {"replayed": report.replayed, "already": report.already,
                     "failed": report.failed}
