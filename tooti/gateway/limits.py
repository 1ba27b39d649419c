"""Rate limits and budgets of API keys and accounts: requests per minute (``rpm``),
tokens per minute (``tpm``), requests in flight (``concurrency``) per key and per
account, and spend per key per UTC day / month (``budget_day`` / ``budget_month``,
integer micro-units), from :attr:`Caller.key_limits` and :attr:`Caller.account_limits`.

The gateway calls :meth:`Limiter.admit` before routing a request and
:meth:`Limiter.finish` exactly once when it ended (however it ended). ``admit`` answers
a :class:`Ticket` whose :attr:`Ticket.headers` (``x-ratelimit-*``) go on the answer, or
raises ``APIError(429)`` naming the limit, with ``retry-after`` and the same headers.
A key and account without limits cost nothing: no counter, no header.

Sharing one limit between gateways (one database), without a round trip per request
------------------------------------------------------------------------------------
Windows are fixed: UTC minutes for rpm and tpm, the UTC day and month for budgets, from
the wall clock (so every gateway agrees on them). Each gateway *claims a chunk* of a
window's allowance from the shared row in ``quota_windows``
(:func:`tooti.accounts.quota.claim`: one conditional UPDATE, ``used + chunk <= limit``,
or ``INSERT … ON CONFLICT DO NOTHING`` for the window's first claim) and serves
requests from the chunk in memory; it claims again only when the chunk runs out. A
chunk is ``max(1, limit // 10)`` units (or what the request needs, if more), and never
more than is left, so the last units of a window are claimed one by one. In steady
state one claim serves ``limit // 10`` requests: at most ~10 claims per subject per
window per gateway, none per request. Without a database (a lone gateway) the same
code claims from an in-memory table.

The bounds (G gateways sharing the database, C = the chunk):

* **rpm and budgets never exceed their limit**, however many gateways: what all of
  them admit in a window is at most what they claimed, and the claims never pass the
  limit. The cost is under-use: up to ``G * C`` units of a window may sit claimed in
  other gateways' chunks when one gateway is refused (an idle chunk is given back
  after :data:`IDLE_RETURN` seconds, every chunk when the gateway closes; a gateway
  killed with ``kill -9`` strands at most its chunks, until their window ends — for
  a budget, at most ``budget // 10`` of that day or month per crash).
* **tpm**: the tokens of a request are known only when it ends. ``admit`` reserves the
  request's prompt-token estimate (capped at the limit) like rpm reserves 1; ``finish``
  charges the difference between the actual tokens and the reservation. Tokens beyond
  the estimate are *charged* unconditionally (:func:`~tooti.accounts.quota.charge`, by
  :meth:`Limiter.run` within :data:`TICK` s, or by the next ``admit``), so the shared
  count is exact but may pass the limit: tokens served in a window are at most the
  limit plus what the requests in flight produce beyond their estimates (their
  completions). Once over, every gateway refuses until the window ends.
* **Budgets** reserve the request's ``max_cost`` from the day's and the month's
  allowances at ``admit``; ``finish`` returns the unused part to the local chunk (a
  cost beyond the reservation, which the credits plugin never settles, is charged).
  So the spend of a key is at most its budget, across gateways.
* **concurrency** is counted in process, per key and per account. Across gateways each
  gateway allows ``max(1, limit // L)`` where L is the number of live gateways (rows
  of ``gateways`` seen in the last :data:`LIVE_FOR` s, heartbeated by :meth:`run`), so
  together they allow at most ``max(limit, L)`` — with the caveat that the share is
  per gateway: a client using one gateway of two gets half its concurrency. For
  :data:`LIVE_FOR` s after a gateway joins, the others still use the old L (a
  transient overshoot of at most one share per joining gateway).

Headers: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` (``"12s"``, ``"1m3s"``, like OpenAI) when the caller has
an rpm limit (of the key and the account, the one with the fewest remaining), and the
same three ``-tokens`` when it has a tpm limit. ``remaining`` is this gateway's view
(the shared count at its last claim, plus its unused chunk).

Memory: one counter per active subject; :meth:`Limiter.run` forgets counters idle for
two of their windows (after charging their debt) and concurrency counters at zero, and
deletes rows of windows that ended (:func:`~tooti.accounts.quota.purge`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Literal

import trio

from tooti import clock
from tooti.accounts import quota
from tooti.accounts.database import Database, Tx
from tooti.accounts.quota import Period
from tooti.accounts.records import Caller, Limits
from tooti.backoff import Backoff
from tooti.errors import APIError

log = logging.getLogger("tooti.gateway.limits")

TICK = 1.0
"""Seconds between :meth:`Limiter.run`'s rounds (charging debts, giving back idle chunks)."""
IDLE_RETURN = 30.0
"""A chunk unused this long is given back to the shared row."""
HEARTBEAT = 5.0
"""Seconds between this gateway's ``gateways.last_seen`` updates."""
LIVE_FOR = 15.0
"""A gateway seen within this many seconds counts as live (concurrency shares)."""
PURGE_EVERY = 60.0
"""Seconds between deletions of ended windows' rows."""
MAX_RETRY = 30.0
"""Longest wait (seconds) between :meth:`Limiter.run`'s rounds while the database fails."""
CLOSE_TIMEOUT = 5.0
"""Seconds :meth:`Limiter.run` spends giving chunks back when it ends."""
NO_LIMITS = Limits()

