"""Rate limits and budgets (tooti.gateway.limits over tooti.accounts.quota): each limit
refuses with 429, its error object and headers; one limit shared by two gateways on one
database holds; windows reset; concurrency is released on cancellation; budgets reserve
the maximum cost and free the rest. Storage tests run on SQLite and PostgreSQL (the
``database`` fixture); the no-database case runs in memory."""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from tooti.accounts import quota
from tooti.accounts.database import Database, DatabaseError
from tooti.accounts.records import Caller, Limits
from tooti.errors import APIError
from tooti.gateway.limits import IDLE_RETURN, Limiter, Ticket, format_reset

T0 = float(calendar.timegm((2026, 3, 10, 12, 0, 0)))
"""A minute boundary: the tests' wall clock starts here and moves with trio's clock."""


def wall() -> float:
    return T0 + trio.current_time()


NONE = Limits()


def caller(key: Limits = NONE, account: Limits = NONE, key_id: str = "key_1",
           account_id: str = "acct_1") -> Caller:
    return Caller(key_id=key_id, account_id=account_id, account_name="alice", role="user",
                  group="", public_fallback=True, models=(), key_limits=key,
                  account_limits=account, expires_at=None, active=True)


def limiter(db: Database | None, gateway_id: str = "gw-a") -> Limiter:
    return Limiter(db, gateway_id, wall=wall)


async def admit(lim: Limiter, who: Caller, n: int = 0, *, tokens: int = 1,
                max_cost: int = 0) -> Ticket:
    return await lim.admit(who, f"req-{n}", tokens_estimate=tokens, max_cost=max_cost)


async def refused(lim: Limiter, who: Caller, **kwargs: Any) -> APIError:
    with pytest.raises(APIError) as info:
        await admit(lim, who, **kwargs)
    assert info.value.status == 429
    assert info.value.type == "rate_limit_error"
    return info.value


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database | None]:
    """No database (a lone gateway), then SQLite and PostgreSQL (as the ``database``
    fixture makes them)."""
    if request.param == "memory":
        yield None
        return
    url = str(tmp_path / "tooti.sqlite3") if request.param == "sqlite" else \
        str(request.getfixturevalue("postgres_cluster").fresh_database())
    db = Database(url)
    yield db
    db.close()


# ------------------------------------------------------------ helpers


def test_reset_is_written_like_openai() -> None:
    assert format_reset(12) == "12s"
    assert format_reset(63) == "1m3s"
    assert format_reset(60) == "1m0s"
    assert format_reset(0.2) == "1s"
    assert format_reset(3725) == "1h2m5s"


def test_windows_are_utc_minutes_days_and_months() -> None:
    t = calendar.timegm((2026, 12, 31, 23, 59, 30))
    assert quota.window_start("minute", t) == t - 30
    assert quota.window_start("day", t) == calendar.timegm((2026, 12, 31, 0, 0, 0))
    month = quota.window_start("month", t)
    assert month == calendar.timegm((2026, 12, 1, 0, 0, 0))
    assert quota.window_end("month", month) == calendar.timegm((2027, 1, 1, 0, 0, 0))
    assert quota.period_of("key:k:spend:day") == "day"
    assert quota.period_of("acct:a:tpm") == "minute"


# ------------------------------------------------------------ no limits


async def test_a_caller_without_limits_costs_nothing(store: Database | None) -> None:
    lim = limiter(store)
    for n in range(50):
        ticket = await admit(lim, caller(), n, tokens=10_000, max_cost=10**9)
        assert ticket.headers == []
        await lim.finish(ticket, tokens=10_000, cost=10**9)
    assert lim.counters() == 0
    if store is not None:
        assert store.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM quota_windows")) == 0


# ------------------------------------------------------------ each limit refuses


