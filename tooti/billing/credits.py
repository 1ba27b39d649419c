"""``credits``: the built-in billing plugin — prepaid credit reserved per request from a
per-gateway lease, settled into the node owner's earnings, one usage row per request.

``usage-ledger`` (the name of the usage ledger this plugin folds in) maps to the same
plugin: a request without an account (an open gateway's anonymous caller) is charged
nothing and only gets its usage row, so a gateway without accounts records usage
exactly as before. Neither is the ``admin`` account (the admin key, and the static
``[gateway.groups.*]`` keys of a config): the house's own requests are recorded, never
charged, and earn the serving node nothing (no money is created for them).

For a request of an account (``ctx.account_id``):

* :meth:`Credits.authorize` reserves ``ctx.max_cost`` micro-units from this gateway's
  lease on the account (:mod:`tooti.accounts.leases`: memory only, unless the lease is
  short); a balance that cannot cover it answers 402 ``insufficient_quota`` before any
  node is used.
* :meth:`Credits.settle` charges ``min(usage.cost, reserved)`` (integer micro-units),
  splits it into the node owner's share and the gateway's fee (``fee_bps``), and
  writes, in ONE transaction, the usage row (``INSERT … ON CONFLICT (request_id) DO
  NOTHING``) and its journal entry ``settle:<request_id>``: ``lease:<id>`` →
  ``earnings:<owner>`` + ``fees``. Both or neither; settling twice changes nothing. The
  unused part of the reservation goes back to the lease once the entry is committed.
  A lease found closed (its gateway was cut off from the database past its ttl and
  another reconciled it) is replaced by the account's own book: see the bound in
  :mod:`tooti.accounts.leases`.
* :meth:`Credits.refund` frees the reservation and records a ``failed`` row, cost 0.

The node's owner is the one the gateway knew when the node served
(:attr:`Usage.owner`, from the peer's admission: the account whose join token admitted
it, ``admin`` for the legacy token), so a node earns for its owner from its first
request. Only a usage without one (a caller other than the gateway's proxy) is looked
up in ``node_owners`` at write time — never cached — and earns for ``admin`` without a
row.

**Durability and group commit** (as the usage ledger always did): settle queues its
row and entry and returns once they are committed. :meth:`Credits.run` writes
everything queued while a transaction is being written (in a worker thread) in the
next one (up to ``BATCH`` requests), so concurrent requests share a commit. A settle
alone in flight (no other request authorized within :data:`OPEN_HINT_AGE` and not yet
settled: concurrency 1) that finds nothing being written and the last batch written
whole first tries to commit its record at once on the event loop's thread
(:meth:`~tooti.accounts.database.Database.try_write_now`: SQLite only, and only when
that can neither wait for a lock nor ``fsync``): that saves the request the
worker-thread hop and two task switches, the largest cost of its settle (about
170 → 70 µs of CPU). The attempt never waits, so the pipeline's ``SETTLE_TIMEOUT``
bounds a settle as before; when it declines (PostgreSQL always, a network round trip;
SQLite when another process holds the file's write lock or a checkpoint is due) or
fails, :meth:`Credits.run` writes the record in a worker thread, the settle waiting for
it (cancellable). After a failed batch only :meth:`Credits.run` retries, backing off.
The gateway settles a completed answer before its last bytes leave, so a client never
sees a complete answer whose charge a ``kill -9`` could lose.

**Nothing is lost to a failing database** and no error ends ``run``. Queuing never
blocks and never fails (a settle cut off by the pipeline's timeout is still written,
and its reservation released, once the database takes it). A batch the database
refuses stays in memory and is tried again with :class:`~tooti.backoff.Backoff`
(:data:`RETRY_BASE` doubling to :data:`RETRY_CAP` s) while the database is
unreachable; each reservation is held until its request is written, so the lease
cannot be returned with an unbilled request's credit. Memory is bounded: while
:data:`QUEUE` records wait, :meth:`Credits.authorize` refuses new requests (503
``billing_unavailable``, ``retry-after``) instead of serving what it cannot bill — so
at most ``QUEUE`` plus the requests in flight wait. If the database answers but refuses
one request on its own :data:`POISON_ATTEMPTS` times (a value it cannot store), that
request goes to ``usage_quarantine`` with the error; so does everything still waiting
when the plugin closes (if the database cannot take even that, to
``usage-quarantine.jsonl`` in the data dir). ``tooti ledger check`` reports every
quarantined row as a violation, and :func:`replay_quarantine` (``tooti ledger
replay``, ``POST /admin/v1/ledger/replay``) writes them again idempotently: the usage
row ``ON CONFLICT DO NOTHING`` and the entry ``settle:<request id>``, so a replay
never charges twice. A quarantined request's reserved credit stays in its lease and
returns to the account with it; the replay charges it from the lease if still open,
else from the account's book directly (the bound of :mod:`tooti.accounts.leases`).

Options (``[billing.options]``, shared by every billing plugin): ``fee_bps`` (the
gateway's fee in basis points of what nodes earn, default 0), ``lease_credits``
(credit taken per lease, a decimal string of credits or an integer, never a float,
default ``"1"``), ``lease_idle``
(seconds without a request after which a lease goes back, default 30), ``lease_ttl``
(seconds a lease lives without renewal, default 120; renewed every third of it).

Database: :attr:`BillingSetup.database` (shared with the gateway, which closes it),
else ``<data_dir>/tooti.sqlite3`` opened (and closed) by the plugin. Gateway id:
:attr:`BillingSetup.gateway_id`; without one, a random id (its leases are then
reconciled by expiry only, never by a restart).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import msgspec
import trio

from tooti import clock
from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import (
    FEES,
    AlreadyPosted,
    Entry,
    InsufficientFunds,
    NewEntries,
    account_book,
    earnings_book,
    lease_book,
    post_new,
)
from tooti.accounts.leases import LOCK_OPEN_LEASE, LeaseBook, Reservation, lock_open_lease
from tooti.accounts.money import format_credits, parse_credits, split_fee
from tooti.accounts.records import ADMIN_ACCOUNT
from tooti.backoff import Backoff
from tooti.billing.base import Billing, BillingSetup, RequestContext, Usage
from tooti.errors import APIError

log = logging.getLogger("tooti.billing")

QUARANTINE_FILE = "usage-quarantine.jsonl"
"""In the data dir: rows that neither the usage table nor the quarantine table took."""
QUEUE = 10_000
"""Most requests whose records wait in memory for the database; beyond it
:meth:`Credits.authorize` refuses (503) rather than serve what it could not bill."""
BATCH = 512
FLUSH_TIMEOUT = 10.0
"""Longest wait in :meth:`Credits.flush` (shutdown must not hang on the database)."""
RETRY_BASE = 0.1
RETRY_CAP = 5.0
"""Backoff (seconds) between attempts at a batch the database refused."""
POISON_ATTEMPTS = 5
"""Times a request the database refuses on its own, while it answers, is tried before
it is quarantined (a value no database takes)."""
OPEN_HINT_AGE = 10.0
"""Seconds after its authorization a request no longer keeps a settle from writing its
own record (see :meth:`Credits.settle`): one that old is unlikely to finish within that
write, and one whose settle never came (the pipeline's deadline passed before this
plugin's turn) must not keep the fast path off for good."""

COLUMNS = ("request_id", "ts", "account_id", "key_id", "model", "node_id", "owner_id",
           "endpoint", "stream", "prompt_tokens", "completion_tokens", "estimated",
           "price_input", "price_output", "cost", "charged", "earned", "fee", "lease_id",
           "status", "latency_ms", "ttft_ms")
OPTIONAL_COLUMNS = frozenset({"ttft_ms"})
"""Columns added after rows were first quarantined: a record without one replays as
NULL (see :func:`_item_of`)."""
INSERT = (f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES "
          f"({', '.join('?' * len(COLUMNS))}) ON CONFLICT (request_id) DO NOTHING")
OWNER = COLUMNS.index("owner_id")
QUARANTINE_INSERT = ("INSERT INTO usage_quarantine (request_id, ts, error, row_json) "
                     "VALUES (?, ?, ?, ?)")


class CreditsOptions(msgspec.Struct, frozen=True):
    """The plugin's part of ``[billing.options]``."""

    fee_bps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    lease_credits: str | int | float = "1"
    lease_idle: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    lease_ttl: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    synchronous_commit: bool = False
    """PostgreSQL only: wait for the server's WAL flush at each settle commit. Off (the
    default) a settle is committed and visible at once and survives the gateway being
    killed, but a crash of the PostgreSQL server itself may lose the last fraction of a
    second of settles (their credit then returns to the account with the lease): the
    same class of durability as SQLite's ``synchronous=NORMAL``, which a power loss can
    take back. On costs one disk flush per batch (milliseconds on most disks), which a
    request at concurrency 1 waits for."""


def parse_options(options: Mapping[str, Any]) -> tuple[CreditsOptions, int]:
    """The plugin's options and the lease size in micro-units; ValueError naming the
    option if one is wrong."""
    mine = {name: options[name] for name in CreditsOptions.__struct_fields__
            if name in options}
    try:
        parsed = msgspec.convert(mine, CreditsOptions)
    except msgspec.ValidationError as exc:
        raise ValueError(f"billing.options: {exc}") from None
    raw = parsed.lease_credits
    if isinstance(raw, bool):
        raise ValueError("billing.options.lease_credits must be an amount of credits")
    if isinstance(raw, float):
        raise ValueError(f"billing.options.lease_credits must be a decimal string or an "
                         f"integer of credits, not a float: write \"{raw}\" (money is "
                         "never a float)")
    try:
        size = parse_credits(str(raw))
    except ValueError as exc:
        raise ValueError(f"billing.options.lease_credits: {exc}") from None
    if size <= 0:
        raise ValueError("billing.options.lease_credits must be more than 0")
    return parsed, size


@dataclass
class _Item:
    """One request's usage row and charge, queued for the writer."""

    row: list[Any]
    request_id: str
    account_id: str
    node_id: str
    owner: str
    """The account the serving node earns for (``""``: read ``node_owners``)."""
    charged: int
    earned: int
    fee: int
    reservation: Reservation | None
    committed: trio.Event = field(default_factory=trio.Event)
    """Set once the row and its entry are written (or quarantined)."""
    attempts: int = 0
    """Times the database refused this request alone while it was reachable."""


class Credits:
    """The ``credits`` billing plugin (see the module docstring)."""

    def __init__(self, setup: BillingSetup, *,
                 wall: Callable[[], float] = clock.wall) -> None:
        self.options, size = parse_options(setup.options)
        self.data_dir = setup.data_dir
        self._own_db = setup.database is None
        self.db = setup.database or Database("", data_dir=setup.data_dir)
        self.gateway_id = setup.gateway_id or "gw_" + secrets.token_hex(6)
        self.wall = wall
        self.leases = LeaseBook(self.db, self.gateway_id, size=size,
                                idle=self.options.lease_idle, ttl=self.options.lease_ttl,
                                wall=wall)
        try:
            self.leases.recover_sync()
        except Exception:
            if self._own_db:
                self.db.close()
            raise
        self._import_quarantine_file()
        self._reserved: dict[str, Reservation] = {}
        self._pending: deque[_Item] = deque()
        """Requests not written yet, oldest first (those being retried at the front)."""
        self._wake = trio.Event()
        self._write_lock = trio.Lock()
        self._queued = 0
        self._written = 0
        self._wrote: trio.Event | None = None
        """Set (and dropped) at the next write's end; made only when :meth:`flush` waits."""
        self._healthy = True
        """The last batch was written whole: a settle may write its own batch (see
        :meth:`settle`); else the retries are :meth:`run`'s, backing off."""
        self._open: dict[str, float] = {}
        """Requests authorized and not settled or refunded yet, with when (oldest first;
        a hint only: a settle alone in flight writes its own record on the event loop's
        thread; entries older than :data:`OPEN_HINT_AGE` are dropped as it looks)."""

    # ------------------------------------------------------------ Billing

    async def run(self) -> None:
        """Write queued requests in batches and keep the leases, until cancelled; a batch
        the database refuses is kept and tried again, backing off."""
        backoff = Backoff(RETRY_BASE, RETRY_CAP)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.leases.run)
            while True:
                while not self._pending:
                    self._wake = trio.Event()
                    await self._wake.wait()
                if await self._write_round():
                    backoff.reset()
                else:
                    await trio.sleep(backoff.next())

    def credit_changed(self, account_id: str | None = None) -> None:
        """Credit reached ``account_id`` (None: any account) through this gateway, e.g.
        a top-up: its next request asks the database again instead of being refused
        from memory (see :meth:`tooti.accounts.leases.LeaseBook.credit_changed`)."""
        self.leases.credit_changed(account_id)

    def _import_quarantine_file(self) -> None:
        """Move the records a previous run left in :data:`QUARANTINE_FILE` (its database
        took nothing) into ``usage_quarantine``, where the ledger check reports them and
        the replay finds them; a failure is logged (the file stays for the next start)."""
        path = self.data_dir / QUARANTINE_FILE
        if not path.exists():
            return
        try:
            records = _file_records(path.read_text(encoding="utf-8"), path)
            if records:
                self.db.write_sync(lambda tx: tx.many(QUARANTINE_INSERT, records))
            path.rename(path.with_name(f"{path.name}.imported-{int(clock.wall())}"))
        except Exception as exc:
            log.error("credits: could not import %s (%s: %s); it stays for the next start",
                      path, type(exc).__name__, exc)
            return
        log.warning("credits: %d quarantined requests of %s moved to usage_quarantine; "
                    "tooti ledger replay bills them", len(records), path)

    @property
    def backlog(self) -> int:
        """Requests whose records wait in memory (queued or being retried)."""
        return len(self._pending)

    async def authorize(self, ctx: RequestContext) -> None:
        """Reserve the request's maximum cost (nothing for an anonymous request, nor for the
        ``admin`` account: the house, whose requests are recorded but never charged and
        earn nobody anything); 402 ``insufficient_quota`` if the account's balance cannot
        cover it; 503 while :data:`QUEUE` records wait for the database."""
        if len(self._pending) >= QUEUE:
            raise APIError(
                503, "the gateway cannot record requests right now (its billing database "
                "is not taking writes); retry shortly", code="billing_unavailable",
                headers={"retry-after": "5"})
        if not ctx.account_id or ctx.account_id == ADMIN_ACCOUNT:
            self._open[ctx.request_id] = clock.now()
            return
        try:
            reservation = await self.leases.reserve(ctx.account_id, max(ctx.max_cost, 0))
        except InsufficientFunds:
            raise APIError(
                402, f"insufficient credit: this request may cost up to "
                f"{format_credits(ctx.max_cost)} credits, more than the account's balance; "
                "top up or redeem a credit code", code="insufficient_quota",
                type="insufficient_quota") from None
        self._reserved[ctx.request_id] = reservation
        self._open[ctx.request_id] = clock.now()

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        """Charge what was delivered (capped at the reservation) and record the usage
        row; returns once both are committed (idempotent by request id). The record is
        queued before this first waits, so a settle cut off by its caller's timeout is
        still written (and its reservation released) by :meth:`run`."""
        reservation = self._reserved.get(ctx.request_id)
        cost = usage.cost
        charged = min(cost, reservation.amount) if reservation is not None else 0
        earned, fee = split_fee(charged, self.options.fee_bps)
        item = _Item(
            [ctx.request_id, self.wall(), ctx.account_id, ctx.key_id, usage.model,
             usage.node_id, usage.owner, ctx.endpoint, int(ctx.stream), usage.prompt_tokens,
             usage.completion_tokens, int(usage.estimated), usage.price_input,
             usage.price_output, cost, charged, earned, fee,
             reservation.lease_id if reservation is not None else "", usage.status,
             usage.latency_ms, usage.ttft_ms],
            ctx.request_id, ctx.account_id, usage.node_id, usage.owner, charged, earned,
            fee, reservation)
        self._queued += 1
        self._pending.append(item)
        self._reserved.pop(ctx.request_id, None)  # the queued item holds it now
        self._open.pop(ctx.request_id, None)
        if self._healthy and not self._write_lock.locked() and self._alone():
            # Alone in flight, nothing being written: commit here, at once, if SQLite
            # can without waiting, sparing the request the worker thread hop and two
            # task switches (waking run(), then being woken by it). With others in
            # flight run() writes, in a worker thread, where the records of requests
            # finishing meanwhile gather into its next batch.
            self._write_now()
        if not item.committed.is_set():  # run() writes it
            self._wake.set()
            await item.committed.wait()

    def _alone(self) -> bool:
        """No other request in flight (authorized within :data:`OPEN_HINT_AGE` and not
        settled or refunded): those older are dropped from :attr:`_open`, oldest first."""
        open_ = self._open
        while open_:
            oldest = next(iter(open_))
            if open_[oldest] > clock.now() - OPEN_HINT_AGE:
                return False
            del open_[oldest]
        return True

    def _write_now(self) -> None:
        """Write the queued records in one transaction on this thread if the database
        takes them at once (:meth:`~tooti.accounts.database.Database.try_write_now`);
        else, or if it fails, they go back to the queue for :meth:`run` (after a failure
        no settle writes its own batch until :meth:`run` has written one whole). Never
        waits: called only while nothing else is writing, it needs no lock."""
        batch: list[_Item] = []
        while self._pending and len(batch) < BATCH:
            batch.append(self._pending.popleft())
        try:
            done, closed = self.db.try_write_now(functools.partial(self._commit, items=batch))
        except Exception as exc:  # run() writes it, one by one if need be, and logs
            log.debug("credits: a settle's own batch failed (%s: %s); left to the writer",
                      type(exc).__name__, exc)
            done, closed = False, None
            self._healthy = False
        if not done:
            self._pending.extendleft(reversed(batch))
            return
        self._done(batch, closed or [])

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        """Free the reservation and queue a ``failed`` row (zero tokens, cost 0)."""
        reservation = self._reserved.pop(ctx.request_id, None)
        self._open.pop(ctx.request_id, None)
        if reservation is not None:
            self.leases.release(reservation, 0)
        self._queue(_Item(
            [ctx.request_id, self.wall(), ctx.account_id, ctx.key_id, ctx.model, "", "",
             ctx.endpoint, int(ctx.stream), 0, 0, 0, 0, 0, 0, 0, 0, 0, "", "failed", 0.0, None],
            ctx.request_id, ctx.account_id, "", "", 0, 0, 0, None))

    async def close(self) -> None:
        """Flush the queue (quarantining what the database still refuses), return every
        lease and close a database opened here."""
        with trio.CancelScope(shield=True):
            await self.flush(closing=True)
            try:
                await self.leases.close()
            except Exception:
                log.exception("credits: returning the leases failed (they expire)")
        if self._own_db:
            self.db.close()

    # ------------------------------------------------------------ writing

    def _queue(self, item: _Item) -> None:
        """Never blocks, never fails: the memory it takes is bounded by :data:`QUEUE`
        (``authorize`` refuses beyond it) plus the requests in flight."""
        self._queued += 1
        self._pending.append(item)
        self._wake.set()

    async def flush(self, *, closing: bool = False) -> None:
        """Return once every request queued before the call is written (at most
        :data:`FLUSH_TIMEOUT` s); ``closing``: then quarantine whatever is still waiting."""
        target = self._queued
        backoff = Backoff(RETRY_BASE, RETRY_CAP)
        with trio.move_on_after(FLUSH_TIMEOUT):
            while self._written < target:
                if self._pending:
                    if await self._write_round():
                        backoff.reset()
                    else:
                        await trio.sleep(backoff.next())
                else:  # the last ones are being written by run() or a settle
                    if self._wrote is None:
                        self._wrote = trio.Event()
                    await self._wrote.wait()
        if self._written >= target:
            return
        log.error("credits: %d requests not written after %.0fs", target - self._written,
                  FLUSH_TIMEOUT)
        if closing and self._pending:
            with trio.CancelScope(shield=True):
                async with self._write_lock:
                    left = list(self._pending)
                    self._pending.clear()
                    await self._quarantine(left, RuntimeError(
                        "the database refused it until the gateway closed"))
                    self._done(left, [])

    async def _write_round(self) -> bool:
        """Write the next batch; False if part of it is kept to be tried again."""
        async with self._write_lock:
            batch: list[_Item] = []
            while self._pending and len(batch) < BATCH:
                batch.append(self._pending.popleft())
            if not batch:
                return True
            # A batch taken off the queue is always dealt with, even during shutdown.
            with trio.CancelScope(shield=True):
                kept = await self._write(batch)
            self._pending.extendleft(reversed(kept))
            self._healthy = not kept
            return not kept

    def _commit(self, tx: Tx, items: list[_Item], look: bool = False) -> list[str]:
        """:func:`commit`, without waiting for PostgreSQL's WAL flush unless
        ``synchronous_commit`` (see :class:`CreditsOptions`)."""
        if tx.dialect == "postgresql":
            tx.run("SET LOCAL synchronous_commit TO "
                   + ("ON" if self.options.synchronous_commit else "OFF"))
        return commit(tx, items, look=look)

    async def _write(self, items: list[_Item]) -> list[_Item]:
        """Write ``items``; those to be tried again. A batch that fails is kept whole
        while the database is unreachable, else written request by request: one the
        database refuses :data:`POISON_ATTEMPTS` times while it takes others is
        quarantined."""
        write = self.db.write
        try:
            closed = await write(functools.partial(self._commit, items=items))
        except (AlreadyPosted, _Retry):
            pass  # a request settled before, a lease closed: one by one, looking
        except Exception as exc:
            log.error("credits: a batch of %d requests failed (%s: %s)", len(items),
                      type(exc).__name__, exc)
            if not await self._reachable():
                return items
        else:
            self._done(items, closed)
            return []
        kept: list[_Item] = []
        for item in items:
            try:
                closed = await write(functools.partial(
                    self._commit, items=[item], look=True))
            except Exception as error:
                item.attempts += 1
                if item.attempts < POISON_ATTEMPTS:
                    kept.append(item)
                    continue
                await self._quarantine([item], error)
                closed = []
            self._done([item], closed)
        return kept

    async def _reachable(self) -> bool:
        try:
            await self.db.read(lambda tx: tx.value("SELECT 1"))
        except Exception:
            return False
        return True

    def _done(self, items: list[_Item], closed: list[str]) -> None:
        """``items`` are written (or quarantined): release their reservations, wake
        their settles."""
        for lease_id in closed:
            self.leases.forget(lease_id)
        self._written += len(items)
        for item in items:
            if item.reservation is not None:
                self.leases.release(item.reservation, item.charged)
            item.committed.set()
        if self._wrote is not None:
            self._wrote.set()
            self._wrote = None

    async def _quarantine(self, items: list[_Item], error: Exception) -> None:
        """Keep requests the database refused, with why: in ``usage_quarantine`` (which
        :func:`replay_quarantine` writes again), else in :data:`QUARANTINE_FILE`, else
        (nothing takes them) in the log. Their reserved credit stays in the lease (it
        returns to the account with it); the replay charges it."""
        reason = f"{type(error).__name__}: {error}"
        records = [(item.request_id, json.dumps(_record(item), default=repr))
                   for item in items]
        for item in items:
            log.error("credits: request %s quarantined (%s)", item.request_id, reason)
        now = clock.wall()
        try:
            await self.db.write(lambda tx: tx.many(
                QUARANTINE_INSERT, [(rid, now, reason, rec) for rid, rec in records]))
            return
        except Exception as exc:
            log.error("credits: the quarantine table refused %d requests (%s)",
                      len(records), exc)
        try:
            with (self.data_dir / QUARANTINE_FILE).open("a") as file:
                for _, record in records:
                    file.write(json.dumps({"error": reason, "row": record}) + "\n")
        except OSError as exc:
            for request_id, record in records:
                log.error("credits: %s lost to the disk (%s); its record: %s", request_id,
                          exc, record)


