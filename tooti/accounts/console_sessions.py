"""The web console's sign-in sessions, kept in the accounts database so every gateway
sharing it knows them (and a log-out anywhere is a log-out everywhere).

:meth:`ConsoleSessions.create` makes two secrets of 32 random bytes each (urlsafe
base64): the session token, which the console puts in its signed ``HttpOnly`` cookie,
and the session's CSRF token, which its forms carry. Only the SHA-256 of the session
token is stored (:func:`tooti.accounts.credentials.digest`), as the primary key of
``console_sessions``, so the table never holds a usable cookie; the CSRF token is
stored as it is (it is worthless without the cookie, and the pages must render it).

:meth:`ConsoleSessions.lookup` answers None for a token unknown, expired or revoked,
and for a suspended account's session, so a suspension signs the account out at its
next page; it writes ``last_seen`` at most once a :data:`SEEN_EVERY` per session (a
page view is a read, not a write). :meth:`revoke` ends one session (log out),
:meth:`revoke_all` every session of an account (log out everywhere; also done by a
password change, :meth:`tooti.accounts.passwords.Passwords.set_password`).

:meth:`ConsoleSessions.secret_key` is the key the console signs its cookies with:
created once per database (``INSERT … ON CONFLICT DO NOTHING``, then read back, so
gateways starting together agree on one) and kept in ``console_secrets``.

Times are wall-clock Unix seconds (stored, shared between gateways); the clock is a
constructor parameter so tests can move it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import msgspec

from tooti import clock
from tooti.accounts import credentials
from tooti.accounts.database import Database, Tx
from tooti.accounts.passwords import refuse_inactive, revoke_sessions
from tooti.accounts.records import AccountInfo
from tooti.accounts.service import _get_account

SEEN_EVERY = 60.0
"""Seconds between two writes of a session's ``last_seen``."""
MAX_TOKEN = 128
"""Longer cookie values are not looked up (a token is 43 characters)."""
SECRET_KEY = "session_key"
"""The ``console_secrets`` row holding the cookie-signing key."""


class SessionInfo(msgspec.Struct, frozen=True):
    """A live console session (its token is never kept; its CSRF token is)."""

    account: AccountInfo
    csrf: str
    created_at: float
    expires_at: float


class ConsoleSessions:
    """Console sessions on one :class:`Database` (see the module docstring)."""

    TTL = 12 * 3600.0

    def __init__(self, db: Database, *, wall: Callable[[], float] = clock.wall) -> None:
        """``wall``: the clock of stored times (tests pass their own)."""
        self.db = db
        self.wall = wall
        self._key: str | None = None

    async def create(self, account_id: str, *, ttl: float = TTL) -> tuple[str, str]:
        """A new session of an active account: ``(session token, csrf token)``;
        :class:`~tooti.accounts.passwords.LoginRefused` ``suspended`` for a suspended
        account, 404 :class:`~tooti.errors.APIError` for an unknown one. Sessions of
        the account that ended more than a day ago are deleted on the way."""
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)

        def run(tx: Tx) -> None:
            refuse_inactive(_get_account(tx, account_id))
            now = self.wall()
            tx.run("DELETE FROM console_sessions WHERE account_id = ? AND "
                   "(expires_at < ? OR revoked_at < ?)", (account_id, now - 86400.0,
                                                          now - 86400.0))
            tx.run("INSERT INTO console_sessions (hash, account_id, csrf, created_at, "
                   "expires_at, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
                   (credentials.digest(token), account_id, csrf, now, now + ttl, now))

        await self.db.write(run)
        return token, csrf

    async def lookup(self, token: str) -> SessionInfo | None:
        """The live session of ``token``, or None (see the module docstring)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return None
        digest = credentials.digest(token)

        def read(tx: Tx) -> tuple[SessionInfo, float] | None:
            row = tx.one("SELECT account_id, csrf, created_at, expires_at, last_seen "
                         "FROM console_sessions WHERE hash = ? AND revoked_at IS NULL "
                         "AND expires_at > ?", (digest, self.wall()))
            if row is None:
                return None
            account = _get_account(tx, str(row[0]))
            if account.status != "active":
                return None
            return SessionInfo(account=account, csrf=str(row[1]),
                               created_at=float(row[2]), expires_at=float(row[3])), \
                float(row[4])

        found = await self.db.read(read)
        if found is None:
            return None
        session, last_seen = found
        now = self.wall()
        if now - last_seen >= SEEN_EVERY:
            await self.db.write(lambda tx: tx.run(
                "UPDATE console_sessions SET last_seen = ? WHERE hash = ?", (now, digest)))
        return session

    async def revoke(self, token: str) -> None:
        """End the session of ``token`` (an unknown or ended one: nothing happens)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return
        digest, now = credentials.digest(token), self.wall()
        await self.db.write(lambda tx: tx.run(
            "UPDATE console_sessions SET revoked_at = ? WHERE hash = ? AND revoked_at IS "
            "NULL", (now, digest)))

    async def revoke_all(self, account_id: str) -> int:
        """End every session of an account (log out everywhere); how many were live."""
        now = self.wall()
        return await self.db.write(lambda tx: revoke_sessions(tx, account_id, now))

    async def secret_key(self) -> str:
        """The cookie-signing key every gateway on this database shares (created once)."""
        if self._key is None:
            candidate = secrets.token_urlsafe(48)

            def run(tx: Tx) -> str:
                tx.run("INSERT INTO console_secrets (name, value) VALUES (?, ?) "
                       "ON CONFLICT DO NOTHING", (SECRET_KEY, candidate))
                return str(tx.value("SELECT value FROM console_secrets WHERE name = ?",
                                    (SECRET_KEY,)))

            self._key = await self.db.write(run)
        return self._key
