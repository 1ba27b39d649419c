"""Who an API key speaks for, without a database round trip per request.

:class:`KeyDirectory` answers :meth:`~KeyDirectory.verify` (a presented secret → the
:class:`~tooti.accounts.records.Caller` its key speaks for, or None) from memory in
steady state:

* **Positive cache.** Verified keys, by the SHA-256 digest of the secret (the database
  stores the same digest; the secret itself is never kept). An LRU bounded at
  :data:`POSITIVE_LIMIT` entries. Revoked keys and suspended accounts stay cached as
  *inactive* callers, so a client that keeps presenting a revoked key costs nothing
  either.
* **Negative cache.** Digests the database did not know, bounded at
  :data:`NEGATIVE_LIMIT` entries, each for :data:`NEGATIVE_TTL` seconds. It is not
  cleared when keys change: a key's secret exists only once its row is committed (it is
  generated inside the creating transaction and shown after), so no digest read as
  unknown can belong to a key created since; and a flood of made-up keys cannot get its
  lookups repeated by provoking changes.
* **Shape and checksum first.** A secret that is not exactly an API key's shape with
  a right checksum (:func:`tooti.accounts.credentials.is_api_key`: ``sk-tooti-`` + 43
  + 6 base64url characters, the last 6 a CRC-32 of the rest) is refused before any
  lookup, so made-up, mistyped and truncated keys cost no round trip. Concurrent
  lookups of one digest share one query, and at most :data:`MAX_LOOKUPS` lookups run
  at once, so even forged keys with a right checksum cannot take the database's
  connections from everyone else.
* **Expiry** is checked on every verify against :func:`tooti.clock.wall`, so an
  expired key is refused the moment it expires, whatever the cache holds.
* **Invalidation.** :meth:`~KeyDirectory.run` polls ``SELECT counter FROM changes``
  every :data:`POLL_INTERVAL` seconds. Every change a gateway caches (a key revoked or
  created, an account suspended or its limits changed, a group membership) bumps that
  counter in the same transaction (:func:`tooti.accounts.service.bump_changes`); when it
  moved, every cached entry is read again in a few queries (:data:`REFRESH_CHUNK`
  digests each). Revocation is therefore visible on every gateway sharing the database
  within one poll interval plus one refresh (well under 2 s). As a safety net for rows
  changed without bumping the counter, the cache is refreshed every
  :data:`FULL_REFRESH` seconds anyway. A database that cannot be read keeps the cache
  as it is (logged, retried at the next poll).
* **No stale answer cached.** Each refresh bumps a generation number before it reads.
  A lookup records the generation before its own read and caches its answer only if no
  refresh began meanwhile; otherwise it reads again (a read that started before a
  revocation committed could otherwise be cached after the refresh that saw the
  revocation, and stay active until the next change or full refresh).

**Scale.** A change re-reads every cached key (:data:`REFRESH_CHUNK` digests per
query), whatever changed: refresh work is proportional to the cached keys times the
rate of changes. With the default bound of :data:`POSITIVE_LIMIT` cached keys that is
at most 200 queries of 500 digests per change, fine for thousands of keys and changes
that come from people (key creation, revocation, suspension), not for a deployment
creating keys many times a second while caching ~100,000 keys; that would need
per-row change sequence numbers (refresh only the rows changed since the last poll).

A key is active while it is not revoked, its account is active, and (for a key of a
group) the group exists and the account is its owner, a member, or an admin.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import msgspec
import trio

from tooti import clock
from tooti.accounts.credentials import API_KEY_LENGTH, digest, is_api_key
from tooti.accounts.database import Database, Row, Tx
from tooti.accounts.records import Caller, Limits

log = logging.getLogger("tooti.accounts")

POSITIVE_LIMIT = 100_000
"""Most keys (verified, active or not) kept in memory."""
NEGATIVE_LIMIT = 10_000
"""Most unknown digests remembered."""
NEGATIVE_TTL = 2.0
"""Seconds an unknown digest is remembered as unknown."""
MAX_LOOKUPS = 4
"""Database lookups of uncached keys running at once (the rest wait their turn)."""
POLL_INTERVAL = 0.5
"""Seconds between two reads of the change counter."""
FULL_REFRESH = 60.0
"""Seconds after which every cached entry is read again even without a change."""
REFRESH_CHUNK = 500
"""Digests per refresh query."""
MAX_SECRET_BYTES = API_KEY_LENGTH
"""Longer secrets are not keys (every generated key is exactly this long)."""
STALE_RETRIES = 3
"""Reads of one key again when refreshes keep overlapping them (then not cached)."""

_SELECT = """SELECT k.hash, k.id, k.account_id, a.name, a.role, a.status, k.group_id, g.name,
    g.public_nodes, g.owner_id, k.models, k.rpm, k.tpm, k.concurrency, k.budget_day,
    k.budget_month, k.expires_at, k.revoked_at, l.rpm, l.tpm, l.concurrency,
    (SELECT COUNT(*) FROM memberships m WHERE m.group_id = g.id
        AND m.account_id = k.account_id)