async def test_rpm_refuses_with_the_error_object_and_every_header(
    store: Database | None, autojump_clock: trio.testing.MockClock,
) -> None:
    await trio.sleep(12)  # 48 s left in the window
    lim = limiter(store)
    who = caller(key=Limits(rpm=3, tpm=1000))
    for n in range(3):
        ticket = await admit(lim, who, n, tokens=10)
        await lim.finish(ticket, tokens=10, cost=0)
    assert dict(ticket.headers) == {
        b"x-ratelimit-limit-requests": b"3", b"x-ratelimit-remaining-requests": b"0",
        b"x-ratelimit-reset-requests": b"48s",
        b"x-ratelimit-limit-tokens": b"1000", b"x-ratelimit-remaining-tokens": b"970",
        b"x-ratelimit-reset-tokens": b"48s",
    }
    error = await refused(lim, who)
    assert error.code == "rate_limit_exceeded"
    assert "requests per minute" in error.message and "key_1" in error.message
    assert error.to_dict()["error"]["type"] == "rate_limit_error"
    assert error.headers == {
        "retry-after": "48",
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "48s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "970",
        "x-ratelimit-reset-tokens": "48s",
    }


async def test_an_account_rpm_counts_every_key_of_the_account(
    store: Database | None, autojump_clock: trio.testing.MockClock,
) -> None:
    lim = limiter(store)
    account = Limits(rpm=4)
    for n in range(4):
        await admit(lim, caller(account=account, key_id=f"key_{n % 2}"), n)
    error = await refused(lim, caller(account=account, key_id="key_9"))
    assert "account acct_1" in error.message
    assert error.headers["retry-after"] == "60"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"


async def test_tpm_admits_on_the_estimate_and_charges_the_actual_tokens(
    store: Database | None, autojump_clock: trio.testing.MockClock,
) -> None:
    lim = limiter(store)
    who = caller(account=Limits(tpm=100))
    first = await admit(lim, who, 1, tokens=30)
    assert dict(first.headers)[b"x-ratelimit-remaining-tokens"] == b"70"
    await lim.finish(first, tokens=90, cost=0)  # 60 more than its estimate
    await lim.tick()  # the debt reaches the shared count
    error = await refused(lim, who, tokens=20)  # 90 used: 20 more do not fit
    assert error.code == "rate_limit_exceeded"
    assert "tokens per minute" in error.message and "account acct_1" in error.message
    assert error.headers["x-ratelimit-limit-tokens"] == "100"
    assert error.headers["x-ratelimit-remaining-tokens"] == "10"
    assert error.headers["retry-after"] == "60"
    assert "x-ratelimit-limit-requests" not in error.headers  # no rpm limit
    ticket = await admit(lim, who, 2, tokens=10)  # exactly the 10 left
    await lim.finish(ticket, tokens=4, cost=0)  # 6 come back
    ticket = await admit(lim, who, 3, tokens=6)
    assert dict(ticket.headers)[b"x-ratelimit-remaining-tokens"] == b"0"


async def test_concurrency_refuses_the_request_over_the_limit(store: Database | None) -> None:
    lim = limiter(store)
    who = caller(key=Limits(concurrency=2), account=Limits(concurrency=5))
    tickets = [await admit(lim, who, n) for n in range(2)]
    error = await refused(lim, who)
    assert error.code == "rate_limit_exceeded"
    assert "concurrent requests" in error.message and "key key_1" in error.message
    assert error.headers == {"retry-after": "1"}
    # another key of the account still gets in, up to the account's 5
    other = caller(key=Limits(concurrency=10), account=Limits(concurrency=5), key_id="key_2")
    tickets += [await admit(lim, other, n) for n in range(3)]
    error = await refused(lim, other)
    assert "account acct_1" in error.message
    await lim.finish(tickets[0], tokens=1, cost=0)
    await lim.finish(tickets[0], tokens=1, cost=0)  # idempotent: releases once
    tickets.append(await admit(lim, other, 9))
    await refused(lim, who)
    for ticket in tickets:
        await lim.finish(ticket, tokens=1, cost=0)
    assert lim.counters() == 0  # no counter kept for requests no longer in flight


