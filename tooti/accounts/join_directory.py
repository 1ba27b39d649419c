"""Join tokens minted per account, held in memory for tunnel admission, and the
owner each joined node is bound to.

:class:`JoinTokenDirectory` keeps every unrevoked row of ``join_tokens`` whose account
is active, by the SHA-256 digest of the token (the ``hash`` column), so admitting a
tunnel (which is synchronous) never waits on the database. :meth:`~JoinTokenDirectory.run`
polls ``changes.counter`` every :data:`POLL_INTERVAL` and reloads every token when it
moved (every mint or revocation bumps it in the same transaction), so a revoked token
admits no new tunnel on any gateway sharing the database within about a second (at
most ``POLL_INTERVAL`` plus one reload; the bound promised is 2 s). Live tunnels of a
revoked token are not left up: the directory tells its listeners which token ids
disappeared (:meth:`~JoinTokenDirectory.on_revoked`) and the gateway's tunnel
admission closes the sessions they admitted (a node cut off this way redials and is
refused). This is stricter than a SIGHUP reload of the static tokens, which keeps live
tunnels until they reconnect: a revoked account token is usually a leaked or retired
one, and the node's earnings must stop with it.

Owners. Every node that joins is bound to the account its admission speaks for
(:meth:`~JoinTokenDirectory.bind_owner`): the account a token was minted for, or
``admin`` for the legacy static join tokens and for loopback peers without a token.
A relayed node belongs to its relay's admission owner. Bindings are kept in a bounded
in-memory map (:meth:`~JoinTokenDirectory.owner_of`, which the billing plugin reads
per request) and queued for an upsert into ``node_owners`` written by a small writer
task of :meth:`~JoinTokenDirectory.run` (the queue is bounded: when full, a binding is
dropped with a log line and the node's next join binds it again).

Rebinding. A node id is bound to the Ed25519 key that proved it (``public_key``,
hex). The same id proven by the same key is the same machine, so a join with another
account's token moves the binding to that account (newest join wins: its operator
holds the machine's key and a token of the new account) and is logged at WARNING,
since it moves the node's future earnings. The same id proven by a *different* key
never takes over the row (a gateway that never saw the node could otherwise let any
operator claim a known node id and its earnings): the upsert is conditional on the
key, the row keeps its owner and a WARNING says so; this gateway still credits the
traffic that machine serves here to the account that admitted it (``owner_of`` is
what this gateway admitted, which the database row matches except in that case).

Lookups are by dict key, not compared in constant time: the key is the SHA-256 of a
32-byte random secret, so timing how a hash-table probe for one digest proceeds tells
an attacker nothing about any other token's digest, let alone its secret.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable

import msgspec
import trio

from tooti import clock
from tooti.accounts.database import Database, Tx
from tooti.accounts.records import ADMIN_ACCOUNT

log = logging.getLogger("tooti.accounts")

POLL_INTERVAL = 0.5
"""Seconds between two reads of ``changes.counter``."""
MAX_PENDING = 1024
"""Owner bindings queued for the database at most (more are dropped, with a log line)."""
MAX_OWNERS = 100_000
"""Node ids whose owner is remembered in memory (least recently bound forgotten first)."""
WRITE_BATCH = 256
"""Owner bindings written per transaction."""


class JoinGrant(msgspec.Struct, frozen=True):
    """What one unrevoked join token admits (never the token, never its hash)."""

    token_id: str
    account_id: str
    """The account the token was minted for: the owner of every node joining with it."""
    group: str
    """The node group name it admits into (``""`` = the account's public nodes)."""
    group_id: str
    """The group's id in ``node_groups`` (``""`` = public)."""
    name: str
    """The token's name, as listed (may be empty)."""


class OwnerBinding(msgspec.Struct, frozen=True):
    """A node id bound to the account it joined for."""

    account_id: str
    group_id: str
    token_id: str
    public_key: str
    """The hex Ed25519 key the node proved (``""`` when unknown)."""


_LOAD_SQL = (
    "SELECT t.id, t.account_id, t.group_id, g.name, t.name, t.hash FROM join_tokens t "
    "JOIN accounts a ON a.id = t.account_id "
    "LEFT JOIN node_groups g ON g.id = t.group_id "
    "WHERE t.revoked_at IS NULL AND a.status = 'active'")

_UPSERT_SQL = (
    "INSERT INTO node_owners (node_id, account_id, group_id, token_id, public_key, bound_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
    "account_id = excluded.account_id, group_id = excluded.group_id, "
    "token_id = excluded.token_id, public_key = excluded.public_key, "
    "bound_at = excluded.bound_at "
    "WHERE node_owners.public_key = excluded.public_key OR node_owners.public_key = ''")


class JoinTokenDirectory:
    """Unrevoked join tokens by digest, and the owners of joined nodes (see the module
    docstring)."""

    def __init__(self, db: Database, *, poll_interval: float = POLL_INTERVAL,
                 max_pending: int = MAX_PENDING, max_owners: int = MAX_OWNERS) -> None:
        self.db = db
        self.poll_interval = poll_interval
        self.max_pending = max_pending
        self.max_owners = max_owners
        self._grants: dict[bytes, JoinGrant] = {}
        self.counter = -1
        """The ``changes.counter`` the tokens held were loaded at (-1: never loaded)."""
        self._polled = trio.Event()
        self._pending: dict[str, OwnerBinding] = {}
        self._wake_writer = trio.Event()
        self._write_lock = trio.Lock()
        self._owners: OrderedDict[str, OwnerBinding] = OrderedDict()
        self._revoked_listeners: list[Callable[[frozenset[str]], None]] = []
        self._running = False
        self.dropped = 0
        """Owner bindings dropped because the queue was full."""

    # ------------------------------------------------------------ tokens

    def __len__(self) -> int:
        """How many tokens admit nodes now."""
        return len(self._grants)

    def lookup(self, digest: bytes | str) -> JoinGrant | None:
        """What the token whose SHA-256 is ``digest`` (32 raw bytes or 64 hex digits)
        admits, or None (unknown, revoked, or its account suspended)."""
        if isinstance(digest, str):
            try:
                digest = bytes.fromhex(digest)
            except ValueError:
                return None
        return self._grants.get(digest)

    def on_revoked(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call ``listener`` with the ids of tokens that stopped admitting (revoked,
        deleted, their account suspended or their group gone) after each reload."""
        self._revoked_listeners.append(listener)

    def load_sync(self) -> None:
        """Load every token now, in this thread (at start, before serving)."""
        self._apply(*self.db.read_sync(_load))

    async def load(self) -> None:
        """Load every token now, in a worker thread."""
        self._apply(*await self.db.read(_load))

    def _apply(self, counter: int, grants: dict[bytes, JoinGrant]) -> None:
        gone = ({g.token_id for g in self._grants.values()}
                - {g.token_id for g in grants.values()})
        first = self.counter < 0
        self._grants, self.counter = grants, counter
        if not first:
            log.debug("join tokens reloaded at change %d: %d valid", counter, len(grants))
        if gone:
            log.info("join tokens no longer valid: %s", ", ".join(sorted(gone)))
            for listener in self._revoked_listeners:
                try:
                    listener(frozenset(gone))
                except Exception:
                    log.exception("a join-token revocation listener failed")

    async def wait_current(self) -> None:
        """Wait until the tokens held reflect every change committed before this call
        (the next poll that sees the current counter has reloaded them)."""
        target = int(await self.db.read(
            lambda tx: tx.value("SELECT counter FROM changes WHERE id = 1", default=0)))
        while self.counter < target:
            await self._polled.wait()

    # ------------------------------------------------------------ owners

    def bind_owner(self, node_id: str, account_id: str, group_id: str = "",
                   token_id: str = "", *, public_key: bytes = b"") -> None:
        """Bind ``node_id`` (a proven node identity) to ``account_id``: remembered now
        for :meth:`owner_of`, written to ``node_owners`` by :meth:`run` (unless this
        very binding is already remembered). ``group_id`` is the id of the group its
        token admitted it into (``""`` for public nodes or a static config group)."""
        binding = OwnerBinding(account_id or ADMIN_ACCOUNT, group_id, token_id,
                               public_key.hex())
        owners = self._owners
        old = owners.get(node_id)
        if old == binding:
            owners.move_to_end(node_id)
            return
        owners[node_id] = binding
        owners.move_to_end(node_id)
        while len(owners) > self.max_owners:
            owners.popitem(last=False)
        if node_id not in self._pending and len(self._pending) >= self.max_pending:
            self.dropped += 1
            log.warning("node owner queue full (%d): the binding of %s to %s is dropped "
                        "until it joins again", self.max_pending, node_id, binding.account_id)
            return
        self._pending[node_id] = binding
        self._wake_writer.set()

    def owner_of(self, node_id: str) -> str:
        """The account ``node_id`` earns for on this gateway: the account whose token
        admitted it here, else ``admin`` (a node never bound here)."""
        binding = self._owners.get(node_id)
        return binding.account_id if binding is not None else ADMIN_ACCOUNT

    async def flush(self) -> None:
        """Write every queued owner binding now (returns once those a concurrent flush
        took are written too)."""
        async with self._write_lock:
            await self._flush()

    async def _flush(self) -> None:
        while self._pending:
            batch = dict(list(self._pending.items())[:WRITE_BATCH])
            for node_id in batch:
                del self._pending[node_id]
            try:
                outcomes = await self.db.write(functools.partial(_upsert, batch=batch))
            except Exception as exc:
                log.warning("could not record the owners of %d nodes (%s); they are "
                            "recorded when they join again", len(batch), exc)
                continue
            for node_id, (outcome, owner) in outcomes.items():
                if outcome == "kept":
                    log.warning("node %s proved a key other than the one bound to it for "
                                "account %s: that binding is kept (this gateway credits "
                                "what the node serves here to %s)", node_id, owner,
                                batch[node_id].account_id)
                else:
                    log.warning("node %s (same key) rejoined for account %s, was bound to "
                                "%s: its earnings go to %s from now on", node_id,
                                batch[node_id].account_id, owner, batch[node_id].account_id)

    # ------------------------------------------------------------ background

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Load the tokens (if not yet), then poll ``changes.counter`` and write owner
        bindings until cancelled; queued bindings are written at the end too. Started
        twice, the second call returns at once (the station and the runner may both
        start it)."""
        if self._running:
            task_status.started()
            return
        self._running = True
        try:
            if self.counter < 0:
                await self.load()
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_owners)
                await self._poll()
        finally:
            self._running = False
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()

    async def _poll(self) -> None:
        while True:
            await trio.sleep(self.poll_interval)
            try:
                counter = int(await self.db.read(
                    lambda tx: tx.value("SELECT counter FROM changes WHERE id = 1",
                                        default=0)))
                if counter != self.counter:
                    await self.load()
            except Exception as exc:
                log.warning("join tokens not refreshed (%s); retrying", exc)
            polled, self._polled = self._polled, trio.Event()
            polled.set()

    async def _write_owners(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer = trio.Event()
            await self.flush()


def _load(tx: Tx) -> tuple[int, dict[bytes, JoinGrant]]:
    """The change counter, then every token that admits (counter first: a change
    committed in between is reloaded again at the next poll, never missed)."""
    counter = int(tx.value("SELECT counter FROM changes WHERE id = 1", default=0))
    grants: dict[bytes, JoinGrant] = {}
    for token_id, account_id, group_id, group_name, name, digest in tx.all(_LOAD_SQL):
        if group_id and group_name is None:
            continue  # its group is gone: it admits into nothing (never into public)
        try:
            key = bytes.fromhex(digest)
        except ValueError:
            continue
        grants[key] = JoinGrant(token_id, account_id, group_name or "", group_id, name)
    return counter, grants


def _upsert(tx: Tx, batch: dict[str, OwnerBinding]) -> dict[str, tuple[str, str]]:
    """Write ``batch``; returns, by node id, the bindings worth a warning:
    ``("kept", owner)`` when the row was kept because another key is bound to it,
    ``("moved", previous owner)`` when the same key rejoined for another account."""
    now = clock.wall()
    outcomes: dict[str, tuple[str, str]] = {}
    for node_id, b in batch.items():
        before = tx.one("SELECT account_id FROM node_owners WHERE node_id = ?", (node_id,))
        changed = tx.run(_UPSERT_SQL, (node_id, b.account_id, b.group_id, b.token_id,
                                       b.public_key, now))
        if before is None:
            continue
        if changed == 0:
            outcomes[node_id] = ("kept", str(before[0]))
        elif before[0] != b.account_id:
            outcomes[node_id] = ("moved", str(before[0]))
    return outcomes
