"""Account passwords for the web console: argon2id hashes, checked with a lockout.

A password is hashed with argon2id (argon2-cffi's :class:`~argon2.PasswordHasher` with
its defaults, RFC 9106's low-memory profile: a random salt per hash, the parameters in
the encoded hash) and stored in ``accounts.password_hash`` (``""``: no password set, the
account signs in only with a login link). Hashing and verifying cost tens of
milliseconds of CPU and memory, so they run in a worker thread behind a
:class:`trio.CapacityLimiter` of :data:`HASHING_THREADS` (a flood of sign-ins queues
there instead of taking every core).

:meth:`Passwords.check` refuses with :class:`LoginRefused`, whose ``reason`` a page may
show, as it says nothing a guesser could use beyond what the lockout must say:

* ``credentials``: an unknown name, no password set, or a wrong password. The three
  take the same time: an unknown name or an account without a password is verified
  against a dummy hash anyway, so the answer's timing does not tell which names exist.
* ``locked``: ``max_failures`` wrong passwords within ``window`` seconds lock the
  account for ``lock_seconds`` (``retry_after`` says how long is left); a locked
  account is refused even with the right password, and so is a right password whose
  check ended after concurrent wrong ones locked it (the success is re-checked in the
  transaction that clears the count). The counts live in the database
  (``login_failures``), so every gateway sharing it counts together; a failure is one
  ``INSERT … ON CONFLICT DO UPDATE`` (atomic on SQLite and PostgreSQL), a success
  deletes the row.
* ``suspended``: the right password of a suspended account (told only to someone who
  knows the password).

:meth:`Passwords.set_password` replaces the hash, forgets the failures and revokes every
console session of the account (a password change logs out everywhere), in one
transaction that also bumps the ``changes`` counter.

Times are wall-clock Unix seconds (they are stored and shared between gateways); the
clock is a constructor parameter so tests can move it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from tooti import clock
from tooti.accounts.database import Database, Tx
from tooti.accounts.records import AccountInfo
from tooti.accounts.service import _find_account, _get_account, bump_changes

log = logging.getLogger("tooti.accounts")

HASHING_THREADS = 2
"""Argon2 hashes computed at once per :class:`Passwords` (each takes ~64 MiB)."""

Reason = str
"""``credentials`` | ``locked`` | ``suspended`` | ``link``."""


class LoginRefused(Exception):
    """A sign-in was refused; ``reason`` is ``credentials``, ``locked``, ``suspended`` or
    ``link`` (a login link unknown, used, expired or malformed); ``retry_after`` is the
    seconds left of a lock (0 for the other reasons)."""

    def __init__(self, reason: Reason, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def revoke_sessions(tx: Tx, account_id: str, now: float) -> int:
    """Revoke every live console session of an account in ``tx``; how many."""
    return tx.run("UPDATE console_sessions SET revoked_at = ? WHERE account_id = ? AND "
                  "revoked_at IS NULL", (now, account_id))


def plausible_name(name: object) -> bool:
    """Whether ``name`` could be an account's name or id (worth a lookup): a non-empty
    string without a NUL (PostgreSQL text cannot hold one) of at most 200 characters."""
    return isinstance(name, str) and 0 < len(name) <= 200 and "\x00" not in name


def refuse_inactive(account: AccountInfo) -> AccountInfo:
    """``account`` if it is active, else :class:`LoginRefused` ``suspended``."""
    if account.status != "active":
        raise LoginRefused("suspended")
    return account


class Passwords:
    """Password hashes and the lockout on one :class:`Database` (module docstring)."""

    MIN_LENGTH = 10
    MAX_LENGTH = 1024

    def __init__(self, db: Database, *, max_failures: int = 5, window: float = 900.0,
                 lock_seconds: float = 900.0,
                 wall: Callable[[], float] = clock.wall) -> None:
        """``max_failures`` wrong passwords within ``window`` seconds lock an account for
        ``lock_seconds``; ``wall``: the clock of stored times (tests pass their own)."""
        self.db = db
        self.max_failures = max_failures
        self.window = window
        self.lock_seconds = lock_seconds
        self.wall = wall
        self._hasher = PasswordHasher()
        self._limiter = trio.CapacityLimiter(HASHING_THREADS)
        self._dummy: str | None = None

    # -------------------------------------------------------- hashing (worker threads)

    async def _hash(self, password: str) -> str:
        return await trio.to_thread.run_sync(self._hasher.hash, password,
                                             limiter=self._limiter)

    def _verify_sync(self, encoded: str, password: str) -> bool:
        try:
            return self._hasher.verify(encoded, password)
        except (VerificationError, InvalidHashError):
            return False

    async def _verify(self, encoded: str, password: str) -> bool:
        return await trio.to_thread.run_sync(self._verify_sync, encoded, password,
                                             limiter=self._limiter)

    async def _dummy_hash(self) -> str:
        """A hash no password matches, verified for unknown names (same cost)."""
        if self._dummy is None:
            self._dummy = await self._hash(secrets.token_urlsafe(32))
        return self._dummy

    # -------------------------------------------------------- the API

    async def set_password(self, account_id: str, password: str) -> None:
        """Set an account's password (see the module docstring); ``ValueError`` if it is
        shorter than :attr:`MIN_LENGTH` or longer than :attr:`MAX_LENGTH` characters,
        or holds a NUL; 404 :class:`APIError` for an unknown account."""
        if not isinstance(password, str) or not (
                self.MIN_LENGTH <= len(password) <= self.MAX_LENGTH):
            raise ValueError(f"a password is {self.MIN_LENGTH} to {self.MAX_LENGTH} "
                             "characters")
        if "\x00" in password:
            raise ValueError("a password may not contain a NUL character")
        encoded = await self._hash(password)

        def run(tx: Tx) -> None:
            _get_account(tx, account_id)
            tx.run("UPDATE accounts SET password_hash = ? WHERE id = ?",
                   (encoded, account_id))
            tx.run("DELETE FROM login_failures WHERE account_id = ?", (account_id,))
            revoke_sessions(tx, account_id, self.wall())
            bump_changes(tx)

        await self.db.write(run)
        log.info("accounts: password of %s set; its console sessions revoked", account_id)

    async def has_password(self, account_id: str) -> bool:
        """Whether the account has a password (False for an unknown one)."""
        value = await self.db.read(lambda tx: tx.value(
            "SELECT password_hash FROM accounts WHERE id = ?", (account_id,), default=""))
        return bool(value)

    async def check(self, name: str, password: str) -> AccountInfo:
        """The account ``name`` (or id) if ``password`` is its password; else
        :class:`LoginRefused` (see the module docstring)."""

        def read(tx: Tx) -> tuple[AccountInfo | None, str, float | None]:
            account = _find_account(tx, name) if plausible_name(name) else None
            if account is None:
                return None, "", None
            encoded = str(tx.value("SELECT password_hash FROM accounts WHERE id = ?",
                                   (account.id,), default=""))
            locked = tx.value("SELECT locked_until FROM login_failures WHERE "
                              "account_id = ?", (account.id,))
            return account, encoded, None if locked is None else float(locked)

        account, encoded, locked_until = await self.db.read(read)
        now = self.wall()
        if account is not None and locked_until is not None and locked_until > now:
            raise LoginRefused("locked", locked_until - now)
        too_long = not isinstance(password, str) or len(password) > self.MAX_LENGTH
        candidate = "" if too_long else password
        ok = await self._verify(encoded or await self._dummy_hash(), candidate)
        if account is None or not encoded or too_long:
            raise LoginRefused("credentials")
        if not ok:
            until = await self.db.write(lambda tx: self._fail(tx, account.id))
            now = self.wall()
            if until is not None and until > now:
                raise LoginRefused("locked", until - now)
            raise LoginRefused("credentials")
        locked = await self.db.write(lambda tx: self._succeed(tx, account.id))
        if locked is not None:
            raise LoginRefused("locked", max(0.0, locked - self.wall()))
        return refuse_inactive(account)

    def _fail(self, tx: Tx, account_id: str) -> float | None:
        """Count a wrong password (a new window once the last is over) and lock the
        account at :attr:`max_failures`; the lock's end, if it is locked."""
        now = self.wall()
        stale = now - self.window
        tx.run(
            "INSERT INTO login_failures (account_id, failures, window_start, locked_until) "
            "VALUES (?, 1, ?, NULL) ON CONFLICT (account_id) DO UPDATE SET "
            "failures = CASE WHEN login_failures.window_start <= ? THEN 1 "
            "ELSE login_failures.failures + 1 END, "
            "window_start = CASE WHEN login_failures.window_start <= ? THEN ? "
            "ELSE login_failures.window_start END",
            (account_id, now, stale, stale, now))
        tx.run("UPDATE login_failures SET locked_until = ?, failures = 0, window_start = ? "
               "WHERE account_id = ? AND failures >= ? AND "
               "(locked_until IS NULL OR locked_until <= ?)",
               (now + self.lock_seconds, now, account_id, self.max_failures, now))
        until = tx.value("SELECT locked_until FROM login_failures WHERE account_id = ?",
                         (account_id,))
        return None if until is None else float(until)

    def _succeed(self, tx: Tx, account_id: str) -> float | None:
        """Forget the failures unless the account got locked meanwhile (then the lock's
        end: the right password is refused too). The conditional ``DELETE`` waits for a
        concurrent failure's row lock on PostgreSQL and re-checks, so a lock committed
        first is seen."""
        now = self.wall()
        tx.run("DELETE FROM login_failures WHERE account_id = ? AND "
               "(locked_until IS NULL OR locked_until <= ?)", (account_id, now))
        until = tx.value("SELECT locked_until FROM login_failures WHERE account_id = ?",
                         (account_id,))
        return None if until is None or float(until) <= now else float(until)
