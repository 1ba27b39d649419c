"""One-time login links for the web console (``tooti accounts login-link NAME``).

A link's secret is ``tl-tooti-`` + 43 base64url characters (32 random bytes, made by
:func:`tooti.accounts.credentials.generate`), shown once to whoever minted it (the admin
API answers it, the CLI prints the console URL holding it) and stored only as its
SHA-256 (:func:`~tooti.accounts.credentials.digest`) in ``login_links``, with the
account, who minted it and when it expires (:attr:`LoginLinks.TTL`, 15 minutes, unless
asked otherwise).

:meth:`LoginLinks.consume` uses a link once: a single conditional ``UPDATE … SET used_at
WHERE hash = ? AND used_at IS NULL AND expires_at > now``, so of any number of
concurrent uses on any number of gateways exactly one changes the row and signs in;
every other, and a link unknown, expired, already used or not of the link's shape, is
:class:`~tooti.accounts.passwords.LoginRefused` ``link`` (one reason for all, so a
guesser learns nothing). A link of a suspended account is used up and refused
``suspended``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tooti import clock
from tooti.accounts import credentials
from tooti.accounts.database import Database, Tx
from tooti.accounts.passwords import LoginRefused, refuse_inactive
from tooti.accounts.records import AccountInfo
from tooti.accounts.service import _active_account, _get_account

_SHAPE = re.compile("tl-tooti-[A-Za-z0-9_-]{" + str(credentials.RANDOM_CHARS) + "}")
MAX_TTL = 7 * 86400.0
"""The longest a login link may live (a week)."""


class LoginLinks:
    """Mint and consume one-time login links on one :class:`Database`."""

    PREFIX = "tl-tooti-"
    TTL = 900.0

    def __init__(self, db: Database, *, wall: Callable[[], float] = clock.wall) -> None:
        """``wall``: the clock of stored times (tests pass their own)."""
        self.db = db
        self.wall = wall

    async def mint(self, account_id: str, *, by_account: str = "admin",
                   ttl: float = TTL) -> str:
        """A new link secret for an active account (shown once, stored as its digest),
        valid ``ttl`` seconds (``0 < ttl <=`` :data:`MAX_TTL`, else ``ValueError``);
        404 / 403 :class:`~tooti.errors.APIError` for an unknown / suspended account."""
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (
                0 < ttl <= MAX_TTL):
            raise ValueError(f"a login link lives 1 to {int(MAX_TTL)} seconds")
        secret = credentials.generate(self.PREFIX)

        def run(tx: Tx) -> None:
            _active_account(tx, account_id)
            now = self.wall()
            tx.run("INSERT INTO login_links (id, hash, account_id, created_by, created_at, "
                   "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (credentials.new_id("link"), credentials.digest(secret), account_id,
                    by_account, now, now + float(ttl)))

        await self.db.write(run)
        return secret

    async def usable(self, secret: str) -> bool:
        """Whether ``secret`` is a link that :meth:`consume` would take now (unused, not
        expired), without using it up: the page a link opens says at once when it is
        spent. (It can still be spent between the two; :meth:`consume` decides.)"""
        if not isinstance(secret, str) or _SHAPE.fullmatch(secret) is None:
            return False
        digest = credentials.digest(secret)
        found = await self.db.read(lambda tx: tx.value(
            "SELECT COUNT(*) FROM login_links WHERE hash = ? AND used_at IS NULL "
            "AND expires_at > ?", (digest, self.wall()), 0))
        return bool(found)

    async def consume(self, secret: str) -> AccountInfo:
        """The account a link signs in, using the link up (see the module docstring)."""
        if not isinstance(secret, str) or _SHAPE.fullmatch(secret) is None:
            raise LoginRefused("link")
        digest = credentials.digest(secret)

        def run(tx: Tx) -> AccountInfo | None:
            now = self.wall()
            if tx.run("UPDATE login_links SET used_at = ? WHERE hash = ? AND used_at IS "
                      "NULL AND expires_at > ?", (now, digest, now)) != 1:
                return None
            account_id = tx.value("SELECT account_id FROM login_links WHERE hash = ?",
                                  (digest,))
            return _get_account(tx, str(account_id))

        account = await self.db.write(run)
        if account is None:
            raise LoginRefused("link")
        return refuse_inactive(account)
