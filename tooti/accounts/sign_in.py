"""How people sign in to the console, as one object a gateway builds once: passwords
(:mod:`tooti.accounts.passwords`), one-time links (:mod:`tooti.accounts.login_links`)
and sessions (:mod:`tooti.accounts.console_sessions`) on the accounts database. The
admin API and the console share it, so the argon2 work of both is behind one limiter
(two hashes at a time per gateway)."""

from __future__ import annotations

import dataclasses

from tooti.accounts.console_sessions import ConsoleSessions
from tooti.accounts.database import Database
from tooti.accounts.login_links import LoginLinks
from tooti.accounts.passwords import Passwords


@dataclasses.dataclass(frozen=True)
class SignIn:
    """Passwords, login links and console sessions on one database."""

    passwords: Passwords
    links: LoginLinks
    sessions: ConsoleSessions

    @classmethod
    def of(cls, database: Database) -> SignIn:
        """The three on ``database``."""
        return cls(Passwords(database), LoginLinks(database), ConsoleSessions(database))
