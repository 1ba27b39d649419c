"""The accounts service (tooti.accounts.service) on SQLite and PostgreSQL: accounts,
keys, groups, invites (atomic under concurrency), join tokens, credit codes, top-ups and
payouts through the journal, and the changes counter the gateways poll."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio

from tooti import clock
from tooti.accounts import credentials
from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import ISSUED, PAYOUTS, balance, earnings_book, post
from tooti.accounts.money import MAX_AMOUNT
from tooti.accounts.records import Limits
from tooti.accounts.service import AccountService, changes_counter
from tooti.errors import APIError


@pytest.fixture
def service(database: Database) -> AccountService:
    return AccountService(database)


async def refused(status: int, code: str | None, call: Awaitable[Any]) -> APIError:
    with pytest.raises(APIError) as caught:
        await call
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    assert caught.value.to_dict()["error"]["message"]
    return caught.value


def counter(db: Database) -> int:
    return db.read_sync(changes_counter)


async def gather(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run every call at once (each in its own task, so their transactions overlap in
    worker threads); each result or the exception it raised."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except APIError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return results


def rows_mention(db: Database, table: str, secret: str) -> bool:
    rows = db.read_sync(lambda tx: tx.all(f"SELECT * FROM {table}"))
    return any(secret in str(value) for row in rows for value in row)


# ------------------------------------------------------------ accounts

async def test_ensure_admin_is_idempotent(service: AccountService) -> None:
    first = await service.ensure_admin()
    again = await service.ensure_admin()
    assert (first.id, first.name, first.role, first.status) == ("admin", "admin", "admin",
                                                               "active")
    assert again == first
    assert [a.id for a in await service.list_accounts()] == ["admin"]


async def test_accounts_have_unique_valid_names(service: AccountService) -> None:
    alice = await service.create_account("alice@example.org")
    assert (alice.role, alice.status, alice.balance, alice.earnings) == ("user", "active", 0, 0)
    assert alice.id.startswith("acct_")
    await refused(409, "conflict", service.create_account("alice@example.org", "operator"))
    for bad in ("", "a" * 65, "a b", "é", "x/y", "semi;colon"):
        await refused(400, "invalid_request", service.create_account(bad))
    await refused(400, "invalid_request", service.create_account("bob", "root"))
    bob = await service.create_account("b.o-b_" + "x" * 58, "operator")  # 64 characters
    assert bob.role == "operator"
    assert await service.find_account(alice.id) == alice
    assert await service.find_account("alice@example.org") == alice
    assert await service.find_account("nobody") is None
    assert await service.get_account(bob.id) == bob
    await refused(404, "not_found", service.get_account("acct_missing"))
    assert [a.id for a in await service.list_accounts()] == [alice.id, bob.id]


async def test_suspend_and_activate(service: AccountService, database: Database) -> None:
    await service.ensure_admin()
    user = await service.create_account("carol")
    before = counter(database)
    assert (await service.set_status(user.id, "suspended")).status == "suspended"
    assert counter(database) == before + 1
    await refused(403, "forbidden", service.create_key(user.id))
    assert (await service.set_status(user.id, "active")).status == "active"
    assert counter(database) == before + 2
    await service.create_key(user.id)
    await refused(400, "invalid_request", service.set_status(user.id, "banned"))
    await refused(404, "not_found", service.set_status("acct_missing", "active"))
    await refused(409, "conflict", service.set_status("admin", "suspended"))


async def test_account_limits(service: AccountService, database: Database) -> None:
    user = await service.create_account("dave")
    before = counter(database)
    updated = await service.set_limits(user.id, Limits(rpm=60, tpm=10_000, concurrency=2))
    assert updated.limits == Limits(rpm=60, tpm=10_000, concurrency=2)
    assert counter(database) == before + 1
    assert database.read_sync(lambda tx: tx.one(
        "SELECT rpm, tpm, concurrency FROM account_limits WHERE account_id = ?", (user.id,))
    ) == (60, 10_000, 2)
    assert (await service.set_limits(user.id, Limits(rpm=5))).limits == Limits(rpm=5)
    wrong: Any = 1.5  # a Limits built in Python is not type-checked by msgspec
    for bad in (Limits(budget_day=10), Limits(rpm=wrong), Limits(tpm=True),
                Limits(concurrency=-1)):
        await refused(400, "invalid_request", service.set_limits(user.id, bad))
    assert (await service.get_account(user.id)).limits == Limits(rpm=5)
    await refused(404, "not_found", service.set_limits("acct_missing", Limits(rpm=1)))


# ------------------------------------------------------------ keys

async def test_keys_are_shown_once_and_stored_hashed(service: AccountService,
                                                     database: Database) -> None:
    user = await service.create_account("erin")
    before = counter(database)
    expiry = clock.wall() + 3600
    secret, key = await service.create_key(
        user.id, "laptop", models=("llama3", "qwen"), expires_at=expiry,
        limits=Limits(rpm=10, budget_day=5_000_000, budget_month=50_000_000))
    assert counter(database) == before + 1
    assert secret.startswith(credentials.API_KEY) and len(secret) > 40
    assert key.prefix == credentials.visible_prefix(secret) and secret.startswith(key.prefix)
    assert (key.account_id, key.name, key.group, key.models) == (user.id, "laptop", "",
                                                                 ("llama3", "qwen"))
    assert key.limits == Limits(rpm=10, budget_day=5_000_000, budget_month=50_000_000)
    assert key.expires_at == expiry and key.revoked_at is None
    assert not rows_mention(database, "api_keys", secret)
    assert database.read_sync(lambda tx: tx.value(
        "SELECT hash FROM api_keys WHERE id = ?", (key.id,))) == credentials.digest(secret)
    assert await service.list_keys(user.id) == [key]
    assert await service.list_keys() == [key]
    assert await service.list_keys("acct_other") == []
    found = await service.find_key_by_secret(secret)
    assert found is not None and found[0] == key and found[1].id == user.id
    assert await service.find_key_by_secret(secret + "x") is None
    assert await service.find_key_by_secret("") is None


async def test_key_input_is_checked(service: AccountService) -> None:
    user = await service.create_account("frank")
    await refused(400, "invalid_request", service.create_key(user.id, expires_at=1.0))
    await refused(400, "invalid_request", service.create_key(user.id, expires_at=True))
    await refused(400, "invalid_request", service.create_key(user.id, models="llama3"))
    await refused(400, "invalid_request", service.create_key(user.id, models=("",)))
    await refused(400, "invalid_request", service.create_key(
        user.id, limits=Limits(budget_day=MAX_AMOUNT + 1)))
    await refused(400, "invalid_request", service.create_key(user.id, "x" * 201))
    await refused(404, "not_found", service.create_key("acct_missing"))
    assert await service.list_keys(user.id) == []


async def test_revoked_and_expired_keys(service: AccountService, database: Database,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    alice = await service.create_account("alice")
    bob = await service.create_account("bob")
    secret, key = await service.create_key(alice.id)
    await refused(404, "not_found", service.revoke_key(key.id, account_id=bob.id))
    assert (await service.find_key_by_secret(secret)) is not None
    before = counter(database)
    revoked = await service.revoke_key(key.id, account_id=alice.id)
    assert revoked.revoked_at is not None
    assert counter(database) == before + 1
    again = await service.revoke_key(key.id)
    assert again.revoked_at == revoked.revoked_at and counter(database) == before + 1
    assert await service.find_key_by_secret(secret) is None
    await refused(404, "not_found", service.revoke_key("key_missing"))

    now = clock.wall()
    short, _ = await service.create_key(bob.id, expires_at=now + 60)
    assert await service.find_key_by_secret(short) is not None
    monkeypatch.setattr(clock, "wall", lambda: now + 61)
    assert await service.find_key_by_secret(short) is None


async def test_a_key_routes_only_to_a_group_of_its_account(service: AccountService) -> None:
    owner = await service.create_account("olga", "operator")
    member = await service.create_account("mia")
    outsider = await service.create_account("otto")
    group = await service.create_group(owner.id, "friends")
    secret, _ = await service.create_invite(group.name, owner.id)
    await service.redeem_invite(secret, member.id)
    _, key = await service.create_key(member.id, group="friends")
    assert key.group == "friends"
    _, key = await service.create_key(owner.id, group=group.id)
    assert key.group == "friends"
    await refused(403, "forbidden", service.create_key(outsider.id, group="friends"))
    await refused(403, "forbidden", service.create_key(outsider.id, group="no-such-group"))


# ------------------------------------------------------------ groups

async def test_groups(service: AccountService, database: Database) -> None:
    admin = await service.ensure_admin()
    operator = await service.create_account("op", "operator")
    user = await service.create_account("user")
    await refused(403, "forbidden", service.create_group(user.id, "mine"))
    for bad in ("", "a b", "x" * 65, "we@home", "g/1"):
        await refused(400, "invalid_request", service.create_group(operator.id, bad))
    before = counter(database)
    group = await service.create_group(operator.id, "lab.gpu_1-x", public_nodes=False)
    assert counter(database) == before + 1
    assert (group.name, group.owner_id, group.public_nodes, group.members) == (
        "lab.gpu_1-x", operator.id, False, 1)
    assert group.id.startswith("grp_")
    await refused(409, "conflict", service.create_group(admin.id, "lab.gpu_1-x"))
    other = await service.create_group(admin.id, "admins")
    assert other.public_nodes is True
    assert await service.get_group(group.id) == group
    assert await service.get_group("lab.gpu_1-x") == group
    await refused(404, "not_found", service.get_group("nope"))
    assert [m.id for m in await service.members(group.name)] == [operator.id]
    assert await service.list_groups(operator.id) == [group]
    assert await service.list_groups(user.id) == []
    assert [g.name for g in await service.list_groups()] == ["lab.gpu_1-x", "admins"]

    secret, _ = await service.create_invite(group.name, operator.id, max_uses=5)
    await service.redeem_invite(secret, user.id)
    assert [g.id for g in await service.list_groups(user.id)] == [group.id]
    assert {m.id for m in await service.members(group.id)} == {operator.id, user.id}
    assert (await service.get_group(group.id)).members == 2
    before = counter(database)
    await service.remove_member(group.name, user.id)
    assert counter(database) == before + 1
    assert [m.id for m in await service.members(group.id)] == [operator.id]
    await refused(404, "not_found", service.remove_member(group.name, user.id))
    await refused(409, "conflict", service.remove_member(group.name, operator.id))
    await refused(403, "forbidden", service.create_key(user.id, group=group.name))


# ------------------------------------------------------------ invites

async def test_concurrent_invite_redemptions_admit_exactly_max_uses(
        service: AccountService, database: Database) -> None:
    owner = await service.create_account("owner", "operator")
    group = await service.create_group(owner.id, "crowd")
    secret, invite = await service.create_invite(group.name, owner.id, max_uses=3)
    assert (invite.max_uses, invite.uses, invite.group_id) == (3, 0, group.id)
    accounts = [await service.create_account(f"guest{i}") for i in range(20)]
    results = await gather([partial(service.redeem_invite, secret, a.id) for a in accounts])
    admitted = [r for r in results if not isinstance(r, APIError)]
    assert len(admitted) == 3 and all(g.id == group.id for g in admitted)
    assert sorted({(r.status, r.code) for r in results if isinstance(r, APIError)}) == [
        (410, "used_up")]
    assert len(await service.members(group.id)) == 4  # the owner and three guests
    [listed] = await service.list_invites(group.name)
    assert listed.uses == 3
    assert database.read_sync(lambda tx: tx.value(
        "SELECT COUNT(*) FROM invite_redemptions")) == 3


async def test_concurrent_redemptions_by_one_account_use_one_use(
        service: AccountService) -> None:
    owner = await service.create_account("owner", "operator")
    guest = await service.create_account("guest")
    group = await service.create_group(owner.id, "pair")
    secret, _ = await service.create_invite(group.id, owner.id, max_uses=2)
    results = await gather([(lambda: service.redeem_invite(secret, guest.id))] * 8)
    assert all(not isinstance(r, APIError) and r.id == group.id for r in results)
    again = await service.redeem_invite(secret, guest.id)
    assert again.members == 2
    [invite] = await service.list_invites(group.id)
    assert invite.uses == 1


async def test_invites_expire_are_revoked_and_are_hashed(
        service: AccountService, database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = await service.ensure_admin()
    owner = await service.create_account("owner", "operator")
    member = await service.create_account("member")
    guest = await service.create_account("guest")
    group = await service.create_group(owner.id, "club")
    await refused(400, "invalid_request", service.create_invite(group.id, owner.id,
                                                                max_uses=0))
    await refused(400, "invalid_request", service.create_invite(
        group.id, owner.id, max_uses=2.0))  # type: ignore[arg-type]
    secret, _ = await service.create_invite(group.id, owner.id)
    assert secret.startswith(credentials.INVITE)
    assert not rows_mention(database, "invites", secret)
    await service.redeem_invite(secret, member.id)
    await refused(403, "forbidden", service.create_invite(group.id, member.id))
    _, by_admin = await service.create_invite(group.id, admin.id)  # an admin may
    assert by_admin.created_by == admin.id

    revoked, info = await service.create_invite(group.id, owner.id)
    assert (await service.revoke_invite(info.id)).revoked_at is not None
    await refused(410, "revoked", service.redeem_invite(revoked, guest.id))
    await refused(404, "not_found", service.revoke_invite("inv_missing"))
    await refused(404, "not_found", service.redeem_invite("ti-tooti-made-up", guest.id))

    now = clock.wall()
    expiring, late = await service.create_invite(group.id, owner.id, max_uses=10,
                                                 expires_at=now + 60)
    monkeypatch.setattr(clock, "wall", lambda: now + 61)
    await refused(410, "expired", service.redeem_invite(expiring, guest.id))
    assert [m.id for m in await service.members(group.id)] == [owner.id, member.id]
    uses = {i.id: i.uses for i in await service.list_invites(group.id)}
    assert (uses[info.id], uses[late.id]) == (0, 0)


# ------------------------------------------------------------ join tokens

async def test_join_tokens(service: AccountService, database: Database) -> None:
    admin = await service.ensure_admin()
    operator = await service.create_account("op", "operator")
    rival = await service.create_account("rival", "operator")
    user = await service.create_account("user")
    group = await service.create_group(operator.id, "private")
    await refused(403, "forbidden", service.create_join_token(user.id))
    before = counter(database)
    secret, public = await service.create_join_token(operator.id, name="rack 1")
    assert counter(database) == before + 1
    assert secret.startswith(credentials.JOIN_TOKEN) and secret.startswith(public.prefix)
    assert (public.account_id, public.group, public.name) == (operator.id, "", "rack 1")
    assert not rows_mention(database, "join_tokens", secret)
    _, grouped = await service.create_join_token(operator.id, group="private")
    assert grouped.group == "private"
    await refused(403, "forbidden", service.create_join_token(rival.id, group=group.id))
    _, by_admin = await service.create_join_token(admin.id, group="private")
    assert by_admin.account_id == admin.id
    await refused(404, "not_found", service.create_join_token(operator.id, group="nope"))
    listed = await service.list_join_tokens(operator.id)
    assert [t.id for t in listed] == [public.id, grouped.id]
    assert all(t.revoked_at is None for t in listed)  # several valid at once
    assert len(await service.list_join_tokens()) == 3

    await refused(404, "not_found", service.revoke_join_token(public.id, account_id=rival.id))
    before = counter(database)
    gone = await service.revoke_join_token(public.id, account_id=operator.id)
    assert gone.revoked_at is not None and counter(database) == before + 1
    assert (await service.revoke_join_token(public.id)).revoked_at == gone.revoked_at
    assert counter(database) == before + 1
    assert [t.revoked_at is None for t in await service.list_join_tokens(operator.id)] == [
        False, True]
    await refused(404, "not_found", service.revoke_join_token("jt_missing"))


# ------------------------------------------------------------ credit

async def test_top_up_is_idempotent(service: AccountService, database: Database) -> None:
    user = await service.create_account("payer")
    assert await service.top_up(user.id, 5_000_000, idem_key="t1", memo="invoice 7") == 5_000_000
    assert await service.top_up(user.id, 5_000_000, idem_key="t1") == 5_000_000  # again
    assert await service.top_up(user.id, 1, idem_key="t2") == 5_000_001
    assert (await service.get_account(user.id)).balance == 5_000_001
    assert database.read_sync(lambda tx: balance(tx, ISSUED)) == -5_000_001
    assert database.read_sync(lambda tx: tx.value(
        "SELECT memo FROM journal WHERE idem_key = 'topup:t1'")) == "invoice 7"
    for bad in (0, -1, True, 1.5, MAX_AMOUNT + 1, "5"):
        await refused(400, "invalid_request", service.top_up(
            user.id, bad, idem_key=f"bad{bad!r}"))  # type: ignore[arg-type]
    assert await service.top_up(user.id, MAX_AMOUNT - 5_000_001, idem_key="max") == MAX_AMOUNT
    await refused(400, "invalid_request", service.top_up(user.id, 1, idem_key=""))
    await refused(404, "not_found", service.top_up("acct_missing", 1, idem_key="t3"))


async def test_a_credit_code_credits_once_under_concurrency(
        service: AccountService, database: Database) -> None:
    admin = await service.ensure_admin()
    users = [await service.create_account(f"u{i}") for i in range(10)]
    secret, code = await service.create_credit_code(2_500_000, admin.id)
    assert secret.startswith(credentials.CREDIT_CODE) and secret.startswith(code.prefix)
    assert (code.amount, code.created_by, code.redeemed_by) == (2_500_000, admin.id, None)
    assert not rows_mention(database, "credit_codes", secret)
    results = await gather([partial(service.redeem_credit_code, secret, u.id) for u in users])
    winners = [r for r in results if not isinstance(r, APIError)]
    assert winners == [2_500_000]
    assert {(r.status, r.code) for r in results if isinstance(r, APIError)} == {
        (410, "used_up")}
    balances = [(await service.get_account(u.id)).balance for u in users]
    assert sorted(balances) == [0] * 9 + [2_500_000]
    assert database.read_sync(lambda tx: balance(tx, ISSUED)) == -2_500_000
    [listed] = await service.list_credit_codes()
    assert listed.redeemed_by == users[balances.index(2_500_000)].id
    assert database.read_sync(lambda tx: tx.value(
        "SELECT kind FROM journal WHERE idem_key = ?", (f"code:{code.id}",))) == "code"


async def test_concurrent_redemptions_of_one_code_by_one_account(
        service: AccountService) -> None:
    admin = await service.ensure_admin()
    user = await service.create_account("greedy")
    secret, _ = await service.create_credit_code(1_000_000, admin.id)
    results = await gather([(lambda: service.redeem_credit_code(secret, user.id))] * 10)
    assert [r for r in results if not isinstance(r, APIError)] == [1_000_000]
    assert (await service.get_account(user.id)).balance == 1_000_000


async def test_credit_code_refusals(service: AccountService,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    admin = await service.ensure_admin()
    operator = await service.create_account("op", "operator")
    user = await service.create_account("user")
    await refused(403, "forbidden", service.create_credit_code(1, operator.id))
    for bad in (0, True, 0.5, MAX_AMOUNT + 1):
        await refused(400, "invalid_request", service.create_credit_code(
            bad, admin.id))  # type: ignore[arg-type]
    await refused(404, "not_found", service.redeem_credit_code("tc-tooti-made-up", user.id))
    now = clock.wall()
    secret, _ = await service.create_credit_code(7, admin.id, expires_at=now + 60)
    monkeypatch.setattr(clock, "wall", lambda: now + 61)
    await refused(410, "expired", service.redeem_credit_code(secret, user.id))
    assert (await service.get_account(user.id)).balance == 0


async def test_payouts_move_earnings_once(service: AccountService, database: Database) -> None:
    operator = await service.create_account("earner", "operator")
    book = earnings_book(operator.id)

    def earn(tx: Tx) -> bool:  # what settling requests on its nodes does
        return post(tx, "settle:r1", "settle", [("lease:l1", -3_000_000), (book, 3_000_000)])

    database.write_sync(earn)
    assert (await service.get_account(operator.id)).earnings == 3_000_000
    assert await service.payout(operator.id, 1_000_000, idem_key="p1") == 2_000_000
    assert await service.payout(operator.id, 1_000_000, idem_key="p1") == 2_000_000  # again
    await refused(409, "insufficient_funds", service.payout(operator.id, 2_000_001,
                                                             idem_key="p2"))
    assert await service.payout(operator.id, 2_000_000, idem_key="p2") == 0
    assert (await service.get_account(operator.id)).earnings == 0
    assert database.read_sync(lambda tx: balance(tx, PAYOUTS)) == 3_000_000
    half: Any = 1.0
    await refused(400, "invalid_request", service.payout(operator.id, half, idem_key="p3"))
    nobody = await service.create_account("nobody", "operator")
    await refused(409, "insufficient_funds", service.payout(nobody.id, 1, idem_key="p4"))


# ------------------------------------------------------------ self-service reads

async def test_account_usage_sums_the_usage_table(service: AccountService,
                                                  database: Database) -> None:
    user = await service.create_account("usr")

    def record(tx: Tx) -> None:
        for i, (ts, account, prompt, completion, charged) in enumerate([
                (100.0, user.id, 10, 20, 30), (200.0, user.id, 1, 2, 3),
                (300.0, user.id, 5, 5, 0), (250.0, "acct_other", 99, 99, 99)]):
            tx.run("INSERT INTO usage (request_id, ts, account_id, key_id, model, node_id, "
                   "endpoint, stream, prompt_tokens, completion_tokens, estimated, "
                   "price_input, price_output, cost, charged, status, latency_ms) VALUES "
                   "(?, ?, ?, 'k', 'm', 'n', 'chat', 0, ?, ?, 0, 0, 0, ?, ?, 'ok', 1.0)",
                   (f"r{i}", ts, account, prompt, completion, charged, charged))

    database.write_sync(record)
    assert await service.account_usage(user.id, 150.0) == {
        "requests": 2, "prompt_tokens": 6, "completion_tokens": 7, "charged": 3}
    assert await service.account_usage(user.id, 0.0) == {
        "requests": 3, "prompt_tokens": 16, "completion_tokens": 27, "charged": 33}
    assert await service.account_usage("acct_none", 0.0) == {
        "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "charged": 0}


async def test_find_key_by_secret_reports_a_suspended_account(
        service: AccountService) -> None:
    user = await service.create_account("sleepy")
    secret, key = await service.create_key(user.id)
    await service.top_up(user.id, 42, idem_key="t")
    await service.set_status(user.id, "suspended")
    found = await service.find_key_by_secret(secret)
    assert found is not None
    assert found[0].id == key.id and found[1].status == "suspended" and found[1].balance == 42


async def test_two_gateways_redeeming_one_invite_admit_exactly_max_uses(
        database_url: str) -> None:
    """Two gateways (two Database connections on one database) redeem one 3-use code for
    twenty accounts at once: exactly three are admitted."""
    first, second = Database(database_url), Database(database_url)
    try:
        a, b = AccountService(first), AccountService(second)
        owner = await a.create_account("owner", "operator")
        group = await a.create_group(owner.id, "shared")
        secret, _ = await a.create_invite(group.id, owner.id, max_uses=3)
        guests = [await a.create_account(f"g{i}") for i in range(20)]
        results = await gather([partial((a, b)[i % 2].redeem_invite, secret, g.id)
                                 for i, g in enumerate(guests)])
        assert sum(not isinstance(r, APIError) for r in results) == 3
        assert len(await b.members(group.id)) == 4
        assert [i.uses for i in await b.list_invites(group.id)] == [3]
    finally:
        first.close()
        second.close()


# ------------------------------------------------------------ review fixes

async def test_configured_group_names_are_reserved(database: Database) -> None:
    """No operator may create a database group under a configured group's name (nodes
    and requests are routed by group name)."""
    service = AccountService(database, reserved_groups={"private", "eu"})
    operator = await service.create_account("op-reserved", "operator")
    for name in ("private", "eu"):
        await refused(409, "conflict", service.create_group(operator.id, name))
    assert await service.list_groups() == []
    assert (await service.create_group(operator.id, "private2")).name == "private2"


async def test_idempotency_keys_are_bound_to_their_movement(
        service: AccountService, database: Database) -> None:
    """A top-up or payout key reused for another account or amount is a 409, not a
    silent 200 that moves nothing; the same movement again is answered as before."""
    one = await service.create_account("idem-one")
    two = await service.create_account("idem-two")
    assert await service.top_up(one.id, 5_000_000, idem_key="k1") == 5_000_000
    assert await service.top_up(one.id, 5_000_000, idem_key="k1") == 5_000_000  # a retry
    await refused(409, "idempotency_conflict", service.top_up(one.id, 6_000_000,
                                                               idem_key="k1"))
    await refused(409, "idempotency_conflict", service.top_up(two.id, 5_000_000,
                                                               idem_key="k1"))
    assert (await service.get_account(one.id)).balance == 5_000_000
    assert (await service.get_account(two.id)).balance == 0

    operator = await service.create_account("idem-op", "operator")
    book = earnings_book(operator.id)
    database.write_sync(lambda tx: post(tx, "settle:idem", "settle",
                                        [("lease:l9", -3_000_000), (book, 3_000_000)]))
    assert await service.payout(operator.id, 1_000_000, idem_key="p") == 2_000_000
    assert await service.payout(operator.id, 1_000_000, idem_key="p") == 2_000_000
    await refused(409, "idempotency_conflict", service.payout(operator.id, 2_000_000,
                                                               idem_key="p"))
    # Keys of top-ups and payouts are separate namespaces.
    assert await service.top_up(operator.id, 1, idem_key="p") == 1
    assert database.read_sync(lambda tx: balance(tx, PAYOUTS)) == 1_000_000


async def test_max_active_keys(service: AccountService) -> None:
    user = await service.create_account("many-keys")
    made = [await service.create_key(user.id, max_active=3) for _ in range(3)]
    await refused(409, "too_many_keys", service.create_key(user.id, max_active=3))
    await service.revoke_key(made[0][1].id)
    await service.create_key(user.id, max_active=3)  # a revoked key does not count
    await service.create_key(user.id)  # without max_active (the admin API): no cap
    assert len(await service.list_keys(user.id)) == 5