def _record(item: _Item) -> dict[str, Any]:
    return {**dict(zip(COLUMNS, item.row, strict=False)), "owner_id": item.owner,
            "charged": item.charged}


def node_owner(tx: Tx, node_id: str) -> str:
    """The account a node earns for: its ``node_owners`` row, else ``admin`` (never
    cached: a binding written a moment ago counts)."""
    if not node_id:
        return ""
    return str(tx.value("SELECT account_id FROM node_owners WHERE node_id = ?",
                        (node_id,), default=ADMIN_ACCOUNT))


class _Retry(Exception):
    """The optimistic batch met a closed lease: roll back and write its requests one by
    one (:func:`commit` with ``look``), which charges such a request to its account."""


def commit(tx: Tx, items: list[_Item], *, look: bool = False) -> list[str]:
    """Every item's usage row and settle entry in ``tx``; the leases found closed.

    A constant number of statements per batch, however many requests it holds, locking
    in a fixed order (lease rows by id, then books by name) so batches of concurrent
    gateways, and reconciles (:func:`~tooti.accounts.leases.close_leases`), never
    deadlock. The writer's batch (``look`` False) is optimistic: it assumes every lease
    of the batch open and every request new, sends the lease locks, usage rows, entries,
    books and lines at once (on PostgreSQL in one pipeline, one round trip) and checks
    the rows each changed after; a closed lease, a request written before or a lease
    short of its charge rolls the batch back, and the writer then writes its requests
    one by one with ``look``: leases locked first (a closed one's requests charged to
    their account), requests already written skipped."""
    charging = [item for item in items if item.charged > 0]
    leases = sorted({item.reservation.lease_id for item in charging
                     if item.reservation is not None and item.reservation.lease_id})
    if not look:
        rows, entries, floors = _settlements(tx, _unique(items), lambda lease_id: True)
        plan = NewEntries(entries, floors)
        counts = tx.pipelined([
            *[(LOCK_OPEN_LEASE, (lease_id,), False) for lease_id in leases],
            (INSERT, rows, True), *plan.statements()])
        if any(count != 1 for count in counts[:len(leases)]):
            raise _Retry("a lease of this batch was closed")
        if counts[len(leases)] != len(rows):
            raise AlreadyPosted("a usage row of this batch was written before")
        plan.check(counts[len(leases) + 1:])
        return []
    open_leases = {lease_id for lease_id in leases if lock_open_lease(tx, lease_id)}
    written = _written(tx, [item.request_id for item in items])
    rows, entries, floors = _settlements(  # settled (or refunded) before: nothing moves
        tx, _unique(items, written), open_leases.__contains__)
    if tx.many(INSERT, rows) != len(rows):  # written by a replay meanwhile
        raise AlreadyPosted("a usage row of this batch was written concurrently")
    post_new(tx, entries, floors=floors)
    return [lease_id for lease_id in leases if lease_id not in open_leases]


