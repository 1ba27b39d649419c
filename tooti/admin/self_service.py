"""Self-service with one's own API key: ``/v1/me`` and below.

The gateway (:mod:`tooti.gateway.app`) verifies the request's key first and hands the
:class:`~tooti.accounts.records.Caller` it speaks for to :meth:`SelfService.handle`;
everything here acts as that caller's account and nothing else:

* ``GET /v1/me``: the account (id, name, role, status), its balance and unpaid
  earnings, the calling key's and the account's limits, usage this UTC month (requests,
  tokens, credit charged) and the groups it belongs to.
* ``GET /v1/me/keys``: the account's keys (never a secret); ``POST /v1/me/keys`` (same
  body as the admin route without ``account``) creates one and shows its secret once
  (its group must be one the account belongs to, else 403);
  ``DELETE /v1/me/keys/{id}``: revoke one of the account's own keys. Another account's key
  id is answered 404, exactly like an unknown one, so ids reveal nothing.
* ``POST /v1/me/redeem`` ``{code}``: an invite code (``ti-tooti-…``) joins its group, a
  credit code (``tc-tooti-…``) adds its amount to the balance; told apart by prefix.
* Operator (and admin) accounts: ``POST /v1/me/groups`` ``{name, public_nodes}``,
  ``POST /v1/me/groups/{name}/invites`` ``{max_uses, expires_in | expires_at}`` (their own
  groups), ``POST /v1/me/join-tokens`` ``{group, name}`` and ``GET /v1/me/earnings
  ?since=&until=``. A user account gets 403.

**Who may.** Only a caller recognised by a database API key (``Caller.source ==
"db"``) or by the gateway's admin key (``admin_key``, the master credential, acting as
the admin account) acts as an account here. An anonymous caller (an open gateway, no
valid key) gets 401 ``invalid_api_key``: there is no "me" without a key. A legacy static
``[gateway.groups.*]`` key (``static``) gets 403 ``permission_error``: it is counted
against the admin account for billing, but it is not the admin account's key and must
never mint keys, tokens or invites as it.

**A key made with a key is never more than it.** ``POST /v1/me/keys`` with a database
key may not widen that key's reach: each limit (rpm, tpm, concurrency, budgets) is at
most the calling key's (left out: the calling key's), the models a subset of its models
(left out: the same list), the expiry no later than its expiry (left out: the same);
asking for more is a 403 naming the field. An account has at most
:data:`~tooti.accounts.service.MAX_SELF_SERVICE_KEYS` active keys it made (409
``too_many_keys``), which bounds how far per-key budgets multiply.

Money in answers is integer micro-units plus a decimal string, as in the admin API
(:mod:`tooti.admin.accounts_api`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tooti import clock
from tooti.accounts.credentials import CREDIT_CODE, INVITE
from tooti.accounts.database import Database
from tooti.accounts.records import Caller, Limits
from tooti.accounts.service import MAX_SELF_SERVICE_KEYS
from tooti.admin.accounts_api import (
    GroupSpec,
    InviteSpec,
    JoinTokenSpec,
    KeySpec,
    Router,
    Text,
    _route,
    account_json,
    earnings_report,
    expiry_of,
    group_json,
    invite_json,
    join_token_json,
    key_json,
    key_limits,
    limits_json,
    listing,
    money,
    query,
    read_json,
    time_param,
)
from tooti.errors import APIError
from tooti.mesh.http import Headers, Receive, Scope, Send, send_json

if TYPE_CHECKING:
    from tooti.accounts.service import AccountService

import msgspec

ME_PREFIX = "/v1/me"


class RedeemBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    code: Text


_ROUTES = [
    _route("GET", "/v1/me", "me"),
    _route("GET", "/v1/me/keys", "list_keys"),
    _route("POST", "/v1/me/keys", "create_key"),
    _route("DELETE", "/v1/me/keys/{}", "revoke_key"),
    _route("POST", "/v1/me/redeem", "redeem"),
    _route("POST", "/v1/me/groups", "create_group"),
    _route("POST", "/v1/me/groups/{}/invites", "create_invite"),
    _route("POST", "/v1/me/join-tokens", "create_join_token"),
    _route("GET", "/v1/me/earnings", "earnings"),
]


def month_start(now: float) -> float:
    """The Unix time the UTC month of ``now`` began."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def _static() -> APIError:
    return APIError(403, "a key from the gateway's configuration ([gateway.groups.*]) "
                    "cannot use /v1/me: use an account's API key", code="forbidden",
                    type="permission_error")


def _wider(param: str, what: str) -> APIError:
    return APIError(403, f"a key made with a key may not {what} than the calling key's",
                    param=param, code="forbidden", type="permission_error")


def narrowed(caller: Caller, models: tuple[str, ...], limits: Limits,
             expires_at: float | None) -> tuple[tuple[str, ...], Limits, float | None]:
    """The models, limits and expiry of a key ``caller`` makes for itself: each left out
    is the caller's own, each given must be within the caller's (403 naming the field
    else). The admin key (no limits, every model, no expiry) allows anything."""
    if caller.models:
        if not models:
            models = caller.models
        elif not set(models) <= set(caller.models):
            raise _wider("models", "allow other models")
    own = caller.key_limits
    fields: dict[str, int | None] = {}
    for field in Limits.__struct_fields__:
        mine, asked = getattr(own, field), getattr(limits, field)
        if mine is not None:
            if asked is None:
                asked = mine
            elif asked > mine:
                raise _wider(field, f"have a higher {field}")
        fields[field] = asked
    if caller.expires_at is not None:
        if expires_at is None:
            expires_at = caller.expires_at
        elif expires_at > caller.expires_at:
            raise _wider("expires_at", "expire later")
    return models, Limits(**fields), expires_at


