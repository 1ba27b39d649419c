"""Per-gateway credit leases: reserving a request's maximum cost without a database
round trip.

A gateway takes part of an account's balance into a *lease* (one journal entry
``account:<id>`` → ``lease:<lease id>``, floor 0 on the account, plus a row in
``leases``) and then reserves requests from it in memory. It goes to the database
only when the local lease is short: it tops the lease up (or opens one) by
``lease_size`` micro-units, at least what the request needs and at most the
account's balance. Settling spends from the lease's book (:mod:`tooti.billing.credits`
posts ``lease:<id>`` → earnings + fees); what a request did not use goes back to the
lease in memory.

Life of a lease:

* **renewed**: its ``expires_at`` (wall clock, shared by every gateway) is pushed to
  ``now + ttl`` every ``ttl / 3`` while the gateway holds it. The gateway reserves from
  a lease only until ``2/3 · ttl`` after the start of its last successful renewal
  (monotonic clock): a gateway cut off from the database stops reserving from its
  leases a third of a ttl before any other gateway may take them back (so clocks of
  gateways may differ by up to ``ttl / 3``).
* **returned** when idle (no reservation outstanding for ``idle`` seconds) and at
  :meth:`LeaseBook.close`: its remainder goes back to the account.
* **reconciled** if its gateway died (``kill -9``): at the restart of a gateway with
  the same id (:meth:`LeaseBook.recover_sync`, before it serves anything) and, once
  expired, by any gateway (:meth:`LeaseBook.reconcile_expired`, every ``ttl / 3``).
  Reconciling closes the row (``UPDATE … WHERE closed_at IS NULL``, so exactly one
  gateway does it) and posts the lease book's balance back to the account with the
  idempotency key ``release:<lease id>``. Nothing is lost (the remainder returns) and
  nothing is billed twice (settle entries are idempotent by request id).

Locking order (PostgreSQL): every transaction that moves money out of or into a lease
first locks the rows of *every* lease it touches, in id order (a conditional
``UPDATE leases`` each: :func:`close_leases` locks all of them before posting any
remainder), and only then touches books, in name order. So a reconcile closing many
leases and a settle batch spending from many never wait on each other in a cycle.
Reconciling reads the lease book *after* locking the row, so a concurrent settle on
that lease either commits before (and the remainder excludes it) or finds the row
closed.

A refusal costs one transaction, then nothing for a while: growing a lease reads the
account's balance under the lock of its book row (so a short balance is definite, not
a race lost to another gateway, and is never retried), and the account's available
credit is remembered as *short* for :data:`SHORT_TTL` seconds (per account: another
request asking for more than that is refused from memory, one asking for less still
tries). :meth:`LeaseBook.credit_changed` forgets it at once (a top-up on this gateway).
The only retry is for a lease that another gateway closed meanwhile (it had expired):
then a new lease is opened.

**The bound.** Reservations never exceed a lease's free credit and leases never exceed
the balance (the floor), so while gateways reach the database no account is ever
overspent, however many gateways share it. The one exception: a gateway cut off from
the database for longer than ``ttl`` has its leases reconciled by another; requests it
had reserved *before* it stopped reserving (its deadline) and that settle afterwards
find the lease closed and are charged to the account book directly, without a floor.
The account can then go below zero by at most the sum of those requests' costs (each
capped at its own reservation), which is at most what that lease held when it was
closed — and the remainder returned by the reconcile was exactly that credit, so money
is still neither created nor lost. ``tooti ledger check`` reports such a negative
balance as a warning, not a violation, when settle entries charged to the account book
explain it.

Each gateway sharing a database needs its own ``gateway_id``: a gateway starting
reconciles every open lease carrying its id, so two running with one id would take
each other's leases back (never overspending: the other's settles then charge the
account books directly, within the bound above).

A lease's credit is not available to other gateways while held: an account whose
balance sits in gateway A's lease is refused (402) on gateway B until A returns it
(idle return, ``idle`` seconds after its last request) — under-serving, never
overspending.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import trio

from tooti import clock
from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import InsufficientFunds, account_book, balance, lease_book, post
from tooti.accounts.money import MICROS

log = logging.getLogger("tooti.accounts.leases")

DEFAULT_SIZE = MICROS
"""Credit taken per lease (1 credit), unless a request needs more."""
DEFAULT_IDLE = 30.0
DEFAULT_TTL = 120.0
ATTEMPTS = 3
"""Times a reservation tries to grow a lease that another gateway keeps closing (only a
lease found gone is retried; a short balance is final)."""
SHORT_TTL = 1.0
"""Seconds an account found short is refused from memory (for requests asking more than
it had); :meth:`LeaseBook.credit_changed` forgets it sooner."""


class Reservation(msgspec.Struct, frozen=True):
    """What one request holds: ``amount`` micro-units of ``lease_id`` (``""``: nothing
    reserved, e.g. a request that can cost nothing)."""

    account_id: str
    lease_id: str
    amount: int


@dataclass
class _Lease:
    id: str
    account_id: str
    free: int
    """Credit of the lease neither reserved nor spent (in memory)."""
    deadline: float
    """Monotonic time after which this gateway reserves nothing more from it."""
    last_used: float
    holds: int = 0
    """Reservations outstanding."""
    open: bool = True


class _LeaseGone(Exception):
    """The lease was closed by another gateway (it had expired)."""


def close_lease(tx: Tx, lease_id: str, closed_at: float, *,
                expired_before: float | None = None) -> int | None:
    """Close an open lease and post its remainder back to its account (idempotency key
    ``release:<lease id>``); None if it was closed already (or, with
    ``expired_before``, has not expired)."""
    if expired_before is None:
        changed = tx.run("UPDATE leases SET closed_at = ? WHERE id = ? AND closed_at IS NULL",
                         (closed_at, lease_id))
    else:
        changed = tx.run("UPDATE leases SET closed_at = ? WHERE id = ? AND closed_at IS NULL "
                         "AND expires_at < ?", (closed_at, lease_id, expired_before))
    if changed == 0:
        return None
    account = str(tx.value("SELECT account_id FROM leases WHERE id = ?", (lease_id,)))
    remainder = balance(tx, lease_book(lease_id))
    if remainder:
        post(tx, f"release:{lease_id}", "release",
             [(lease_book(lease_id), -remainder), (account_book(account), remainder)])
    return remainder


def close_leases(tx: Tx, lease_ids: list[str], closed_at: float, *,
                 expired_before: float | None = None) -> list[str]:
    """Close several leases in one transaction (see :func:`close_lease`); the ids closed.

    Every lease row is locked first, in id order, and only then are books touched (the
    remainders posted): the locking order settle batches follow too, so a reconcile
    and a settle batch on the same leases and accounts cannot deadlock on PostgreSQL."""
    locked: list[str] = []
    for lease_id in sorted(set(lease_ids)):
        if expired_before is None:
            hit = tx.run("UPDATE leases SET amount = amount WHERE id = ? "
                         "AND closed_at IS NULL", (lease_id,))
        else:
            hit = tx.run("UPDATE leases SET amount = amount WHERE id = ? "
                         "AND closed_at IS NULL AND expires_at < ?",
                         (lease_id, expired_before))
        if hit:
            locked.append(lease_id)
    return [lease_id for lease_id in locked
            if close_lease(tx, lease_id, closed_at, expired_before=expired_before)
            is not None]


LOCK_OPEN_LEASE = "UPDATE leases SET amount = amount WHERE id = ? AND closed_at IS NULL"
"""Locks an open lease's row for the transaction; changes no row if it is closed."""


