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

The node's owner is the ``node_owners`` row of the serving node (cached), ``admin``
when it has none.

**Durability and group commit** (as the usage ledger always did): settle queues its
row and entry and returns once they are committed; :meth:`Credits.run` writes
everything queued while a transaction is being written in the next one (up to
``BATCH`` requests), so concurrent requests share a commit. The gateway settles a
completed answer before its last bytes leave, so a client never sees a complete
answer whose charge a ``kill -9`` could lose. Nothing is ever lost to a bad value or a
failing database, and no error ends ``run``: a batch that fails is written again
request by request, and a request that still fails goes to ``usage_quarantine`` with
the error (or, if the database cannot take even that, to ``usage-quarantine.jsonl``
in the data dir); its reserved credit stays in the lease and returns to the account
when the lease is returned.

Options (``[billing.options]``, shared by every billing plugin): ``fee_bps`` (the
gateway's fee in basis points of what nodes earn, default 0), ``lease_credits``
(credit taken per lease, a decimal number of credits, default 1), ``lease_idle``
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import trio

from tooti import clock
from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import (
    FEES,
    InsufficientFunds,
    account_book,
    earnings_book,
    lease_book,
    post,
)
from tooti.accounts.leases import LeaseBook, Reservation, lock_open_lease
from tooti.accounts.money import format_credits, parse_credits, split_fee
from tooti.accounts.records import ADMIN_ACCOUNT
from tooti.billing.base import Billing, BillingSetup, RequestContext, Usage
from tooti.errors import APIError

log = logging.getLogger("tooti.billing")

QUARANTINE_FILE = "usage-quarantine.jsonl"
"""In the data dir: rows that neither the usage table nor the quarantine table took."""
QUEUE = 10_000
BATCH = 512
FLUSH_TIMEOUT = 10.0
"""Longest wait in :meth:`Credits.flush` (shutdown must not hang on the database)."""
OWNER_TTL = 60.0
"""Seconds a node's owner is cached."""

COLUMNS = ("request_id", "ts", "account_id", "key_id", "model", "node_id", "owner_id",
           "endpoint", "stream", "prompt_tokens", "completion_tokens", "estimated",
           "price_input", "price_output", "cost", "charged", "earned", "fee", "lease_id",
           "status", "latency_ms")
INSERT = (f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES "
          f"({', '.join('?' * len(COLUMNS))}) ON CONFLICT (request_id) DO NOTHING")
OWNER = COLUMNS.index("owner_id")


class CreditsOptions(msgspec.Struct, frozen=True):
    """The plugin's part of ``[billing.options]``."""

    fee_bps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    lease_credits: str | int | float = "1"
    lease_idle: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    lease_ttl: Annotated[float, msgspec.Meta(gt=0)] = 120.0


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
    charged: int
    earned: int
    fee: int
    reservation: Reservation | None
    committed: trio.Event | None


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
        self._reserved: dict[str, Reservation] = {}
        self._owners: dict[str, tuple[str, float]] = {}
        self._send, self._receive = trio.open_memory_channel[_Item](QUEUE)
        self._queued = 0
        self._written = 0
        self._wrote = trio.Event()

    # ------------------------------------------------------------ Billing

    async def run(self) -> None:
        """Write queued requests in batches and keep the leases, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.leases.run)
            while True:
                batch = [await self._receive.receive()]
                while len(batch) < BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                # A batch taken off the queue is always written, even during shutdown.
                with trio.CancelScope(shield=True):
                    await self._write(batch)

    async def authorize(self, ctx: RequestContext) -> None:
        """Reserve the request's maximum cost (nothing for an anonymous request, nor for the
        ``admin`` account: the house, whose requests are recorded but never charged and
        earn nobody anything); 402 ``insufficient_quota`` if the account's balance cannot
        cover it."""
        if not ctx.account_id or ctx.account_id == ADMIN_ACCOUNT:
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

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        """Charge what was delivered (capped at the reservation) and record the usage
        row; returns once both are committed (idempotent by request id)."""
        reservation = self._reserved.pop(ctx.request_id, None)
        cost = usage.cost
        charged = min(cost, reservation.amount) if reservation is not None else 0
        earned, fee = split_fee(charged, self.options.fee_bps)
        committed = trio.Event()
        await self._queue(_Item(
            [ctx.request_id, self.wall(), ctx.account_id, ctx.key_id, usage.model,
             usage.node_id, "", ctx.endpoint, int(ctx.stream), usage.prompt_tokens,
             usage.completion_tokens, int(usage.estimated), usage.price_input,
             usage.price_output, cost, charged, earned, fee,
             reservation.lease_id if reservation is not None else "", usage.status,
             usage.latency_ms],
            ctx.request_id, ctx.account_id, usage.node_id, charged, earned, fee,
            reservation, committed))
        await committed.wait()

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        """Free the reservation and queue a ``failed`` row (zero tokens, cost 0)."""
        reservation = self._reserved.pop(ctx.request_id, None)
        if reservation is not None:
            self.leases.release(reservation, 0)
        await self._queue(_Item(
            [ctx.request_id, self.wall(), ctx.account_id, ctx.key_id, ctx.model, "", "",
             ctx.endpoint, int(ctx.stream), 0, 0, 0, 0, 0, 0, 0, 0, 0, "", "failed", 0.0],
            ctx.request_id, ctx.account_id, "", 0, 0, 0, None, None))

    async def close(self) -> None:
        """Flush the queue, return every lease and close a database opened here."""
        with trio.CancelScope(shield=True):
            await self.flush()
            try:
                await self.leases.close()
            except Exception:
                log.exception("credits: returning the leases failed (they expire)")
        if self._own_db:
            self.db.close()

    # ------------------------------------------------------------ writing

    async def _queue(self, item: _Item) -> None:
        self._queued += 1
        await self._send.send(item)

    async def flush(self) -> None:
        """Return once every request queued before the call is written."""
        target = self._queued
        items: list[_Item] = []
        while True:
            try:
                items.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        if items:
            await self._write(items)
        with trio.move_on_after(FLUSH_TIMEOUT) as timer:
            while self._written < target:
                await self._wrote.wait()
        if timer.cancelled_caught:
            log.error("credits: %d requests not written after %.0fs",
                      target - self._written, FLUSH_TIMEOUT)

    async def _write(self, items: list[_Item]) -> None:
        closed: list[str] = []
        try:
            closed = await self.db.write(lambda tx: self._commit(tx, items))
        except Exception as exc:
            log.error("credits: a batch of %d requests failed (%s: %s); writing them one "
                      "by one", len(items), type(exc).__name__, exc)
            for item in items:
                one = [item]
                try:
                    closed += await self.db.write(functools.partial(self._commit, items=one))
                except Exception as error:
                    await self._quarantine(item, error)
        for lease_id in closed:
            self.leases.forget(lease_id)
        self._written += len(items)
        for item in items:
            if item.reservation is not None:
                self.leases.release(item.reservation, item.charged)
            if item.committed is not None:
                item.committed.set()
        self._wrote.set()
        self._wrote = trio.Event()

    def _commit(self, tx: Tx, items: list[_Item]) -> list[str]:
        """Every item's usage row and settle entry in ``tx``; the leases found closed.

        Locks in a fixed order (lease rows, then books by name) so batches of
        concurrent gateways never deadlock."""
        charging = [item for item in items if item.charged > 0]
        leases = sorted({item.reservation.lease_id for item in charging
                         if item.reservation is not None and item.reservation.lease_id})
        open_leases = {lease_id for lease_id in leases if lock_open_lease(tx, lease_id)}
        owners = {node: self._owner(tx, node) for node in {item.node_id for item in items}}
        sources: dict[str, str] = {}
        books: set[str] = set()
        for item in charging:
            lease_id = item.reservation.lease_id if item.reservation is not None else ""
            source = (lease_book(lease_id) if lease_id in open_leases
                      else account_book(item.account_id))
            sources[item.request_id] = source
            books |= {source, earnings_book(owners[item.node_id] or ADMIN_ACCOUNT)}
            if item.fee:
                books.add(FEES)
        for book in sorted(books):
            tx.run("UPDATE books SET balance = balance WHERE book = ?", (book,))
        for item in items:
            owner = owners[item.node_id]
            row = list(item.row)
            row[OWNER] = owner
            if tx.run(INSERT, row) == 0:
                continue  # settled (or refunded) before: nothing moves again
            if item.charged <= 0:
                continue
            source = sources[item.request_id]
            lines = [(source, -item.charged),
                     (earnings_book(owner or ADMIN_ACCOUNT), item.earned)]
            if item.fee:
                lines.append((FEES, item.fee))
            post(tx, f"settle:{item.request_id}", "settle", lines,
                 request_id=item.request_id,
                 floors={source: 0} if source.startswith("lease:") else None)
        return [lease_id for lease_id in leases if lease_id not in open_leases]

    def _owner(self, tx: Tx, node_id: str) -> str:
        """The account a node earns for (``admin`` without a ``node_owners`` row)."""
        if not node_id:
            return ""
        now = clock.wall()
        cached = self._owners.get(node_id)
        if cached is not None and now - cached[1] < OWNER_TTL:
            return cached[0]
        owner = str(tx.value("SELECT account_id FROM node_owners WHERE node_id = ?",
                             (node_id,), default=ADMIN_ACCOUNT))
        self._owners[node_id] = (owner, now)
        return owner

    async def _quarantine(self, item: _Item, error: Exception) -> None:
        """Keep a request the database refused, with why: in ``usage_quarantine``, else
        in :data:`QUARANTINE_FILE`, else (nothing takes it) in the log."""
        reason = f"{type(error).__name__}: {error}"
        record = json.dumps({**dict(zip(COLUMNS, item.row, strict=False)),
                             "charged": item.charged}, default=repr)
        log.error("credits: request %s quarantined (%s)", item.request_id, reason)
        try:
            await self.db.write(lambda tx: tx.run(
                "INSERT INTO usage_quarantine (request_id, ts, error, row_json) "
                "VALUES (?, ?, ?, ?)", (item.request_id, clock.wall(), reason, record)))
            return
        except Exception as exc:
            log.error("credits: the quarantine table refused %s (%s)", item.request_id, exc)
        try:
            with (self.data_dir / QUARANTINE_FILE).open("a") as file:
                file.write(json.dumps({"error": reason, "row": record}) + "\n")
        except OSError as exc:
            log.error("credits: %s lost to the disk (%s); its record: %s", item.request_id,
                      exc, record)


def plugins() -> Mapping[str, Callable[[BillingSetup], Billing]]:
    """The names this plugin is registered under."""
    return {"credits": Credits, "usage-ledger": Credits}