Kind = Literal["requests", "tokens", "budget"]


def format_reset(seconds: float) -> str:
    """A reset delay as OpenAI writes it: ``"12s"``, ``"1m3s"``, ``"2h0m5s"``."""
    total = max(1, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Counter:
    """This gateway's share of one subject in its current window."""

    __slots__ = ("limit", "local", "lock", "period", "shared", "subject", "touched", "window")

    def __init__(self, subject: str, period: Period, limit: int, window: int,
                 wall: float) -> None:
        self.subject = subject
        self.period: Period = period
        self.limit = limit
        self.window = window
        self.local = 0
        """Units claimed and not yet used; negative: units consumed but not yet charged."""
        self.shared = 0
        """The shared row's count at the last claim or charge."""
        self.touched = wall
        self.lock: trio.Lock | None = None

    def roll(self, wall: float) -> None:
        """Move to the window holding ``wall`` (a debt moves with it: it is still owed)."""
        window = quota.window_start(self.period, wall)
        if window != self.window:
            self.window = window
            self.local = min(self.local, 0)
            self.shared = 0

    def remaining(self) -> int:
        return max(0, self.limit - self.shared + self.local)

    def reset_in(self, wall: float) -> float:
        return quota.window_end(self.period, self.window) - wall


class _Hold:
    """Units a ticket took from one counter (given back or settled at finish)."""

    __slots__ = ("amount", "counter", "window")

    def __init__(self, counter: _Counter, amount: int, window: int) -> None:
        self.counter = counter
        self.amount = amount
        self.window = window


class Ticket:
    """One admitted request: what it holds, and the headers for its answer."""

    __slots__ = (
        "_budgets",
        "_done",
        "_requests",
        "_running",
        "_tokens",
        "headers",
        "request_id",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.headers: list[tuple[bytes, bytes]] = []
        """``x-ratelimit-*`` headers for the answer (empty when the caller has no rpm/tpm)."""
        self._requests: list[_Hold] = []
        """rpm holds: given back if the request is refused, kept once it is admitted."""
        self._tokens: list[_Hold] = []
        self._budgets: list[_Hold] = []
        self._running: list[str] = []
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done


class _Refused(Exception):
    def __init__(self, kind: Kind, name: str, counter: _Counter | None, message: str,
                 retry_after: float) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.name = name
        self.counter = counter
        self.message = message
        self.retry_after = retry_after


class Limiter:
    """Limits and budgets of callers (see the module docstring): ``db`` shared with other
    gateways (None: this gateway alone, counters in memory)."""

    def __init__(self, db: Database | None, gateway_id: str, *,
                 wall: Callable[[], float] | None = None) -> None:
        """``wall``: the wall clock windows are cut from (default :func:`tooti.clock.wall`;
        tests pass one driven by trio's clock)."""
        self.db = db
        self.gateway_id = gateway_id
        self._wall = wall
        self._counters: dict[str, _Counter] = {}
        self._running: dict[str, int] = {}
        self._memory: dict[tuple[str, int], int] = {}
        """The shared table when there is no database."""
        self.live_gateways = 1

    def wall(self) -> float:
        return self._wall() if self._wall is not None else clock.wall()

    # ------------------------------------------------------------ admit / finish

    async def admit(self, caller: Caller, request_id: str, *, tokens_estimate: int,
                    max_cost: int) -> Ticket:
        """Admit one request of ``caller`` or raise ``APIError(429)`` (see the module
        docstring). ``tokens_estimate``: the prompt's tokens; ``max_cost``: the most the
        request may cost (micro-units), reserved from the key's budgets."""
        ticket = Ticket(request_id)
        key, acct = caller.key_limits, caller.account_limits
        if key == NO_LIMITS and acct == NO_LIMITS:
            return ticket
        wall = self.wall()
        try:
            self._hold_concurrency(ticket, f"key:{caller.key_id}", key.concurrency)
            self._hold_concurrency(ticket, f"acct:{caller.account_id}", acct.concurrency)
            requests: list[_Counter] = []
            tokens: list[_Counter] = []
            for kind, ident, limits in (("key", caller.key_id, key),
                                        ("acct", caller.account_id, acct)):
                if limits.rpm is not None:
                    hold = await self._take(quota.subject(kind, ident, "rpm"),
                                            limits.rpm, 1, wall, "requests",
                                            "requests per minute")
                    requests.append(hold.counter)
                    ticket._requests.append(hold)
                if limits.tpm is not None:
                    need = max(1, min(tokens_estimate, limits.tpm))
                    hold = await self._take(quota.subject(kind, ident, "tpm"),
                                            limits.tpm, need, wall, "tokens",
                                            "tokens per minute")
                    tokens.append(hold.counter)
                    ticket._tokens.append(hold)
            for name, budget, what in (("spend:day", key.budget_day, "daily budget"),
                                       ("spend:month", key.budget_month, "monthly budget")):
                if budget is not None:
                    ticket._budgets.append(await self._take(
                        quota.subject("key", caller.key_id, name), budget,
                        max(1, max_cost), wall, "budget", what))
        except _Refused as refused:
            self._undo(ticket)
            raise self._error(refused, caller, wall) from None
        except BaseException:
            self._undo(ticket)
            raise
        ticket.headers = [(k.encode(), v.encode())
                          for k, v in self._headers(requests, tokens, wall).items()]
        return ticket

    async def finish(self, ticket: Ticket, *, tokens: int, cost: int) -> None:
        """The request of ``ticket`` ended having used ``tokens`` (prompt + completion)
        and cost ``cost`` micro-units: settle its holds. Idempotent; never waits, so a
        cancelled caller still releases everything."""
        if ticket._done:
            return
        ticket._done = True
        for name in ticket._running:
            self._release_running(name)
        for hold in ticket._tokens:
            self._settle(hold, tokens)
        for hold in ticket._budgets:
            self._settle(hold, cost)

    def _settle(self, hold: _Hold, used: int) -> None:
        # The counter may have been forgotten (a request longer than two windows).
        counter = self._counters.setdefault(hold.counter.subject, hold.counter)
        counter.roll(self.wall())
        if used > hold.amount:
            counter.local -= used - hold.amount  # a debt, charged by run() or the next admit
        elif counter.window == hold.window:
            counter.local += hold.amount - used

    def _undo(self, ticket: Ticket) -> None:
        """Give back every hold of a ticket that was refused or cancelled in admit."""
        ticket._done = True
        for name in ticket._running:
            self._release_running(name)
        for hold in (*ticket._requests, *ticket._tokens, *ticket._budgets):
            if hold.counter.window == hold.window:
                hold.counter.local += hold.amount

    # ------------------------------------------------------------ concurrency

    def concurrency_share(self, limit: int) -> int:
        """What this gateway allows of a concurrency limit (see the module docstring)."""
        live = self.live_gateways
        return limit if live <= 1 else max(1, limit // live)

    def _hold_concurrency(self, ticket: Ticket, name: str, limit: int | None) -> None:
        if limit is None:
            return
        share = self.concurrency_share(limit)
        running = self._running.get(name, 0)
        if running >= share:
            scope = "key" if name.startswith("key:") else "account"
            across = f" ({share} on this gateway of {self.live_gateways})" \
                if share != limit else ""
            raise _Refused("requests", "concurrency", None,
                           f"Rate limit reached for concurrent requests on {scope} "
                           f"{name.split(':', 1)[1]}: limit {limit}{across}, "
                           f"{running} in flight. Retry when one finishes.", 1.0)
        self._running[name] = running + 1
        ticket._running.append(name)

    def _release_running(self, name: str) -> None:
        running = self._running.get(name, 0) - 1
        if running > 0:
            self._running[name] = running
        else:
            self._running.pop(name, None)

    # ------------------------------------------------------------ windows

    def _counter(self, subject: str, limit: int, wall: float) -> _Counter:
        counter = self._counters.get(subject)
        if counter is None:
            period = quota.period_of(subject)
            counter = self._counters[subject] = _Counter(
                subject, period, limit, quota.window_start(period, wall), wall)
        else:
            counter.roll(wall)
            counter.limit = limit
            counter.touched = wall
        return counter

    async def _take(self, subject: str, limit: int, need: int, wall: float, kind: Kind,
                    what: str) -> _Hold:
        """Take ``need`` units of ``subject`` from the local chunk, claiming another
        chunk from the shared row when it is short; :class:`_Refused` when the window
        has fewer left."""
        counter = self._counter(subject, limit, wall)
        if counter.local >= need:
            counter.local -= need
            return _Hold(counter, need, counter.window)
        if counter.lock is None:
            counter.lock = trio.Lock()
        async with counter.lock:  # one claim in flight per subject on this gateway
            counter.roll(wall)
            if counter.local < need:
                window, short = counter.window, need - counter.local
                debt = max(0, -counter.local)
                granted, shared = await self._claim(
                    subject, window, limit, short, max(short, max(1, limit // 10)))
                if granted == 0 and debt:
                    # Not enough left for the request: at least record the debt.
                    shared = await self._charge(subject, window, debt)
                    if counter.window == window:
                        counter.local += debt
                if counter.window == window:
                    counter.shared = shared
                    counter.local += granted
                if granted == 0:
                    scope, ident = subject.split(":")[:2]
                    scope = "key" if scope == "key" else "account"
                    raise _Refused(kind, subject.split(":", 2)[2], counter,
                                   f"Rate limit reached for {what} on {scope} {ident}: "
                                   f"limit {limit}, used {min(shared, limit)}"
                                   if kind != "budget" else
                                   f"Budget exceeded: the key's {what} of {limit} micro-units "
                                   f"has {max(0, limit - shared)} left, this request may cost "
                                   f"{need}", counter.reset_in(wall))
                if counter.window != window:  # the window turned while claiming
                    return _Hold(counter, need, window)
            counter.local -= need
            return _Hold(counter, need, counter.window)

    async def _claim(self, subject: str, window: int, limit: int, need: int,
                     want: int) -> tuple[int, int]:
        if self.db is None:
            used = self._memory.get((subject, window), 0)
            grant = min(want, limit - used)
            if grant < need:
                return 0, used
            self._memory[(subject, window)] = used + grant
            return grant, used + grant
        return await self.db.write(
            lambda tx: quota.claim(tx, subject, window, limit, need, want))

    async def _charge(self, subject: str, window: int, amount: int) -> int:
        if self.db is None:
            used = self._memory.get((subject, window), 0) + amount
            self._memory[(subject, window)] = used
            return used
        return await self.db.write(lambda tx: quota.charge(tx, subject, window, amount))

    async def _release(self, subject: str, window: int, amount: int) -> None:
        if self.db is None:
            key = (subject, window)
            self._memory[key] = max(0, self._memory.get(key, 0) - amount)
            return
        await self.db.write(lambda tx: quota.release(tx, subject, window, amount))

    # ------------------------------------------------------------ answers

    def _headers(self, requests: list[_Counter], tokens: list[_Counter],
                 wall: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, counters in (("requests", requests), ("tokens", tokens)):
            if counters:
                tightest = min(counters, key=_Counter.remaining)
                headers[f"x-ratelimit-limit-{name}"] = str(tightest.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(tightest.remaining())
                headers[f"x-ratelimit-reset-{name}"] = format_reset(tightest.reset_in(wall))
        return headers

    def _error(self, refused: _Refused, caller: Caller, wall: float) -> APIError:
        requests: list[_Counter] = []
        tokens: list[_Counter] = []
        for kind, ident, limits in (("key", caller.key_id, caller.key_limits),
                                    ("acct", caller.account_id, caller.account_limits)):
            for name, limit, into in (("rpm", limits.rpm, requests),
                                      ("tpm", limits.tpm, tokens)):
                if limit is not None:
                    into.append(self._counter(quota.subject(kind, ident, name), limit, wall))
        headers = {"retry-after": str(max(1, math.ceil(refused.retry_after)))}
        headers.update(self._headers(requests, tokens, wall))
        if refused.counter is not None:  # the refusing limit's own figures
            counter = refused.counter
            if refused.kind in ("requests", "tokens"):
                headers[f"x-ratelimit-limit-{refused.kind}"] = str(counter.limit)
                headers[f"x-ratelimit-remaining-{refused.kind}"] = str(counter.remaining())
                headers[f"x-ratelimit-reset-{refused.kind}"] = format_reset(
                    counter.reset_in(wall))
        budget = refused.kind == "budget"
        return APIError(429, refused.message,
                        code="budget_exceeded" if budget else "rate_limit_exceeded",
                        type="rate_limit_error", headers=headers)

    # ------------------------------------------------------------ background

    async def run(self) -> None:
        """Charge debts, give back idle chunks, forget idle counters, heartbeat and
        count live gateways, delete ended windows; at the end, give every chunk back.

        No database error ends it (it runs in the gateway's nursery): a round that
        fails is logged and the next one waits a :class:`~tooti.backoff.Backoff` delay
        (:data:`TICK` doubling to :data:`MAX_RETRY`); a debt or chunk whose write
        failed stays in its counter for the next round."""
        next_beat = next_purge = clock.now()
        backoff = Backoff(TICK, MAX_RETRY)
        try:
            while True:
                delay = TICK
                try:
                    await self.tick()
                    if self.db is not None and clock.now() >= next_beat:
                        await self._heartbeat()
                        next_beat = clock.now() + HEARTBEAT
                    if self.db is not None and clock.now() >= next_purge:
                        await self.db.write(partial(quota.purge, wall=self.wall()))
                        next_purge = clock.now() + PURGE_EVERY
                except Exception as exc:
                    delay = backoff.next()
                    log.warning("rate limits: syncing with the database failed (%s: %s); "
                                "trying again in %.1fs", type(exc).__name__, exc, delay)
                else:
                    backoff.reset()
                await trio.sleep(delay)
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                try:
                    await self.close()
                except Exception as exc:
                    log.warning("rate limits: giving chunks back at close failed (%s: %s); "
                                "they are freed when their windows end",
                                type(exc).__name__, exc)

    async def tick(self) -> None:
        """One round of :meth:`run`'s periodic work (without the heartbeat). Raises the
        first database error, after putting the debt or chunk it was writing back in
        its counter (nothing is lost; the next round writes it)."""
        wall = self.wall()
        for counter in list(self._counters.values()):
            counter.roll(wall)
            if counter.local < 0:
                window, debt = counter.window, -counter.local
                counter.local = 0
                try:
                    shared = await self._charge(counter.subject, window, debt)
                except BaseException:
                    self._restore(counter, window, -debt)
                    raise
                if counter.window == window:
                    counter.shared = shared
            elif counter.local > 0 and wall - counter.touched >= IDLE_RETURN:
                window, amount = counter.window, counter.local
                counter.local = 0
                try:
                    await self._release(counter.subject, window, amount)
                except BaseException:
                    self._restore(counter, window, amount)
                    raise
                counter.shared -= amount
            length = quota.window_end(counter.period, counter.window) - counter.window
            if (wall - counter.touched >= 2 * length and counter.local == 0
                    and (counter.lock is None or not counter.lock.locked())):
                self._counters.pop(counter.subject, None)
        if self._memory:  # no database: forget the shared counts of windows that ended
            for subject, start in list(self._memory):
                if quota.window_end(quota.period_of(subject), start) <= wall:
                    del self._memory[subject, start]

    def _restore(self, counter: _Counter, window: int, units: int) -> None:
        """Put back in ``counter`` what a failed write took out of it: a debt
        (``units < 0``, still owed, whatever the window now) or an unused chunk
        (``units > 0``, only while its window lasts: the shared row forgets it then)."""
        self._counters.setdefault(counter.subject, counter)
        if units < 0 or counter.window == window:
            counter.local += units

    async def close(self) -> None:
        """Give every unused chunk back and charge every debt (the gateway is stopping);
        every counter is tried, the first error raised after."""
        wall = self.wall()
        failed: BaseException | None = None
        for counter in list(self._counters.values()):
            counter.roll(wall)
            window, amount = counter.window, counter.local
            counter.local = 0
            try:
                if amount > 0:
                    await self._release(counter.subject, window, amount)
                elif amount < 0:
                    await self._charge(counter.subject, window, -amount)
            except Exception as exc:
                self._restore(counter, window, amount)
                failed = failed or exc
        if failed is not None:
            raise failed

    async def _heartbeat(self) -> None:
        assert self.db is not None
        wall, me = self.wall(), self.gateway_id

        def beat(tx: Tx) -> int:
            tx.run("INSERT INTO gateways (id, started_at, last_seen) VALUES (?, ?, ?) "
                   "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
                   (me, wall, wall))
            return int(tx.value("SELECT COUNT(*) FROM gateways WHERE last_seen >= ?",
                                (wall - LIVE_FOR,), default=1))

        self.live_gateways = max(1, await self.db.write(beat))

    def counters(self) -> int:
        """How many counters this gateway holds (bounded memory: see :meth:`tick`)."""
        return len(self._counters) + len(self._running) + len(self._memory)