def _unique(items: list[_Item], skip: set[str] | None = None) -> list[_Item]:
    """``items`` without those in ``skip``, each request id once (the first)."""
    fresh: dict[str, _Item] = {}
    for item in items:
        if not skip or item.request_id not in skip:
            fresh.setdefault(item.request_id, item)
    return list(fresh.values())


def _settlements(tx: Tx, items: list[_Item], is_open: Callable[[str], bool],
                 ) -> tuple[list[list[Any]], list[Entry], dict[str, int]]:
    """The usage rows of ``items``, the settle entries of those charged, and the floors
    of the lease books they spend from: a request whose lease ``is_open`` spends from
    it, one whose lease was reconciled meanwhile is charged to its account directly."""
    looked_up = {node: node_owner(tx, node)
                 for node in {item.node_id for item in items if not item.owner}}
    rows: list[list[Any]] = []
    entries: list[Entry] = []
    floors: dict[str, int] = {}
    for item in items:
        owner = item.owner or looked_up[item.node_id]
        row = list(item.row)
        row[OWNER] = owner
        rows.append(row)
        if item.charged <= 0:
            continue
        lease_id = item.reservation.lease_id if item.reservation is not None else ""
        if lease_id and is_open(lease_id):
            source = lease_book(lease_id)
            floors[source] = 0
        else:
            source = account_book(item.account_id)
        lines = [(source, -item.charged), (earnings_book(owner or ADMIN_ACCOUNT), item.earned)]
        if item.fee:
            lines.append((FEES, item.fee))
        entries.append(Entry(f"settle:{item.request_id}", "settle", lines, item.request_id))
    return rows, entries, floors


