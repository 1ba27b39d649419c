"""The console's accounts layer on SQLite and PostgreSQL: argon2id passwords with the
lockout (concurrent failures too), the dummy hash for unknown names, one-time login
links (single use under concurrent consumes), console sessions (expiry, revoke, log
out everywhere, a password change ends them, a suspension hides them), the cookie key
shared by gateways, the reports' UTC day buckets and per-account isolation, and the
TTFT a request's usage row records (and a quarantined row from before the column)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import trio

from tooti.accounts import reports
from tooti.accounts.console_sessions import SEEN_EVERY, ConsoleSessions
from tooti.accounts.database import Database, Tx
from tooti.accounts.login_links import LoginLinks
from tooti.accounts.passwords import LoginRefused, Passwords, subject_of
from tooti.accounts.records import AccountInfo
from tooti.accounts.service import AccountService
from tooti.billing.base import BillingSetup, Outcome, RequestContext
from tooti.billing.credits import COLUMNS, Credits, replay_quarantine
from tooti.billing.pipeline import usage_from
from tooti.errors import APIError

T0 = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC
DAY = 86400.0
PASSWORD = "correct horse battery"


class Wall:
    """A wall clock the test moves."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def service(database: Database) -> AccountService:
    return AccountService(database)


async def gather(calls: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run every call at once; each result or the exception it raised."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except (LoginRefused, APIError) as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return results


async def refused(reason: str, call: Awaitable[Any]) -> LoginRefused:
    with pytest.raises(LoginRefused) as caught:
        await call
    assert caught.value.reason == reason
    return caught.value


# ------------------------------------------------------------ passwords

async def test_password_is_argon2id_and_checks(database: Database,
                                               service: AccountService) -> None:
    alice = await service.create_account("alice")
    passwords = Passwords(database)
    assert not await passwords.has_password(alice.id)
    await refused("credentials", passwords.check("alice", PASSWORD))  # none set yet
    await passwords.set_password(alice.id, PASSWORD)
    assert await passwords.has_password(alice.id)
    stored = database.read_sync(lambda tx: tx.value(
        "SELECT password_hash FROM accounts WHERE id = ?", (alice.id,)))
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert (await passwords.check("alice", PASSWORD)).id == alice.id
    assert (await passwords.check(alice.id, PASSWORD)).id == alice.id
    await refused("credentials", passwords.check("alice", PASSWORD + "!"))
    for bad in ("short", "x" * (Passwords.MAX_LENGTH + 1), "nul\x00inside password"):
        with pytest.raises(ValueError):
            await passwords.set_password(alice.id, bad)
    with pytest.raises(APIError):
        await passwords.set_password("acct_missing", PASSWORD)


async def test_unknown_name_verifies_a_dummy_hash(database: Database,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    passwords = Passwords(database)
    verified: list[str] = []
    real = passwords._verify_sync

    def spy(encoded: str, password: str) -> bool:
        verified.append(encoded)
        return real(encoded, password)

    monkeypatch.setattr(passwords, "_verify_sync", spy)
    await refused("credentials", passwords.check("nobody", PASSWORD))
    await refused("credentials", passwords.check("", PASSWORD))
    await refused("credentials", passwords.check("nul\x00name", PASSWORD))
    assert len(verified) == 3 and all(h.startswith("$argon2id$") for h in verified)


async def test_migration_2_upgrades_a_database_with_rows(
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tooti.accounts import database as database_module
    from tooti.accounts.schema import MIGRATIONS

    monkeypatch.setattr(database_module, "MIGRATIONS", MIGRATIONS[:1])
    old = Database(database_url)
    assert old.version == 1
    row = usage_row("before", T0, "acct_x", "m")
    del row["ttft_ms"]
    insert(old, [row])
    old.close()
    monkeypatch.setattr(database_module, "MIGRATIONS", MIGRATIONS)
    new = Database(database_url)
    try:
        assert new.version == 2
        assert new.read_sync(lambda tx: tx.one(
            "SELECT request_id, ttft_ms FROM usage")) == ("before", None)
        Database(database_url).close()  # opening again applies nothing twice
        assert new.version == 2
    finally:
        new.close()


async def test_lockout_after_failures_and_reset(database: Database, service: AccountService,
                                                wall: Wall) -> None:
    bob = await service.create_account("bob")
    passwords = Passwords(database, max_failures=3, window=60.0, lock_seconds=120.0,
                          wall=wall)
    await passwords.set_password(bob.id, PASSWORD)
    await refused("credentials", passwords.check("bob", "wrong password 1"))
    await refused("credentials", passwords.check("bob", "wrong password 2"))
    assert (await passwords.check("bob", PASSWORD)).id == bob.id  # a success resets
    for _ in range(2):
        await refused("credentials", passwords.check("bob", "wrong password"))
    locked = await refused("locked", passwords.check("bob", "wrong password"))
    assert locked.retry_after == pytest.approx(120.0)
    wall.t += 100
    locked = await refused("locked", passwords.check("bob", PASSWORD))  # right one too
    assert locked.retry_after == pytest.approx(20.0)
    wall.t += 21
    assert (await passwords.check("bob", PASSWORD)).id == bob.id
    # failures spread wider than the window never lock
    for _ in range(5):
        await refused("credentials", passwords.check("bob", "wrong password"))
        wall.t += 61
    assert (await passwords.check("bob", PASSWORD)).id == bob.id


async def test_concurrent_failures_lock(database: Database, service: AccountService,
                                        wall: Wall) -> None:
    carol = await service.create_account("carol")
    passwords = Passwords(database, wall=wall)  # the defaults: 5 in 15 min, 15 min
    await passwords.set_password(carol.id, PASSWORD)
    results = await gather([lambda: passwords.check("carol", "guess guess guess")] * 8)
    assert all(isinstance(r, LoginRefused) for r in results)
    assert any(r.reason == "locked" for r in results)
    locked = await refused("locked", passwords.check("carol", PASSWORD))
    assert 0 < locked.retry_after <= 900.0
    # a right password racing wrong ones never gets through once they lock
    wall.t += 901
    calls = [lambda: passwords.check("carol", "guess guess guess")] * 5
    await gather(calls)
    await refused("locked", passwords.check("carol", PASSWORD))


async def test_suspended_account_refused_after_its_password(
        database: Database, service: AccountService) -> None:
    dave = await service.create_account("dave")
    passwords = Passwords(database)
    await passwords.set_password(dave.id, PASSWORD)
    await service.set_status(dave.id, "suspended")
    await refused("credentials", passwords.check("dave", "not the password"))
    await refused("suspended", passwords.check("dave", PASSWORD))


def failure_rows(database: Database) -> dict[str, tuple[int, float | None]]:
    return {str(r[0]): (int(r[1]), r[2]) for r in database.read_sync(lambda tx: tx.all(
        "SELECT subject, failures, locked_until FROM login_failures"))}


async def test_unknown_names_count_and_lock_like_accounts(
        database: Database, service: AccountService, wall: Wall,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bob = await service.create_account("bob")
    passwords = Passwords(database, max_failures=3, window=60.0, lock_seconds=120.0,
                          wall=wall)
    await passwords.set_password(bob.id, PASSWORD)
    writes: list[str] = []
    real_write = database.write

    async def counted(fn: Callable[[Tx], Any]) -> Any:
        writes.append(getattr(fn, "__name__", "?"))
        return await real_write(fn)

    monkeypatch.setattr(database, "write", counted)
    # a wrong password and an unknown name do the same writes (no timing tell)
    await refused("credentials", passwords.check("bob", "wrong password"))
    on_account, writes[:] = list(writes), []
    await refused("credentials", passwords.check("ghost", "wrong password"))
    assert writes == on_account and len(on_account) == 2  # the count, the purge
    # both lock after max_failures, the same way (no enumeration by lockout)
    await refused("credentials", passwords.check(bob.id, "x" * 2000))  # id = name
    await refused("credentials", passwords.check("ghost", "wrong password"))
    bob_locked = await refused("locked", passwords.check("bob", "wrong password"))
    ghost_locked = await refused("locked", passwords.check("ghost", "wrong password"))
    assert bob_locked.retry_after == ghost_locked.retry_after == pytest.approx(120.0)
    await refused("locked", passwords.check("bob", PASSWORD))
    rows = failure_rows(database)
    assert set(rows) == {subject_of("bob"), subject_of("ghost")}  # no typed text stored
    assert all(until == wall.t + 120.0 for _, until in rows.values())
    wall.t += 121
    assert (await passwords.check(bob.id, PASSWORD)).id == bob.id
    assert set(failure_rows(database)) == {subject_of("ghost")}


async def test_login_failures_stay_bounded(database: Database, wall: Wall) -> None:
    passwords = Passwords(database, max_failures=2, window=60.0, lock_seconds=300.0,
                          max_subjects=3, wall=wall)
    await refused("credentials", passwords.check("a1", "wrong password"))
    await refused("credentials", passwords.check("a2", "wrong password"))
    await refused("locked", passwords.check("a2", "wrong password"))  # for 300 s
    assert failure_rows(database)[subject_of("a2")][1] == wall.t + 300.0
    # a spray of new names: the oldest unlocked rows go beyond the cap, never a lock
    for i in range(6):
        wall.t += 1
        await refused("credentials", passwords.check(f"spray{i}", "wrong password"))
        rows = failure_rows(database)
        assert len(rows) <= 3 and subject_of("a2") in rows
        assert subject_of(f"spray{i}") in rows
    await refused("locked", passwords.check("a2", PASSWORD))
    # rows whose window and lock have passed are deleted by the next failure
    wall.t += 301
    await refused("credentials", passwords.check("late", "wrong password"))
    assert set(failure_rows(database)) == {subject_of("late")}


async def test_outdated_hash_is_upgraded_after_a_right_password(
        database: Database, service: AccountService, wall: Wall) -> None:
    from argon2 import PasswordHasher

    kim = await service.create_account("kim")
    sessions = ConsoleSessions(database, wall=wall)
    passwords = Passwords(database, wall=wall)
    await passwords.set_password(kim.id, PASSWORD)
    session, _ = await sessions.create(kim.id)
    old = PasswordHasher(time_cost=1, memory_cost=8192).hash(PASSWORD)
    database.write_sync(lambda tx: tx.run(
        "UPDATE accounts SET password_hash = ? WHERE id = ?", (old, kim.id)))
    stored = lambda: str(database.read_sync(lambda tx: tx.value(  # noqa: E731
        "SELECT password_hash FROM accounts WHERE id = ?", (kim.id,))))
    await refused("credentials", passwords.check("kim", "not the password"))
    assert stored() == old  # a wrong password changes nothing
    assert (await passwords.check("kim", PASSWORD)).id == kim.id
    upgraded = stored()
    assert upgraded != old and not PasswordHasher().check_needs_rehash(upgraded)
    assert PasswordHasher().verify(upgraded, PASSWORD)
    assert await sessions.lookup(session) is not None  # sessions stay
    assert (await passwords.check("kim", PASSWORD)).id == kim.id
    assert stored() == upgraded  # a current hash is not rewritten


# ------------------------------------------------------------ login links

async def test_login_link_single_use_under_concurrency(
        database: Database, service: AccountService, wall: Wall) -> None:
    erin = await service.create_account("erin")
    links = LoginLinks(database, wall=wall)
    secret = await links.mint(erin.id)
    assert secret.startswith(LoginLinks.PREFIX)
    stored = database.read_sync(lambda tx: tx.all("SELECT * FROM login_links"))
    assert not any(secret in str(v) for row in stored for v in row)
    results = await gather([lambda: links.consume(secret)] * 8)
    winners = [r for r in results if isinstance(r, AccountInfo)]
    assert [w.id for w in winners] == [erin.id]
    assert all(r.reason == "link" for r in results if isinstance(r, LoginRefused))
    await refused("link", links.consume(secret))


async def test_login_link_expiry_shape_and_suspension(
        database: Database, service: AccountService, wall: Wall) -> None:
    frank = await service.create_account("frank")
    links = LoginLinks(database, wall=wall)
    short = await links.mint(frank.id, ttl=10)
    wall.t += 11
    await refused("link", links.consume(short))
    for bad in ("", "tl-tooti-short", "sk-tooti-" + "a" * 43, short + "x"):
        await refused("link", links.consume(bad))
    with pytest.raises(ValueError):
        await links.mint(frank.id, ttl=0)
    with pytest.raises(APIError):
        await links.mint("acct_missing")
    live = await links.mint(frank.id)
    await service.set_status(frank.id, "suspended")
    await refused("suspended", links.consume(live))
    with pytest.raises(APIError) as caught:
        await links.mint(frank.id)
    assert caught.value.status == 403


# ------------------------------------------------------------ sessions

async def test_sessions_expire_and_revoke(database: Database, service: AccountService,
                                          wall: Wall) -> None:
    gina = await service.create_account("gina")
    sessions = ConsoleSessions(database, wall=wall)
    token, csrf = await sessions.create(gina.id, ttl=100)
    assert len(token) >= 43 and len(csrf) >= 43 and token != csrf
    assert not database.read_sync(lambda tx: tx.all(
        "SELECT 1 FROM console_sessions WHERE hash = ?", (token,)))
    info = await sessions.lookup(token)
    assert info is not None and info.account.id == gina.id and info.csrf == csrf
    assert info.expires_at == wall.t + 100
    assert await sessions.lookup(token + "x") is None
    assert await sessions.lookup("") is None
    wall.t += SEEN_EVERY + 1
    assert await sessions.lookup(token) is not None
    assert database.read_sync(lambda tx: tx.value(
        "SELECT last_seen FROM console_sessions")) == wall.t
    wall.t += 100
    assert await sessions.lookup(token) is None  # expired
    second, _ = await sessions.create(gina.id)
    await sessions.revoke(second)
    assert await sessions.lookup(second) is None


async def test_revoke_all_password_change_and_suspension(
        database: Database, service: AccountService, wall: Wall) -> None:
    hana = await service.create_account("hana")
    ivan = await service.create_account("ivan")
    sessions = ConsoleSessions(database, wall=wall)
    passwords = Passwords(database, wall=wall)
    hana_tokens = [(await sessions.create(hana.id))[0] for _ in range(3)]
    ivan_token, _ = await sessions.create(ivan.id)
    assert await sessions.revoke_all(hana.id) == 3
    assert all([await sessions.lookup(t) is None for t in hana_tokens])
    assert await sessions.lookup(ivan_token) is not None  # another account's untouched
    again, _ = await sessions.create(hana.id)
    await passwords.set_password(hana.id, PASSWORD)  # logs out everywhere
    assert await sessions.lookup(again) is None
    assert await sessions.lookup(ivan_token) is not None
    await service.set_status(ivan.id, "suspended")
    assert await sessions.lookup(ivan_token) is None
    await refused("suspended", sessions.create(ivan.id))
    await service.set_status(ivan.id, "active")
    assert await sessions.lookup(ivan_token) is not None


async def test_secret_key_shared(database: Database) -> None:
    first, second = ConsoleSessions(database), ConsoleSessions(database)
    keys = await gather([first.secret_key, second.secret_key])
    assert keys[0] == keys[1] and len(keys[0]) >= 43
    assert await ConsoleSessions(database).secret_key() == keys[0]


# ------------------------------------------------------------ reports and TTFT

def usage_row(request_id: str, ts: float, account: str, model: str, *, owner: str = "",
              node: str = "n1", charged: int = 0, earned: int = 0,
              ttft: float | None = None) -> dict[str, Any]:
    return {"request_id": request_id, "ts": ts, "account_id": account, "key_id": "key_1",
            "model": model, "node_id": node, "owner_id": owner, "endpoint": "chat",
            "stream": 1, "prompt_tokens": 10, "completion_tokens": 5, "estimated": 0,
            "price_input": 0, "price_output": 0, "cost": charged, "charged": charged,
            "earned": earned, "fee": charged - earned, "lease_id": "", "status": "ok",
            "latency_ms": 12.5, "ttft_ms": ttft}


def insert(db: Database, rows: list[dict[str, Any]]) -> None:
    def run(tx: Tx) -> None:
        for row in rows:
            tx.run(f"INSERT INTO usage ({', '.join(row)}) VALUES "
                   f"({', '.join('?' * len(row))})", list(row.values()))
    db.write_sync(run)


async def test_reports_day_buckets_and_isolation(database: Database,
                                                 service: AccountService) -> None:
    user = await service.create_account("user1")
    other = await service.create_account("user2")
    op = await service.create_account("op1", "operator")
    midnight = (T0 // DAY + 1) * DAY  # the next UTC midnight
    insert(database, [
        usage_row("r1", midnight - 1, user.id, "m-a", owner=op.id, charged=100, earned=90),
        usage_row("r2", midnight - 2, user.id, "m-a", owner=op.id, charged=50, earned=45),
        usage_row("r3", midnight, user.id, "m-a", owner=op.id, charged=7, earned=6,
                  ttft=33.5),
        usage_row("r4", midnight + 5, user.id, "m-b", node="n2", owner=op.id, charged=1,
                  earned=1),
        usage_row("r5", midnight + 6, other.id, "m-a", charged=999),
        usage_row("old", midnight - 40 * DAY, user.id, "m-a", charged=5),
    ])
    days = await reports.usage_by_day(database, user.id, days=30, now=midnight + 10)
    assert [(d.day, d.model, d.requests, d.charged, d.prompt_tokens) for d in days] == [
        ("2026-05-28", "m-a", 2, 150, 20), ("2026-05-29", "m-a", 1, 7, 10),
        ("2026-05-29", "m-b", 1, 1, 10)]
    today = await reports.usage_by_day(database, user.id, days=1, now=midnight + 10)
    assert {d.day for d in today} == {"2026-05-29"}
    theirs = await reports.usage_by_day(database, other.id, now=midnight + 10)
    assert [(d.requests, d.charged) for d in theirs] == [(1, 999)]
    recent = await reports.recent_requests(database, user.id, limit=3)
    assert [r.request_id for r in recent] == ["r4", "r3", "r1"]
    assert recent[1].ttft_ms == 33.5 and recent[0].ttft_ms is None and recent[0].stream
    assert all(r.request_id != "r5" for r in
               await reports.recent_requests(database, user.id))
    earned = await reports.earnings_by_day(database, op.id, now=midnight + 10)
    assert [(e.day, e.node_id, e.requests, e.tokens, e.earned) for e in earned] == [
        ("2026-05-28", "n1", 2, 30, 135), ("2026-05-29", "n1", 1, 15, 6),
        ("2026-05-29", "n2", 1, 15, 1)]
    assert await reports.earnings_by_day(database, user.id, now=midnight) == []
    with pytest.raises(ValueError):
        await reports.usage_by_day(database, user.id, days=0)
    database.write_sync(lambda tx: tx.run(
        "INSERT INTO node_owners (node_id, account_id, bound_at) VALUES (?, ?, ?)",
        ("node-x", op.id, T0)))
    assert [(n.node_id, n.group) for n in await reports.nodes_of(database, op.id)] == [
        ("node-x", "")]
    assert await reports.nodes_of(database, user.id) == []


async def test_ttft_recorded_and_old_quarantine_replays(database: Database,
                                                        tmp_path: Any) -> None:
    outcome = Outcome(served=True, node_id="n1", model="m", status="ok", ttft_ms=41.25)
    usage = usage_from(outcome, 400, trio.current_time())
    assert usage.ttft_ms == 41.25
    credits = Credits(BillingSetup(data_dir=tmp_path, database=database))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(credits.run)
        await credits.settle(RequestContext(request_id="req-ttft", key_id="k", model="m",
                                            endpoint="chat", stream=True), usage)
        await credits.refund(RequestContext(request_id="req-none", key_id="k", model="m",
                                            endpoint="chat", stream=False), "no node")
        await credits.flush()
        nursery.cancel_scope.cancel()
    await credits.close()
    stored: dict[str, float | None] = dict(database.read_sync(lambda tx: tx.all(
        "SELECT request_id, ttft_ms FROM usage")))
    assert stored == {"req-ttft": 41.25, "req-none": None}
    # a row quarantined before the column existed has no ttft_ms: it replays as NULL
    record = usage_row("req-old", T0, "", "m")
    del record["ttft_ms"]
    assert set(record) == set(COLUMNS) - {"ttft_ms"}
    database.write_sync(lambda tx: tx.run(
        "INSERT INTO usage_quarantine (request_id, ts, error, row_json) VALUES (?, ?, ?, ?)",
        ("req-old", T0, "test", json.dumps(record))))
    report = await replay_quarantine(database)
    assert report.replayed == ["req-old"] and not report.failed
    assert database.read_sync(lambda tx: tx.one(
        "SELECT ttft_ms, latency_ms FROM usage WHERE request_id = 'req-old'")) == (None, 12.5)
