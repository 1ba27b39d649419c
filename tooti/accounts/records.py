"""What the accounts layer hands out: frozen records read from the database (never a
secret, never a hash). Money fields are integer micro-units."""

from __future__ import annotations

from typing import Literal

import msgspec

Role = Literal["admin", "operator", "user"]
Status = Literal["active", "suspended"]
Source = Literal["db", "admin_key", "static", "anonymous"]
"""Where a :class:`Caller` came from (see :attr:`Caller.source`)."""
ADMIN_ACCOUNT = "admin"
"""The id of the account created at first start: the admin key acts as it, and nodes
joined with the legacy global join token belong to it."""


class Limits(msgspec.Struct, frozen=True, omit_defaults=True):
    """Per-key or per-account limits; None = unlimited."""

    rpm: int | None = None
    """Requests per minute."""
    tpm: int | None = None
    """Tokens (prompt + completion) per minute."""
    concurrency: int | None = None
    """Requests in flight at once."""
    budget_day: int | None = None
    """Micro-units a key may spend per UTC day (keys only)."""
    budget_month: int | None = None
    """Micro-units a key may spend per UTC month (keys only)."""


class AccountInfo(msgspec.Struct, frozen=True):
    id: str
    name: str
    role: Role
    status: Status
    balance: int
    """Spendable micro-units (the ``account:<id>`` book)."""
    created_at: float
    limits: Limits = Limits()
    earnings: int = 0
    """Micro-units earned by the account's nodes and not yet paid out."""


class KeyInfo(msgspec.Struct, frozen=True):
    """An API key as listed (its secret is shown once, at creation, and never kept)."""

    id: str
    account_id: str
    name: str
    prefix: str
    """The visible start of the key (``sk-tooti-AbC123``)."""
    group: str
    """The group name whose nodes the key routes to (``""`` = public nodes only)."""
    models: tuple[str, ...]
    """Models the key may use (empty = all it can see)."""
    limits: Limits
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class Caller(msgspec.Struct, frozen=True):
    """Who a verified API key speaks for: what the gateway caches per key and checks on
    every request (see :mod:`tooti.accounts.directory`)."""

    key_id: str
    account_id: str
    account_name: str
    role: Role
    group: str
    """Group name whose nodes serve the key (``""`` = public nodes only)."""
    public_fallback: bool
    """Whether the key also reaches public nodes (its group allows it; always True
    without a group)."""
    models: tuple[str, ...]
    key_limits: Limits
    account_limits: Limits
    expires_at: float | None
    active: bool
    """False once the key is revoked or its account suspended."""
    source: Source = "anonymous"
    """How the caller was recognised: ``db`` (an API key of the accounts database, the
    only callers that act as their account in self-service), ``admin_key`` (the
    gateway's master credential), ``static`` (a legacy ``[gateway.groups.*]`` key: it
    routes to its group and nothing more, never acting as an account) or
    ``anonymous`` (an open gateway's caller without a valid key). The default is the
    least trusted, so a Caller built without saying is never taken for an account."""


class GroupInfo(msgspec.Struct, frozen=True):
    id: str
    name: str
    owner_id: str
    public_nodes: bool
    """Members' keys also reach public nodes."""
    created_at: float
    members: int = 0


class InviteInfo(msgspec.Struct, frozen=True):
    id: str
    group_id: str
    prefix: str
    max_uses: int
    uses: int
    expires_at: float | None
    created_by: str
    created_at: float
    revoked_at: float | None


class JoinTokenInfo(msgspec.Struct, frozen=True):
    id: str
    account_id: str
    group: str
    """Group name the token admits nodes into (``""`` = the owner's public nodes)."""
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None


class CreditCodeInfo(msgspec.Struct, frozen=True):
    id: str
    prefix: str
    amount: int
    created_by: str
    created_at: float
    expires_at: float | None
    redeemed_by: str | None
    redeemed_at: float | None