def _written(tx: Tx, request_ids: list[str]) -> set[str]:
    """Which of ``request_ids`` have a usage row already."""
    found: set[str] = set()
    for start in range(0, len(request_ids), 500):
        chunk = request_ids[start:start + 500]
        found.update(row[0] for row in tx.all(
            "SELECT request_id FROM usage WHERE request_id IN ("
            + ", ".join("?" * len(chunk)) + ")", chunk))
    return found


# ------------------------------------------------------------ replaying the quarantine


class ReplayReport(msgspec.Struct, frozen=True):
    """What :func:`replay_quarantine` did."""

    replayed: list[str]
    """Requests whose row (and settle entry, if charged) were written now."""
    already: list[str]
    """Requests found written before (nothing moved; their quarantine rows dropped)."""
    failed: list[str]
    """``<request id>: <error>`` of rows the database still refuses (kept)."""
    imported: int = 0
    """Records moved from :data:`QUARANTINE_FILE` into the table first."""


def _item_of(record: Mapping[str, Any]) -> _Item:
    """The queued item a quarantined record was made from (ValueError if it is not one)."""
    row = [record.get(column) if column in OPTIONAL_COLUMNS else record[column]
           for column in COLUMNS]
    ints = ("charged", "earned", "fee")
    if any(type(record[name]) is not int for name in ints):
        raise ValueError("charged, earned and fee must be integers")
    charged, earned, fee = (int(record[name]) for name in ints)
    if charged < 0 or earned + fee != charged:
        raise ValueError(f"charged {charged} is not earned {earned} + fee {fee}")
    request_id, account_id = str(record["request_id"]), str(record["account_id"])
    lease_id = str(record["lease_id"] or "")
    reservation = Reservation(account_id, lease_id, charged) if lease_id else None
    return _Item(row, request_id, account_id, str(record["node_id"]),
                 str(record["owner_id"] or ""), charged, earned, fee, reservation)


