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

* ``credentials``: an unknown name, no password set, a wrong password (or one longer
  than :attr:`Passwords.MAX_LENGTH`). They do the same work: an unknown name or an
  account without a password is verified against a dummy hash anyway, and every one of
  them counts a failure (the same writes), so neither the answer's timing nor the
  lockout tells which names exist.
* ``locked``: ``max_failures`` failures within ``window`` seconds lock the *name* for
  ``lock_seconds`` (``retry_after`` says how long is left), whether an account has it
  or not; a locked name is refused even with the right password, and so is a right
  password whose check ended after concurrent wrong ones locked it (the success is
  re-checked in the transaction that clears the count). Failures are counted per
  *subject*: the SHA-256 of the account's name when the name or id given is an
  account's (so its name and its id share one count), else of the text given
  (:func:`subject_of`; hashed, as people type passwords into name fields). The counts
  live in the database (``login_failures``), so every gateway sharing it counts
  together; a failure is one ``INSERT … ON CONFLICT DO UPDATE`` (atomic on SQLite and
  PostgreSQL), a success deletes the row.

The table is bounded. After each failure, a second transaction (:meth:`Passwords.
_purge`) deletes the rows whose window and lock have both passed (an index on
``window_start`` finds them), and if more than ``max_subjects`` rows remain, deletes
the oldest rows that hold no active lock. So rows live at most ``max(window,
lock_seconds)`` after their last failure, and a failure needs an argon2 verification
(:data:`HASHING_THREADS` per gateway), which bounds how fast names sprayed at random
can add rows; active locks are never evicted (evicting them would let a sprayer unlock
a name it is guessing), so only they can exceed the cap, each paid for with
``max_failures`` verifications. The purge is best effort: if it fails (a deadlock with
another gateway's purge on PostgreSQL), it is logged and the next failure purges.
* ``suspended``: the right password of a suspended account (told only to someone who
  knows the password).

After a successful check, if argon2 says the stored hash was made with other
parameters than the current ones (``check_needs_rehash``), the password is hashed again
and stored in place of the old hash (only if the stored hash is still the one checked,
so a concurrent :meth:`Passwords.set_password` wins), in one transaction that bumps the
``changes`` counter; sessions stay.

:meth:`Passwords.set_password` replaces the hash, forgets the failures and revokes every
console session of the account (a password change logs out everywhere), in one
transaction that also bumps the ``changes`` counter.

Times are wall-clock Unix seconds (they are stored and shared between gateways); the
clock is a constructor parameter so tests can move it.
"""

from __future__ import annotations

import hashlib
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


def subject_of(name: str) -> str:
    """The ``login_failures`` key of a sign-in name: its SHA-256 (hex), so no typed text
    is stored; a name that cannot be encoded (a lone surrogate) is hashed as is."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def refuse_inactive(account: AccountInfo) -> AccountInfo:
    """``account`` if it is active, else :class:`LoginRefused` ``suspended``."""
    if account.status != "active":
        raise LoginRefused("suspended")
    return account


class Passwords:
    """Password hashes and the lockout on one :class:`Database` (module docstring)."""

    MIN_LENGTH = 10
    MAX_LENGTH = 1024

    MAX_SUBJECTS = 100_000
    """Rows of ``login_failures`` kept at most, active locks aside (module docstring)."""

    def __init__(self, db: Database, *, max_failures: int = 5, window: float = 900.0,
                 lock_seconds: float = 900.0, max_subjects: int = MAX_SUBJECTS,
                 wall: Callable[[], float] = clock.wall) -> None:
        """``max_failures`` failures within ``window`` seconds lock a name for
        ``lock_seconds``; at most ``max_subjects`` rows of failures are kept (active
        locks aside); ``wall``: the clock of stored times (tests pass their own)."""
        self.db = db
        self.max_failures = max_failures
        self.window = window
        self.lock_seconds = lock_seconds
        self.max_subjects = max_subjects
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
            account = _get_account(tx, account_id)
            tx.run("UPDATE accounts SET password_hash = ? WHERE id = ?",
                   (encoded, account_id))
            tx.run("DELETE FROM login_failures WHERE subject = ?",
                   (subject_of(account.name),))
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

        def read(tx: Tx) -> tuple[AccountInfo | None, str, str, float | None]:
            account = _find_account(tx, name) if plausible_name(name) else None
            subject = subject_of(account.name if account is not None else str(name))
            encoded = "" if account is None else str(tx.value(
                "SELECT password_hash FROM accounts WHERE id = ?", (account.id,),
                default=""))
            locked = tx.value("SELECT locked_until FROM login_failures WHERE subject = ?",
                              (subject,))
            return account, subject, encoded, None if locked is None else float(locked)

        account, subject, encoded, locked_until = await self.db.read(read)
        now = self.wall()
        if locked_until is not None and locked_until > now:
            raise LoginRefused("locked", locked_until - now)
        too_long = not isinstance(password, str) or len(password) > self.MAX_LENGTH
        candidate = "" if too_long else password
        ok = await self._verify(encoded or await self._dummy_hash(), candidate)
        if account is None or not encoded or too_long or not ok:
            # the same writes whether the name is an account's or not (module docstring)
            until = await self.db.write(lambda tx: self._fail(tx, subject))
            await self._purge(subject)
            now = self.wall()
            if until is not None and until > now:
                raise LoginRefused("locked", until - now)
            raise LoginRefused("credentials")
        locked = await self.db.write(lambda tx: self._succeed(tx, subject))
        if locked is not None:
            raise LoginRefused("locked", max(0.0, locked - self.wall()))
        refuse_inactive(account)
        if self._hasher.check_needs_rehash(encoded):
            await self._rehash(account.id, encoded, candidate)
        return account

    async def _rehash(self, account_id: str, checked: str, password: str) -> None:
        """Store a hash of ``password`` with the current parameters in place of
        ``checked``, unless the stored hash changed meanwhile."""
        encoded = await self._hash(password)

        def run(tx: Tx) -> int:
            changed = tx.run("UPDATE accounts SET password_hash = ? WHERE id = ? AND "
                             "password_hash = ?", (encoded, account_id, checked))
            if changed:
                bump_changes(tx)
            return changed

        if await self.db.write(run):
            log.info("accounts: password hash of %s upgraded to the current parameters",
                     account_id)

    def _fail(self, tx: Tx, subject: str) -> float | None:
        """Count a failure of ``subject`` (a new window once the last is over) and lock it
        at :attr:`max_failures`; the lock's end, if it is locked."""
        now = self.wall()
        stale = now - self.window
        tx.run(
            "INSERT INTO login_failures (subject, failures, window_start, locked_until) "
            "VALUES (?, 1, ?, NULL) ON CONFLICT (subject) DO UPDATE SET "
            "failures = CASE WHEN login_failures.window_start <= ? THEN 1 "
            "ELSE login_failures.failures + 1 END, "
            "window_start = CASE WHEN login_failures.window_start <= ? THEN ? "
            "ELSE login_failures.window_start END",
            (subject, now, stale, stale, now))
        tx.run("UPDATE login_failures SET locked_until = ?, failures = 0, window_start = ? "
               "WHERE subject = ? AND failures >= ? AND "
               "(locked_until IS NULL OR locked_until <= ?)",
               (now + self.lock_seconds, now, subject, self.max_failures, now))
        until = tx.value("SELECT locked_until FROM login_failures WHERE subject = ?",
                         (subject,))
        return None if until is None else float(until)

    async def _purge(self, keep: str) -> None:
        """Bound ``login_failures`` (module docstring): delete the rows whose window and
        lock have passed, then the oldest unlocked rows beyond :attr:`max_subjects`
        (never ``keep``, the subject just counted). Best effort, in its own transaction."""

        def run(tx: Tx) -> int:
            now = self.wall()
            gone = tx.run("DELETE FROM login_failures WHERE window_start <= ? AND "
                          "(locked_until IS NULL OR locked_until <= ?)",
                          (now - self.window, now))
            over = int(tx.value("SELECT COUNT(*) FROM login_failures", default=0)) - (
                self.max_subjects)
            if over > 0:
                gone += tx.run(
                    "DELETE FROM login_failures WHERE subject IN (SELECT subject FROM "
                    "login_failures WHERE subject <> ? AND (locked_until IS NULL OR "
                    "locked_until <= ?) ORDER BY window_start, subject LIMIT ?)",
                    (keep, now, over))
            return gone

        try:
            await self.db.write(run)
        except Exception as error:  # any database error: the next failure purges again
            log.warning("accounts: purging old login failures failed (%s); the next "
                        "failure retries", type(error).__name__)

    def _succeed(self, tx: Tx, subject: str) -> float | None:
        """Forget the failures unless the name got locked meanwhile (then the lock's
        end: the right password is refused too). The conditional ``DELETE`` waits for a
        concurrent failure's row lock on PostgreSQL and re-checks, so a lock committed
        first is seen."""
        now = self.wall()
        tx.run("DELETE FROM login_failures WHERE subject = ? AND "
               "(locked_until IS NULL OR locked_until <= ?)", (subject, now))
        until = tx.value("SELECT locked_until FROM login_failures WHERE subject = ?",
                         (subject,))
        return None if until is None or float(until) <= now else float(until)
