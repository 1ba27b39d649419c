"""``usage-ledger``: the built-in billing plugin, one usage record per request in SQLite.

Records go to ``<data_dir>/usage.sqlite3`` (WAL mode, ``synchronous=NORMAL``), keyed
by request id so settling twice writes once. Rows are queued on a bounded channel and
written off the event loop by :meth:`UsageLedger.run` with group commit: every row
queued while a transaction is being written goes into the next one (up to ``BATCH``).
:meth:`UsageLedger.settle` returns once its row is committed, and the gateway settles
a completed answer before its last bytes leave, so a client never sees a complete
answer whose record a ``kill -9`` of the gateway could still lose (a committed WAL
transaction is in the operating system's hands; only losing the machine itself, power
or kernel, can take the last ones back).

No row is ever lost to a bad value or a failing disk, and no error ends ``run``: a
batch that fails is written again row by row, and a row that still fails goes to the
``usage_quarantine`` table with the error (or, if the database cannot take even that,
to ``usage-quarantine.jsonl`` beside it). Accounts and balances come later;
``authorize`` admits every request.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from tooti import clock
from tooti.billing.base import Billing, BillingSetup, RequestContext, Usage
from tooti.hookspecs import hookimpl

log = logging.getLogger("tooti.billing")

FILENAME = "usage.sqlite3"
QUARANTINE_FILE = "usage-quarantine.jsonl"
"""Beside the database: rows that neither the usage table nor the quarantine table took."""
QUEUE = 10_000
BATCH = 512
FLUSH_TIMEOUT = 10.0
"""Longest wait in :meth:`UsageLedger.flush` (shutdown must not hang on the disk)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    node_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    stream INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    price_input REAL NOT NULL,
    price_output REAL NOT NULL,
    cost REAL NOT NULL,
    status TEXT NOT NULL,
    latency_ms REAL NOT NULL
)
"""
INSERT = "INSERT OR IGNORE INTO usage VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
COLUMNS = ("request_id", "ts", "key_id", "model", "node_id", "endpoint", "stream",
           "prompt_tokens", "completion_tokens", "estimated", "price_input", "price_output",
           "cost", "status", "latency_ms")
QUARANTINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_quarantine (
    request_id TEXT,
    ts REAL NOT NULL,
    error TEXT NOT NULL,
    row TEXT NOT NULL
)
"""

Row = tuple[Any, ...]
Pending = tuple[Row, trio.Event | None]
"""A queued row and the event set once it is committed (or quarantined)."""


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the ledger database in WAL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(SCHEMA)
    db.execute(QUARANTINE_SCHEMA)
    return db