def _anonymous() -> APIError:
    return APIError(401, "an API key is required for /v1/me (Authorization: Bearer KEY)",
                    code="invalid_api_key", type="invalid_request_error",
                    headers={"www-authenticate": "Bearer"})


class SelfService:
    """``/v1/me*`` for the caller a gateway verified (see the module docstring)."""

    def __init__(self, service: AccountService, database: Database | None = None) -> None:
        """``database``: for ``GET /v1/me/earnings`` (the earnings report reads it)."""
        self.service = service
        self.database = database
        self.router = Router(self, _ROUTES)

    async def handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     headers: Headers, caller: Caller | None) -> None:
        """Serve one ``/v1/me*`` request as ``caller`` (None, anonymous or account-less:
        401; a static configured key: 403)."""
        if caller is None or not caller.account_id or caller.source == "anonymous":
            raise _anonymous()
        if caller.source not in ("db", "admin_key"):
            raise _static()
        handler, args = self.router.find(scope["method"], scope["path"])
        status, body = await handler(scope, receive, caller, *args)
        await send_json(send, status, body, headers)

    async def _operator(self, caller: Caller) -> None:
        """Groups, invites, join tokens and earnings are for operator and admin accounts."""
        account = await self.service.get_account(caller.account_id)
        if account.role not in ("operator", "admin"):
            raise APIError(403, "only operator accounts run nodes and groups",
                           code="forbidden")

    # ------------------------------------------------------------ routes

    async def me(self, scope: Scope, receive: Receive, caller: Caller) -> tuple[int, Any]:
        account = await self.service.get_account(caller.account_id)
        since = month_start(clock.wall())
        usage = dict(await self.service.account_usage(account.id, since))
        charged = usage.pop("charged", 0)
        groups = await self.service.list_groups(account.id)
        held = await self.service.held(account.id)
        return 200, {
            **account_json(account), **money("held", held),
            "key": {"id": caller.key_id, "group": caller.group,
                    "models": list(caller.models), "limits": limits_json(caller.key_limits),
                    "expires_at": caller.expires_at},
            "usage": {"since": since, **usage, **money("charged", int(charged))},
            "groups": [group_json(g) for g in groups],
        }

    async def list_keys(self, scope: Scope, receive: Receive, caller: Caller
                        ) -> tuple[int, Any]:
        keys = await self.service.list_keys(caller.account_id)
        return 200, listing([key_json(k) for k in keys])

    async def create_key(self, scope: Scope, receive: Receive, caller: Caller
                         ) -> tuple[int, Any]:
        body = await read_json(scope, receive, KeySpec)
        models, limits, expires_at = narrowed(
            caller, tuple(body.models), key_limits(body),
            expiry_of(body.expires_in, body.expires_at))
        secret, key = await self.service.create_key(
            caller.account_id, body.name, group=body.group, models=models, limits=limits,
            expires_at=expires_at, max_active=MAX_SELF_SERVICE_KEYS)
        return 201, key_json(key, secret)

    async def revoke_key(self, scope: Scope, receive: Receive, caller: Caller, key_id: str
                         ) -> tuple[int, Any]:
        await self.service.revoke_key(key_id, account_id=caller.account_id)
        return 200, {"id": key_id, "object": "api_key", "revoked": True}

    async def redeem(self, scope: Scope, receive: Receive, caller: Caller
                     ) -> tuple[int, Any]:
        body = await read_json(scope, receive, RedeemBody)
        code = body.code.strip()
        if code.startswith(INVITE):
            group = await self.service.redeem_invite(code, caller.account_id)
            return 200, {"redeemed": "invite", "group": group_json(group)}
        if code.startswith(CREDIT_CODE):
            balance = await self.service.redeem_credit_code(code, caller.account_id)
            return 200, {"redeemed": "credit_code", **money("balance", balance)}
        raise APIError(400, f"not an invite code ({INVITE}…) or a credit code "
                       f"({CREDIT_CODE}…)", param="code", code="invalid_code")

    async def create_group(self, scope: Scope, receive: Receive, caller: Caller
                           ) -> tuple[int, Any]:
        body = await read_json(scope, receive, GroupSpec)
        await self._operator(caller)
        group = await self.service.create_group(caller.account_id, body.name,
                                                public_nodes=body.public_nodes)
        return 201, group_json(group)

    async def create_invite(self, scope: Scope, receive: Receive, caller: Caller,
                            group: str) -> tuple[int, Any]:
        body = await read_json(scope, receive, InviteSpec)
        await self._operator(caller)
        secret, invite = await self.service.create_invite(
            group, caller.account_id, max_uses=body.max_uses,
            expires_at=expiry_of(body.expires_in, body.expires_at))
        return 201, invite_json(invite, secret)

    async def create_join_token(self, scope: Scope, receive: Receive, caller: Caller
                                ) -> tuple[int, Any]:
        body = await read_json(scope, receive, JoinTokenSpec)
        await self._operator(caller)
        secret, token = await self.service.create_join_token(
            caller.account_id, group=body.group, name=body.name)
        return 201, join_token_json(token, secret)

    async def earnings(self, scope: Scope, receive: Receive, caller: Caller
                       ) -> tuple[int, Any]:
        await self._operator(caller)
        if self.database is None:
            raise APIError(404, "earnings are not available on this gateway",
                           code="not_found")
        params = query(scope)
        report = await earnings_report(self.database, time_param(params, "since"),
                                       time_param(params, "until"), caller.account_id)
        account = await self.service.get_account(caller.account_id)
        return 200, {"account_id": account.id, **money("earnings", account.earnings),
                     "report": report}
