"""``tooti ledger check``'s invariants and the earnings reports, on SQLite and
PostgreSQL: a ledger written by the credits plugin passes; each kind of damage (a
tampered book, an unbalanced entry, a closed lease still holding credit, a charge
without its entry, an account overdrawn beyond the bound) is reported."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from tests.test_credits import ACCOUNT, ctx, open_account, running, usage
from tooti.accounts import earnings
from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import ISSUED, PAYOUTS, earnings_book, post
from tooti.accounts.ledger_check import check, check_report, summary
from tooti.accounts.money import MICROS


async def settled_ledger(db: Database, tmp_path: Path) -> None:
    """Ten credits issued; three requests settled (two on node-a owned by acct_op, one
    on node-b owned by nobody: admin), one refunded; 10 % fee."""
    open_account(db)
    open_account(db, "acct_op", credit=0)
    db.write_sync(lambda tx: tx.run(
        "INSERT INTO node_owners (node_id, account_id, bound_at) VALUES ('node-a', 'acct_op', 0)"))
    async with running(db, tmp_path, fee_bps=1000) as credits:
        for i, node in enumerate(("node-a", "node-a", "node-b")):
            await credits.authorize(ctx(f"r{i}", 10_000))
            await credits.settle(ctx(f"r{i}", 10_000), usage(node=node))  # 4000 each
        await credits.authorize(ctx("r9", 10_000))
        await credits.refund(ctx("r9", 10_000), "failed")


async def test_a_settled_ledger_passes(database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)
    assert check_report(database).violations == []
    assert check_report(database).warnings == []
    assert summary(database) == {
        "issued": 10 * MICROS, "balances": 10 * MICROS - 12_000, "leased": 0,
        "earnings": 10_800, "fees": 1200, "payouts": 0, "charged": 12_000,
        "open_leases": 0}


async def test_a_tampered_book_is_found(database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)
    database.write_sync(lambda tx: tx.run(
        "UPDATE books SET balance = balance + 1 WHERE book = ?", (f"account:{ACCOUNT}",)))
    violations = check(database)
    assert violations[0].startswith("books whose balance is not the sum of their lines: "
                                    f"account:{ACCOUNT}")
    assert any("the books sum to 1" in v for v in violations)


async def test_an_unbalanced_entry_is_found(database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)

    def forge(tx: Tx) -> None:  # what post() refuses to write, written by hand
        tx.run("INSERT INTO journal (id, idem_key, kind, at) VALUES ('je_x', 'forged', "
               "'topup', 0)")
        tx.run("INSERT INTO journal_lines VALUES ('je_x', ?, 500)", (f"account:{ACCOUNT}",))
        tx.run("UPDATE books SET balance = balance + 500 WHERE book = ?",
               (f"account:{ACCOUNT}",))

    database.write_sync(forge)
    violations = check(database)
    assert violations[0] == "unbalanced journal entries: forged sums to 500"
    assert "the books sum to 500, not 0 (money was created or lost)" in violations


async def test_leases_and_charges_are_checked(database: Database, tmp_path: Path) -> None:
    open_account(database)
    async with running(database, tmp_path, close=False) as credits:
        await credits.authorize(ctx("r1", 10_000))
    assert check(database) == []
    # A lease closed without its release entry still holds credit.
    database.write_sync(lambda tx: tx.run("UPDATE leases SET closed_at = 1"))
    assert check(database)[0].startswith("closed leases holding credit: lease_")
    # A charge without its entry, and a fee that does not add up.
    database.write_sync(lambda tx: tx.run(
        "INSERT INTO usage (request_id, ts, key_id, model, node_id, endpoint, stream, "
        "prompt_tokens, completion_tokens, estimated, price_input, price_output, cost, "
        "charged, earned, fee, status, latency_ms) VALUES ('r7', 0, 'k', 'm', 'n', 'e', 0, "
        "1, 1, 0, 1, 1, 7, 7, 5, 1, 'ok', 0)"))
    violations = check(database)
    assert "charged requests without exactly one settle entry: r7 charged 7, 0 entries" in (
        violations)
    assert ("requests whose earned + fee is not their charge: r7 charged 7, earned 5 + fee 1"
            in violations)


async def test_an_overdrawn_account_is_a_violation_unless_explained(
        database: Database) -> None:
    open_account(database, credit=100)

    def overdraw(tx: Tx) -> None:
        post(tx, "payout:x", "payout", [(f"account:{ACCOUNT}", -150), (PAYOUTS, 150)])

    database.write_sync(overdraw)
    assert check(database) == [f"accounts below zero: account:{ACCOUNT} holds -50"]


async def test_earnings_per_operator_and_node(database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)
    nodes = earnings.by_node(database)
    assert [(n.owner_id, n.node_id, n.requests, n.earned, n.fee) for n in nodes] == [
        ("acct_op", "node-a", 2, 7200, 800), ("admin", "node-b", 1, 3600, 400)]
    operators = earnings.by_operator(database)
    assert [(o.owner_id, o.nodes, o.requests, o.prompt_tokens, o.earned) for o in operators
            ] == [("acct_op", 1, 2, 2000, 7200), ("admin", 1, 1, 1000, 3600)]
    assert earnings.by_node(database, until=0) == []  # before any request
    assert [n.node_id for n in earnings.by_node(database, owner="admin")] == ["node-b"]
    database.write_sync(lambda tx: post(
        tx, "payout:1", "payout", [(earnings_book("acct_op"), -2000), (PAYOUTS, 2000)],
        floors={earnings_book("acct_op"): 0}))
    rows = earnings.payouts(database)
    assert [(r.owner_id, r.earned, r.owed, r.paid) for r in rows] == [
        ("acct_op", 7200, 5200, 2000), ("admin", 3600, 3600, 0)]
    exported = earnings.export_json(rows)
    assert exported[0] == {"owner_id": "acct_op", "earned": 7200, "owed": 5200, "paid": 2000,
                           "earned_credits": "0.0072", "owed_credits": "0.0052",
                           "paid_credits": "0.002"}
    parsed = list(csv.DictReader(io.StringIO(earnings.export_csv(rows))))
    assert parsed[1] == {"owner_id": "admin", "earned": "3600", "owed": "3600", "paid": "0",
                         "earned_credits": "0.0036", "owed_credits": "0.0036",
                         "paid_credits": "0"}
    assert check(database) == []


@pytest.mark.parametrize("by", ["account", "owner"])
async def test_usage_summary_groups(database: Database, tmp_path: Path, by: str) -> None:
    from tooti.billing.ledger import summarize

    await settled_ledger(database, tmp_path)
    rows = {row.group: (row.requests, row.cost, row.charged) for row in summarize(database, by)}
    if by == "account":
        assert rows == {ACCOUNT: (4, 12_000, 12_000)}
    else:
        assert rows == {"acct_op": (2, 8000, 8000), "admin": (1, 4000, 4000), "-": (1, 0, 0)}


async def test_tooti_usage_reads_the_accounts_database(
        database: Database, database_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tooti.cli import main

    await settled_ledger(database, tmp_path)
    assert main(["usage", "--database", database_url, "--by", "node"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["node-a", "2", "2000", "2000", "0.008", "0.008"]
    assert lines[3].split() == ["node-b", "1", "1000", "1000", "0.004", "0.004"]


# ------------------------------------------------------------ review finding 11


def forge(db: Database, idem_key: str, kind: str, lines: list[tuple[str, int]],
          request_id: str = "") -> None:
    """A balanced entry written through the journal (so only the new checks can see it)."""
    db.write_sync(lambda tx: post(tx, idem_key, kind, lines, request_id=request_id))


async def test_issued_moves_only_through_top_ups_and_codes(
        database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)
    forge(database, "gift:1", "settle", [(ISSUED, -700), (f"account:{ACCOUNT}", 700)])
    assert "entries moving issued credit that are not top-ups or codes: gift:1 (settle) " \
        "moves -700" in check(database)


async def test_credit_codes_and_their_entries_match(database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)

    def codes(tx: Tx) -> None:
        for code_id, redeemed in (("cc_a", ACCOUNT), ("cc_b", ACCOUNT), ("cc_c", None)):
            tx.run("INSERT INTO credit_codes (id, prefix, hash, amount, created_by, "
                   "created_at, redeemed_by) VALUES (?, 'tc', ?, 500, 'admin', 0, ?)",
                   (code_id, code_id, redeemed))

    database.write_sync(codes)
    forge(database, "code:cc_a", "code", [(ISSUED, -500), (f"account:{ACCOUNT}", 500)])
    forge(database, "code:cc_b", "code", [(ISSUED, -900), (f"account:{ACCOUNT}", 900)])
    forge(database, "code:cc_c", "code", [(ISSUED, -500), (f"account:{ACCOUNT}", 500)])
    violations = check(database)
    assert ("redeemed credit codes without exactly one entry of their amount: cc_b of 500: "
            "1 entries crediting 900") in violations
    assert "code entries without a redeemed code: code:cc_c" in violations
    assert not any("cc_a" in v for v in violations)


async def test_a_lease_amount_must_match_its_entries(database: Database, tmp_path: Path) -> None:
    open_account(database)
    async with running(database, tmp_path, close=False) as credits:
        await credits.authorize(ctx("r1", 10_000))
        lease = credits.leases._current[ACCOUNT].id
    assert check(database) == []
    database.write_sync(lambda tx: tx.run("UPDATE leases SET amount = amount + 1"))
    assert check(database) == [f"leases whose amount is not what their lease entries "
                               f"credited: {lease} amount {MICROS + 1}, entries {MICROS}"]


async def test_a_settle_must_pay_its_rows_owner(database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)  # r0 on node-a: earned 3600 by acct_op
    database.write_sync(lambda tx: tx.run(
        "UPDATE usage SET owner_id = 'acct_x' WHERE request_id = 'r0'"))
    assert check(database) == [
        "settle entries not paying their request's owner its earnings and fee: r0: earned "
        "3600 + fee 400 for acct_x, its entry pays 0 to the owner, 400 to fees, 4000 in all"]


async def test_a_quarantined_request_is_a_violation(database: Database, tmp_path: Path) -> None:
    await settled_ledger(database, tmp_path)
    database.write_sync(lambda tx: tx.run(
        "INSERT INTO usage_quarantine (request_id, ts, error, row_json) "
        "VALUES ('r5', 0, 'OperationalError: locked', '{}')"))
    assert check(database) == ["quarantined requests, not billed yet (run tooti ledger "
                               "replay): r5 (OperationalError: locked)"]


def settle_direct(tx: Tx, request_id: str, account: str, lease_id: str, amount: int) -> None:
    """A settle charged to the account book (its lease was found closed), by hand."""
    tx.run("INSERT INTO usage (request_id, ts, account_id, key_id, model, node_id, "
           "owner_id, endpoint, stream, prompt_tokens, completion_tokens, estimated, "
           "price_input, price_output, cost, charged, earned, fee, lease_id, status, "
           "latency_ms) VALUES (?, 0, ?, 'k', 'm', 'n', 'admin', 'e', 0, 1, 1, 0, 1, 1, "
           "?, ?, ?, 0, ?, 'ok', 0)", (request_id, account, amount, amount, amount, lease_id))
    post(tx, f"settle:{request_id}", "settle",
         [(f"account:{account}", -amount), (earnings_book("admin"), amount)],
         request_id=request_id)


async def test_the_overdraft_allowance_is_what_a_reconciled_lease_returned(
        database: Database) -> None:
    """Settles charged to the account book directly (their lease was reconciled) may
    overdraw it only within what that lease's release returned — not by everything
    direct settles ever charged."""
    # A direct settle on a lease that returned nothing explains no overdraft.
    open_account(database, "acct_bob", credit=0)
    database.write_sync(lambda tx: settle_direct(tx, "r0", "acct_bob", "lease_none", 700))
    assert check(database) == [
        "accounts below zero: account:acct_bob holds -700",
        "settles charged directly beyond what their reconciled lease returned: "
        "lease_none charged 700, its release returned 0"]
    database.write_sync(lambda tx: post(tx, "topup:bob", "topup", [
        (ISSUED, -700), ("account:acct_bob", 700)]))

    open_account(database, credit=0)

    def reconciled(tx: Tx) -> None:
        # lease_a returned 3000 to the account; then another lease took all of it.
        post(tx, "topup:t", "topup", [(ISSUED, -3000), ("lease:lease_a", 3000)])
        post(tx, "release:lease_a", "release",
             [("lease:lease_a", -3000), (f"account:{ACCOUNT}", 3000)])
        post(tx, "lease:lease_b:1", "lease",
             [(f"account:{ACCOUNT}", -3000), ("lease:lease_b", 3000)])

    database.write_sync(reconciled)
    database.write_sync(lambda tx: settle_direct(tx, "r1", ACCOUNT, "lease_a", 2500))
    report = check_report(database)
    assert [v for v in report.violations if ACCOUNT in v or "lease_a" in v] == []
    assert report.warnings[0].startswith(f"account:{ACCOUNT} holds -2500")
    database.write_sync(lambda tx: settle_direct(tx, "r2", ACCOUNT, "lease_a", 1000))
    assert [v for v in check(database) if ACCOUNT in v or "lease_a" in v] == [
        f"accounts below zero: account:{ACCOUNT} holds -3500",
        "settles charged directly beyond what their reconciled lease returned: "
        "lease_a charged 3500, its release returned 3000; lease_none charged 700, its "
        "release returned 0"]
