"""``Database.try_write_now`` (with a fall back to ``Database.write``, as the settles do):
the settles' commits on the event loop's thread when SQLite can take them at once
without an ``fsync``, declined otherwise (writer busy in this process, the file locked
by another process, a checkpoint due, the WAL about to restart after a checkpoint or
at open, a journal that is not WAL; PostgreSQL always), with the same result and
durability either way."""

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


async def write_soon(db: Database, fn: Any) -> Any:
    """``fn`` committed on this thread if the database takes it at once, else in a
    worker thread (what a settle does, see :mod:`tooti.billing.credits`)."""
    done, result = db.try_write_now(fn)
    return result if done else await db.write(fn)


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
    assert await write_soon(database, insert("1001")) == 1
    assert 1001 in versions(database)
    # SQLite commits on the loop (no thread); PostgreSQL always in a thread.
    assert hops.count == (0 if database.dialect == "sqlite" else 1)
    with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error
        await write_soon(database, insert("1001"))  # duplicate: rolled back, raised
    assert await write_soon(database, insert("1002")) == 1  # the writer is usable after
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
            nursery.start_soon(write_soon, db, insert("2001"))
            await trio.testing.wait_all_tasks_blocked()
            assert hops.count == 1 and 2001 not in versions(db)
            db._lock.release()
        assert 2001 in versions(db)
        # 2. another connection (another process) holds the file's write lock
        other = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None,
                                check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_soon, db, insert("2002"))
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
            await write_soon(db, insert(str(3000 + n)))
        assert hops.count == 3  # commits 5 and 10, and 6: the WAL restarts after 5
        assert len(checkpoints) == 2
        assert threading.main_thread().name not in checkpoints
        assert set(range(3000, 3010)) <= versions(db)
    finally:
        db.close()


def wal_salt(path: Path) -> bytes | None:
    """The WAL header's checkpoint sequence number and salts (bytes 12-24: they change
    when SQLite restarts the WAL, rewriting and syncing its header); None: no WAL."""
    try:
        with open(f"{path}-wal", "rb") as wal:
            return wal.read(24)[12:]
    except FileNotFoundError:
        return None


async def test_sqlite_restarts_the_wal_only_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first commit after a checkpoint that copied the whole WAL restarts the log,
    which syncs the WAL header (an ``fdatasync``): it must not run on the loop. So the
    write right after a checkpoint goes to a thread too, and so does the first write
    after opening (a new WAL). Every write whose commit restarted the WAL went to a
    thread; the others stay on the loop."""
    monkeypatch.setattr(database_module, "CHECKPOINT_COMMITS", 5)
    path = tmp_path / "t.sqlite3"
    Database(str(path)).close()  # made and migrated; closing deletes the WAL
    db = Database(str(path))
    db._commits = 0  # (opening committed its migration check)
    hops = ThreadHops(monkeypatch)
    threaded: list[int] = []
    restarted: list[int] = []
    try:
        for n in range(12):
            salt, before = wal_salt(path), hops.count
            await write_soon(db, insert(str(4000 + n)))
            if hops.count > before:
                threaded.append(n)
            if wal_salt(path) != salt:
                restarted.append(n)
        # 0: the first write into a new WAL; 4 and 9: checkpoints; 5 and 10: restarts.
        assert threaded == [0, 4, 5, 9, 10]
        assert restarted == [0, 5, 10]  # the checkpoints copied everything (no reader)
        assert set(restarted) <= set(threaded)
    finally:
        db.close()


async def test_sqlite_an_empty_commit_in_a_thread_leaves_the_restart_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker-thread commit that changed nothing wrote no WAL frame (the WAL did not
    restart): the next write still goes to a thread."""
    db = Database(str(tmp_path / "t.sqlite3"))
    try:
        db._checkpoint()
        db.write_sync(lambda tx: tx.run("DELETE FROM schema_migrations WHERE version < 0"))
        assert db.try_write_now(insert("5001")) == (False, None)
        db.write_sync(insert("5002"))
        assert db.try_write_now(insert("5003")) == (True, 1)
        assert {5002, 5003} <= versions(db) and 5001 not in versions(db)
    finally:
        db.close()


async def test_sqlite_without_wal_every_write_goes_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """``PRAGMA journal_mode=WAL`` refused (as on a network filesystem): a commit would
    need an exclusive lock and an ``fsync``, so nothing is written on the loop, and the
    refusal is logged."""

    class RefusesWal(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.upper() == "PRAGMA JOURNAL_MODE=WAL":
                sql = "PRAGMA journal_mode=DELETE"
            return super().execute(sql, *args)

    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect",
                        lambda *args, **kwargs: real(*args, factory=RefusesWal, **kwargs))
    db = Database(str(tmp_path / "t.sqlite3"))
    monkeypatch.setattr(sqlite3, "connect", real)
    hops = ThreadHops(monkeypatch)
    try:
        assert db.write_sync(lambda tx: tx.value("PRAGMA journal_mode")) == "delete"
        assert "the WAL journal was refused (journal mode delete" in caplog.text
        for n in range(3):
            assert db.try_write_now(insert(str(6000 + n))) == (False, None)
            await write_soon(db, insert(str(6000 + n)))
        assert hops.count == 3
        assert {6000, 6001, 6002} <= versions(db)
    finally:
        db.close()


async def test_postgresql_never_writes_on_the_loop(database: Database) -> None:
    """``try_write_now`` declines on PostgreSQL (a network round trip), nothing ran."""
    if database.dialect != "postgresql":
        pytest.skip("PostgreSQL only")
    assert database.try_write_now(insert("7001")) == (False, None)
    assert 7001 not in versions(database)