class UsageLedger:
    """Queues usage rows and writes them in batches (see the module docstring)."""

    def __init__(self, setup: BillingSetup) -> None:
        self.path = Path(setup.options.get("usage_ledger_path") or setup.data_dir / FILENAME)
        self._db = open_db(self.path)
        self._send, self._receive = trio.open_memory_channel[Pending](QUEUE)
        self._lock = trio.Lock()
        self._queued = 0
        self._written = 0
        self._wrote = trio.Event()

    async def run(self) -> None:
        """Write queued rows in batches until cancelled (see the module docstring)."""
        while True:
            batch = [await self._receive.receive()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            # A batch taken off the queue is always written, even during shutdown:
            # otherwise its rows would be lost and flush() would wait for them forever.
            with trio.CancelScope(shield=True):
                await self._write(batch)

    async def _write(self, batch: list[Pending]) -> None:
        rows = [row for row, _ in batch]
        try:
            async with self._lock:
                await trio.to_thread.run_sync(self._write_sync, rows)
        except Exception:  # _write_sync keeps every row; this is only a last resort
            log.exception("usage ledger: writing %d rows failed", len(rows))
        self._written += len(rows)
        for _, committed in batch:
            if committed is not None:
                committed.set()
        self._wrote.set()
        self._wrote = trio.Event()

    def _write_sync(self, rows: list[Row]) -> None:
        """Commit ``rows`` in one transaction; if that fails, row by row, quarantining
        each row that still fails. Never raises for a bad row or a failing disk."""
        try:
            self._insert(rows)
            return
        except Exception as exc:
            log.error("usage ledger: a batch of %d rows failed (%s: %s); writing them one "
                      "by one", len(rows), type(exc).__name__, exc)
        for row in rows:
            try:
                self._insert([row])
            except Exception as exc:
                self._quarantine(row, exc)

    def _insert(self, rows: list[Row]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(INSERT, rows)

    def _quarantine(self, row: Row, error: Exception) -> None:
        """Keep a row the usage table refused, with why: in ``usage_quarantine``, else
        in :data:`QUARANTINE_FILE`, else (the disk refuses everything) in the log."""
        reason = f"{type(error).__name__}: {error}"
        record = json.dumps(dict(zip(COLUMNS, row, strict=False)), default=repr)
        log.error("usage ledger: request %s quarantined (%s)", row[0], reason)
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("INSERT INTO usage_quarantine VALUES (?,?,?,?)",
                                 (str(row[0]), clock.wall(), reason, record))
            return
        except Exception as exc:
            log.error("usage ledger: quarantine table refused %s (%s)", row[0], exc)
        try:
            with (self.path.parent / QUARANTINE_FILE).open("a") as file:
                file.write(json.dumps({"error": reason, "row": record}) + "\n")
        except OSError as exc:
            log.error("usage ledger: %s lost to the disk (%s); its record: %s", row[0], exc,
                      record)

    async def flush(self) -> None:
        """Return once every row queued before the call is written (shutdown, tests)."""
        target = self._queued
        rows: list[Pending] = []
        while True:
            try:
                rows.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        if rows:
            await self._write(rows)
        with trio.move_on_after(FLUSH_TIMEOUT) as timer:
            while self._written < target:  # the run loop holds the rest: wait for its write
                await self._wrote.wait()
        if timer.cancelled_caught:
            log.error("usage ledger: %d rows not written after %.0fs",
                      target - self._written, FLUSH_TIMEOUT)

    async def authorize(self, ctx: RequestContext) -> None:
        """No balances yet: every request is admitted."""
        return None

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        """Queue the request's usage record; return once it is committed (durable)."""
        committed = trio.Event()
        self._queued += 1
        await self._send.send(((
            ctx.request_id, clock.wall(), ctx.key_id, usage.model, usage.node_id, ctx.endpoint,
            int(ctx.stream), usage.prompt_tokens, usage.completion_tokens, int(usage.estimated),
            usage.price_input, usage.price_output, usage.cost, usage.status, usage.latency_ms,
        ), committed))
        await committed.wait()

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        """Queue a record of a request no node served (zero tokens, status ``failed``)."""
        self._queued += 1
        await self._send.send(((
            ctx.request_id, clock.wall(), ctx.key_id, ctx.model, "", ctx.endpoint,
            int(ctx.stream), 0, 0, 0, 0.0, 0.0, 0.0, "failed", 0.0,
        ), None))

    async def close(self) -> None:
        """Flush the queue and close the database."""
        with trio.CancelScope(shield=True):
            await self.flush()
        self._db.close()


@dataclass(frozen=True)
class SummaryRow:
    """One line of ``tooti usage``."""

    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


GROUPS = {"key": "key_id", "model": "model", "node": "node_id", "status": "status"}


def summarize(path: Path, by: str) -> list[SummaryRow]:
    """Totals per key, model, node or status from a ledger file."""
    column = GROUPS[by]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            f"SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost) "
            f"FROM usage GROUP BY {column} ORDER BY SUM(cost) DESC, COUNT(*) DESC"
        ).fetchall()
    finally:
        db.close()
    return [SummaryRow(str(r[0]) or "-", r[1], r[2] or 0, r[3] or 0, r[4] or 0.0) for r in rows]


@hookimpl
def tooti_billing() -> Mapping[str, Callable[[BillingSetup], Billing]]:
    """The built-in ``usage-ledger`` plugin."""
    return {"usage-ledger": UsageLedger}