async def test_concurrency_is_released_when_the_request_is_cancelled(
    store: Database | None,
) -> None:
    lim = limiter(store)
    who = caller(key=Limits(concurrency=1))
    started = trio.Event()

    async def request(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ticket = await admit(lim, who)
        try:
            task_status.started()
            started.set()
            await trio.sleep_forever()
        finally:
            await lim.finish(ticket, tokens=0, cost=0)  # runs under cancellation

    async with trio.open_nursery() as nursery:
        await nursery.start(request)
        assert started.is_set()
        await refused(lim, who)  # the one slot is taken
        nursery.cancel_scope.cancel()
    ticket = await admit(lim, who)  # released by the cancelled request
    await lim.finish(ticket, tokens=0, cost=0)


async def test_a_request_refused_by_one_limit_gives_back_what_it_took(
    store: Database | None,
) -> None:
    lim = limiter(store)
    who = caller(key=Limits(rpm=5, concurrency=3), account=Limits(tpm=50))
    first = await admit(lim, who, 0, tokens=50)  # takes every token of the minute
    for _ in range(5):  # refused by tpm, after taking a request and a concurrency slot
        error = await refused(lim, who, tokens=1)
        assert "tokens per minute" in error.message
    await lim.finish(first, tokens=20, cost=0)  # 30 tokens come back
    tickets = [await admit(lim, who, n, tokens=10) for n in range(3)]
    # 4 requests counted (not 9), 3 slots held (the refused ones gave theirs back)
    assert dict(tickets[-1].headers)[b"x-ratelimit-remaining-requests"] == b"1"
    assert "concurrent" in (await refused(lim, who, tokens=0)).message


# ------------------------------------------------------------ budgets


async def test_a_daily_budget_refuses_what_would_exceed_it_and_frees_the_unused_part(
    store: Database | None, autojump_clock: trio.testing.MockClock,
) -> None:
    lim = limiter(store)
    who = caller(key=Limits(budget_day=1_000_000, budget_month=5_000_000))
    big = await admit(lim, who, 1, max_cost=800_000)
    error = await refused(lim, who, max_cost=300_000)  # 800k reserved + 300k > 1M
    assert error.code == "budget_exceeded"
    assert "daily budget" in error.message
    assert error.headers["retry-after"] == str(86_400 - 12 * 3600)  # T0 is noon UTC
    await lim.finish(big, tokens=10, cost=100_000)  # 700k of the reservation come back
    small = await admit(lim, who, 2, max_cost=300_000)
    await lim.finish(small, tokens=10, cost=300_000)
    last = await admit(lim, who, 3, max_cost=600_000)  # 600k left of the day
    await lim.finish(last, tokens=10, cost=600_000)
    error = await refused(lim, who, max_cost=1)
    assert error.code == "budget_exceeded"
    await trio.sleep(12 * 3600)  # the next day: the month still has 4M
    ticket = await admit(lim, who, 4, max_cost=1_000_000)
    await lim.finish(ticket, tokens=1, cost=1_000_000)
    if store is not None:
        await lim.close()  # chunks go back: the shared rows hold exactly what was spent
        spent = store.read_sync(lambda tx: quota.used(
            tx, "key:key_1:spend:month", quota.window_start("month", T0)))
        assert spent == 2_000_000


async def test_a_monthly_budget_holds_across_days(
    store: Database | None, autojump_clock: trio.testing.MockClock,
) -> None:
    lim = limiter(store)
    who = caller(key=Limits(budget_month=3_000))
    for day in range(3):
        ticket = await admit(lim, who, day, max_cost=1_000)
        await lim.finish(ticket, tokens=1, cost=1_000)
        await trio.sleep(86_400)
    error = await refused(lim, who, max_cost=1)
    assert error.code == "budget_exceeded" and "monthly budget" in error.message


# ------------------------------------------------------------ windows


async def test_the_next_window_admits_again(
    store: Database | None, autojump_clock: trio.testing.MockClock,
) -> None:
    lim = limiter(store)
    who = caller(key=Limits(rpm=10))
    for n in range(10):
        await admit(lim, who, n)
    error = await refused(lim, who)
    await trio.sleep(int(error.headers["retry-after"]))
    ticket = await admit(lim, who, 11)
    assert dict(ticket.headers)[b"x-ratelimit-remaining-requests"] == b"9"


async def test_idle_counters_are_forgotten_and_old_windows_purged(
    store: Database | None, autojump_clock: trio.testing.MockClock,
) -> None:
    lim = limiter(store)
    for n in range(20):
        await admit(lim, caller(key=Limits(rpm=100), key_id=f"key_{n}"), n)
    assert lim.counters() == (20 if store is not None else 40)  # + the in-memory rows
    for _ in range(200):  # more than two minute windows, one tick a second
        await trio.sleep(1)
        await lim.tick()
        if trio.current_time() == 40 and store is not None:
            # idle chunks were given back: 1 used of each
            assert store.read_sync(lambda tx: tx.value(
                "SELECT SUM(used) FROM quota_windows")) == 20
    assert lim.counters() == 0
    if store is None:
        return
    database = store
    assert database.write_sync(lambda tx: quota.purge(tx, wall())) == 20
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM quota_windows")) == 0


async def test_run_gives_every_chunk_back_when_it_ends(database: Database) -> None:
    lim = limiter(database)
    who = caller(key=Limits(rpm=100, budget_day=1_000_000))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lim.run)
        ticket = await admit(lim, who, max_cost=5_000)
        await lim.finish(ticket, tokens=1, cost=2_000)
        nursery.cancel_scope.cancel()
    rows: dict[str, int] = dict(database.read_sync(lambda tx: tx.all(
        "SELECT subject, used FROM quota_windows")))
    assert rows == {"key:key_1:rpm": 1, "key:key_1:spend:day": 2_000}
    assert database.read_sync(lambda tx: tx.value(
        "SELECT COUNT(*) FROM gateways WHERE id = 'gw-a'")) == 1


