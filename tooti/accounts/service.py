"""The accounts service: every write to accounts, API keys, groups and their members,
invite codes, join tokens (mint, list, revoke), credit codes, top-ups and payouts, on
the accounts database (:class:`~tooti.accounts.database.Database`, SQLite or
PostgreSQL). The admin API, self-service and the CLI call it; the gateway's hot path
does not (it reads through :mod:`tooti.accounts.directory`'s cache).

Every method is async: its statements run in one transaction in a worker thread
(:meth:`Database.write` / :meth:`Database.read`), and an :class:`~tooti.errors.APIError`
raised inside rolls the whole transaction back. Errors carry the OpenAI error object:
400 bad input (``invalid_request``), 403 ``forbidden``, 404 ``not_found``, 409
``conflict`` (or ``insufficient_funds`` for a payout beyond the earnings), 410
``expired`` / ``used_up`` / ``revoked``.

Secrets (API keys, invite codes, join tokens, credit codes) are generated here
(:func:`tooti.accounts.credentials.generate`), returned once, and stored only as their
SHA-256 digest plus a short visible prefix; they are looked up by digest, never compared
in Python, and never logged.

Atomicity across gateways sharing one database comes from single conditional
statements, never from reading then writing:

* an invite redemption inserts ``(invite, account)`` into ``invite_redemptions`` with
  ``ON CONFLICT DO NOTHING`` (the same account twice uses one use), then takes a use with
  ``UPDATE invites SET uses = uses + 1 WHERE … uses < max_uses AND not revoked AND not
  expired``; no row changed means used up (or revoked, or expired) and the transaction
  rolls back. Under PostgreSQL's READ COMMITTED a concurrent ``UPDATE`` waits for the
  row and re-checks its condition, so exactly ``max_uses`` redemptions succeed;
* a credit code is redeemed by ``UPDATE credit_codes SET redeemed_by = … WHERE
  redeemed_by IS NULL AND not expired`` and, in the same transaction, the journal entry
  ``code:<id>`` (``issued`` → ``account:<id>``), so exactly one redemption credits;
* top-ups (``topup:<idem_key>``) and payouts (``payout:<idem_key>``) are journal entries
  (:func:`tooti.accounts.journal.post`): a repeated idempotency key moves nothing. A key
  repeated with the same account and amount is a retry (the balance is answered again);
  one already used for another account or amount is a 409 ``idempotency_conflict``
  (:func:`same_entry` compares the stored entry's lines), never a silent no-op.

Group names are the node groups' names on the wire, so the gateway passes the names of
its configured ``[gateway.groups.*]`` (``reserved_groups``): creating a database group
under one is a 409, so no operator can take over a configured group's nodes or traffic.
A key made with ``max_active`` (self-service passes :data:`MAX_SELF_SERVICE_KEYS`) is
refused with 409 ``too_many_keys`` once the account has that many active (unrevoked,
unexpired) keys; the count is read in the creating transaction, so concurrent creations
may pass it by at most their number.

Every change a gateway caches (keys created or revoked, an account suspended or its
limits changed, group membership, join tokens minted or revoked) also runs
:func:`bump_changes` in its transaction: the ``changes`` counter the key and join-token
directories poll to refresh their caches.

Names: accounts ``[A-Za-z0-9._@-]{1,64}``; groups ``[A-Za-z0-9._-]{1,64}`` (they become
node group names on the wire). Amounts are integer micro-units (never ``bool`` or
``float``), ``0 < amount <= MAX_AMOUNT``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, get_args

from tooti import clock
from tooti.accounts import credentials
from tooti.accounts.database import Database, Row, Tx
from tooti.accounts.journal import (
    ISSUED,
    PAYOUTS,
    InsufficientFunds,
    account_book,
    balance,
    earnings_book,
    post,
)
from tooti.accounts.money import MAX_AMOUNT
from tooti.accounts.records import (
    ADMIN_ACCOUNT,
    AccountInfo,
    CreditCodeInfo,
    GroupInfo,
    InviteInfo,
    JoinTokenInfo,
    KeyInfo,
    Limits,
    Role,
    Status,
)
from tooti.errors import APIError

log = logging.getLogger("tooti.accounts")

ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
GROUP_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
ROLES: tuple[str, ...] = get_args(Role)
STATUSES: tuple[str, ...] = get_args(Status)
NO_LIMITS = Limits()
MAX_USES = 1_000_000
"""The most uses one invite code may have."""
MAX_MODELS = 256
"""The most models one key may be limited to."""
MAX_TEXT = 200
"""The longest key / token name, memo, idempotency key or model name."""
MAX_SELF_SERVICE_KEYS = 100
"""The most active keys an account may make for itself (self-service)."""

_ACCOUNT_COLUMNS = (
    "a.id, a.name, a.role, a.status, a.created_at, l.rpm, l.tpm, l.concurrency, "
    "(SELECT balance FROM books WHERE book = 'account:' || a.id), "
    "(SELECT balance FROM books WHERE book = 'earnings:' || a.id)")
_ACCOUNT_FROM = "accounts a LEFT JOIN account_limits l ON l.account_id = a.id"
_KEY_COLUMNS = (
    "k.id, k.account_id, k.name, k.prefix, COALESCE(g.name, ''), k.models, k.rpm, k.tpm, "
    "k.concurrency, k.budget_day, k.budget_month, k.created_at, k.expires_at, k.revoked_at")
_KEY_FROM = "api_keys k LEFT JOIN node_groups g ON g.id = k.group_id"
_GROUP_COLUMNS = (
    "g.id, g.name, g.owner_id, g.public_nodes, g.created_at, "
    "(SELECT COUNT(*) FROM memberships m WHERE m.group_id = g.id)")
_INVITE_COLUMNS = ("id, group_id, prefix, max_uses, uses, expires_at, created_by, created_at, "
                   "revoked_at")
_TOKEN_COLUMNS = ("t.id, t.account_id, COALESCE(g.name, ''), t.name, t.prefix, t.created_at, "
                  "t.revoked_at")
_TOKEN_FROM = "join_tokens t LEFT JOIN node_groups g ON g.id = t.group_id"
_CODE_COLUMNS = ("id, prefix, amount, created_by, created_at, expires_at, redeemed_by, "
                 "redeemed_at")


def bump_changes(tx: Tx) -> None:
    """Tell every gateway's caches something they hold changed (in ``tx``, so the bump
    commits with the change): :mod:`tooti.accounts.directory` and
    :mod:`tooti.accounts.join_directory` poll this counter."""
    tx.run("UPDATE changes SET counter = counter + 1 WHERE id = 1")


def same_entry(tx: Tx, idem_key: str, kind: str, lines: Sequence[tuple[str, int]]) -> bool:
    """Whether the journal entry ``idem_key`` is of ``kind`` and moved exactly
    ``lines`` (per book, zero lines ignored)."""
    row = tx.one("SELECT id, kind FROM journal WHERE idem_key = ?", (idem_key,))
    if row is None or row[1] != kind:
        return False
    stored: dict[str, int] = {}
    for book, amount in tx.all("SELECT book, amount FROM journal_lines WHERE entry_id = ?",
                               (row[0],)):
        stored[book] = stored.get(book, 0) + int(amount)
    wanted: dict[str, int] = {}
    for book, amount in lines:
        wanted[book] = wanted.get(book, 0) + amount
    return ({b: a for b, a in stored.items() if a} == {b: a for b, a in wanted.items() if a})


def _post_once(tx: Tx, idem_key: str, kind: str, lines: Sequence[tuple[str, int]], *,
               memo: str = "", floors: dict[str, int] | None = None) -> None:
    """Post an entry, or accept a retry of the very same one; 409 if ``idem_key`` was
    used for a different movement."""
    if not post(tx, idem_key, kind, lines, memo=memo, floors=floors) and not same_entry(
            tx, idem_key, kind, lines):
        raise APIError(409, "this idempotency key was used already for another account or "
                       "amount; use a new key for a new movement", param="idem_key",
                       code="idempotency_conflict")


def changes_counter(tx: Tx) -> int:
    """The current value of the ``changes`` counter."""
    return int(tx.value("SELECT counter FROM changes WHERE id = 1", default=0))


# ------------------------------------------------------------ validation

def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, code="invalid_request", param=param)


def _not_found(message: str) -> APIError:
    return APIError(404, message, code="not_found")


def _forbidden(message: str) -> APIError:
    return APIError(403, message, code="forbidden")


def check_amount(amount: object, param: str = "amount") -> int:
    """An amount of micro-units: an int (not a bool, not a float), ``0 < amount <=
    MAX_AMOUNT``; else a 400."""
    if type(amount) is not int:
        raise _bad(f"{param} must be an integer number of micro-units", param)
    if not 0 < amount <= MAX_AMOUNT:
        raise _bad(f"{param} must be between 1 and {MAX_AMOUNT} micro-units", param)
    return amount


def check_account_name(name: object) -> str:
    if not isinstance(name, str) or ACCOUNT_NAME.fullmatch(name) is None:
        raise _bad("an account name is 1 to 64 characters of letters, digits and . _ @ -",
                   "name")
    return name


def check_group_name(name: object) -> str:
    if not isinstance(name, str) or GROUP_NAME.fullmatch(name) is None:
        raise _bad("a group name is 1 to 64 characters of letters, digits and . _ -", "name")
    return name


def _check_text(value: object, param: str, *, required: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (required and not value):
        need = "a non-empty" if required else "a"
        raise _bad(f"{param} must be {need} string of at most {MAX_TEXT} characters", param)
    if any(ord(ch) < 32 for ch in value):
        raise _bad(f"{param} may not contain control characters", param)
    return value


def _check_expiry(expires_at: object, now: float) -> float | None:
    if expires_at is None:
        return None
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or not (
            now < expires_at < 2**53):
        raise _bad("expires_at must be a Unix time in the future", "expires_at")
    return float(expires_at)


def check_limits(limits: object, *, budgets: bool) -> Limits:
    """Per-key (``budgets=True``) or per-account limits: each None or an int in
    ``0 … MAX_AMOUNT`` (a Limits built in Python is not type-checked by msgspec)."""
    if not isinstance(limits, Limits):
        raise _bad("limits must be a Limits record", "limits")
    for field in Limits.__struct_fields__:
        value = getattr(limits, field)
        if value is None:
            continue
        if not budgets and field.startswith("budget_"):
            raise _bad(f"{field} is a per-key limit, not an account's", field)
        if type(value) is not int or not 0 <= value <= MAX_AMOUNT:
            raise _bad(f"{field} must be an integer between 0 and {MAX_AMOUNT}", field)
    return limits


def _check_models(models: object) -> tuple[str, ...]:
    if isinstance(models, str) or not isinstance(models, Iterable):
        raise _bad("models must be a list of model names", "models")
    out = tuple(models)
    if len(out) > MAX_MODELS:
        raise _bad(f"a key may list at most {MAX_MODELS} models", "models")
    for model in out:
        _check_text(model, "models", required=True)
    return tuple(dict.fromkeys(out))


# ------------------------------------------------------------ rows → records

def _account(row: Row) -> AccountInfo:
    return AccountInfo(
        id=row[0], name=row[1], role=row[2], status=row[3], created_at=float(row[4]),
        limits=Limits(rpm=_int(row[5]), tpm=_int(row[6]), concurrency=_int(row[7])),
        balance=int(row[8] or 0), earnings=int(row[9] or 0))


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _key(row: Row) -> KeyInfo:
    return KeyInfo(
        id=row[0], account_id=row[1], name=row[2], prefix=row[3], group=row[4],
        models=tuple(json.loads(row[5])) if row[5] else (),
        limits=Limits(rpm=_int(row[6]), tpm=_int(row[7]), concurrency=_int(row[8]),
                      budget_day=_int(row[9]), budget_month=_int(row[10])),
        created_at=float(row[11]), expires_at=_float(row[12]), revoked_at=_float(row[13]))


def _group(row: Row) -> GroupInfo:
    return GroupInfo(id=row[0], name=row[1], owner_id=row[2], public_nodes=bool(row[3]),
                     created_at=float(row[4]), members=int(row[5]))


def _invite(row: Row) -> InviteInfo:
    return InviteInfo(id=row[0], group_id=row[1], prefix=row[2], max_uses=int(row[3]),
                      uses=int(row[4]), expires_at=_float(row[5]), created_by=row[6],
                      created_at=float(row[7]), revoked_at=_float(row[8]))


def _token(row: Row) -> JoinTokenInfo:
    return JoinTokenInfo(id=row[0], account_id=row[1], group=row[2], name=row[3],
                         prefix=row[4], created_at=float(row[5]), revoked_at=_float(row[6]))


def _code(row: Row) -> CreditCodeInfo:
    return CreditCodeInfo(id=row[0], prefix=row[1], amount=int(row[2]), created_by=row[3],
                          created_at=float(row[4]), expires_at=_float(row[5]),
                          redeemed_by=row[6], redeemed_at=_float(row[7]))


# ------------------------------------------------------------ reads inside a transaction

def _find_account(tx: Tx, id_or_name: str) -> AccountInfo | None:
    row = tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM {_ACCOUNT_FROM} WHERE a.id = ?",
                 (id_or_name,))
    if row is None:
        row = tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM {_ACCOUNT_FROM} WHERE a.name = ?",
                     (id_or_name,))
    return _account(row) if row is not None else None


def _get_account(tx: Tx, account_id: str) -> AccountInfo:
    row = tx.one(f"SELECT {_ACCOUNT_COLUMNS} FROM {_ACCOUNT_FROM} WHERE a.id = ?",
                 (account_id,))
    if row is None:
        raise _not_found(f"no account {account_id}")
    return _account(row)


def _active_account(tx: Tx, account_id: str) -> AccountInfo:
    account = _get_account(tx, account_id)
    if account.status != "active":
        raise _forbidden(f"account {account_id} is suspended")
    return account


def _find_group(tx: Tx, id_or_name: str) -> GroupInfo | None:
    row = tx.one(f"SELECT {_GROUP_COLUMNS} FROM node_groups g WHERE g.id = ?", (id_or_name,))
    if row is None:
        row = tx.one(f"SELECT {_GROUP_COLUMNS} FROM node_groups g WHERE g.name = ?",
                     (id_or_name,))
    return _group(row) if row is not None else None


def _get_group(tx: Tx, id_or_name: str) -> GroupInfo:
    group = _find_group(tx, id_or_name)
    if group is None:
        raise _not_found(f"no group {id_or_name}")
    return group


def _is_member(tx: Tx, group_id: str, account_id: str) -> bool:
    return tx.one("SELECT 1 FROM memberships WHERE group_id = ? AND account_id = ?",
                  (group_id, account_id)) is not None


def _may_manage(group: GroupInfo, account: AccountInfo) -> bool:
    """The group's owner and admin accounts manage a group (invites, tokens, members)."""
    return account.id == group.owner_id or account.role == "admin"


