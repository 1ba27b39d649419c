"""The accounts database and its double-entry journal, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from tooti.accounts.database import Database, Tx, redact
from tooti.accounts.journal import (
    ISSUED,
    AlreadyPosted,
    Entry,
    InsufficientFunds,
    balance,
    post,
    post_new,
)
from tooti.accounts.money import cost_micros, format_credits, parse_credits, split_fee


def test_migrations_apply_once(database: Database) -> None:
    assert database.version >= 1
    database.migrate()  # again: nothing to do
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM schema_migrations")
                              ) == database.version


def test_a_posted_entry_moves_money_once(database: Database) -> None:
    def top_up(tx: Tx) -> bool:
        return post(tx, "topup:1", "topup", [(ISSUED, -5_000_000), ("account:a", 5_000_000)])

    assert database.write_sync(top_up) is True
    assert database.write_sync(top_up) is False  # same idempotency key: nothing moves
    assert database.read_sync(lambda tx: balance(tx, "account:a")) == 5_000_000
    assert database.read_sync(lambda tx: balance(tx, ISSUED)) == -5_000_000


def test_an_unbalanced_entry_is_refused(database: Database) -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        database.write_sync(lambda tx: post(tx, "x", "topup", [("account:a", 1)]))
    with pytest.raises(TypeError):
        database.write_sync(lambda tx: post(tx, "y", "topup", [("a", 0.5), ("b", -0.5)]))  # type: ignore[list-item]


def test_a_floor_refuses_an_overdraft_and_rolls_back(database: Database) -> None:
    database.write_sync(lambda tx: post(tx, "t", "topup", [(ISSUED, -100), ("account:a", 100)]))
    with pytest.raises(InsufficientFunds):
        database.write_sync(lambda tx: post(
            tx, "spend", "lease", [("account:a", -101), ("lease:l", 101)],
            floors={"account:a": 0}))
    assert database.read_sync(lambda tx: balance(tx, "account:a")) == 100
    assert database.read_sync(lambda tx: tx.value(
        "SELECT COUNT(*) FROM journal WHERE idem_key = 'spend'")) == 0


def test_concurrent_debits_never_overdraw(database: Database) -> None:
    """Twenty threads each take 10 from a balance of 100: exactly ten succeed."""
    database.write_sync(lambda tx: post(tx, "t", "topup", [(ISSUED, -100), ("account:a", 100)]))
    results: list[bool] = []

    def take(i: int) -> None:
        try:
            database.write_sync(lambda tx: post(
                tx, f"take:{i}", "lease", [("account:a", -10), (f"lease:{i}", 10)],
                floors={"account:a": 0}))
            results.append(True)
        except InsufficientFunds:
            results.append(False)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 10
    assert database.read_sync(lambda tx: balance(tx, "account:a")) == 0


def test_a_long_read_does_not_hold_up_writes(database: Database) -> None:
    """A report reading for a long time (held open here) never blocks a settle: reads
    have their own connections (SQLite WAL readers; PostgreSQL pool connections)."""
    reading, release = threading.Event(), threading.Event()

    def slow_report(tx: Tx) -> int:
        count = int(tx.value("SELECT COUNT(*) FROM journal"))
        reading.set()
        assert release.wait(10)
        return count

    reader = threading.Thread(target=database.read_sync, args=(slow_report,))
    reader.start()
    assert reading.wait(10)
    try:
        assert database.write_sync(lambda tx: post(
            tx, "t", "topup", [(ISSUED, -1), ("account:a", 1)])) is True
        assert reader.is_alive()  # committed while the report still reads
        assert database.read_sync(lambda tx: balance(tx, "account:a")) == 1
    finally:
        release.set()
        reader.join()


def test_a_batch_posts_like_its_entries_one_by_one(database: Database) -> None:
    """post_new: many entries in a constant number of statements, each book updated once
    with its sum; a floor checked on the sum; an existing key refuses the whole batch."""
    database.write_sync(lambda tx: post(tx, "t", "topup", [(ISSUED, -100), ("lease:l", 100)]))
    entries = [Entry(f"settle:r{i}", "settle", [("lease:l", -10), ("earnings:op", 9),
                                                 ("fees", 1)], f"r{i}") for i in range(5)]
    database.write_sync(lambda tx: post_new(tx, entries, floors={"lease:l": 0}))
    assert database.read_sync(lambda tx: (balance(tx, "lease:l"), balance(tx, "earnings:op"),
                                          balance(tx, "fees"))) == (50, 45, 5)
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM journal_lines")) == 17
    with pytest.raises(AlreadyPosted):  # r4 again, beside a new one: nothing moves
        database.write_sync(lambda tx: post_new(tx, [
            Entry("settle:r5", "settle", [("lease:l", -1), ("fees", 1)]), entries[4]]))
    with pytest.raises(InsufficientFunds):  # 6 x 10 from a lease holding 50
        database.write_sync(lambda tx: post_new(tx, [
            Entry(f"settle:s{i}", "settle", [("lease:l", -10), ("fees", 10)])
            for i in range(6)], floors={"lease:l": 0}))
    assert database.read_sync(lambda tx: (balance(tx, "lease:l"), balance(tx, "fees"))) == (
        50, 5)
    assert database.read_sync(lambda tx: tx.value("SELECT COUNT(*) FROM journal")) == 6


def test_money_is_integers() -> None:
    assert parse_credits("12.5") == 12_500_000
    assert parse_credits("0.000001") == 1
    assert format_credits(12_500_000) == "12.5"
    assert format_credits(-3) == "-0.000003"
    for bad in ("-1", "1e3", "0.0000001", "abc", ""):
        with pytest.raises(ValueError):
            parse_credits(bad)
    assert cost_micros(1000, 500, 500_000, 1_500_000) == 1250  # 0.5 and 1.5 per 1M
    assert cost_micros(1, 0, 1, 0) == 1  # rounded up to a whole micro-unit
    assert split_fee(1001, 1000) == (901, 100)


def test_a_password_never_reaches_an_error() -> None:
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    # libpq takes passwords in the query too; their values never show, other options do
    assert redact("postgresql://u@h/db?sslmode=require&password=s1&sslpassword=s2#f") == \
        "postgresql://u@h/db?sslmode=require&password=***&sslpassword=***"
    assert redact("postgresql://u:p@h/db?application_name=x") == \
        "postgresql://u:***@h/db?application_name=x"
