"""One database API over SQLite (the default, a file in the data dir) and PostgreSQL
(``postgresql://…``, shared by any number of gateways).

Every statement is written once, with ``?`` placeholders; for PostgreSQL they become
``%s`` (so no statement may contain a literal ``?`` or ``%``). Both drivers are
blocking, so trio code calls :meth:`Database.read` / :meth:`Database.write` with a
function of a :class:`Tx`, which runs in a worker thread inside one transaction (never
abandoned on cancellation: a transaction started is finished, committed or rolled
back). The schema is :mod:`tooti.accounts.schema`, migrated at open.

SQLite: one writer connection in WAL mode (``synchronous=NORMAL``) guarded by a lock,
writes in ``BEGIN IMMEDIATE`` transactions, and up to four read-only connections for
:meth:`Database.read` (WAL readers see the last commit and never block the writer).

The hot path's writes (billing's settles, :mod:`tooti.billing.credits`) may use
:meth:`Database.try_write_now`: on SQLite it commits on the event loop's own thread when
it can do so without waiting, and otherwise declines at once (nothing ran; the caller
leaves the write to a worker thread, :meth:`Database.write`). A WAL commit under
``synchronous=NORMAL`` does no ``fsync`` (tens of microseconds), several times cheaper
in CPU than the worker thread hop it saves (waking a thread, then the event loop through
its wakeup socket). It declines when:

* the journal is not WAL (``PRAGMA journal_mode=WAL`` refused, e.g. on a network
  filesystem): a commit would then need an exclusive lock and an ``fsync``;
* the writer lock of this process is taken (taken without blocking), or the file's
  write lock is (``BEGIN IMMEDIATE`` with no busy wait: another process writes);
* a checkpoint is due: the slow part of WAL, the checkpoint (``fsync`` of the WAL and
  the database file), is never run inline. The writer connection's automatic
  checkpoint is off, and every :data:`CHECKPOINT_COMMITS` commits the write goes to the
  worker thread, which checkpoints (``PASSIVE``, as SQLite's automatic one) after its
  commit;
* the WAL may restart: the first commit after a checkpoint that copied the whole WAL
  (and the first into a new, empty WAL, as at open) rewrites the WAL header and syncs
  it (one ``fdatasync``, strace shows it). Until a commit that changed rows has run in
  a worker thread since the last checkpoint (or open), every write goes there: that
  commit either restarted the log or appended to it, and a WAL that is appended to
  after a checkpoint is not restarted before the next one.

The durability of a commit is the same either way. (A checkpoint run by another
process on the same file could still make one inline commit restart the WAL; tooti's
own processes never share a SQLite file while a gateway writes it.)
PostgreSQL: a psycopg 3 connection pool, READ COMMITTED; statements that must be atomic
across gateways are single conditional ``UPDATE``s or ``INSERT … ON CONFLICT DO
NOTHING`` (see :mod:`tooti.accounts.journal`).
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

from tooti import clock
from tooti.accounts.schema import MIGRATIONS

log = logging.getLogger("tooti.accounts")

T = TypeVar("T")
Row = tuple[Any, ...]
Statement = tuple[str, Sequence[Any], bool]
"""``(sql, params, many)``: one statement for :meth:`Tx.pipelined` (``many``: ``params``
is a list of rows, the statement runs once per row)."""
Dialect = Literal["sqlite", "postgresql"]
SQLITE_FILENAME = "tooti.sqlite3"
"""The default database, in the data dir."""
POOL_SIZE = 8
SQLITE_READERS = 4
"""Read-only SQLite connections beside the one writer."""
BUSY_TIMEOUT_MS = 30_000
"""SQLite: how long a write waits for another process's write lock (not inline)."""
CHECKPOINT_COMMITS = 200
"""SQLite: commits between two WAL checkpoints (run in the worker thread, see the module
docstring; SQLite's own automatic checkpoint, off on the writer, runs every 1,000 pages)."""
MIGRATION_LOCK = 7_370_001
"""The PostgreSQL advisory lock taken while migrating (gateways starting together)."""


class DatabaseError(Exception):
    """The database could not be opened or used (the message says which and why)."""


