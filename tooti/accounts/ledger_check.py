"""``tooti ledger check``: the ledger's invariants, verified from the database alone.

:func:`check` returns the violations, most fundamental first (the first one decides
the exit status); an empty list means the ledger balances:

1. every journal entry's lines sum to zero (double entry);
2. every book's cached balance equals the sum of its lines (and no line names a book
   without a balance);
3. all books together sum to zero (money is neither created nor lost: ``issued`` is
   minus everything ever issued) — implied by 1 and 2, kept as the headline figure;
4. ``issued`` moves only through ``topup`` and ``code`` entries (no other entry creates
   or destroys credit);
5. every redeemed credit code has exactly one ``code:<id>`` entry crediting its redeemer
   exactly its amount, and every ``code`` entry belongs to a redeemed code;
6. no account book is below zero — *unless* settles charged to that account book
   directly after a reconcile explain it (a gateway cut off from the database past its
   lease ttl settled on a lease another gateway had reconciled, or a quarantined
   request replayed after its lease went back: the documented bound of
   :mod:`tooti.accounts.leases`). The allowance is, per closed lease of the account,
   the lesser of what those settles charged the account book and what the lease's
   ``release:<lease>`` entry returned to it; within it the balance is a *warning*
   (:func:`check_report`), beyond it a violation. And per lease, what its requests
   charged the account book directly is at most what its release returned (the bound
   itself);
7. a closed lease holds zero, an open lease is not negative, and every lease's
   ``amount`` is what its ``lease`` entries credited its book;
8. every usage row with ``charged > 0`` has exactly one ``settle:<request id>`` entry
   debiting exactly ``charged``, and every settle entry has such a row;
9. every usage row's ``earned + fee == charged``, and its settle entry credits exactly
   ``earned`` to ``earnings:<owner_id>`` (``admin`` without one), ``fee`` to ``fees``
   and nothing else;
10. ``usage_quarantine`` is empty: a quarantined request is not billed yet (``tooti
    ledger replay`` writes it).

:func:`summary` gives the totals an operator reads beside it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import FEES, ISSUED, PAYOUTS
from tooti.accounts.records import ADMIN_ACCOUNT

SHOWN = 20
"""Offending rows listed per invariant (the count says how many there are)."""


class Report(msgspec.Struct, frozen=True):
    """What :func:`check_report` found."""

    violations: list[str]
    warnings: list[str]


def check(db: Database) -> list[str]:
    """Every violated invariant (see the module docstring); empty if the ledger holds."""
    return check_report(db).violations


def check_report(db: Database) -> Report:
    """Violations and warnings, in one read transaction."""
    return db.read_sync(_check)


def _listed(what: str, rows: list[tuple[Any, ...]], fmt: str) -> list[str]:
    if not rows:
        return []
    shown = "; ".join(fmt.format(*row) for row in rows[:SHOWN])
    more = f" (and {len(rows) - SHOWN} more)" if len(rows) > SHOWN else ""
    return [f"{what}: {shown}{more}"]


def _check(tx: Tx) -> Report:
    out: list[str] = []
    warnings: list[str] = []
    out += _listed("unbalanced journal entries", tx.all(
        "SELECT j.idem_key, SUM(l.amount) FROM journal_lines l JOIN journal j "
        "ON j.id = l.entry_id GROUP BY j.idem_key HAVING SUM(l.amount) <> 0 "
        "ORDER BY j.idem_key"), "{0} sums to {1}")
    out += _listed("books whose balance is not the sum of their lines", tx.all(
        "SELECT b.book, b.balance, COALESCE(SUM(l.amount), 0) FROM books b "
        "LEFT JOIN journal_lines l ON l.book = b.book GROUP BY b.book, b.balance "
        "HAVING b.balance <> COALESCE(SUM(l.amount), 0) ORDER BY b.book"),
        "{0} holds {1}, its lines sum to {2}")
    out += _listed("journal lines on books without a balance", tx.all(
        "SELECT l.book, SUM(l.amount) FROM journal_lines l WHERE NOT EXISTS "
        "(SELECT 1 FROM books b WHERE b.book = l.book) GROUP BY l.book "
        "HAVING SUM(l.amount) <> 0 ORDER BY l.book"), "{0} lines sum to {1}")
    total = int(tx.value("SELECT SUM(balance) FROM books", default=0))
    if total:
        out.append(f"the books sum to {total}, not 0 (money was created or lost)")
    out += _listed("entries moving issued credit that are not top-ups or codes", tx.all(
        "SELECT j.idem_key, j.kind, l.amount FROM journal_lines l JOIN journal j "
        "ON j.id = l.entry_id WHERE l.book = ? AND j.kind NOT IN ('topup', 'code') "
        "ORDER BY j.idem_key", (ISSUED,)), "{0} ({1}) moves {2}")
    codes = tx.all(
        "SELECT c.id, c.amount, (SELECT COUNT(*) FROM journal j "
        "WHERE j.idem_key = 'code:' || c.id), (SELECT COALESCE(SUM(l.amount), 0) "
        "FROM journal j JOIN journal_lines l ON l.entry_id = j.id "
        "WHERE j.idem_key = 'code:' || c.id AND l.book = 'account:' || c.redeemed_by) "
        "FROM credit_codes c WHERE c.redeemed_by IS NOT NULL ORDER BY c.id")
    out += _listed("redeemed credit codes without exactly one entry of their amount",
                   [row for row in codes if int(row[2]) != 1 or int(row[3]) != int(row[1])],
                   "{0} of {1}: {2} entries crediting {3}")
    out += _listed("code entries without a redeemed code", tx.all(
        "SELECT j.idem_key FROM journal j WHERE j.kind = 'code' AND NOT EXISTS "
        "(SELECT 1 FROM credit_codes c WHERE j.idem_key = 'code:' || c.id "
        "AND c.redeemed_by IS NOT NULL) ORDER BY j.idem_key"), "{0}")
    below = tx.all("SELECT book, balance FROM books WHERE balance < 0 ORDER BY book")
    unexplained: list[tuple[Any, ...]] = []
    for book, held in below:
        if not str(book).startswith("account:"):
            continue
        allowed = _overdraft_allowed(tx, str(book))
        if -int(held) <= allowed:
            warnings.append(f"{book} holds {held}: settles on leases reconciled while "
                            f"their gateway was cut off (or replayed after their lease "
                            f"went back) charged it up to {allowed} directly (within the "
                            "documented bound)")
        else:
            unexplained.append((book, held))
    out += _listed("accounts below zero", unexplained, "{0} holds {1}")
    out += _listed("settles charged directly beyond what their reconciled lease returned",
                   _direct_beyond_release(tx),
                   "{0} charged {1}, its release returned {2}")
    out += _listed("closed leases holding credit", tx.all(
        "SELECT l.id, b.balance FROM leases l JOIN books b ON b.book = 'lease:' || l.id "
        "WHERE l.closed_at IS NOT NULL AND b.balance <> 0 ORDER BY l.id"), "{0} holds {1}")
    out += _listed("open leases below zero", tx.all(
        "SELECT l.id, b.balance FROM leases l JOIN books b ON b.book = 'lease:' || l.id "
        "WHERE l.closed_at IS NULL AND b.balance < 0 ORDER BY l.id"), "{0} holds {1}")
    leases = tx.all(
        "SELECT le.id, le.amount, (SELECT COALESCE(SUM(l.amount), 0) FROM journal_lines l "
        "JOIN journal j ON j.id = l.entry_id WHERE l.book = 'lease:' || le.id "
        "AND j.kind = 'lease') FROM leases le ORDER BY le.id")
    out += _listed("leases whose amount is not what their lease entries credited",
                   [row for row in leases if int(row[1]) != int(row[2])],
                   "{0} amount {1}, entries {2}")
    out += _listed("charged requests without exactly one settle entry", tx.all(
        "SELECT u.request_id, u.charged, COUNT(j.id) FROM usage u LEFT JOIN journal j "
        "ON j.idem_key = 'settle:' || u.request_id WHERE u.charged > 0 "
        "GROUP BY u.request_id, u.charged HAVING COUNT(j.id) <> 1 ORDER BY u.request_id"),
        "{0} charged {1}, {2} entries")
    out += _listed("settle entries of another amount than their request's charge", tx.all(
        "SELECT u.request_id, u.charged, -SUM(l.amount) FROM usage u JOIN journal j "
        "ON j.idem_key = 'settle:' || u.request_id JOIN journal_lines l "
        "ON l.entry_id = j.id AND l.amount < 0 GROUP BY u.request_id, u.charged "
        "HAVING -SUM(l.amount) <> u.charged ORDER BY u.request_id"),
        "{0} charged {1}, its entry {2}")
    out += _listed("settle entries without a charged request", tx.all(
        "SELECT j.idem_key FROM journal j WHERE j.kind = 'settle' AND NOT EXISTS "
        "(SELECT 1 FROM usage u WHERE u.request_id = j.request_id AND u.charged > 0 "
        "AND j.idem_key = 'settle:' || u.request_id) ORDER BY j.idem_key"), "{0}")
    out += _listed("requests whose earned + fee is not their charge", tx.all(
        "SELECT request_id, charged, earned, fee FROM usage WHERE earned + fee <> charged "
        "ORDER BY request_id"), "{0} charged {1}, earned {2} + fee {3}")
    # One pass over the settle entries' lines, grouped by request (correlated subqueries
    # per request would read a whole book's lines each time: quadratic).
    out += _listed("settle entries not paying their request's owner its earnings and fee",
                   tx.all(
        "SELECT u.request_id, COALESCE(NULLIF(u.owner_id, ''), ?), u.earned, u.fee, "
        "SUM(CASE WHEN l.book = 'earnings:' || COALESCE(NULLIF(u.owner_id, ''), ?) "
        "THEN l.amount ELSE 0 END), SUM(CASE WHEN l.book = ? THEN l.amount ELSE 0 END), "
        "SUM(CASE WHEN l.amount > 0 THEN l.amount ELSE 0 END) "
        "FROM usage u JOIN journal j ON j.idem_key = 'settle:' || u.request_id "
        "JOIN journal_lines l ON l.entry_id = j.id WHERE u.charged > 0 "
        "GROUP BY u.request_id, u.owner_id, u.earned, u.fee "
        "HAVING SUM(CASE WHEN l.book = 'earnings:' || COALESCE(NULLIF(u.owner_id, ''), ?) "
        "THEN l.amount ELSE 0 END) <> u.earned "
        "OR SUM(CASE WHEN l.book = ? THEN l.amount ELSE 0 END) <> u.fee "
        "OR SUM(CASE WHEN l.amount > 0 THEN l.amount ELSE 0 END) <> u.earned + u.fee "
        "ORDER BY u.request_id",
        (ADMIN_ACCOUNT, ADMIN_ACCOUNT, FEES, ADMIN_ACCOUNT, FEES)),
                   "{0}: earned {2} + fee {3} for {1}, its entry pays {4} to the owner, "
                   "{5} to fees, {6} in all")
    out += _listed("quarantined requests, not billed yet (run tooti ledger replay)",
                   tx.all("SELECT request_id, error FROM usage_quarantine "
                          "ORDER BY request_id, ts"), "{0} ({1})")
    return Report(out, warnings)


def _direct_beyond_release(tx: Tx) -> list[tuple[str, int, int]]:
    """Leases whose requests charged their account's book directly (the lease was found
    closed) more than the lease's release returned to that account: the bound of
    :mod:`tooti.accounts.leases` broken."""
    rows = tx.all(
        "SELECT u.lease_id, u.account_id, -SUM(l.amount) FROM usage u JOIN journal j "
        "ON j.idem_key = 'settle:' || u.request_id JOIN journal_lines l "
        "ON l.entry_id = j.id AND l.book = 'account:' || u.account_id "
        "WHERE u.lease_id <> '' AND l.amount < 0 GROUP BY u.lease_id, u.account_id "
        "ORDER BY u.lease_id")
    out: list[tuple[str, int, int]] = []
    for lease_id, account_id, charged in rows:
        returned = _returned(tx, str(lease_id), f"account:{account_id}")
        if int(charged) > returned:
            out.append((str(lease_id), int(charged), returned))
    return out


def _returned(tx: Tx, lease_id: str, book: str) -> int:
    return int(tx.value(
        "SELECT COALESCE(SUM(l.amount), 0) FROM journal j JOIN journal_lines l "
        "ON l.entry_id = j.id WHERE j.idem_key = ? AND l.book = ?",
        (f"release:{lease_id}", book), default=0))


def _overdraft_allowed(tx: Tx, book: str) -> int:
    """How far below zero settles charged directly to ``book`` after reconciles may take
    it: per lease, the lesser of those settles and what the lease's release returned."""
    direct = tx.all(
        "SELECT u.lease_id, -SUM(l.amount) FROM usage u JOIN journal j "
        "ON j.idem_key = 'settle:' || u.request_id JOIN journal_lines l "
        "ON l.entry_id = j.id WHERE l.book = ? AND l.amount < 0 AND u.lease_id <> '' "
        "GROUP BY u.lease_id", (book,))
    return sum(max(0, min(int(charged), _returned(tx, str(lease_id), book)))
               for lease_id, charged in direct)


def summary(db: Database) -> dict[str, int]:
    """Totals in micro-units: ``issued`` (all credit ever issued), ``balances``
    (spendable, all accounts), ``leased`` (held in open leases), ``earnings`` (owed to
    operators), ``fees``, ``payouts``, ``charged`` (all settled requests) and
    ``open_leases`` (a count)."""

    def read(tx: Tx) -> dict[str, int]:
        def books(pattern: str) -> int:
            return int(tx.value("SELECT SUM(balance) FROM books WHERE book LIKE ?",
                                (pattern,), default=0))

        def book(name: str) -> int:
            return int(tx.value("SELECT balance FROM books WHERE book = ?", (name,),
                                default=0))

        return {
            "issued": -book(ISSUED),
            "balances": books("account:_%"),
            "leased": books("lease:_%"),
            "earnings": books("earnings:_%"),
            "fees": book(FEES),
            "payouts": book(PAYOUTS),
            "charged": int(tx.value("SELECT SUM(charged) FROM usage", default=0)),
            "open_leases": int(tx.value(
                "SELECT COUNT(*) FROM leases WHERE closed_at IS NULL", default=0)),
        }

    return db.read_sync(read)