# ------------------------------------------------------------ two gateways, one database


async def test_rpm_shared_by_two_gateways_never_exceeds_the_limit(
    database: Database, autojump_clock: trio.testing.MockClock,
) -> None:
    """rpm=30, 100 admits spread over two gateways at once: at most 30 admitted, and at
    least 30 - 2 chunks (the chunks the other gateway holds unused)."""
    other = Database(database.url)  # the second gateway's own connection(s)
    a, b = limiter(database, "gw-a"), limiter(other, "gw-b")
    who = caller(key=Limits(rpm=30))
    admitted: list[str] = []
    refusals: list[APIError] = []

    async def one(lim: Limiter, n: int) -> None:
        try:
            await admit(lim, who, n)
            admitted.append(lim.gateway_id)
        except APIError as exc:
            refusals.append(exc)

    async with trio.open_nursery() as nursery:
        for n in range(100):
            nursery.start_soon(one, a if n % 2 else b, n)
    chunk = 30 // 10
    assert 30 - 2 * chunk <= len(admitted) <= 30
    assert len(admitted) + len(refusals) == 100
    assert {exc.code for exc in refusals} == {"rate_limit_exceeded"}
    shared = database.read_sync(lambda tx: quota.used(tx, "key:key_1:rpm", int(T0)))
    assert len(admitted) <= shared <= 30
    # once both give back their unused chunks, the last units are claimable one by one
    await a.close()
    await b.close()
    while True:
        try:
            await admit(a if len(admitted) % 2 else b, who)
        except APIError:
            break
        admitted.append("late")
    assert len(admitted) == 30
    await trio.sleep(60)  # the next window
    await admit(a, who)
    other.close()