class Tx:
    """One transaction's statements (``?`` placeholders, whichever the dialect)."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute one statement; the number of rows it changed."""
        self._cursor.execute(self._sql(sql), tuple(params))
        return int(self._cursor.rowcount)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Execute one statement for each of ``rows`` (PostgreSQL: pipelined, one round
        trip); the number of rows they changed in all."""
        if not rows:
            return 0
        self._cursor.executemany(self._sql(sql), [tuple(r) for r in rows])
        return int(self._cursor.rowcount)

    def pipelined(self, statements: Sequence[Statement]) -> list[int]:
        """Execute ``statements`` in order; the rows each changed. On PostgreSQL they go
        to the server in one pipeline (one round trip for all, instead of one each), so
        no statement may depend on an earlier one's result: check the counts after (an
        error in one aborts the rest and is raised here)."""
        if self.dialect != "postgresql":
            return [self.many(sql, params) if many else self.run(sql, params)
                    for sql, params, many in statements]
        connection = self._cursor.connection
        cursors: list[Any] = []
        with connection.pipeline():
            for sql, params, many in statements:
                if many and not params:
                    cursors.append(None)
                    continue
                cursor = connection.cursor()
                if many:
                    cursor.executemany(self._sql(sql), [tuple(row) for row in params])
                else:
                    cursor.execute(self._sql(sql), tuple(params))
                cursors.append(cursor)
        return [0 if cursor is None else int(cursor.rowcount) for cursor in cursors]

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """The first row of a query (None if it has none)."""
        self._cursor.execute(self._sql(sql), tuple(params))
        row = self._cursor.fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Every row of a query."""
        self._cursor.execute(self._sql(sql), tuple(params))
        return [tuple(row) for row in self._cursor.fetchall()]

    def value(self, sql: str, params: Sequence[Any] = (), default: Any = None) -> Any:
        """The first column of the first row (``default`` if there is no row or it is NULL)."""
        row = self.one(sql, params)
        return default if row is None or row[0] is None else row[0]


