"""The double-entry journal: every movement of money is one entry whose lines sum to
zero, posted once per idempotency key.

Money is integer micro-units (:mod:`tooti.accounts.money`). Books are named strings:

* ``account:<id>``: an account's spendable balance (never below zero);
* ``lease:<id>``: credit a gateway took from an account to reserve requests from;
* ``earnings:<id>``: what an operator account earned from its nodes and is owed;
* ``fees``: the gateway's fee on what nodes earned;
* ``issued``: the source of every credit (admin top-ups, redeemed credit codes): its
  balance is minus all credit ever issued;
* ``payouts``: earnings paid out to operators.

:func:`post` (one entry) and :func:`post_new` (a batch of new ones) are the only
writers of ``journal``, ``journal_lines`` and ``books``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from tooti import clock
from tooti.accounts.database import Statement, Tx

ISSUED = "issued"
FEES = "fees"
PAYOUTS = "payouts"


def account_book(account_id: str) -> str:
    return f"account:{account_id}"


def lease_book(lease_id: str) -> str:
    return f"lease:{lease_id}"


def earnings_book(account_id: str) -> str:
    return f"earnings:{account_id}"


def entry_id() -> str:
    """A new entry's id: time-ordered (microseconds, then 48 random bits), so entries
    and their lines are appended at the end of their indexes instead of touching a
    random page each (fewer pages written per commit)."""
    return f"je_{int(clock.wall() * 1_000_000):014x}{secrets.token_hex(6)}"


class InsufficientFunds(Exception):
    """A debit would take a book below its floor; nothing was posted."""

    def __init__(self, book: str, balance: int, needed: int) -> None:
        super().__init__(f"{book} holds {balance}, {needed} needed")
        self.book = book
        self.balance = balance
        self.needed = needed


def post(tx: Tx, idem_key: str, kind: str, lines: Sequence[tuple[str, int]], *,
         request_id: str = "", memo: str = "",
         floors: Mapping[str, int] | None = None) -> bool:
    """Post one balanced entry in ``tx``; False (and nothing written) if an entry with
    ``idem_key`` exists already.

    ``lines`` are ``(book, amount)`` pairs (credit positive, debit negative) that must
    sum to zero, amounts integers. A book in ``floors`` may not end below its floor:
    then :class:`InsufficientFunds` is raised and the caller's transaction must roll
    back (raising out of :meth:`Database.write` does). Books are updated in name order
    so concurrent entries never deadlock."""
    if any(type(amount) is not int for _, amount in lines):
        raise TypeError("journal amounts are integers (micro-units)")
    if sum(amount for _, amount in lines) != 0:
        raise ValueError(f"unbalanced journal entry {idem_key}: {list(lines)}")
    entry = entry_id()
    if tx.run("INSERT INTO journal (id, idem_key, kind, request_id, memo, at) "
              "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (idem_key) DO NOTHING",
              (entry, idem_key, kind, request_id, memo, clock.wall())) == 0:
        return False
    merged: dict[str, int] = {}
    for book, amount in lines:
        merged[book] = merged.get(book, 0) + amount
    for book in sorted(merged):
        _apply(tx, book, merged[book], (floors or {}).get(book))
    tx.many("INSERT INTO journal_lines (entry_id, book, amount) VALUES (?, ?, ?)",
            [(entry, book, amount) for book, amount in lines if amount != 0])
    return True


class Entry(NamedTuple):
    """One entry for :func:`post_new`."""

    idem_key: str
    kind: str
    lines: Sequence[tuple[str, int]]
    request_id: str = ""


class AlreadyPosted(Exception):
    """:func:`post_new` found an entry posted before; the transaction must roll back."""


JOURNAL_INSERT = ("INSERT INTO journal (id, idem_key, kind, request_id, memo, at) "
                  "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (idem_key) DO NOTHING")
LINES_INSERT = ("INSERT INTO journal_lines (entry_id, book, amount) SELECT ?, ?, ? "
                "WHERE EXISTS (SELECT 1 FROM journal WHERE id = ?)")
"""A batch's lines, each only if its entry was inserted (an entry found posted before
inserts nothing, and the batch is rolled back once the counts are checked)."""
FLOORED_UPDATE = ("UPDATE books SET balance = balance + ? WHERE book = ? "
                  "AND balance + ? >= ?")


class NewEntries:
    """What posting a batch of new entries writes (:func:`post_new`), planned before any
    statement runs, so the statements can also go to the database in one pipeline
    (:meth:`statements`, :meth:`check`)."""

    def __init__(self, entries: Sequence[Entry], floors: Mapping[str, int] | None) -> None:
        at = clock.wall()
        self.rows: list[tuple[str, str, str, str, str, float]] = []
        self.lines: list[tuple[str, str, int]] = []
        deltas: dict[str, int] = {}
        for entry in entries:
            if any(type(amount) is not int for _, amount in entry.lines):
                raise TypeError("journal amounts are integers (micro-units)")
            if sum(amount for _, amount in entry.lines) != 0:
                raise ValueError(
                    f"unbalanced journal entry {entry.idem_key}: {list(entry.lines)}")
            new_id = entry_id()
            self.rows.append((new_id, entry.idem_key, entry.kind, entry.request_id, "", at))
            for book, amount in entry.lines:
                if amount:
                    self.lines.append((new_id, book, amount))
                    deltas[book] = deltas.get(book, 0) + amount
        # Books credited (or without a floor) in one statement, then debits with a
        # floor: each group in name order. A settle credits only earnings and fees books
        # and debits only lease and account books, so every batch takes its locks in the
        # same order (no deadlock between gateways).
        floor_of = floors or {}
        self.floored = [(book, deltas[book], floor_of[book]) for book in sorted(deltas)
                        if deltas[book] < 0 and floor_of.get(book) is not None]
        held = {book for book, _, _ in self.floored}
        self.plain = [(book, deltas[book]) for book in sorted(deltas) if book not in held]

    def statements(self) -> list[Statement]:
        """The statements, in order: the entries, the plain books, the floored books
        (each an UPDATE that changes no row if it would pass its floor), the lines."""
        out: list[Statement] = [(JOURNAL_INSERT, self.rows, True)]
        if self.plain:
            out.append(("INSERT INTO books (book, balance) VALUES "
                        + ", ".join(["(?, ?)"] * len(self.plain))
                        + " ON CONFLICT (book) DO UPDATE SET balance = books.balance + "
                        "excluded.balance",
                        [value for book, delta in self.plain for value in (book, delta)],
                        False))
        out += [(FLOORED_UPDATE, (delta, book, delta, floor), False)
                for book, delta, floor in self.floored]
        out.append((LINES_INSERT, [(*line, line[0]) for line in self.lines], True))
        return out

    def check(self, counts: Sequence[int]) -> None:
        """Raise :class:`AlreadyPosted` or :class:`InsufficientFunds` from the rows
        :meth:`statements` changed (the caller's transaction must then roll back)."""
        if counts[0] != len(self.rows):
            raise AlreadyPosted("an entry of this batch was posted before")
        first = 1 + (1 if self.plain else 0)
        for (book, delta, _floor), count in zip(self.floored, counts[first:], strict=False):
            if count != 1:
                raise InsufficientFunds(book, 0, -delta)


def post_new(tx: Tx, entries: Sequence[Entry], *,
             floors: Mapping[str, int] | None = None) -> None:
    """Post many balanced entries the caller knows to be new, in a constant number of
    statements (the hot path of settling a batch of requests): the entries and their
    lines in one pipelined insert each, and each book updated once with the sum of its
    lines, in name order (so concurrent batches never deadlock).

    Raises :class:`AlreadyPosted` if an idempotency key exists after all, and
    :class:`InsufficientFunds` if a book in ``floors`` would end below its floor (its
    lines' sum is checked, as :func:`post` checks each entry's); either way the
    caller's transaction must roll back (raising out of :meth:`Database.write` does)."""
    if not entries:
        return
    plan = NewEntries(entries, floors)
    plan.check(tx.pipelined(plan.statements()))


def _apply(tx: Tx, book: str, amount: int, floor: int | None) -> None:
    """Add ``amount`` to ``book`` (created at zero if new); a debit that would take a
    book with a ``floor`` below it raises :class:`InsufficientFunds`."""
    if floor is not None and amount < 0:
        if tx.run(FLOORED_UPDATE, (amount, book, amount, floor)) == 0:
            have = int(tx.value("SELECT balance FROM books WHERE book = ?", (book,),
                                default=0))
            raise InsufficientFunds(book, have, -amount)
    else:
        tx.run("INSERT INTO books (book, balance) VALUES (?, ?) ON CONFLICT (book) "
               "DO UPDATE SET balance = books.balance + excluded.balance", (book, amount))


def balance(tx: Tx, book: str) -> int:
    """A book's balance (0 for a book never posted to)."""
    return int(tx.value("SELECT balance FROM books WHERE book = ?", (book,), default=0))


def posted(tx: Tx, idem_key: str) -> bool:
    """Whether an entry with ``idem_key`` exists."""
    return tx.one("SELECT 1 FROM journal WHERE idem_key = ?", (idem_key,)) is not None