def lock_open_lease(tx: Tx, lease_id: str) -> bool:
    """Lock an open lease's row for this transaction (so no reconcile closes it under a
    settle); False if it is closed."""
    return tx.run(LOCK_OPEN_LEASE, (lease_id,)) > 0


class LeaseBook:
    """This gateway's leases (see the module docstring)."""

    def __init__(self, db: Database, gateway_id: str, *, size: int = DEFAULT_SIZE,
                 idle: float = DEFAULT_IDLE, ttl: float = DEFAULT_TTL,
                 wall: Callable[[], float] = clock.wall) -> None:
        self.db = db
        self.gateway_id = gateway_id
        self.size = size
        self.idle = idle
        self.ttl = ttl
        self.wall = wall
        """The wall clock for ``expires_at`` (injectable for tests)."""
        self._current: dict[str, _Lease] = {}
        """Account → the lease reservations are taken from."""
        self._leases: dict[str, _Lease] = {}
        """Every lease this gateway holds or still has reservations on."""
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._short: dict[str, tuple[int, float]] = {}
        """Account → (its balance beyond its lease here, monotonic time found short)."""

    # ------------------------------------------------------------ reserving

    def held(self, account_id: str) -> int:
        """Free credit of the account's current lease here (tests, reports)."""
        lease = self._current.get(account_id)
        return lease.free if lease is not None else 0

    def _take(self, account_id: str, amount: int) -> Reservation | None:
        lease = self._current.get(account_id)
        if lease is None:
            return None
        now = clock.now()
        if not lease.open or now >= lease.deadline:
            return None
        if lease.free < amount:
            return None
        lease.free -= amount
        lease.holds += 1
        lease.last_used = now
        return Reservation(account_id, lease.id, amount)

    async def reserve(self, account_id: str, amount: int) -> Reservation:
        """Reserve ``amount`` micro-units of the account's credit; raises
        :class:`InsufficientFunds` if its balance (beyond what this gateway holds) is
        short. Goes to the database only when the local lease cannot cover it."""
        if amount <= 0:
            return Reservation(account_id, "", 0)
        taken = self._take(account_id, amount)
        if taken is not None:
            return taken
        self._refuse_if_short(account_id, amount)
        async with self._locks[account_id]:
            for _ in range(ATTEMPTS):
                taken = self._take(account_id, amount)
                if taken is not None:
                    return taken
                self._refuse_if_short(account_id, amount)
                try:
                    await self._grow(account_id, amount)
                except _LeaseGone:
                    continue  # another gateway closed it (expired): open a new one
                except InsufficientFunds as short:
                    self._short[account_id] = (max(short.balance, 0), clock.now())
                    raise
            taken = self._take(account_id, amount)
            if taken is None:
                raise InsufficientFunds(account_book(account_id), 0, amount)
            return taken

    def _refuse_if_short(self, account_id: str, amount: int) -> None:
        """Raise :class:`InsufficientFunds` from memory if the account was found unable
        to cover ``amount`` less than :data:`SHORT_TTL` seconds ago."""
        short = self._short.get(account_id)
        if short is None:
            return
        have, since = short
        if clock.now() - since >= SHORT_TTL:
            del self._short[account_id]
            return
        lease = self._current.get(account_id)
        free = lease.free if lease is not None and lease.open else 0
        if amount > free + have:
            raise InsufficientFunds(account_book(account_id), have, amount - free)

    def credit_changed(self, account_id: str | None = None) -> None:
        """Credit reached the account (or, with None, any account): forget that it was
        short, so its next request goes to the database again."""
        if account_id is None:
            self._short.clear()
        else:
            self._short.pop(account_id, None)

    async def _grow(self, account_id: str, amount: int) -> None:
        """Top the account's lease up (or open one) so it can cover ``amount``."""
        lease = self._current.get(account_id)
        started = clock.now()
        if lease is not None and not lease.open:
            self._drop(lease)
            lease = None
        # A lease past its local deadline (renewals failed) is renewed here if it is
        # still open: the conditional UPDATE proves no other gateway reconciled it.
        free = lease.free if lease is not None else 0
        need = amount - free
        want = max(self.size, amount) - free
        lease_id = lease.id if lease is not None else "lease_" + secrets.token_hex(12)
        expires = self.wall() + self.ttl

        def grow(tx: Tx) -> int:
            if lease is not None:
                if tx.run("UPDATE leases SET expires_at = ? WHERE id = ? AND closed_at IS NULL",
                          (expires, lease_id)) == 0:
                    raise _LeaseGone(lease_id)
            # Lock the account's book row before reading it: the balance read is then
            # the one the floor sees (no other gateway can take it in between), so a
            # short balance is final, not a race to retry.
            tx.run("UPDATE books SET balance = balance WHERE book = ?",
                   (account_book(account_id),))
            have = balance(tx, account_book(account_id))
            grant = max(0, min(want, have))
            if grant < need:
                raise InsufficientFunds(account_book(account_id), have, need)
            if lease is None:
                tx.run("INSERT INTO leases (id, gateway_id, account_id, amount, acquired_at, "
                       "expires_at) VALUES (?, ?, ?, 0, ?, ?)",
                       (lease_id, self.gateway_id, account_id, self.wall(), expires))
            if grant > 0:  # else only renewed (a lease past its deadline, still enough)
                post(tx, f"lease:{lease_id}:{secrets.token_hex(6)}", "lease",
                     [(account_book(account_id), -grant), (lease_book(lease_id), grant)],
                     floors={account_book(account_id): 0})
                tx.run("UPDATE leases SET amount = amount + ? WHERE id = ?",
                       (grant, lease_id))
            return grant

        try:
            granted = await self.db.write(grow)
        except _LeaseGone:
            if lease is not None:
                self._drop(lease)
            raise
        deadline = started + self.ttl * 2 / 3
        if lease is None:
            lease = _Lease(lease_id, account_id, 0, deadline, clock.now())
            self._leases[lease_id] = lease
            self._current[account_id] = lease
        lease.free += granted
        lease.deadline = deadline
        self._short.pop(account_id, None)

    def release(self, reservation: Reservation, spent: int = 0) -> None:
        """A request ended having spent ``spent`` of its reservation: the rest is free
        again in its lease (if this gateway still holds it)."""
        lease = self._leases.get(reservation.lease_id)
        if lease is None:
            return
        lease.holds -= 1
        lease.last_used = clock.now()
        if lease.open:
            lease.free += max(reservation.amount - max(spent, 0), 0)
        elif lease.holds <= 0:
            self._leases.pop(lease.id, None)

    def forget(self, lease_id: str) -> None:
        """The lease was found closed (reconciled by another gateway): reserve nothing
        more from it."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            self._drop(lease)

    def _drop(self, lease: _Lease) -> None:
        lease.open = False
        lease.free = 0
        if self._current.get(lease.account_id) is lease:
            del self._current[lease.account_id]
        if lease.holds <= 0:
            self._leases.pop(lease.id, None)

    # ------------------------------------------------------------ background

    def recover_sync(self) -> int:
        """Reconcile this gateway id's leases left open by a previous run (killed);
        call before serving. The number of leases closed."""
        mine = set(self._leases)
        now = self.wall()

        def recover(tx: Tx) -> int:
            rows = tx.all("SELECT id FROM leases WHERE gateway_id = ? AND closed_at IS NULL",
                          (self.gateway_id,))
            return len(close_leases(tx, [lease_id for (lease_id,) in rows
                                         if lease_id not in mine], now))

        closed = self.db.write_sync(recover)
        if closed:
            log.info("gateway %s: reconciled %d lease(s) left by its previous run",
                     self.gateway_id, closed)
        return closed

    async def run(self) -> None:
        """Renew, return idle leases and reconcile expired ones, until cancelled."""
        tick = max(min(self.ttl / 3, self.idle / 2), 0.05)
        last_renew = clock.now()
        while True:
            await trio.sleep(tick)
            now = clock.now()
            for account_id, (_, since) in list(self._short.items()):
                if now - since >= SHORT_TTL:
                    del self._short[account_id]
            try:
                if clock.now() - last_renew >= self.ttl / 3:
                    last_renew = clock.now()
                    await self.renew()
                    await self.reconcile_expired()
                await self.return_idle()
            except Exception as exc:  # the database is away: try again next tick
                log.warning("credit leases: %s: %s", type(exc).__name__, exc)

    async def renew(self) -> None:
        """Push the ``expires_at`` of every lease held here to ``now + ttl``."""
        leases = [lease for lease in self._current.values() if lease.open]
        if not leases:
            return
        started = clock.now()
        expires = self.wall() + self.ttl

        def renew(tx: Tx) -> list[str]:
            return [lease.id for lease in sorted(leases, key=lambda lease: lease.id)
                    if tx.run("UPDATE leases SET expires_at = ? WHERE id = ? "
                              "AND closed_at IS NULL", (expires, lease.id)) == 0]

        gone = await self.db.write(renew)
        for lease in leases:
            if lease.id in gone:
                log.warning("credit lease %s was reconciled by another gateway", lease.id)
                self._drop(lease)
            else:
                lease.deadline = max(lease.deadline, started + self.ttl * 2 / 3)

    async def return_idle(self, *, now: float | None = None) -> int:
        """Return every lease with no reservation for ``idle`` seconds; how many."""
        now = clock.now() if now is None else now
        idle = [lease for lease in self._current.values()
                if lease.holds <= 0 and now - lease.last_used >= self.idle]
        for lease in idle:
            self._drop(lease)
        if idle:
            await self._return([lease.id for lease in idle])
        return len(idle)

    async def _return(self, lease_ids: list[str]) -> None:
        closed_at = self.wall()

        def give_back(tx: Tx) -> None:
            close_leases(tx, lease_ids, closed_at)

        with trio.CancelScope(shield=True):
            await self.db.write(give_back)

    async def reconcile_expired(self) -> list[str]:
        """Close every expired lease of any gateway, returning its remainder to its
        account; the ids closed."""
        now = self.wall()

        def reconcile(tx: Tx) -> list[str]:
            rows = tx.all("SELECT id FROM leases WHERE closed_at IS NULL AND expires_at < ?",
                          (now,))
            return close_leases(tx, [lease_id for (lease_id,) in rows], now,
                                expired_before=now)

        closed = await self.db.write(reconcile)
        for lease_id in closed:
            log.info("credit lease %s expired; its remainder went back to its account",
                     lease_id)
            self.forget(lease_id)
        return closed

    async def close(self) -> None:
        """Return every lease this gateway holds (shutdown)."""
        ids = [lease.id for lease in self._leases.values() if lease.open]
        for lease in list(self._leases.values()):
            self._drop(lease)
        if ids:
            await self._return(ids)
