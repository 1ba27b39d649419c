"""Who a ``/v1`` request is: its API key → a :class:`~tooti.accounts.records.Caller`.

**Modes** (``gateway.auth``, resolved once at start by :func:`resolve_mode`):

* ``keys``: every ``/v1`` request needs a valid key, presented as
  ``Authorization: Bearer <key>`` or ``x-api-key: <key>``; anything else is 401.
* ``open``: anyone is served. A valid key is still recognised (its account is charged,
  its group routed to, its limits applied); no key, or one that is not valid, is the
  anonymous caller (account ``""``, charged nothing; its key id is
  :func:`tooti.groups.key_id_of` as before, so usage stays grouped per presented key).
* ``""`` (the default): ``open`` while the gateway listens on loopback only. A gateway
  listening beyond loopback with ``auth`` unset refuses to start
  (:class:`~tooti.config.ConfigError` naming ``gateway.auth``); an explicit ``open``
  beyond loopback starts with a WARNING.

**Which keys** (in this order; each comparison of a configured secret is constant-time):

1. ``gateway.admin_key``: the master credential, the ``admin`` account with no group
   (:attr:`~tooti.accounts.records.Caller.source` ``admin_key``).
2. The static ``[gateway.groups.NAME].api_keys`` (legacy): a Caller of the ``admin``
   account in group NAME, routed only to that group's nodes (as before) and not charged.
   Its source is ``static``: it never acts as the admin account anywhere else
   (self-service refuses it, :mod:`tooti.admin.self_service`). Migrate them to database
   keys of a group (``tooti keys create --group NAME``) so each user is charged.
3. Database keys (``sk-tooti-…``), through the cached
   :class:`~tooti.accounts.directory.KeyDirectory`: no database round trip per request
   (source ``db``).

An open gateway's caller without a valid key has source ``anonymous``.

Refusals use OpenAI's shapes: 401 ``invalid_api_key`` (``invalid_request_error``, with
``www-authenticate: Bearer``) for a missing, wrong, expired or revoked key or a
suspended account (one message for all of them, never echoing the key); 403
``model_not_allowed`` for a model outside the key's allowed models.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Sequence
from typing import Literal

from tooti.accounts.credentials import digest_bytes
from tooti.accounts.directory import KeyDirectory
from tooti.accounts.records import ADMIN_ACCOUNT, Caller, Limits, Source
from tooti.config import ConfigError, parse_listen
from tooti.errors import APIError
from tooti.groups import api_key_digest, key_id_of
from tooti.mesh.http import Scope
from tooti.settings import GatewaySettings

log = logging.getLogger("tooti.gateway")

AuthMode = Literal["keys", "open"]
ADMIN_KEY_ID = "admin-key"
"""The key id of requests made with the admin key."""


def caller(key_id: str, account_id: str, *, name: str = "", group: str = "",
           public_fallback: bool = True, role: Literal["admin", "operator", "user"] = "user",
           source: Source = "anonymous") -> Caller:
    """A Caller not read from the database (the anonymous one, the admin key's, a static
    group key's): no limits, every model."""
    return Caller(key_id=key_id, account_id=account_id, account_name=name, role=role,
                  group=group, public_fallback=public_fallback, models=(),
                  key_limits=Limits(), account_limits=Limits(), expires_at=None, active=True,
                  source=source)


ANONYMOUS = caller("anonymous", "")
"""An open gateway's caller without a key."""


def is_loopback_listen(listen: str) -> bool:
    """Whether ``HOST:PORT`` binds loopback only (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    host, _port = parse_listen(listen)
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def resolve_mode(settings: GatewaySettings, *, warn: bool = True) -> AuthMode:
    """The auth mode a gateway with ``settings`` runs in (see the module docstring).

    Raises :class:`ConfigError` (key ``gateway.auth``) for a gateway listening beyond
    loopback with ``auth`` unset; logs a warning for an explicit ``open`` beyond it."""
    loopback = is_loopback_listen(settings.listen)
    if settings.auth == "keys":
        return "keys"
    if settings.auth == "open":
        if not loopback and warn:
            log.warning("gateway.auth = \"open\" on %s: anyone who can reach it is served "
                        "(charged nothing); set gateway.auth = \"keys\" to require API keys",
                        settings.listen)
        return "open"
    if loopback:
        return "open"
    raise ConfigError(
        f"the gateway listens beyond loopback ({settings.listen}) and gateway.auth is not "
        "set: set gateway.auth = \"keys\" to require API keys (see docs/accounts.md), or "
        "gateway.auth = \"open\" to serve anyone", key="gateway.auth")


def presented_key(scope: Scope) -> bytes:
    """The key a request presents: ``Authorization: Bearer <key>``, else ``x-api-key``
    (empty if neither)."""
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = bytes(value)
        elif name == b"x-api-key" and api_key is None:
            api_key = bytes(value)
    if authorization and authorization[:7].lower() == b"bearer ":
        token = authorization[7:].strip()
        if token:
            return token
    return api_key.strip() if api_key else b""


def unauthorized(presented: bool) -> APIError:
    """The 401 of a request without a valid key (never naming the key)."""
    message = ("Incorrect API key provided: the key is unknown, revoked or expired, or its "
               "account is suspended" if presented else
               "You didn't provide an API key. Provide it in an Authorization header using "
               "Bearer auth (Authorization: Bearer YOUR_KEY) or in x-api-key")
    return APIError(401, message, code="invalid_api_key", type="invalid_request_error",
                    headers={"www-authenticate": "Bearer"})


def check_models(who: Caller, models: Sequence[str]) -> None:
    """403 ``model_not_allowed`` if the key may not use one of ``models`` (the request's
    model and its fallbacks). It names only the key's own list, never another group's."""
    if not who.models:
        return
    for model in models:
        if model not in who.models:
            raise APIError(403, f"this API key may not use the model '{model}'",
                           param="model", code="model_not_allowed",
                           type="permission_error")


def routes_of(who: Caller) -> tuple[str, ...]:
    """The node groups a caller's requests go to, in order: its group, then (if allowed)
    the public nodes ``""``; a caller without a group only the public nodes."""
    if not who.group:
        return ("",)
    return (who.group, "") if who.public_fallback else (who.group,)


class Authenticator:
    """Resolves each ``/v1`` request to its Caller (see the module docstring)."""

    def __init__(self, settings: GatewaySettings, keys: KeyDirectory | None = None) -> None:
        self.mode: AuthMode = resolve_mode(settings)
        self.keys = keys
        """Database keys (None: no database, only the admin key and static keys)."""
        self._admin = digest_bytes(settings.admin_key) if settings.admin_key else None
        self._admin_caller = caller(ADMIN_KEY_ID, ADMIN_ACCOUNT, name=ADMIN_ACCOUNT,
                                    role="admin", source="admin_key")
        self._static: list[tuple[bytes, Caller]] = []
        for name, group in settings.groups.items():
            for key in group.api_keys:
                digest = api_key_digest(key)
                self._static.append((digest, caller(
                    "key-" + digest.hex()[:16], ADMIN_ACCOUNT, name=ADMIN_ACCOUNT,
                    group=name, public_fallback=False, role="admin", source="static")))

    async def identify(self, scope: Scope) -> Caller:
        """The request's caller; 401 in ``keys`` mode without a valid key."""
        token = presented_key(scope)
        if token:
            found = self._configured(token)
            if found is None and self.keys is not None:
                found = await self.keys.verify(token)
            if found is not None:
                return found
        if self.mode == "open":
            return ANONYMOUS if not token else caller(key_id_of(b"Bearer " + token), "")
        raise unauthorized(bool(token))

    def _configured(self, token: bytes) -> Caller | None:
        """The admin key's or a static group key's caller. Every configured digest is
        compared in constant time, so timing tells nothing of which matched."""
        if self._admin is None and not self._static:
            return None
        digest = digest_bytes(token)
        found = None
        if self._admin is not None and hmac.compare_digest(digest, self._admin):
            found = self._admin_caller
        for key, static in self._static:
            if hmac.compare_digest(digest, key) and found is None:
                found = static
        return found
