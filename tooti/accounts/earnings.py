"""What node operators earned: per operator and per node over a time range, and the
rows to pay them out from (``tooti earnings``).

Figures come from the ``usage`` table (one row per request, written with its settle
entry in one transaction by :mod:`tooti.billing.credits`): ``earned`` is the owner's
share of what the request was charged, ``fee`` the gateway's. The payout rows add
each operator's current ``earnings:<id>`` book (owed now, whatever the range) and
what was paid out to it so far. Money is integer micro-units; the CSV and JSON forms
also carry it as decimal credits for people.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import msgspec

from tooti.accounts.database import Database, Tx
from tooti.accounts.journal import PAYOUTS, earnings_book
from tooti.accounts.money import format_credits


class NodeEarnings(msgspec.Struct, frozen=True):
    """One node's figures in the range."""

    owner_id: str
    node_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    earned: int
    fee: int


class OperatorEarnings(msgspec.Struct, frozen=True):
    """One operator's figures in the range (all its nodes)."""

    owner_id: str
    nodes: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    earned: int
    fee: int


class PayoutRow(msgspec.Struct, frozen=True):
    """One operator to pay: earned in the range, owed now, paid out so far."""

    owner_id: str
    earned: int
    owed: int
    paid: int


def _where(since: float | None, until: float | None,
           owner: str | None) -> tuple[str, list[Any]]:
    clauses = ["charged > 0"]
    params: list[Any] = []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append("ts < ?")
        params.append(until)
    if owner is not None:
        clauses.append("owner_id = ?")
        params.append(owner)
    return " AND ".join(clauses), params


def by_node(db: Database, *, since: float | None = None, until: float | None = None,
            owner: str | None = None) -> list[NodeEarnings]:
    """Per operator and node, requests charged in ``[since, until)`` (Unix times)."""
    where, params = _where(since, until, owner)

    def read(tx: Tx) -> list[NodeEarnings]:
        return [NodeEarnings(str(r[0]), str(r[1]), int(r[2]), int(r[3] or 0),
                             int(r[4] or 0), int(r[5] or 0), int(r[6] or 0))
                for r in tx.all(
                    "SELECT owner_id, node_id, COUNT(*), SUM(prompt_tokens), "
                    "SUM(completion_tokens), SUM(earned), SUM(fee) FROM usage "
                    f"WHERE {where} GROUP BY owner_id, node_id ORDER BY owner_id, node_id",
                    params)]

    return db.read_sync(read)


def by_operator(db: Database, *, since: float | None = None, until: float | None = None,
                owner: str | None = None) -> list[OperatorEarnings]:
    """Per operator (its nodes summed), requests charged in ``[since, until)``."""
    totals: dict[str, list[int]] = {}
    for row in by_node(db, since=since, until=until, owner=owner):
        t = totals.setdefault(row.owner_id, [0, 0, 0, 0, 0, 0])
        for i, value in enumerate((1, row.requests, row.prompt_tokens,
                                   row.completion_tokens, row.earned, row.fee)):
            t[i] += value
    return [OperatorEarnings(owner_id, *t) for owner_id, t in sorted(totals.items())]


def payouts(db: Database, *, since: float | None = None, until: float | None = None,
            owner: str | None = None) -> list[PayoutRow]:
    """Every operator with earnings in the range or owed now (or only ``owner``, whose
    row is read alone: its usage rows, its earnings book and its payouts): earned in the
    range, the balance of its earnings book (owed) and what it was paid out (from the
    journal)."""
    earned = {row.owner_id: row.earned
              for row in by_operator(db, since=since, until=until, owner=owner)}
    if owner is None:
        books, match = "book LIKE ?", "earnings:_%"
    else:
        books, match = "book = ?", earnings_book(owner)

    def read(tx: Tx) -> list[PayoutRow]:
        owed = {str(book).removeprefix("earnings:"): int(balance) for book, balance in tx.all(
            f"SELECT book, balance FROM books WHERE {books}", (match,))}
        paid: dict[str, int] = {}
        for book, amount in tx.all(
                "SELECT l.book, SUM(-l.amount) FROM journal_lines l WHERE l.entry_id IN "
                f"(SELECT entry_id FROM journal_lines WHERE book = ?) AND l.{books} "
                "GROUP BY l.book", (PAYOUTS, match)):
            paid[str(book).removeprefix("earnings:")] = int(amount or 0)
        owners = sorted(set(earned) | {o for o, v in owed.items() if v} | set(paid))
        return [PayoutRow(o, earned.get(o, 0), owed.get(o, 0), paid.get(o, 0))
                for o in owners]

    return db.read_sync(read)


def owed(db: Database, owner_id: str) -> int:
    """What ``owner_id`` is owed now (its earnings book)."""
    return int(db.read_sync(lambda tx: tx.value(
        "SELECT balance FROM books WHERE book = ?", (earnings_book(owner_id),), default=0)))


def export_json(rows: list[Any]) -> list[dict[str, Any]]:
    """Rows as JSON-able dicts, every micro-unit field also as ``<field>_credits``."""
    out = []
    for row in rows:
        record: dict[str, Any] = msgspec.to_builtins(row)
        for name in ("earned", "fee", "owed", "paid"):
            if name in record:
                record[f"{name}_credits"] = format_credits(record[name])
        out.append(record)
    return out


def export_csv(rows: list[Any]) -> str:
    """Rows as CSV text with a header (same columns as :func:`export_json`)."""
    records = export_json(rows)
    if not records:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()
