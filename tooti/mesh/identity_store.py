"""Persistent identity bindings: which public key owns each chosen node name.

A node that picks a name (rather than using the id derived from its key) is
bound to the first key that proves the name at this gateway (trust on first
use, :meth:`tooti.mesh.registry.Registry.bind_identity`). The bindings are
kept in ``<data_dir>/identities.sqlite3`` so a gateway restart does not hand a
name to whoever proves it first afterwards.

Bindings are rare (once per name), so the store uses synchronous ``sqlite3``
with a short-lived connection per operation: nothing is held open between
calls, and no call spans an await. The registry loads every binding once at
startup (:meth:`IdentityStore.load`), so a handshake only touches the file
when a name is seen for the first time. Opening checks that the file is a
readable, writable store of a known schema version, so a corrupt or
unwritable file is reported at startup rather than in the middle of a handshake.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tooti import clock

FILENAME = "identities.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 1.0
"""Seconds to wait for another process's lock on the file (the event loop waits too)."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
    "opened_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS identities (name TEXT PRIMARY KEY, "
    "public_key BLOB NOT NULL, bound_at REAL NOT NULL)",
)


class IdentityStoreError(OSError):
    """The identity store cannot be opened, read or written.

    An :class:`OSError`, so ``tooti run`` reports it in one line at startup.
    """


@dataclass(frozen=True, slots=True)
class Binding:
    """One node name bound to the public key that first proved it."""

    name: str
    public_key: bytes
    bound_at: float
    """Wall-clock time of the binding (seconds since the epoch)."""


class IdentityStore:
    """Node name → public key bindings in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open the store at ``path``, creating it (and its directory) if needed.

        Raises :class:`IdentityStoreError` if the file is not a tooti identity store,
        is corrupt, was written by a newer schema, or cannot be written.
        """
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error("cannot create its directory", exc) from None
        with self._connect("open") as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    db.execute(statement)
                versions = [row[0] for row in db.execute("SELECT version FROM schema_version")]
                if not versions:
                    db.execute("INSERT INTO schema_version VALUES (?, ?)",
                               (SCHEMA_VERSION, clock.wall()))
                elif versions != [SCHEMA_VERSION]:
                    raise IdentityStoreError(
                        f"identity store {self.path}: schema version {versions} is not "
                        f"{SCHEMA_VERSION} (written by another tooti version?)")
                else:  # a write, so an unwritable file fails here and not in a handshake
                    db.execute("UPDATE schema_version SET opened_at = ?", (clock.wall(),))
                check = db.execute("PRAGMA quick_check").fetchone()
                if check is None or check[0] != "ok":
                    raise IdentityStoreError(
                        f"identity store {self.path} is corrupt: {check and check[0]}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @classmethod
    def in_data_dir(cls, data_dir: str | os.PathLike[str]) -> IdentityStore:
        """The store at ``<data_dir>/identities.sqlite3`` (``~`` expanded)."""
        return cls(Path(os.path.expanduser(os.fspath(data_dir))) / FILENAME)

    def _error(self, doing: str, exc: BaseException) -> IdentityStoreError:
        return IdentityStoreError(f"identity store {self.path}: {doing}: {exc}")

    @contextmanager
    def _connect(self, doing: str) -> Iterator[sqlite3.Connection]:
        """A connection for one operation, closed after it; sqlite errors become
        :class:`IdentityStoreError` naming the file and ``doing``."""
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise self._error(f"cannot {doing}", exc) from None
        try:
            yield db
        except sqlite3.Error as exc:
            raise self._error(f"cannot {doing}", exc) from None
        finally:
            db.close()

    def get(self, name: str) -> bytes | None:
        """The public key bound to ``name``, or None."""
        with self._connect("read") as db:
            row = db.execute("SELECT public_key FROM identities WHERE name = ?",
                             (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def bind(self, name: str, public_key: bytes) -> bytes:
        """Bind ``name`` to ``public_key`` unless it is bound already; returns the key
        ``name`` is bound to now (the earlier one, if there was one)."""
        with self._connect("write") as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR IGNORE INTO identities VALUES (?, ?, ?)",
                           (name, public_key, clock.wall()))
                row = db.execute("SELECT public_key FROM identities WHERE name = ?",
                                 (name,)).fetchone()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return bytes(row[0])

    def forget(self, name: str) -> bool:
        """Remove ``name``'s binding (the next key to prove it claims it); returns
        whether there was one."""
        with self._connect("write") as db:
            deleted = db.execute("DELETE FROM identities WHERE name = ?", (name,)).rowcount
        return deleted > 0

    def bindings(self) -> list[Binding]:
        """Every binding, by name."""
        with self._connect("read") as db:
            rows = db.execute(
                "SELECT name, public_key, bound_at FROM identities ORDER BY name").fetchall()
        return [Binding(name, bytes(key), bound_at) for name, key, bound_at in rows]

    def load(self) -> dict[str, bytes]:
        """Every binding as name → public key (what the registry keeps in memory)."""
        return {b.name: b.public_key for b in self.bindings()}