async def test_concurrency_is_divided_between_live_gateways(database: Database) -> None:
    a, b = limiter(database, "gw-a"), limiter(database, "gw-b")
    await a._heartbeat()
    await b._heartbeat()
    await a._heartbeat()
    assert a.live_gateways == 2 and b.live_gateways == 2
    who = caller(account=Limits(concurrency=4))
    held = [await admit(a, who, n) for n in range(2)] + [await admit(b, who, n) for n in
                                                          range(2)]
    await refused(a, who)
    await refused(b, who)
    for ticket in held[:2]:
        await a.finish(ticket, tokens=0, cost=0)
    await admit(a, who)


async def test_an_admit_cancelled_while_claiming_gives_back_its_slot(database: Database) -> None:
    lim = limiter(database)
    who = caller(key=Limits(concurrency=1, rpm=10))
    with trio.CancelScope() as scope:
        scope.cancel()
        await admit(lim, who)  # cancelled at its claim, after taking the slot
    assert scope.cancelled_caught
    ticket = await admit(lim, who)  # the slot was given back
    await lim.finish(ticket, tokens=0, cost=0)


# ------------------------------------------------------------ a failing database


class FlakyWrites:
    """The database, with its next ``failures`` writes refused."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.failures = 0
        self.refused = 0
        self.written = 0
        self.wrote = trio.Event()

    async def write(self, fn: Any) -> Any:
        if self.failures:
            self.failures -= 1
            self.refused += 1
            raise DatabaseError("the database is away (failover)")
        result = await self.db.write(fn)
        self.written += 1
        self.wrote.set()
        self.wrote = trio.Event()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def test_run_survives_database_errors_and_keeps_the_debt(
    database: Database, autojump_clock: trio.testing.MockClock,
) -> None:
    """Finding 2: a database error in run() used to end it (and the gateway with it), and
    tick() zeroed a debt before charging it, so a failed charge lost it. Now each round
    is retried with backoff and the debt is charged once the database is back."""
    flaky = FlakyWrites(database)
    lim = Limiter(cast(Database, flaky), "gw-a", wall=wall)
    who = caller(key=Limits(tpm=1000))
    ticket = await admit(lim, who, tokens=10)  # claims a chunk of 100, holds 10
    await lim.finish(ticket, tokens=500, cost=0)  # 490 beyond the estimate: a debt
    flaky.failures, flaky.written = 3, 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lim.run)
        # (No fail_after: trio's autojump clock would jump to its deadline while a
        # database call runs in its thread.) run()'s backoff: 1 + 2 + 4 virtual seconds.
        while flaky.written < 2:  # the debt's charge, then the heartbeat
            await flaky.wrote.wait()
        assert flaky.refused == 3
        assert database.read_sync(lambda tx: tx.value(
            "SELECT COUNT(*) FROM gateways WHERE id = 'gw-a'")) == 1
        nursery.cancel_scope.cancel()
    assert database.read_sync(lambda tx: tx.value(
        "SELECT SUM(used) FROM quota_windows WHERE subject = 'key:key_1:tpm'")) == 500


async def test_a_chunk_whose_release_fails_is_kept(
    database: Database, autojump_clock: trio.testing.MockClock,
) -> None:
    """Finding 2: an idle chunk whose release fails stays in the counter (given back by
    a later round, or at close), not forgotten with the shared row still counting it."""
    flaky = FlakyWrites(database)
    lim = Limiter(cast(Database, flaky), "gw-a", wall=wall)
    who = caller(key=Limits(rpm=100))
    await admit(lim, who)  # claims 10, uses 1
    await trio.sleep(IDLE_RETURN)
    flaky.failures = 1
    with pytest.raises(DatabaseError):
        await lim.tick()
    assert lim._counters["key:key_1:rpm"].local == 9
    await lim.close()
    assert database.read_sync(lambda tx: tx.value(
        "SELECT used FROM quota_windows WHERE subject = 'key:key_1:rpm'")) == 1
