"""The ``credits`` billing plugin and its per-gateway leases, on SQLite and PostgreSQL:
reserve → settle → refund arithmetic in integer micro-units, 402 when the balance is
short, idempotent settles, two gateways on one database never reserving more than the
balance, and leases of a killed gateway reconciled at its restart or after expiry."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
import trio
import trio.testing

from tooti.accounts import leases as leases_module
from tooti.accounts.database import Database, DatabaseError, Tx
from tooti.accounts.journal import FEES, ISSUED, InsufficientFunds, balance, post
from tooti.accounts.leases import LeaseBook
from tooti.accounts.ledger_check import check, check_report, summary
from tooti.accounts.money import MICROS
from tooti.billing import credits as credits_module
from tooti.billing.base import BillingSetup, Outcome, RequestContext, Usage
from tooti.billing.credits import Credits, parse_options
from tooti.billing.pipeline import usage_from
from tooti.errors import APIError

ACCOUNT = "acct_alice"
# 1 and 3 credits per 1M tokens: 1000 prompt + 1000 completion tokens cost 4000 µ.
PRICE_IN, PRICE_OUT = 1_000_000, 3_000_000


def open_account(db: Database, account_id: str = ACCOUNT, credit: int = 10 * MICROS) -> None:
    """An account row (leases refer to it) topped up with ``credit`` micro-units."""
    def create(tx: Tx) -> None:
        tx.run("INSERT INTO accounts (id, name, role, status, created_at) VALUES "
               "(?, ?, 'user', 'active', 0) ON CONFLICT (id) DO NOTHING",
               (account_id, account_id))
        if credit:
            post(tx, f"topup:{account_id}:{credit}", "topup",
                 [(ISSUED, -credit), (f"account:{account_id}", credit)])
    db.write_sync(create)


def book(db: Database, name: str) -> int:
    return db.read_sync(lambda tx: balance(tx, name))


def ctx(request_id: str, max_cost: int, account_id: str = ACCOUNT) -> RequestContext:
    return RequestContext(request_id, "key_1", "m", "chat/completions", False,
                          account_id=account_id, max_cost=max_cost)


def usage(prompt: int = 1000, completion: int = 1000, node: str = "node-a") -> Usage:
    return Usage(node, "m", prompt, completion, "ok", price_input=PRICE_IN,
                 price_output=PRICE_OUT)


def usage_rows(db: Database) -> dict[str, tuple[Any, ...]]:
    return {row[0]: row[1:] for row in db.read_sync(lambda tx: tx.all(
        "SELECT request_id, status, cost, charged, earned, fee, owner_id FROM usage"))}


@asynccontextmanager
async def running(db: Database, tmp_path: Path, gateway_id: str = "gw-a", *,
                  close: bool = True, wall: Callable[[], float] | None = None,
                  **options: Any) -> AsyncIterator[Credits]:
    """A Credits plugin on ``db`` with its run() going; closed after unless ``close`` is
    False (a gateway "killed": its leases stay open in the database)."""
    setup = BillingSetup(tmp_path, options, database=db, gateway_id=gateway_id)
    plugin = Credits(setup, wall=wall) if wall is not None else Credits(setup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(plugin.run)
        yield plugin
        if close:
            await plugin.close()
        nursery.cancel_scope.cancel()


async def test_reserve_settle_refund_arithmetic(database: Database, tmp_path: Path) -> None:
    open_account(database)
    async with running(database, tmp_path, lease_credits="2", fee_bps=1000) as credits:
        await credits.authorize(ctx("r1", 500_000))
        lease = credits.leases._current[ACCOUNT].id
        # One lease of 2 credits left the account; the request holds 0.5 of it.
        assert book(database, f"account:{ACCOUNT}") == 8 * MICROS
        assert book(database, f"lease:{lease}") == 2 * MICROS
        assert credits.leases.held(ACCOUNT) == 1_500_000
        await credits.authorize(ctx("r2", 500_000))  # from memory: the same lease
        assert credits.leases._current[ACCOUNT].id == lease
        await credits.settle(ctx("r1", 500_000), usage())
        assert usage_rows(database)["r1"] == ("ok", 4000, 4000, 3600, 400, "admin")
        assert book(database, f"lease:{lease}") == 2 * MICROS - 4000
        assert book(database, "earnings:admin") == 3600
        assert book(database, FEES) == 400
        # r2 still holds its part:
        assert credits.leases.held(ACCOUNT) == 2 * MICROS - 4000 - 500_000
        await credits.refund(ctx("r2", 500_000), "failed")
        await credits.flush()
        assert credits.leases.held(ACCOUNT) == 2 * MICROS - 4000
        assert usage_rows(database)["r2"][:3] == ("failed", 0, 0)
    # Closed: the lease went back, the account paid exactly what was delivered.
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 4000
    assert book(database, f"lease:{lease}") == 0
    assert check(database) == []
    assert summary(database)["charged"] == 4000


async def test_cost_is_capped_at_the_reservation(database: Database, tmp_path: Path) -> None:
    open_account(database)
    async with running(database, tmp_path) as credits:
        await credits.authorize(ctx("r1", 1000))
        await credits.settle(ctx("r1", 1000), usage())  # costs 4000, reserved 1000
    assert usage_rows(database)["r1"][1:3] == (4000, 1000)
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 1000
    assert check(database) == []


async def test_a_short_balance_is_refused_with_402(database: Database, tmp_path: Path) -> None:
    open_account(database, credit=3000)
    async with running(database, tmp_path) as credits:
        with pytest.raises(APIError) as refused:
            await credits.authorize(ctx("r1", 3001))
        assert (refused.value.status, refused.value.code, refused.value.type) == (
            402, "insufficient_quota", "insufficient_quota")
        await credits.authorize(ctx("r2", 3000))  # exactly the balance: admitted
        with pytest.raises(APIError):
            await credits.authorize(ctx("r3", 1))
    assert book(database, f"account:{ACCOUNT}") == 3000
    assert check(database) == []


async def test_settling_twice_charges_once(database: Database, tmp_path: Path) -> None:
    open_account(database)
    async with running(database, tmp_path) as credits:
        await credits.authorize(ctx("r1", 10_000))
        await credits.settle(ctx("r1", 10_000), usage())
        await credits.settle(ctx("r1", 10_000), usage())
        async with trio.open_nursery() as nursery:  # and concurrently, in one batch
            await credits.authorize(ctx("r2", 10_000))
            for _ in range(2):
                nursery.start_soon(credits.settle, ctx("r2", 10_000), usage())
    entries = database.read_sync(lambda tx: tx.all(
        "SELECT idem_key FROM journal WHERE kind = 'settle' ORDER BY idem_key"))
    assert entries == [("settle:r1",), ("settle:r2",)]
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 8000
    assert check(database) == []


async def test_anonymous_requests_only_get_a_usage_row(database: Database,
                                                      tmp_path: Path) -> None:
    async with running(database, tmp_path) as credits:
        anonymous = ctx("r1", 50_000, account_id="")
        await credits.authorize(anonymous)
        await credits.settle(anonymous, usage())
    assert usage_rows(database)["r1"][:3] == ("ok", 4000, 0)
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM journal")) == 0
    assert check(database) == []


async def test_the_admin_account_is_recorded_never_charged(database: Database,
                                                           tmp_path: Path) -> None:
    """The admin key (and a config's static group keys) act as the admin account: the
    house. Its requests need no balance, are recorded, and create no money."""
    open_account(database, "admin", credit=0)
    async with running(database, tmp_path) as credits:
        house = ctx("r1", 50_000, account_id="admin")
        await credits.authorize(house)  # no balance, yet no 402
        await credits.settle(house, usage())
    assert usage_rows(database)["r1"][:3] == ("ok", 4000, 0)
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM journal")) == 0
    assert check(database) == []


async def test_the_node_owner_earns(database: Database, tmp_path: Path) -> None:
    open_account(database)
    open_account(database, "acct_op", credit=0)
    database.write_sync(lambda tx: tx.run(
        "INSERT INTO node_owners (node_id, account_id, bound_at) VALUES ('node-b', 'acct_op', 0)"))
    async with running(database, tmp_path, fee_bps=2500) as credits:
        await credits.authorize(ctx("r1", 10_000))
        await credits.settle(ctx("r1", 10_000), usage(node="node-b"))
    assert book(database, "earnings:acct_op") == 3000
    assert book(database, FEES) == 1000
    assert usage_rows(database)["r1"][-1] == "acct_op"
    assert check(database) == []


async def test_two_gateways_never_reserve_more_than_the_balance(
        database: Database, database_url: str, tmp_path: Path) -> None:
    """100 concurrent requests over two gateways (two connections to one database)
    whose maximum costs total 4x the balance: what is reserved never exceeds it."""
    balance_µ = 10 * MICROS
    open_account(database, credit=balance_µ)
    other = Database(database_url)
    admitted: list[RequestContext] = []
    refused = 0
    try:
        async with running(database, tmp_path, "gw-a") as a, \
                running(other, tmp_path, "gw-b") as b:

            async def one(i: int) -> None:
                nonlocal refused
                request = ctx(f"r{i}", 400_000)
                try:
                    await (a if i % 2 else b).authorize(request)
                except APIError as exc:
                    assert exc.status == 402
                    refused += 1
                    return
                admitted.append(request)

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
            assert len(admitted) * 400_000 <= balance_µ
            assert len(admitted) + refused == 100
            assert len(admitted) >= 20  # 25 fit; leases may strand a little credit
            async with trio.open_nursery() as nursery:
                for request in admitted:
                    plugin = a if int(request.request_id[1:]) % 2 else b
                    nursery.start_soon(plugin.settle, request, usage(50_000, 100_000))
    finally:
        other.close()
    charged = len(admitted) * 350_000
    assert book(database, f"account:{ACCOUNT}") == balance_µ - charged
    assert summary(database) | {"issued": balance_µ} == summary(database)
    assert summary(database)["open_leases"] == 0
    assert check(database) == []


async def test_a_killed_gateways_lease_is_reconciled_at_its_restart(
        database: Database, tmp_path: Path) -> None:
    open_account(database)
    async with running(database, tmp_path, "gw-a", close=False) as killed:
        await killed.authorize(ctx("r1", 10_000))
        await killed.authorize(ctx("r2", 10_000))
        await killed.settle(ctx("r1", 10_000), usage())  # r2 was in flight: never settled
    assert book(database, f"account:{ACCOUNT}") == 9 * MICROS
    assert check(database) == []  # a lease in use is consistent too
    async with running(database, tmp_path, "gw-a") as restarted:
        # Before serving anything, the restart gave the remainder back.
        assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 4000
        assert summary(database)["open_leases"] == 0
        await restarted.authorize(ctx("r3", 10_000))
    released = database.read_sync(lambda tx: tx.value(
        "SELECT COUNT(*) FROM journal WHERE kind = 'release'"))
    assert released == 2
    assert check(database) == []


async def test_an_expired_lease_is_reconciled_by_another_gateway(
        database: Database, tmp_path: Path) -> None:
    open_account(database)
    now = [1_000_000.0]

    def wall() -> float:
        return now[0]

    async with running(database, tmp_path, "gw-a", close=False, wall=wall) as killed:
        await killed.authorize(ctx("r1", 10_000))
    async with running(database, tmp_path, "gw-b", wall=wall, lease_ttl=60) as other:
        assert await other.leases.reconcile_expired() == []  # not expired yet
        assert book(database, f"account:{ACCOUNT}") == 9 * MICROS
        now[0] += 121  # past the killed gateway's 120 s ttl
        assert len(await other.leases.reconcile_expired()) == 1
        assert book(database, f"account:{ACCOUNT}") == 10 * MICROS
        assert await other.leases.reconcile_expired() == []  # closed once
    assert check(database) == []


async def test_a_settle_on_a_reconciled_lease_charges_the_account(
        database: Database, tmp_path: Path) -> None:
    """The bound: a gateway cut off past its ttl settles a request reserved before;
    the account pays it directly and may end below zero by at most that cost."""
    open_account(database, credit=MICROS)
    now = [1_000_000.0]

    def wall() -> float:
        return now[0]

    async with running(database, tmp_path, "gw-a", wall=wall) as cut_off, \
            running(database, tmp_path, "gw-b", wall=wall) as other:
        await cut_off.authorize(ctx("r1", MICROS))
        now[0] += 121
        await other.leases.reconcile_expired()
        await other.authorize(ctx("r2", MICROS))  # the returned credit, spent again
        await other.settle(ctx("r2", MICROS), usage(0, 1_000_000 // 3))
        await cut_off.settle(ctx("r1", MICROS), usage(1000, 1000))
        assert cut_off.leases.held(ACCOUNT) == 0  # it reserves nothing more from it
    assert book(database, f"account:{ACCOUNT}") == MICROS - 999_999 - 4000
    assert book(database, f"account:{ACCOUNT}") >= -MICROS
    report = check_report(database)
    assert report.violations == []
    assert len(report.warnings) == 1 and "account:acct_alice" in report.warnings[0]


async def test_idle_leases_go_back(database: Database, tmp_path: Path) -> None:
    open_account(database)
    async with running(database, tmp_path, lease_idle=5) as credits:
        await credits.authorize(ctx("r1", 10_000))
        await credits.authorize(ctx("r2", 10_000))
        await credits.settle(ctx("r1", 10_000), usage())
        later = trio.current_time() + 6
        assert await credits.leases.return_idle(now=later) == 0  # r2 still holds it
        await credits.refund(ctx("r2", 10_000), "failed")
        assert await credits.leases.return_idle(now=trio.current_time() + 4) == 0
        assert await credits.leases.return_idle(now=later) == 1
        assert summary(database)["open_leases"] == 0
        assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 4000
        await credits.authorize(ctx("r2", 10_000))  # a new lease when needed again
        assert summary(database)["open_leases"] == 1


async def test_lease_book_refuses_beyond_the_balance(database: Database) -> None:
    open_account(database, credit=5000)
    leases = LeaseBook(database, "gw-x", size=MICROS)
    first = await leases.reserve(ACCOUNT, 4000)  # the lease is the whole balance
    assert book(database, f"account:{ACCOUNT}") == 0
    with pytest.raises(InsufficientFunds):
        await leases.reserve(ACCOUNT, 2000)
    leases.release(first, 0)
    await leases.reserve(ACCOUNT, 5000)
    await leases.close()
    assert book(database, f"account:{ACCOUNT}") == 5000


async def test_settles_on_postgresql_do_not_wait_for_the_wal_flush_unless_asked(
        database: Database, tmp_path: Path) -> None:
    """A settle commit is visible (and survives the gateway) at once; only with
    ``synchronous_commit`` does it wait for PostgreSQL's disk flush."""
    seen: list[str] = []

    def spy(tx: Tx) -> None:
        if tx.dialect == "postgresql":
            seen.append(str(tx.value("SHOW synchronous_commit")))

    for wait in (False, True):
        open_account(database)
        async with running(database, tmp_path, synchronous_commit=wait) as credits:
            original = credits_module.commit

            def watched(tx: Tx, items: list[Any], original: Any = original,
                        look: bool = False) -> list[str]:
                spy(tx)
                return original(tx, items, look=look)

            credits_module.commit = watched  # type: ignore[assignment]
            try:
                await credits.authorize(ctx(f"r-{wait}", 10_000))
                await credits.settle(ctx(f"r-{wait}", 10_000), usage())
            finally:
                credits_module.commit = original  # type: ignore[assignment]
    if database.dialect == "postgresql":
        assert seen == ["off", "on"]
    assert check(database) == []


def test_options_are_validated() -> None:
    assert parse_options({})[1] == MICROS
    assert parse_options({"lease_credits": "0.5", "spend_cap_tokens": 3})[1] == 500_000
    assert parse_options({"lease_credits": 2})[1] == 2 * MICROS
    for bad in ({"fee_bps": 10_001}, {"fee_bps": -1}, {"lease_credits": "abc"},
                {"lease_credits": 0}, {"lease_ttl": 0}, {"lease_idle": "x"}):
        with pytest.raises(ValueError):
            parse_options(bad)


async def test_leases_are_renewed_while_held(database: Database, tmp_path: Path) -> None:
    open_account(database)
    now = [1_000_000.0]

    def wall() -> float:
        return now[0]

    def expires() -> float:
        return float(database.read_sync(lambda tx: tx.value("SELECT expires_at FROM leases")))

    async with running(database, tmp_path, "gw-a", wall=wall) as a, \
            running(database, tmp_path, "gw-b", wall=wall) as b:
        await a.authorize(ctx("r1", 10_000))
        lease = a.leases._current[ACCOUNT]
        assert expires() == now[0] + 120
        now[0] += 100
        await a.leases.renew()
        assert expires() == now[0] + 120
        now[0] += 100
        assert await b.leases.reconcile_expired() == []  # renewed: not expired
        # Past its local deadline (renewals failed), the lease is renewed on the next
        # reservation, since it is still open, instead of being stranded.
        lease.deadline = 0.0
        await a.authorize(ctx("r2", 10_000))
        assert a.leases._current[ACCOUNT] is lease and expires() == now[0] + 120
        # Reconciled by another gateway: the next renewal finds it gone and drops it.
        now[0] += 121
        assert await b.leases.reconcile_expired() == [lease.id]
        await a.leases.renew()
        assert ACCOUNT not in a.leases._current
        await a.settle(ctx("r1", 10_000), usage())
        await a.refund(ctx("r2", 10_000), "failed")
    assert check(database) == []


# ------------------------------------------------------------ review fixes (money side)


class Flaky:
    """A :class:`Database` whose writes (and, while ``down``, reads) fail on demand:
    ``fail(fn)`` decides per write; ``writes`` counts the writes of a lease growing."""

    def __init__(self, db: Database, fail: Callable[[Any], bool] = lambda fn: False) -> None:
        self.db = db
        self.fail = fail
        self.down = False
        self.writes = 0

    async def write(self, fn: Callable[[Tx], Any]) -> Any:
        if "_grow" in getattr(fn, "__qualname__", ""):
            self.writes += 1
        if self.down or self.fail(fn):
            raise DatabaseError("the database is away")
        return await self.db.write(fn)

    def try_write_now(self, fn: Callable[[Tx], Any]) -> tuple[bool, Any]:  # a settle's own
        if self.down or self.fail(fn):
            raise DatabaseError("the database is away")
        return self.db.try_write_now(fn)

    async def read(self, fn: Callable[[Tx], Any]) -> Any:
        if self.down:
            raise DatabaseError("the database is away")
        return await self.db.read(fn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


# Tests on trio's autojump clock take leases that never expire (lease_ttl=1e6): the
# clock jumps while a database call runs in its thread, which could otherwise carry a
# fresh lease past its local deadline before it is used.


def is_settle_batch(fn: Any) -> bool:
    return isinstance(fn, functools.partial) and getattr(fn.func, "__name__", "") in (
        "commit", "_commit")


def holds(credits: Credits) -> int:
    return sum(lease.holds for lease in credits.leases._leases.values())


def quarantine_rows(db: Database) -> list[str]:
    return [row[0] for row in db.read_sync(lambda tx: tx.all(
        "SELECT request_id FROM usage_quarantine ORDER BY request_id"))]


async def test_an_outage_keeps_settles_in_memory_until_written(
    database: Database, tmp_path: Path, autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finding 3: while the database is away, settles wait in memory (retried with
    backoff) instead of being quarantined as free requests; a settle cut off by its
    caller's timeout, even past the queue's bound, is still written and its reservation
    released; past the bound new requests are refused (503), not served unbilled."""
    monkeypatch.setattr(credits_module, "QUEUE", 2)
    open_account(database)
    async with running(database, tmp_path, lease_ttl=1e6) as credits:
        flaky = Flaky(database)
        credits.db = cast(Database, flaky)
        for i in range(3):
            await credits.authorize(ctx(f"r{i}", 10_000))
        flaky.down = True
        for i in range(3):  # each settle cut off (the pipeline's SETTLE_TIMEOUT)
            with trio.move_on_after(5):
                await credits.settle(ctx(f"r{i}", 10_000), usage())
        assert credits.backlog == 3
        with pytest.raises(APIError) as refused:
            await credits.authorize(ctx("r3", 10_000))
        assert (refused.value.status, refused.value.code) == (503, "billing_unavailable")
        assert usage_rows(database) == {}
        flaky.down = False
        await credits.flush()
        assert credits.backlog == 0
        assert holds(credits) == 0  # every reservation released once written
    rows = usage_rows(database)
    assert sorted(rows) == ["r0", "r1", "r2"]
    assert all(row[:3] == ("ok", 4000, 4000) for row in rows.values())
    assert quarantine_rows(database) == []
    assert not (tmp_path / credits_module.QUARANTINE_FILE).exists()
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 3 * 4000
    assert check(database) == []


async def test_quarantined_settles_fail_the_check_and_replay_once(
    database: Database, tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    """Finding 3: a request the database keeps refusing (while it answers) is
    quarantined; ``ledger check`` reports it; the replay bills it exactly once (a second
    replay, or a replay of a row written meanwhile, moves nothing)."""
    open_account(database)
    open_account(database, "acct_op", credit=0)
    async with running(database, tmp_path, fee_bps=1000, lease_ttl=1e6) as credits:
        flaky = Flaky(database, is_settle_batch)
        credits.db = cast(Database, flaky)
        await credits.authorize(ctx("r1", 10_000))
        await credits.settle(ctx("r1", 10_000), usage(node="node-a"))
        credits.db = database
        assert holds(credits) == 0
    assert quarantine_rows(database) == ["r1"]
    assert "r1" not in usage_rows(database)
    violations = check(database)
    assert violations[0].startswith("quarantined requests, not billed yet (run tooti ledger "
                                    "replay): r1 (DatabaseError: the database is away)")
    # The lease went back with r1's credit: the replay charges the account directly.
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS
    report = await credits_module.replay_quarantine(database)
    assert (report.replayed, report.already, report.failed) == (["r1"], [], [])
    assert usage_rows(database)["r1"] == ("ok", 4000, 4000, 3600, 400, "admin")
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 4000
    assert check(database) == []
    again = await credits_module.replay_quarantine(database)
    assert (again.replayed, again.already, again.failed) == ([], [], [])
    # A row quarantined although it was written (the commit's answer was lost):
    row_json = json.dumps({**dict(zip(credits_module.COLUMNS,
                                      database.read_sync(lambda tx: tx.one(
                                          f"SELECT {', '.join(credits_module.COLUMNS)} "
                                          "FROM usage WHERE request_id = 'r1'")),
                                      strict=True))})
    database.write_sync(lambda tx: tx.run(
        "INSERT INTO usage_quarantine (request_id, ts, error, row_json) VALUES "
        "('r1', 0, 'lost answer', ?)", (row_json,)))
    third = await credits_module.replay_quarantine(database)
    assert (third.replayed, third.already) == ([], ["r1"])
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 4000
    assert quarantine_rows(database) == []
    assert check(database) == []


async def test_the_quarantine_file_is_replayed_too(
    database: Database, tmp_path: Path, autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing while the database takes nothing (not even the quarantine table): the
    request goes to usage-quarantine.jsonl, and the replay imports and bills it."""
    monkeypatch.setattr(credits_module, "FLUSH_TIMEOUT", 3.0)
    open_account(database)
    credits_db = Flaky(database)
    async with running(database, tmp_path, lease_ttl=1e6) as credits:
        await credits.authorize(ctx("r1", 10_000))
        credits.db = cast(Database, credits_db)
        credits_db.down = True
        with trio.move_on_after(1):
            await credits.settle(ctx("r1", 10_000), usage())
    lines = (tmp_path / credits_module.QUARANTINE_FILE).read_text().splitlines()
    assert len(lines) == 1 and "r1" in lines[0]
    report = await credits_module.replay_quarantine(database, tmp_path)
    assert (report.imported, report.replayed) == (1, ["r1"])
    assert not (tmp_path / credits_module.QUARANTINE_FILE).exists()
    assert usage_rows(database)["r1"][:3] == ("ok", 4000, 4000)
    assert book(database, f"account:{ACCOUNT}") == 10 * MICROS - 4000
    assert check(database) == []


async def test_a_402_costs_one_write_then_none_for_a_second(
    database: Database, tmp_path: Path, mock_clock: trio.testing.MockClock,
) -> None:
    """Finding 7: a short balance is final (not retried) and remembered for SHORT_TTL;
    a smaller request still tries, and credit_changed forgets it at once."""
    open_account(database, credit=3000)
    async with running(database, tmp_path, lease_ttl=1e6) as credits:
        flaky = Flaky(database)
        credits.leases.db = cast(Database, flaky)
        for _ in range(5):
            with pytest.raises(APIError) as refused:
                await credits.authorize(ctx("r1", 5000))
            assert refused.value.status == 402
        assert flaky.writes == 1
        await credits.authorize(ctx("r2", 2000))  # fits: goes to the database
        assert flaky.writes == 2
        await credits.refund(ctx("r2", 2000), "failed")
        with pytest.raises(APIError):
            await credits.authorize(ctx("r3", 5000))
        assert flaky.writes == 3
        open_account(database, credit=5000)  # a top-up
        with pytest.raises(APIError):  # still remembered as short ...
            await credits.authorize(ctx("r4", 5000))
        assert flaky.writes == 3
        credits.credit_changed(ACCOUNT)  # ... until told
        await credits.authorize(ctx("r4", 5000))
        assert flaky.writes == 4
        await credits.refund(ctx("r4", 5000), "failed")
        with pytest.raises(APIError):
            await credits.authorize(ctx("r5", 50_000))
        assert flaky.writes == 5
        mock_clock.jump(leases_module.SHORT_TTL / 2)
        with pytest.raises(APIError):
            await credits.authorize(ctx("r6", 50_000))
        assert flaky.writes == 5
        mock_clock.jump(leases_module.SHORT_TTL / 2)  # forgotten after SHORT_TTL
        with pytest.raises(APIError):
            await credits.authorize(ctx("r7", 50_000))
        assert flaky.writes == 6
    assert check(database) == []


async def test_the_serving_peers_owner_earns_and_no_default_is_cached(
    database: Database, tmp_path: Path,
) -> None:
    """Finding 8: the owner the gateway knew at settle time earns (no node_owners row
    needed yet); without one, a row written after the node's first request counts."""
    open_account(database)
    for operator in ("acct_op", "acct_op2"):
        open_account(database, operator, credit=0)
    async with running(database, tmp_path) as credits:
        await credits.authorize(ctx("r1", 10_000))
        await credits.settle(ctx("r1", 10_000), msgspec.structs.replace(
            usage(node="node-new"), owner="acct_op"))
        await credits.authorize(ctx("r2", 10_000))
        await credits.settle(ctx("r2", 10_000), usage(node="node-x"))  # no row: admin
        database.write_sync(lambda tx: tx.run(
            "INSERT INTO node_owners (node_id, account_id, bound_at) "
            "VALUES ('node-x', 'acct_op2', 0)"))
        await credits.authorize(ctx("r3", 10_000))
        await credits.settle(ctx("r3", 10_000), usage(node="node-x"))
    rows = usage_rows(database)
    assert [rows[r][5] for r in ("r1", "r2", "r3")] == ["acct_op", "admin", "acct_op2"]
    assert book(database, "earnings:acct_op") == 4000
    assert book(database, "earnings:acct_op2") == 4000
    assert book(database, "earnings:admin") == 4000
    assert check(database) == []


async def test_the_proxy_hands_the_peers_owner_to_billing() -> None:
    outcome = Outcome(served=True, node_id="node-a", model="m", owner="acct_op",
                      status="ok")
    assert usage_from(outcome, 100, 0.0).owner == "acct_op"


class Recorder:
    """A Tx that records every statement it runs."""

    def __init__(self, tx: Tx, log: list[str]) -> None:
        self._tx = tx
        self._log = log

    def run(self, sql: str, params: Any = ()) -> int:
        self._log.append(f"{sql} {params}")
        return self._tx.run(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)


async def test_reconciling_locks_every_lease_before_any_book(database: Database) -> None:
    """Finding 13: closing several leases locks all their rows (in id order) before any
    book, the order settle batches lock in (else PostgreSQL can deadlock them)."""
    now = [1_000_000.0]
    for account in ("acct_a", "acct_b"):
        open_account(database, account)
    killed = LeaseBook(database, "gw-a", ttl=10, wall=lambda: now[0])
    for account in ("acct_a", "acct_b"):
        await killed.reserve(account, 5000)
    lease_ids = sorted(lease.id for lease in killed._leases.values())
    now[0] += 60
    statements: list[str] = []
    real_write = database.write

    async def recording(fn: Callable[[Tx], Any]) -> Any:
        return await real_write(lambda tx: fn(cast(Tx, Recorder(tx, statements))))

    other = LeaseBook(database, "gw-b", ttl=10, wall=lambda: now[0])
    other.db = cast(Database, SimpleNamespace(write=recording))
    assert sorted(await other.reconcile_expired()) == lease_ids
    first_book = next(i for i, sql in enumerate(statements)
                      if "books" in sql or "journal" in sql)
    locked = [i for i, sql in enumerate(statements)
              if sql.startswith("UPDATE leases") and any(lid in sql for lid in lease_ids)]
    assert {lid for i in locked[:2] for lid in lease_ids if lid in statements[i]} == set(
        lease_ids)
    assert locked[1] < first_book
    assert [lid for lid in lease_ids if lid in statements[locked[0]]] == lease_ids[:1]
    assert check(database) == []


async def test_a_renewal_without_new_credit_posts_no_empty_entry(
    database: Database, autojump_clock: trio.testing.MockClock,
) -> None:
    """Finding 16: a lease past its deadline that still covers the request is renewed
    without a journal entry (there was one without lines)."""
    open_account(database)
    leases = LeaseBook(database, "gw-a", ttl=3)
    first = await leases.reserve(ACCOUNT, 100)
    leases.release(first, 0)
    await trio.sleep(3)  # past the local deadline (2/3 ttl), no renewal running
    await leases.reserve(ACCOUNT, 100)
    assert database.read_sync(lambda tx: tx.value(
        "SELECT COUNT(*) FROM journal j WHERE NOT EXISTS "
        "(SELECT 1 FROM journal_lines l WHERE l.entry_id = j.id)")) == 0
    assert database.read_sync(lambda tx: tx.value(
        "SELECT COUNT(*) FROM journal WHERE kind = 'lease'")) == 1
    await leases.close()
    assert check(database) == []


def test_lease_credits_is_never_a_float() -> None:
    with pytest.raises(ValueError, match="not a float"):
        parse_options({"lease_credits": 0.5})
    assert parse_options({"lease_credits": "0.5"})[1] == 500_000


async def test_a_quarantine_file_is_imported_at_start(
    database: Database, tmp_path: Path,
) -> None:
    """What a previous run could only write to usage-quarantine.jsonl reaches the table
    when the plugin starts, so the ledger check and the admin API's replay see it."""
    record = {column: 0 for column in credits_module.COLUMNS}
    record.update(request_id="r9", account_id="", key_id="k", model="m", node_id="",
                  owner_id="", endpoint="e", lease_id="", status="failed")
    (tmp_path / credits_module.QUARANTINE_FILE).write_text(
        json.dumps({"error": "disk", "row": json.dumps(record)}) + "\n")
    async with running(database, tmp_path) as credits:
        await credits.flush()
    assert quarantine_rows(database) == ["r9"]
    assert not (tmp_path / credits_module.QUARANTINE_FILE).exists()
    report = await credits_module.replay_quarantine(database)
    assert report.replayed == ["r9"] and usage_rows(database)["r9"][0] == "failed"
    assert check(database) == []


async def test_an_idle_writer_lets_a_settle_write_its_own_batch(
    database: Database, tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    """Alone in flight with nothing being written: on SQLite a settle commits its row
    in its own task (run() is not even running here) and returns with it committed;
    PostgreSQL leaves every write to run(). With another request in flight, or after a
    failed batch, it leaves the write to run() (which gathers concurrent records into
    one batch, and retries with backoff)."""
    setup = BillingSetup(tmp_path, {}, database=database, gateway_id="gw-a")
    credits = Credits(setup)
    try:
        await credits.authorize(ctx("r1", 0, account_id=""))
        with trio.move_on_after(1) as waited:
            await credits.settle(ctx("r1", 0, account_id=""), usage())
        if database.dialect == "sqlite":
            assert not waited.cancelled_caught and usage_rows(database)["r1"][0] == "ok"
        else:  # a network round trip: never on the loop's thread
            assert waited.cancelled_caught and credits.backlog == 1
            await credits.flush()  # (what run() would do)
            assert usage_rows(database)["r1"][0] == "ok"
        for rid in ("r0", "r9"):
            await credits.authorize(ctx(rid, 0, account_id=""))
        with trio.move_on_after(1):  # r0 still in flight: r9's record waits for run()
            await credits.settle(ctx("r9", 0, account_id=""), usage())
        assert credits.backlog == 1 and "r9" not in usage_rows(database)
        await credits.refund(ctx("r0", 0, account_id=""), "failed")
        await credits.flush()  # (what run() would do)
        assert {"r0", "r9"} <= set(usage_rows(database))
        flaky = Flaky(database, is_settle_batch)
        credits.db = cast(Database, flaky)
        with trio.move_on_after(1):  # refused: kept for run(), the settle waits
            await credits.settle(ctx("r2", 0, account_id=""), usage())
        assert credits.backlog == 1 and not credits._healthy
        credits.db = database
        with trio.move_on_after(1):  # unhealthy: no write of its own, waits for run()
            await credits.settle(ctx("r3", 0, account_id=""), usage())
        assert credits.backlog == 2 and "r3" not in usage_rows(database)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(credits.run)
            await credits.flush()
            nursery.cancel_scope.cancel()
        assert {"r1", "r2", "r3"} <= set(usage_rows(database))
        assert credits._healthy and not credits._open
    finally:
        await credits.close()
