"""Read-only reports for the web console's pages, from the ``usage`` and
``node_owners`` tables: one account's usage per UTC day and model, its last requests,
an operator's earnings per UTC day and node, and the nodes it owns.

Every function takes the :class:`~tooti.accounts.database.Database` and the account
whose rows it reads, and filters by it in SQL (``usage.account_id`` for what an account
spent, ``usage.owner_id`` for what its nodes earned): a page can show only the rows of
the account it passes. Days are UTC dates (``"YYYY-MM-DD"``), bucketed in SQL by the
whole days since the epoch (``floor(ts / 86400)``, written per dialect since SQLite
has no ``FLOOR`` and PostgreSQL's ``CAST`` rounds); ``days`` counts today, so
``days=1`` is today alone. Money is integer micro-units.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import msgspec

from tooti import clock
from tooti.accounts.database import Database, Tx

DAY = 86400
MAX_DAYS = 400
MAX_ROWS = 1000


class DayUsage(msgspec.Struct, frozen=True):
    """What an account used of one model on one UTC day."""

    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    charged: int


class RequestRow(msgspec.Struct, frozen=True):
    """One request of an account, as its usage row recorded it."""

    request_id: str
    ts: float
    key_id: str
    model: str
    node_id: str
    endpoint: str
    stream: bool
    status: str
    prompt_tokens: int
    completion_tokens: int
    charged: int
    ttft_ms: float | None
    latency_ms: float


class DayEarnings(msgspec.Struct, frozen=True):
    """What one node of an operator earned on one UTC day."""

    day: str
    node_id: str
    requests: int
    tokens: int
    earned: int


class OwnedNode(msgspec.Struct, frozen=True):
    """A node bound to an operator account (``group`` ``""``: its public nodes)."""

    node_id: str
    group: str
    bound_at: float


def _day_expr(tx: Tx) -> str:
    """SQL for the whole UTC days since the epoch of ``ts``."""
    if tx.dialect == "postgresql":
        return f"CAST(FLOOR(ts / {DAY}) AS BIGINT)"
    return f"CAST(ts / {DAY} AS INTEGER)"  # SQLite truncates; ts is never negative


def _day_text(index: int) -> str:
    return datetime.fromtimestamp(index * DAY, UTC).strftime("%Y-%m-%d")


def _since(days: int, now: float | None) -> float:
    """The start of the first UTC day of the last ``days`` (today included)."""
    if type(days) is not int or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be an integer from 1 to {MAX_DAYS}")
    today = math.floor((clock.wall() if now is None else now) / DAY)
    return float((today - days + 1) * DAY)


async def _by_day(db: Database, *, who: str, who_id: str, key: str, sums: str, days: int,
                  now: float | None) -> list[tuple[str, str, list[int]]]:
    """The usage rows where column ``who`` is ``who_id`` over the last ``days`` UTC days
    (today included), grouped by day and column ``key``, by day then key: per group its day
    (``YYYY-MM-DD``), key and the integers of the ``sums`` select list (a fixed SQL text of
    this module's callers, never user input)."""
    since = _since(days, now)

    def read(tx: Tx) -> list[tuple[str, str, list[int]]]:
        day = _day_expr(tx)
        rows = tx.all(
            f"SELECT {day} AS d, {key}, {sums} FROM usage WHERE {who} = ? AND ts >= ? "
            f"GROUP BY {day}, {key} ORDER BY d, {key}", (who_id, since))
        return [(_day_text(int(r[0])), str(r[1]), [int(v) for v in r[2:]]) for r in rows]

    return await db.read(read)


async def usage_by_day(db: Database, account_id: str, *, days: int = 30,
                       now: float | None = None) -> list[DayUsage]:
    """An account's requests, tokens and charges per UTC day and model over the last
    ``days`` days (today included), by day then model."""
    rows = await _by_day(
        db, who="account_id", who_id=account_id, key="model", days=days, now=now,
        sums="COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
             "COALESCE(SUM(charged), 0)")
    return [DayUsage(day=day, model=model, requests=v[0], prompt_tokens=v[1],
                     completion_tokens=v[2], charged=v[3]) for day, model, v in rows]


async def recent_requests(db: Database, account_id: str, *,
                          limit: int = 50) -> list[RequestRow]:
    """An account's last ``limit`` requests (1 to :data:`MAX_ROWS`), newest first."""
    if type(limit) is not int or not 1 <= limit <= MAX_ROWS:
        raise ValueError(f"limit must be an integer from 1 to {MAX_ROWS}")
    rows = await db.read(lambda tx: tx.all(
        "SELECT request_id, ts, key_id, model, node_id, endpoint, stream, status, "
        "prompt_tokens, completion_tokens, charged, ttft_ms, latency_ms FROM usage "
        "WHERE account_id = ? ORDER BY ts DESC, request_id LIMIT ?", (account_id, limit)))
    return [RequestRow(request_id=str(r[0]), ts=float(r[1]), key_id=str(r[2]),
                       model=str(r[3]), node_id=str(r[4]), endpoint=str(r[5]),
                       stream=bool(r[6]), status=str(r[7]), prompt_tokens=int(r[8]),
                       completion_tokens=int(r[9]), charged=int(r[10]),
                       ttft_ms=None if r[11] is None else float(r[11]),
                       latency_ms=float(r[12])) for r in rows]


async def earnings_by_day(db: Database, owner_id: str, *, days: int = 30,
                          now: float | None = None) -> list[DayEarnings]:
    """What an operator's nodes served and earned per UTC day and node over the last
    ``days`` days (today included), by day then node."""
    rows = await _by_day(
        db, who="owner_id", who_id=owner_id, key="node_id", days=days, now=now,
        sums="COUNT(*), COALESCE(SUM(prompt_tokens + completion_tokens), 0), "
             "COALESCE(SUM(earned), 0)")
    return [DayEarnings(day=day, node_id=node, requests=v[0], tokens=v[1], earned=v[2])
            for day, node, v in rows]


async def nodes_of(db: Database, owner_id: str) -> list[OwnedNode]:
    """The nodes bound to an operator account, oldest binding first."""
    rows = await db.read(lambda tx: tx.all(
        "SELECT n.node_id, COALESCE(g.name, ''), n.bound_at FROM node_owners n "
        "LEFT JOIN node_groups g ON g.id = n.group_id WHERE n.account_id = ? "
        "ORDER BY n.bound_at, n.node_id", (owner_id,)))
    return [OwnedNode(node_id=str(r[0]), group=str(r[1]), bound_at=float(r[2]))
            for r in rows]