async def replay_quarantine(db: Database, data_dir: Path | None = None) -> ReplayReport:
    """Write every quarantined request again, idempotently: its usage row (``ON
    CONFLICT (request_id) DO NOTHING``) and settle entry (``settle:<request id>``) in
    one transaction with the removal of its quarantine row, so a replay repeated or
    racing another charges nothing twice. A request whose lease has been returned
    since is charged to its account's book directly (the credit it reserved went back
    there with the lease; see the bound in :mod:`tooti.accounts.leases`). With
    ``data_dir``, records of :data:`QUARANTINE_FILE` are moved into the table first
    (the file is renamed ``….imported-<time>``)."""
    imported = 0
    if data_dir is not None and (data_dir / QUARANTINE_FILE).exists():
        imported = await _import_file(db, data_dir / QUARANTINE_FILE)
    rows = await db.read(lambda tx: tx.all(
        "SELECT DISTINCT request_id, row_json FROM usage_quarantine ORDER BY request_id"))
    replayed: list[str] = []
    already: list[str] = []
    failed: list[str] = []
    for request_id, row_json in rows:
        try:
            item = _item_of(json.loads(row_json))
        except (ValueError, KeyError, TypeError) as exc:
            failed.append(f"{request_id}: unreadable record ({exc})")
            continue

        def write(tx: Tx, item: _Item = item, raw: str = row_json) -> bool:
            written = tx.one("SELECT 1 FROM usage WHERE request_id = ?",
                             (item.request_id,)) is not None
            commit(tx, [item], look=True)
            tx.run("DELETE FROM usage_quarantine WHERE request_id = ? AND row_json = ?",
                   (item.request_id, raw))
            return written

        try:
            was_written = await db.write(write)
        except Exception as exc:
            failed.append(f"{request_id}: {type(exc).__name__}: {exc}")
            continue
        (already if was_written else replayed).append(str(request_id))
    if replayed or already:
        log.info("credits: replayed %d quarantined requests (%d were written before)",
                 len(replayed), len(already))
    return ReplayReport(replayed, already, failed, imported)


def _file_records(text: str, path: Path) -> list[tuple[str, float, str, str]]:
    """The ``usage_quarantine`` rows of :data:`QUARANTINE_FILE`'s lines."""
    records: list[tuple[str, float, str, str]] = []
    now = clock.wall()
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            record = str(entry["row"])
            request_id = str(json.loads(record)["request_id"])
        except (ValueError, KeyError, TypeError):
            log.error("credits: an unreadable line of %s is skipped: %.200s", path, line)
            continue
        records.append((request_id, now, str(entry.get("error", "")), record))
    return records


async def _import_file(db: Database, path: Path) -> int:
    records = _file_records(await trio.Path(path).read_text(encoding="utf-8"), path)
    if records:
        await db.write(lambda tx: tx.many(QUARANTINE_INSERT, records))
    await trio.Path(path).rename(path.with_name(f"{path.name}.imported-{int(clock.wall())}"))
    return len(records)


def plugins() -> Mapping[str, Callable[[BillingSetup], Billing]]:
    """The names this plugin is registered under."""
    return {"credits": Credits, "usage-ledger": Credits}
