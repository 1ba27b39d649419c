"""A settle's own write on the event loop's thread (``Credits.settle`` with
``Database.try_write_now``) never holds up the request: the pipeline's
``SETTLE_TIMEOUT`` still bounds a settle whose record the database keeps waiting (on
PostgreSQL, and on SQLite when the write must go to a worker thread), and a settle the
pipeline's deadline skipped does not keep the fast path off for good."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tooti.accounts import database as database_module
from tooti.accounts.database import Database
from tooti.billing import credits as credits_module
from tooti.billing import pipeline as pipeline_module
from tooti.billing.base import BillingSetup, Outcome, RequestContext, Usage
from tooti.billing.credits import Credits
from tooti.billing.pipeline import SETTLE_TIMEOUT, BillingPipeline


def ctx(request_id: str) -> RequestContext:
    """An anonymous request (no lease: only its usage row is written)."""
    return RequestContext(request_id, "key_1", "m", "chat/completions", False)


def usage() -> Usage:
    return Usage("node-a", "m", 10, 10, "ok")


def served() -> Outcome:
    outcome = Outcome()
    outcome.served, outcome.status = True, "ok"
    return outcome


def usage_ids(db: Database) -> set[str]:
    return {row[0] for row in db.read_sync(lambda tx: tx.all(
        "SELECT request_id FROM usage"))}


def is_settle_batch(fn: Any) -> bool:
    return isinstance(fn, functools.partial) and getattr(fn.func, "__name__", "") in (
        "commit", "_commit")


async def test_the_settle_timeout_bounds_a_settle_the_database_keeps_waiting(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settle's record must be written in a worker thread (PostgreSQL always;
    SQLite when a checkpoint is due), and that write is held: the pipeline's finish
    still returns at its deadline, counted late, while the write is held; the record
    lands once the database takes it. (Trio's real clock: on the autojump clock a
    flush's deadline would pass while the released write still runs in its thread.)"""
    gate = threading.Event()
    released: list[bool] = []
    """Per held write: True once the test let it go, False if it gave up waiting."""
    real = database.write_sync

    def held(fn: Any) -> Any:
        if is_settle_batch(fn):
            # (bounded: a settle that waits for this write must fail the test, not hang)
            released.append(gate.wait(timeout=5))
        return real(fn)

    monkeypatch.setattr(database, "write_sync", held)
    monkeypatch.setattr(pipeline_module, "SETTLE_TIMEOUT", 0.2)
    if database.dialect == "sqlite":
        database._commits = database_module.CHECKPOINT_COMMITS - 1  # a checkpoint due
    credits = Credits(BillingSetup(tmp_path, {}, database=database, gateway_id="gw-a"))
    pipeline = BillingPipeline([credits])
    late: list[str] = []
    pipeline.on_late = late.append
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(credits.run)
            await pipeline.authorize(ctx("r1"))
            await pipeline.finish(ctx("r1"), served(), usage())
            assert released == []  # returned while the write was still held
            assert late == ["r1"]
            assert "r1" not in usage_ids(database)
            gate.set()
            await credits.flush()
            assert "r1" in usage_ids(database) and credits.backlog == 0
            assert released == [True]
            nursery.cancel_scope.cancel()
    finally:
        gate.set()
        await credits.close()


class SlowFor:
    """A billing plugin whose settle of one request outlasts the pipeline's deadline
    (the plugins after it never get that request's settle)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    async def run(self) -> None:
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        pass

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        if ctx.request_id == self.request_id:
            await trio.sleep(SETTLE_TIMEOUT * 2)

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_settle_skipped_by_the_deadline_leaves_the_fast_path_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    """r0's settle never reaches ``credits`` (the plugin before it used the whole
    deadline): r0 stays 'in flight' for the settle-alone hint only until
    ``OPEN_HINT_AGE``; after that a request alone writes its own record again (run()
    is not running here: nothing else would write it)."""
    db = Database(str(tmp_path / "t.sqlite3"))
    credits = Credits(BillingSetup(tmp_path, {}, database=db, gateway_id="gw-a"))
    pipeline = BillingPipeline([SlowFor("r0"), credits])
    late: list[str] = []
    pipeline.on_late = late.append
    try:
        await pipeline.authorize(ctx("r0"))
        await pipeline.finish(ctx("r0"), served(), usage())
        assert late == ["r0"]
        await pipeline.authorize(ctx("r1"))
        await pipeline.finish(ctx("r1"), served(), usage())  # r0 counts: run() would write
        assert late == ["r0", "r1"] and "r1" not in usage_ids(db)
        await credits.flush()
        await trio.sleep(credits_module.OPEN_HINT_AGE)
        await pipeline.authorize(ctx("r2"))
        await pipeline.finish(ctx("r2"), served(), usage())
        assert late == ["r0", "r1"]  # r2 written in its own settle, at once
        assert "r2" in usage_ids(db) and not credits._open
    finally:
        await credits.close()
        db.close()