class Database:
    """An open database: SQLite or PostgreSQL (see the module docstring)."""

    dialect: Dialect

    def __init__(self, url: str, *, data_dir: Path | None = None,
                 pool_size: int = POOL_SIZE) -> None:
        """``url``: ``postgresql://…`` (or ``postgres://…``), ``sqlite:///path``, a
        plain path, or ``""`` for ``<data_dir>/tooti.sqlite3``."""
        self.url = url
        self._lock = threading.Lock()
        self._readers: queue.Queue[sqlite3.Connection] = queue.Queue()
        self._readers_lock = threading.Lock()
        self._readers_opened = 0
        self._sqlite: sqlite3.Connection | None = None
        self._commits = 0
        """SQLite: commits since the last WAL checkpoint (changed under :attr:`_lock`)."""
        self._wal = False
        """SQLite: the journal is WAL (else :meth:`try_write_now` always declines)."""
        self._restart_due = True
        """SQLite: the next commit may restart the WAL (an ``fsync``): set by a checkpoint
        and at open, cleared by a commit that changed rows in :meth:`write_sync`."""
        self._pool: Any = None
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            self.where = redact(url)
            self._open_postgres(url, pool_size)
        else:
            self.dialect = "sqlite"
            path = Path(url.removeprefix("sqlite://")) if url else None
            if path is None:
                if data_dir is None:
                    raise DatabaseError("no database: give a URL or a data dir")
                path = data_dir / SQLITE_FILENAME
            self.path = path.expanduser()
            self.where = str(self.path)
            self._open_sqlite(self.path)
        self.migrate()

    # ------------------------------------------------------------ opening

    def _open_sqlite(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                 timeout=BUSY_TIMEOUT_MS / 1000)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA wal_autocheckpoint=0")  # checkpointed off the loop, see above
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open the database {path}: {exc}") from None
        self._sqlite = db
        self._wal = str(mode).lower() == "wal"
        if not self._wal:
            log.warning("database %s: the WAL journal was refused (journal mode %s, e.g. a "
                        "network filesystem): every write runs in a worker thread", path,
                        mode)

    def _open_postgres(self, url: str, pool_size: int) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise DatabaseError(f"PostgreSQL needs psycopg 3 and psycopg-pool ({exc})") from None
        self._pg_errors = psycopg.Error
        try:
            self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=True,
                                        timeout=10.0, name="tooti")
            self._pool.wait(timeout=10.0)
        except Exception as exc:
            if self._pool is not None:
                self._pool.close()
            raise DatabaseError(f"cannot connect to the database {self.where}: {exc}") from None

    def migrate(self) -> None:
        """Bring the schema to the newest version (each migration once, in order, under
        a lock so gateways starting together apply it once)."""

        def apply(tx: Tx) -> None:
            if tx.dialect == "postgresql":
                tx.run("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            tx.run("CREATE TABLE IF NOT EXISTS schema_migrations ("
                   "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            done = {row[0] for row in tx.all("SELECT version FROM schema_migrations")}
            for version, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    tx.run(statement)
                tx.run("INSERT INTO schema_migrations VALUES (?, ?)",
                       (version, clock.wall()))
                log.info("database %s: applied migration %d", self.where, version)

        self.write_sync(apply)

    @property
    def version(self) -> int:
        """The newest migration applied."""
        return int(self.read_sync(lambda tx: tx.value(
            "SELECT MAX(version) FROM schema_migrations", default=0)))

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Tx]:
        if self.dialect == "sqlite":
            assert self._sqlite is not None
            if not write:
                with self._reader() as reader:
                    cursor = reader.cursor()
                    cursor.execute("BEGIN")
                    try:
                        yield Tx(cursor, "sqlite")
                    finally:
                        cursor.execute("ROLLBACK")
                return
            with self._lock:
                changes = self._sqlite.total_changes
                cursor = self._sqlite.cursor()
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(cursor, "sqlite")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                cursor.execute("COMMIT")
                self._commits += 1
                if self._sqlite.total_changes != changes:
                    self._restart_due = False  # restarted the WAL, or appended to it
                if self._commits >= CHECKPOINT_COMMITS:
                    self._checkpoint()
        else:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
                yield Tx(cursor, "postgresql")

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file (``PASSIVE``: as far as no reader holds
        it back), under :attr:`_lock`; a failure is logged (the next one retries). The
        next commit may restart the WAL: it goes to a worker thread (see the module
        docstring)."""
        assert self._sqlite is not None
        self._commits = 0
        self._restart_due = True
        try:
            self._sqlite.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("database %s: WAL checkpoint failed (%s)", self.where, exc)

    def try_write_now(self, fn: Callable[[Tx], T]) -> tuple[bool, T | None]:
        """Run ``fn`` in one write transaction in this thread (the event loop's) if that
        cannot wait nor ``fsync`` (SQLite only, see the module docstring): ``(True, its
        result)``; else ``(False, None)`` at once, nothing ran (PostgreSQL always: a
        network round trip). For short transactions only (a batch of settles). ``fn``'s
        exception is raised (its transaction rolled back)."""
        db = self._sqlite
        if (db is None or not self._wal or self._restart_due
                or self._commits + 1 >= CHECKPOINT_COMMITS):
            return False, None
        if not self._lock.acquire(blocking=False):
            return False, None
        try:
            cursor = db.cursor()
            cursor.execute("PRAGMA busy_timeout=0")
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # another process writes: wait in a thread
                return False, None
            finally:
                cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            try:
                result = fn(Tx(cursor, "sqlite"))
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
            self._commits += 1
            return True, result
        finally:
            self._lock.release()

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only SQLite connection of the pool (WAL: readers never wait for the
        writer nor block it, so a long report does not hold up settles); opened on first
        use, at most :data:`SQLITE_READERS`, then callers wait for a free one."""
        try:
            reader = self._readers.get_nowait()
        except queue.Empty:
            with self._readers_lock:
                opened = self._readers_opened < SQLITE_READERS
                if opened:
                    self._readers_opened += 1
            if opened:
                reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                         check_same_thread=False, isolation_level=None,
                                         timeout=30.0)
            else:
                reader = self._readers.get()
        try:
            yield reader
        finally:
            self._readers.put(reader)

    def write_sync(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one write transaction, in this thread."""
        with self._transaction(True) as tx:
            return fn(tx)

    def read_sync(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one read transaction, in this thread."""
        with self._transaction(False) as tx:
            return fn(tx)

    async def write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one write transaction in a worker thread (see the module
        docstring); its exception is raised here."""
        return await trio.to_thread.run_sync(self.write_sync, fn)

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one read transaction in a worker thread."""
        return await trio.to_thread.run_sync(self.read_sync, fn)

    def is_unique_violation(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a broken unique or primary-key constraint."""
        if isinstance(exc, sqlite3.IntegrityError):
            return "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc)
        return type(exc).__name__ == "UniqueViolation"

    def close(self) -> None:
        """Close the connection (or the pool)."""
        if self._sqlite is not None:
            with self._lock:
                self._sqlite.close()
            self._sqlite = None
            while True:
                try:
                    self._readers.get_nowait().close()
                except queue.Empty:
                    break
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def redact(url: str) -> str:
    """A database URL with every password replaced by ``***`` (for logs, errors and the
    console): the one in its user info, and the value of any query parameter whose name
    holds ``password`` (libpq's ``password``, ``sslpassword``); a fragment is dropped."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = rest.partition("#")[0]
    base, mark, query = rest.partition("?")
    if "@" in base:
        userinfo, _, host = base.rpartition("@")
        if ":" in userinfo:
            base = f"{userinfo.split(':', 1)[0]}:***@{host}"
    if query:
        query = "&".join(
            f"{name}=***" if "password" in name.lower() and eq else f"{name}{eq}{value}"
            for name, eq, value in (part.partition("=") for part in query.split("&")))
    return f"{scheme}://{base}{mark}{query}"