FROM api_keys k
JOIN accounts a ON a.id = k.account_id
LEFT JOIN node_groups g ON g.id = k.group_id
LEFT JOIN account_limits l ON l.account_id = k.account_id
"""


def caller_of(row: Row) -> Caller:
    """The :class:`Caller` of one row of :data:`_SELECT`."""
    (_hash, key_id, account_id, account_name, role, status, group_id, group_name,
     public_nodes, owner_id, models, rpm, tpm, concurrency, budget_day, budget_month,
     expires_at, revoked_at, a_rpm, a_tpm, a_concurrency, memberships) = row
    group = ""
    allowed = True
    if group_id:
        group = group_name or ""
        allowed = bool(group_name) and (
            role == "admin" or owner_id == account_id or int(memberships or 0) > 0)
    return Caller(
        key_id=key_id, account_id=account_id, account_name=account_name, role=role,
        group=group, public_fallback=not group or bool(public_nodes),
        models=_models(models),
        key_limits=Limits(rpm=rpm, tpm=tpm, concurrency=concurrency,
                          budget_day=budget_day, budget_month=budget_month),
        account_limits=Limits(rpm=a_rpm, tpm=a_tpm, concurrency=a_concurrency),
        expires_at=None if expires_at is None else float(expires_at),
        active=revoked_at is None and status == "active" and allowed,
        source="db",
    )


def _models(text: Any) -> tuple[str, ...]:
    if not text:
        return ()
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        log.warning("an API key's allowed models are not a JSON list; it may use none")
        return ("",)  # matches no model: fail closed
    return tuple(str(m) for m in value) if isinstance(value, list) else ("",)


def is_key_shaped(secret: bytes) -> bool:
    """Whether ``secret`` could be an API key this gateway generated: the exact shape
    and a right checksum (cheap, no lookup)."""
    return is_api_key(secret)


class KeyDirectory:
    """The API keys of one database, cached (see the module docstring)."""

    def __init__(self, db: Database, *, positive_limit: int = POSITIVE_LIMIT,
                 negative_limit: int = NEGATIVE_LIMIT, negative_ttl: float = NEGATIVE_TTL,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.db = db
        self.positive_limit = positive_limit
        self.negative_limit = negative_limit
        self.negative_ttl = negative_ttl
        self.poll_interval = poll_interval
        self._known: OrderedDict[str, Caller] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._pending: dict[str, trio.Event] = {}
        self._lookups = trio.Semaphore(MAX_LOOKUPS)
        self.counter: int | None = None
        """The change counter as last read (None before the first poll)."""
        self.lookups = 0
        """Database lookups of uncached keys made so far (for tests and metrics)."""
        self.polls = 0
        """Polls of the change counter completed so far."""
        self._polled = trio.Event()
        self._generation = 0
        """Bumped as each refresh begins (a lookup overlapping one is not cached)."""

    def __len__(self) -> int:
        return len(self._known)

    # ------------------------------------------------------------ verify

    async def verify(self, secret: bytes) -> Caller | None:
        """The active, unexpired caller ``secret`` is the key of; None for anything else
        (unknown, revoked, expired, suspended account, not a key at all)."""
        caller = await self.lookup(secret)
        if caller is None or not caller.active:
            return None
        if caller.expires_at is not None and caller.expires_at <= clock.wall():
            return None
        return caller

    async def lookup(self, secret: bytes) -> Caller | None:
        """The caller ``secret`` is the key of, active or not (None: unknown)."""
        if not is_key_shaped(secret):
            return None
        # The cache is a dict keyed by the SHA-256 of a 256-bit random secret: finding an
        # entry tells an attacker nothing a constant-time compare would hide.
        hashed = digest(secret)
        while True:
            caller = self._known.get(hashed)
            if caller is not None:
                self._known.move_to_end(hashed)
                return caller
            until = self._unknown.get(hashed)
            if until is not None:
                if until > clock.now():
                    return None
                del self._unknown[hashed]
            pending = self._pending.get(hashed)
            if pending is None:
                break
            await pending.wait()  # another request is looking it up: share its answer
        done = self._pending[hashed] = trio.Event()
        try:
            async with self._lookups:
                for _ in range(STALE_RETRIES):
                    generation = self._generation
                    self.lookups += 1
                    rows = await self.db.read(lambda tx: _select(tx, [hashed]))
                    if generation == self._generation:
                        break
                else:  # refreshes kept overlapping the read: answer, but cache nothing
                    return caller_of(rows[0]) if rows else None
            if rows:
                caller = caller_of(rows[0])
                self._remember(hashed, caller)
                return caller
            self._unknown[hashed] = clock.now() + self.negative_ttl
            while len(self._unknown) > self.negative_limit:
                self._unknown.popitem(last=False)
            return None
        finally:
            del self._pending[hashed]
            done.set()

    def _remember(self, digest: str, caller: Caller) -> None:
        self._known[digest] = caller
        self._known.move_to_end(digest)
        while len(self._known) > self.positive_limit:
            self._known.popitem(last=False)

    # ------------------------------------------------------------ invalidation

    async def wait_polled(self) -> None:
        """Wait until the next poll of the change counter has completed (and, if it
        moved, the cache was refreshed)."""
        await self._polled.wait()

    async def run(self) -> None:
        """Poll the change counter and refresh the cache when it moves, until cancelled."""
        last_full = clock.now()
        while True:
            try:
                counter = await self.db.read(
                    lambda tx: tx.value("SELECT counter FROM changes WHERE id = 1", default=0))
                full = clock.now() - last_full >= FULL_REFRESH
                if counter != self.counter or full:
                    # also at the first poll: keys verified before it may have changed
                    await self.refresh()
                    last_full = clock.now()
                    self.counter = counter
            except Exception as exc:  # the database is away: keep the cache, retry
                log.warning("reading API key changes failed (%s); retrying", exc)
            self.polls += 1
            self._polled.set()
            self._polled = trio.Event()
            await trio.sleep(self.poll_interval)

    async def refresh(self) -> None:
        """Read every cached key again (revoked, expired, suspended → inactive; deleted
        → forgotten). Lookups whose read overlaps this refresh do not cache their
        answer (they read again)."""
        self._generation += 1
        digests = list(self._known)
        rows: list[Row] = []
        for start in range(0, len(digests), REFRESH_CHUNK):
            chunk = digests[start:start + REFRESH_CHUNK]
            rows += await self.db.read(partial(_select, digests=chunk))
        fresh = {row[0]: caller_of(row) for row in rows}
        for hashed in digests:
            caller = fresh.get(hashed)
            if caller is None:
                self._known.pop(hashed, None)
            elif hashed in self._known:  # not evicted meanwhile
                self._known[hashed] = caller


def _select(tx: Tx, digests: Sequence[str]) -> list[Row]:
    marks = ", ".join("?" for _ in digests)
    return tx.all(_SELECT + f"WHERE k.hash IN ({marks})", list(digests))