def _get_token(tx: Tx, token_id: str) -> JoinTokenInfo:
    row = tx.one(f"SELECT {_TOKEN_COLUMNS} FROM {_TOKEN_FROM} WHERE t.id = ?", (token_id,))
    if row is None:
        raise _not_found(f"no join token {token_id}")
    return _token(row)


def _get_key(tx: Tx, key_id: str) -> KeyInfo:
    row = tx.one(f"SELECT {_KEY_COLUMNS} FROM {_KEY_FROM} WHERE k.id = ?", (key_id,))
    if row is None:
        raise _not_found(f"no key {key_id}")
    return _key(row)


class AccountService:
    """Accounts, keys, groups, invites, join tokens, credit codes, top-ups and payouts on
    one :class:`Database` (see the module docstring)."""

    def __init__(self, db: Database, *, reserved_groups: Iterable[str] = ()) -> None:
        """``reserved_groups``: group names no database group may take (the gateway's
        configured ``[gateway.groups.*]``)."""
        self.db = db
        self.reserved_groups = frozenset(reserved_groups)
        self.on_credit: Callable[[str], None] | None = None
        """Called with the account id after credit reached it (a top-up, a redeemed
        code), so this gateway's billing forgets that the account was short."""

    # -------------------------------------------------------- accounts

    async def ensure_admin(self) -> AccountInfo:
        """The admin account (id and name ``admin``, role admin), created if missing;
        calling it again changes nothing."""

        def run(tx: Tx) -> AccountInfo:
            if tx.run("INSERT INTO accounts (id, name, role, status, created_at) "
                      "VALUES (?, ?, 'admin', 'active', ?) ON CONFLICT DO NOTHING",
                      (ADMIN_ACCOUNT, ADMIN_ACCOUNT, clock.wall())):
                bump_changes(tx)
            account = _find_account(tx, ADMIN_ACCOUNT)
            if account is None or account.id != ADMIN_ACCOUNT:
                raise APIError(409, "the name 'admin' belongs to another account; rename "
                               "it to let the admin account be created", code="conflict")
            return account

        return await self.db.write(run)

    async def create_account(self, name: str, role: str = "user") -> AccountInfo:
        """A new active account with a unique ``name``; 409 if the name is taken."""
        check_account_name(name)
        if role not in ROLES:
            raise _bad(f"role must be one of {', '.join(ROLES)}", "role")

        def run(tx: Tx) -> AccountInfo:
            account_id = credentials.new_id("acct")
            if tx.run("INSERT INTO accounts (id, name, role, status, created_at) "
                      "VALUES (?, ?, ?, 'active', ?) ON CONFLICT DO NOTHING",
                      (account_id, name, role, clock.wall())) == 0:
                raise APIError(409, f"an account named {name} exists already",
                               code="conflict")
            return _get_account(tx, account_id)

        return await self.db.write(run)

    async def get_account(self, account_id: str) -> AccountInfo:
        """The account ``account_id`` (404 if none)."""
        return await self.db.read(lambda tx: _get_account(tx, account_id))

    async def held(self, account_id: str) -> int:
        """Micro-units of the account's credit that gateways hold in open leases
        (:mod:`tooti.accounts.leases`): still the account's, spendable by its requests, and
        back in its balance when the lease ends. ``balance + held`` is what it can spend."""
        return (await self.held_by_account(account_id)).get(account_id, 0)

    async def held_by_account(self, account_id: str | None = None) -> dict[str, int]:
        """:meth:`held` of every account holding any (or of ``account_id`` only), in one
        query."""
        where = "" if account_id is None else " AND l.account_id = ?"
        rows = await self.db.read(lambda tx: tx.all(
            "SELECT l.account_id, COALESCE(SUM(b.balance), 0) FROM leases l JOIN books b "
            "ON b.book = 'lease:' || l.id WHERE l.closed_at IS NULL" + where +
            " GROUP BY l.account_id", () if account_id is None else (account_id,)))
        return {str(row[0]): int(row[1]) for row in rows if int(row[1])}

    async def find_account(self, id_or_name: str) -> AccountInfo | None:
        """The account with this id, else with this name, else None."""
        return await self.db.read(lambda tx: _find_account(tx, id_or_name))

    async def list_accounts(self) -> list[AccountInfo]:
        """Every account, oldest first."""
        return await self.db.read(lambda tx: [_account(row) for row in tx.all(
            f"SELECT {_ACCOUNT_COLUMNS} FROM {_ACCOUNT_FROM} ORDER BY a.created_at, a.id")])

    async def set_status(self, account_id: str, status: str) -> AccountInfo:
        """Suspend or activate an account (its keys stop or start working on every
        gateway within the directory's poll). The admin account cannot be suspended."""
        if status not in STATUSES:
            raise _bad(f"status must be one of {', '.join(STATUSES)}", "status")
        if account_id == ADMIN_ACCOUNT and status != "active":
            raise APIError(409, "the admin account cannot be suspended", code="conflict")

        def run(tx: Tx) -> AccountInfo:
            if tx.run("UPDATE accounts SET status = ? WHERE id = ?", (status, account_id)) == 0:
                raise _not_found(f"no account {account_id}")
            bump_changes(tx)
            return _get_account(tx, account_id)

        return await self.db.write(run)

    async def set_limits(self, account_id: str, limits: Limits) -> AccountInfo:
        """Replace an account's limits (rpm, tpm, concurrency; None = unlimited)."""
        check_limits(limits, budgets=False)

        def run(tx: Tx) -> AccountInfo:
            _get_account(tx, account_id)
            tx.run("INSERT INTO account_limits (account_id, rpm, tpm, concurrency) "
                   "VALUES (?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET "
                   "rpm = excluded.rpm, tpm = excluded.tpm, concurrency = excluded.concurrency",
                   (account_id, limits.rpm, limits.tpm, limits.concurrency))
            bump_changes(tx)
            return _get_account(tx, account_id)

        return await self.db.write(run)

    # -------------------------------------------------------- API keys

    async def create_key(self, account_id: str, name: str = "", *, group: str = "",
                         models: Sequence[str] = (), limits: Limits = NO_LIMITS,
                         expires_at: float | None = None,
                         max_active: int | None = None) -> tuple[str, KeyInfo]:
        """A new API key for an active account: ``(secret, info)``; the secret is shown
        this once and stored only as its digest. ``group`` (name or id) must be a group
        the account owns or belongs to (403 else, whether or not it exists). With
        ``max_active``, 409 ``too_many_keys`` if the account has that many active keys."""
        _check_text(name, "name")
        model_list = _check_models(models)
        check_limits(limits, budgets=True)

        def run(tx: Tx) -> tuple[str, KeyInfo]:
            now = clock.wall()
            expiry = _check_expiry(expires_at, now)
            _active_account(tx, account_id)
            if max_active is not None and int(tx.value(
                    "SELECT COUNT(*) FROM api_keys WHERE account_id = ? AND revoked_at IS "
                    "NULL AND (expires_at IS NULL OR expires_at > ?)", (account_id, now),
                    default=0)) >= max_active:
                raise APIError(409, f"account {account_id} has {max_active} active keys "
                               "already; revoke one first", code="too_many_keys")
            group_id = ""
            if group:
                found = _find_group(tx, group)
                if found is None or not _is_member(tx, found.id, account_id):
                    raise _forbidden(f"account {account_id} is not a member of a group "
                                     f"{group}")
                group_id = found.id
            secret = credentials.generate(credentials.API_KEY)
            key_id = credentials.new_id("key")
            tx.run("INSERT INTO api_keys (id, account_id, name, prefix, hash, group_id, "
                   "models, rpm, tpm, concurrency, budget_day, budget_month, created_at, "
                   "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (key_id, account_id, name, credentials.visible_prefix(secret),
                    credentials.digest(secret), group_id,
                    json.dumps(list(model_list)) if model_list else "", limits.rpm,
                    limits.tpm, limits.concurrency, limits.budget_day, limits.budget_month,
                    now, expiry))
            bump_changes(tx)
            return secret, _get_key(tx, key_id)

        return await self.db.write(run)

    async def list_keys(self, account_id: str | None = None) -> list[KeyInfo]:
        """Every key (revoked ones too), or one account's, oldest first."""

        def run(tx: Tx) -> list[KeyInfo]:
            if account_id is None:
                rows = tx.all(f"SELECT {_KEY_COLUMNS} FROM {_KEY_FROM} "
                              "ORDER BY k.created_at, k.id")
            else:
                rows = tx.all(f"SELECT {_KEY_COLUMNS} FROM {_KEY_FROM} WHERE k.account_id = ? "
                              "ORDER BY k.created_at, k.id", (account_id,))
            return [_key(row) for row in rows]

        return await self.db.read(run)

    async def revoke_key(self, key_id: str, *, account_id: str | None = None) -> KeyInfo:
        """Revoke a key (again: no change). With ``account_id``, only that account's key
        (another's is a 404, as an unknown one)."""

        def run(tx: Tx) -> KeyInfo:
            key = tx.one("SELECT account_id FROM api_keys WHERE id = ?", (key_id,))
            if key is None or (account_id is not None and key[0] != account_id):
                raise _not_found(f"no key {key_id}")
            if tx.run("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                      (clock.wall(), key_id)):
                bump_changes(tx)
            return _get_key(tx, key_id)

        return await self.db.write(run)

    async def find_key_by_secret(self, secret: str) -> tuple[KeyInfo, AccountInfo] | None:
        """The key a secret is (looked up by digest) and its account; None for an unknown,
        revoked or expired key. The account may be suspended: callers check
        ``AccountInfo.status``."""
        if not isinstance(secret, str) or not secret:
            return None
        hashed = credentials.digest(secret)

        def run(tx: Tx) -> tuple[KeyInfo, AccountInfo] | None:
            row = tx.one(f"SELECT {_KEY_COLUMNS} FROM {_KEY_FROM} WHERE k.hash = ?", (hashed,))
            if row is None:
                return None
            key = _key(row)
            if key.revoked_at is not None or (
                    key.expires_at is not None and key.expires_at <= clock.wall()):
                return None
            return key, _get_account(tx, key.account_id)

        return await self.db.read(run)

    async def account_usage(self, account_id: str, since: float) -> dict[str, int]:
        """What an account used since ``since`` (Unix time): ``requests``,
        ``prompt_tokens``, ``completion_tokens`` and ``charged`` (micro-units), from the
        ``usage`` table."""

        def run(tx: Tx) -> dict[str, int]:
            row = tx.one("SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
                         "SUM(charged) FROM usage WHERE account_id = ? AND ts >= ?",
                         (account_id, since))
            values = [int(v or 0) for v in (row or (0, 0, 0, 0))]
            return dict(zip(("requests", "prompt_tokens", "completion_tokens", "charged"),
                            values, strict=True))

        return await self.db.read(run)

    # -------------------------------------------------------- groups

    async def create_group(self, owner_id: str, name: str, *,
                           public_nodes: bool = True) -> GroupInfo:
        """A private group owned by an active operator or admin account (403 else), who
        becomes its first member; 409 if the name is taken (also by a configured group:
        ``reserved_groups``)."""
        check_group_name(name)
        if name in self.reserved_groups:
            raise APIError(409, f"a group named {name} exists already (in the gateway's "
                           "configuration)", param="name", code="conflict")
        if type(public_nodes) is not bool:
            raise _bad("public_nodes must be true or false", "public_nodes")

        def run(tx: Tx) -> GroupInfo:
            owner = _active_account(tx, owner_id)
            if owner.role not in ("operator", "admin"):
                raise _forbidden("only operator and admin accounts create groups")
            group_id = credentials.new_id("grp")
            now = clock.wall()
            if tx.run("INSERT INTO node_groups (id, name, owner_id, public_nodes, created_at) "
                      "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                      (group_id, name, owner_id, int(public_nodes), now)) == 0:
                raise APIError(409, f"a group named {name} exists already", code="conflict")
            tx.run("INSERT INTO memberships (group_id, account_id, joined_at) VALUES (?, ?, ?)",
                   (group_id, owner_id, now))
            bump_changes(tx)
            return _get_group(tx, group_id)

        return await self.db.write(run)

    async def list_groups(self, account_id: str | None = None) -> list[GroupInfo]:
        """Every group, or those ``account_id`` owns or belongs to."""

        def run(tx: Tx) -> list[GroupInfo]:
            if account_id is None:
                rows = tx.all(f"SELECT {_GROUP_COLUMNS} FROM node_groups g "
                              "ORDER BY g.created_at, g.id")
            else:
                rows = tx.all(f"SELECT {_GROUP_COLUMNS} FROM node_groups g WHERE "
                              "g.owner_id = ? OR g.id IN (SELECT group_id FROM memberships "
                              "WHERE account_id = ?) ORDER BY g.created_at, g.id",
                              (account_id, account_id))
            return [_group(row) for row in rows]

        return await self.db.read(run)

    async def get_group(self, id_or_name: str) -> GroupInfo:
        """The group with this id or name (404 if none)."""
        return await self.db.read(lambda tx: _get_group(tx, id_or_name))

    async def members(self, group: str) -> list[AccountInfo]:
        """The group's members (its owner included), by when they joined."""

        def run(tx: Tx) -> list[AccountInfo]:
            found = _get_group(tx, group)
            return [_account(row) for row in tx.all(
                f"SELECT {_ACCOUNT_COLUMNS} FROM {_ACCOUNT_FROM} JOIN memberships m ON "
                "m.account_id = a.id WHERE m.group_id = ? ORDER BY m.joined_at, a.id",
                (found.id,))]

        return await self.db.read(run)

    async def remove_member(self, group: str, account_id: str) -> None:
        """Remove an account from a group (404 if it is not a member; 409 for the owner).
        Its keys bound to the group stop reaching the group's nodes once the gateways'
        directories refresh."""

        def run(tx: Tx) -> None:
            found = _get_group(tx, group)
            if account_id == found.owner_id:
                raise APIError(409, "a group's owner cannot leave it", code="conflict")
            if tx.run("DELETE FROM memberships WHERE group_id = ? AND account_id = ?",
                      (found.id, account_id)) == 0:
                raise _not_found(f"account {account_id} is not a member of {found.name}")
            bump_changes(tx)

        await self.db.write(run)

    # -------------------------------------------------------- invites

    async def create_invite(self, group: str, by_account: str, *, max_uses: int = 1,
                            expires_at: float | None = None) -> tuple[str, InviteInfo]:
        """A new invite code to ``group``, by its owner or an admin (403 else):
        ``(secret, info)``, the secret shown this once."""
        if type(max_uses) is not int or not 1 <= max_uses <= MAX_USES:
            raise _bad(f"max_uses must be an integer between 1 and {MAX_USES}", "max_uses")

        def run(tx: Tx) -> tuple[str, InviteInfo]:
            now = clock.wall()
            expiry = _check_expiry(expires_at, now)
            found = _get_group(tx, group)
            if not _may_manage(found, _active_account(tx, by_account)):
                raise _forbidden(f"only the owner of {found.name} or an admin invites to it")
            secret = credentials.generate(credentials.INVITE)
            invite_id = credentials.new_id("inv")
            tx.run("INSERT INTO invites (id, group_id, prefix, hash, max_uses, uses, "
                   "expires_at, created_by, created_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                   (invite_id, found.id, credentials.visible_prefix(secret),
                    credentials.digest(secret), max_uses, expiry, by_account, now))
            row = tx.one(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE id = ?", (invite_id,))
            assert row is not None
            return secret, _invite(row)

        return await self.db.write(run)

    async def list_invites(self, group: str) -> list[InviteInfo]:
        """A group's invites (used up, expired and revoked ones too), oldest first."""

        def run(tx: Tx) -> list[InviteInfo]:
            found = _get_group(tx, group)
            return [_invite(row) for row in tx.all(
                f"SELECT {_INVITE_COLUMNS} FROM invites WHERE group_id = ? "
                "ORDER BY created_at, id", (found.id,))]

        return await self.db.read(run)

    async def revoke_invite(self, invite_id: str) -> InviteInfo:
        """Revoke an invite (again: no change); 404 if unknown."""

        def run(tx: Tx) -> InviteInfo:
            tx.run("UPDATE invites SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                   (clock.wall(), invite_id))
            row = tx.one(f"SELECT {_INVITE_COLUMNS} FROM invites WHERE id = ?", (invite_id,))
            if row is None:
                raise _not_found(f"no invite {invite_id}")
            return _invite(row)

        return await self.db.write(run)

    async def redeem_invite(self, secret: str, account_id: str) -> GroupInfo:
        """Join the group an invite code is for. Atomic: of any number of concurrent
        redemptions (on any gateways) exactly ``max_uses`` succeed. 404 unknown code; 410
        ``used_up`` / ``expired`` / ``revoked``; an account already in the group (or
        that redeemed this code before) gets the group again and uses no use."""
        if not isinstance(secret, str) or not secret:
            raise _not_found("no such invite code")
        hashed = credentials.digest(secret)

        def run(tx: Tx) -> GroupInfo:
            row = tx.one("SELECT id, group_id, expires_at, revoked_at FROM invites "
                         "WHERE hash = ?", (hashed,))
            if row is None:
                raise _not_found("no such invite code")
            invite_id, group_id, expires_at, revoked_at = row
            _active_account(tx, account_id)
            if _is_member(tx, group_id, account_id):
                return _get_group(tx, group_id)
            now = clock.wall()
            if revoked_at is not None:
                raise APIError(410, "this invite code was revoked", code="revoked")
            if expires_at is not None and expires_at <= now:
                raise APIError(410, "this invite code has expired", code="expired")
            if tx.run("INSERT INTO invite_redemptions (invite_id, account_id, redeemed_at) "
                      "VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                      (invite_id, account_id, now)) == 0:
                # Redeemed by this account before (and since removed from the group, or
                # a concurrent redemption by it committed first): no second use.
                if _is_member(tx, group_id, account_id):
                    return _get_group(tx, group_id)
                raise APIError(409, "this account redeemed this invite code already and "
                               "was removed from the group since", code="conflict")
            if tx.run("UPDATE invites SET uses = uses + 1 WHERE id = ? AND uses < max_uses "
                      "AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)",
                      (invite_id, now)) == 0:
                raise APIError(410, "this invite code is used up", code="used_up")
            tx.run("INSERT INTO memberships (group_id, account_id, joined_at) "
                   "VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (group_id, account_id, now))
            bump_changes(tx)
            return _get_group(tx, group_id)

        return await self.db.write(run)

    # -------------------------------------------------------- join tokens

    async def create_join_token(self, account_id: str, *, group: str = "",
                                name: str = "") -> tuple[str, JoinTokenInfo]:
        """A new node join token owned by an active operator or admin account (403 else):
        for its public nodes, or with ``group`` for a group it owns (or any group, for an
        admin). ``(secret, info)``, the secret shown this once; several may be valid."""
        _check_text(name, "name")

        def run(tx: Tx) -> tuple[str, JoinTokenInfo]:
            account = _active_account(tx, account_id)
            if account.role not in ("operator", "admin"):
                raise _forbidden("join tokens are minted for operator and admin accounts")
            group_id = ""
            if group:
                found = _get_group(tx, group)
                if not _may_manage(found, account):
                    raise _forbidden(f"only the owner of {found.name} or an admin mints its "
                                     "join tokens")
                group_id = found.id
            secret = credentials.generate(credentials.JOIN_TOKEN)
            token_id = credentials.new_id("jt")
            tx.run("INSERT INTO join_tokens (id, account_id, group_id, name, prefix, hash, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (token_id, account_id, group_id, name, credentials.visible_prefix(secret),
                    credentials.digest(secret), clock.wall()))
            bump_changes(tx)
            return secret, _get_token(tx, token_id)

        return await self.db.write(run)

    async def list_join_tokens(self, account_id: str | None = None) -> list[JoinTokenInfo]:
        """Every join token (revoked ones too), or one account's, oldest first."""

        def run(tx: Tx) -> list[JoinTokenInfo]:
            if account_id is None:
                rows = tx.all(f"SELECT {_TOKEN_COLUMNS} FROM {_TOKEN_FROM} "
                              "ORDER BY t.created_at, t.id")
            else:
                rows = tx.all(f"SELECT {_TOKEN_COLUMNS} FROM {_TOKEN_FROM} "
                              "WHERE t.account_id = ? ORDER BY t.created_at, t.id",
                              (account_id,))
            return [_token(row) for row in rows]

        return await self.db.read(run)

    async def revoke_join_token(self, token_id: str, *,
                                account_id: str | None = None) -> JoinTokenInfo:
        """Revoke a join token (again: no change): nodes can no longer join with it. With
        ``account_id``, only that account's token (another's is a 404)."""

        def run(tx: Tx) -> JoinTokenInfo:
            token = _get_token(tx, token_id)
            if account_id is not None and token.account_id != account_id:
                raise _not_found(f"no join token {token_id}")
            if tx.run("UPDATE join_tokens SET revoked_at = ? WHERE id = ? "
                      "AND revoked_at IS NULL", (clock.wall(), token_id)):
                bump_changes(tx)
            return _get_token(tx, token_id)

        return await self.db.write(run)

    # -------------------------------------------------------- credit

    async def top_up(self, account_id: str, amount: int, *, idem_key: str,
                     memo: str = "") -> int:
        """Credit an account ``amount`` micro-units (journal entry ``topup:<idem_key>``,
        ``issued`` → ``account:<id>``); the balance after. A repeated ``idem_key`` moves
        nothing (409 ``idempotency_conflict`` if it was used for another account or
        amount)."""
        check_amount(amount)
        _check_text(idem_key, "idem_key", required=True)
        _check_text(memo, "memo")

        def run(tx: Tx) -> int:
            _get_account(tx, account_id)
            book = account_book(account_id)
            _post_once(tx, f"topup:{idem_key}", "topup", [(ISSUED, -amount), (book, amount)],
                       memo=memo)
            return balance(tx, book)

        after = await self.db.write(run)
        self._credited(account_id)
        return after

    def _credited(self, account_id: str) -> None:
        if self.on_credit is not None:
            try:
                self.on_credit(account_id)
            except Exception:
                log.exception("telling billing that %s got credit failed", account_id)

    async def create_credit_code(self, amount: int, by_account: str, *,
                                 expires_at: float | None = None
                                 ) -> tuple[str, CreditCodeInfo]:
        """A single-use code worth ``amount`` micro-units, made by an admin account (403
        else): ``(secret, info)``, the secret shown this once."""
        check_amount(amount)

        def run(tx: Tx) -> tuple[str, CreditCodeInfo]:
            now = clock.wall()
            expiry = _check_expiry(expires_at, now)
            if _active_account(tx, by_account).role != "admin":
                raise _forbidden("only admin accounts make credit codes")
            secret = credentials.generate(credentials.CREDIT_CODE)
            code_id = credentials.new_id("cc")
            tx.run("INSERT INTO credit_codes (id, prefix, hash, amount, created_by, "
                   "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (code_id, credentials.visible_prefix(secret), credentials.digest(secret),
                    amount, by_account, now, expiry))
            row = tx.one(f"SELECT {_CODE_COLUMNS} FROM credit_codes WHERE id = ?", (code_id,))
            assert row is not None
            return secret, _code(row)

        return await self.db.write(run)

    async def redeem_credit_code(self, secret: str, account_id: str) -> int:
        """Credit an account a code's amount (journal entry ``code:<id>``, ``issued`` →
        ``account:<id>``); the balance after. Single use and atomic: of concurrent
        redemptions exactly one credits. 404 unknown; 410 ``used_up`` / ``expired``."""
        if not isinstance(secret, str) or not secret:
            raise _not_found("no such credit code")
        hashed = credentials.digest(secret)

        def run(tx: Tx) -> int:
            row = tx.one("SELECT id, amount, expires_at FROM credit_codes WHERE hash = ?",
                         (hashed,))
            if row is None:
                raise _not_found("no such credit code")
            code_id, amount, expires_at = row[0], int(row[1]), row[2]
            _active_account(tx, account_id)
            now = clock.wall()
            if expires_at is not None and expires_at <= now:
                raise APIError(410, "this credit code has expired", code="expired")
            if tx.run("UPDATE credit_codes SET redeemed_by = ?, redeemed_at = ? WHERE id = ? "
                      "AND redeemed_by IS NULL AND (expires_at IS NULL OR expires_at > ?)",
                      (account_id, now, code_id, now)) == 0:
                raise APIError(410, "this credit code was redeemed already", code="used_up")
            book = account_book(account_id)
            post(tx, f"code:{code_id}", "code", [(ISSUED, -amount), (book, amount)])
            return balance(tx, book)

        after = await self.db.write(run)
        self._credited(account_id)
        return after

    async def list_credit_codes(self) -> list[CreditCodeInfo]:
        """Every credit code (redeemed ones too), oldest first."""
        return await self.db.read(lambda tx: [_code(row) for row in tx.all(
            f"SELECT {_CODE_COLUMNS} FROM credit_codes ORDER BY created_at, id")])

    async def payout(self, account_id: str, amount: int, *, idem_key: str) -> int:
        """Pay an operator ``amount`` of its earnings (journal entry
        ``payout:<idem_key>``, ``earnings:<id>`` → ``payouts``, never below zero: 409
        ``insufficient_funds``); the earnings left. A repeated ``idem_key`` moves
        nothing (409 ``idempotency_conflict`` if it was used for another account or
        amount)."""
        check_amount(amount)
        _check_text(idem_key, "idem_key", required=True)

        def run(tx: Tx) -> int:
            _get_account(tx, account_id)
            book = earnings_book(account_id)
            try:
                _post_once(tx, f"payout:{idem_key}", "payout",
                           [(book, -amount), (PAYOUTS, amount)], floors={book: 0})
            except InsufficientFunds as exc:
                raise APIError(409, f"account {account_id} has earned {exc.balance} "
                               f"micro-units unpaid, less than {amount}",
                               code="insufficient_funds") from None
            return balance(tx, book)

        return await self.db.write(run)
