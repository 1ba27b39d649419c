"""``Database.write_soon``: the settles' commits on the event loop's thread when SQLite can
take them at once, in a worker thread otherwise (writer busy in this process, the file
locked by another process, a checkpoint due; PostgreSQL always), with the same result
and durability either way."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tooti.accounts import database as database_module
from tooti.accounts.database import Database, Tx


def insert(value: str) -> Any:
    def run(tx: Tx) -> int:
        return tx.run("INSERT INTO schema_migrations VALUES (?, ?)", (int(value), 0.0))
    return run


def versions(db: Database) -> set[int]:
    return {row[0] for row in db.read_sync(lambda tx: tx.all(
        "SELECT version FROM schema_migrations"))}


class ThreadHops:
    """Counts the calls that went to a worker thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = trio.to_thread.run_sync

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(trio.to_thread, "run_sync", counted)


async def test_commits_in_the_loop_or_in_a_thread_with_the_same_result(
    database: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    hops = ThreadHops(monkeypatch)
    assert await database.write_soon(insert("1001")) == 1
    assert 1001 in versions(database)
    # SQLite commits on the loop (no thread); PostgreSQL always in a thread.
    assert hops.count == (0 if database.dialect == "sqlite" else 1)
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        await database.write_soon(insert("1001"))  # duplicate: rolled back, raised
    assert await database.write_soon(insert("1002")) == 1  # the writer is usable after
    assert {1001, 1002} <= versions(database)


async def test_sqlite_never_waits_on_the_loop(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer lock held by a thread of this process, or the file's write lock held by
    another connection: the commit goes to a worker thread (the loop keeps running) and
    lands once the lock is free."""
    db = Database(str(tmp_path / "t.sqlite3"))
    hops = ThreadHops(monkeypatch)
    try:
        # 1. the in-process writer lock is held
        db._lock.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.write_soon, insert("2001"))
            await trio.testing.wait_all_tasks_blocked()
            assert hops.count == 1 and 2001 not in versions(db)
            db._lock.release()
        assert 2001 in versions(db)
        # 2. another connection (another process) holds the file's write lock
        other = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None,
                                check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(db.write_soon, insert("2002"))
            await trio.testing.wait_all_tasks_blocked()
            assert hops.count == 2
            other.execute("ROLLBACK")
        other.close()
        assert 2002 in versions(db)
        # the busy timeout of the thread path is back to its normal value
        assert db.write_sync(lambda tx: tx.value("PRAGMA busy_timeout")) == \
            database_module.BUSY_TIMEOUT_MS
    finally:
        db.close()


async def test_sqlite_checkpoints_in_a_worker_thread(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer never checkpoints automatically (an fsync on the loop); every
    CHECKPOINT_COMMITS commits one write goes to a thread and checkpoints there."""
    monkeypatch.setattr(database_module, "CHECKPOINT_COMMITS", 5)
    db = Database(str(tmp_path / "t.sqlite3"))
    hops = ThreadHops(monkeypatch)
    checkpoints: list[str] = []
    real = db._checkpoint

    def counted() -> None:
        checkpoints.append(threading.current_thread().name)
        real()

    monkeypatch.setattr(db, "_checkpoint", counted)
    try:
        assert db.write_sync(lambda tx: tx.value("PRAGMA wal_autocheckpoint")) == 0
        db._commits = 0
        for n in range(10):
            await db.write_soon(insert(str(3000 + n)))
        assert hops.count == 2  # commits 5 and 10
        assert len(checkpoints) == 2
        assert threading.main_thread().name not in checkpoints
        assert set(range(3000, 3010)) <= versions(db)
    finally:
        db.close()
