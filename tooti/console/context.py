"""What the console is given by the gateway that serves it (:class:`ConsoleContext`):
the services, the live registry and the admin views it reads, so it never imports the
gateway (the layering: ``tooti.console`` sits between the roles and ``tooti.admin``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tooti.accounts.console_sessions import ConsoleSessions
from tooti.accounts.database import Database
from tooti.accounts.login_links import LoginLinks
from tooti.accounts.passwords import Passwords
from tooti.accounts.service import AccountService
from tooti.accounts.sign_in import SignIn
from tooti.admin.api import AdminAPI
from tooti.admin.peer_control import PeerControl
from tooti.mesh.registry import Registry
from tooti.settings import GatewaySettings


@dataclasses.dataclass
class ConsoleContext:
    """Everything a console page may read or act through."""

    settings: Callable[[], GatewaySettings]
    """The gateway's settings now (a SIGHUP reload swaps them)."""
    database: Database
    accounts: AccountService
    """Accounts, keys, groups, invites, join tokens, credits: what the admin API calls."""
    registry: Registry
    """Live peers and the event bus."""
    admin: AdminAPI
    """The admin views (``snapshot`` for live pages, ``network_view``)."""
    peer_control: PeerControl
    """Disable, enable and drain a node (as ``POST /admin/v1/peers/{id}/…``)."""
    gateway_id: str = ""
    fronts: tuple[str, ...] = ()
    """The API dialects the gateway speaks besides OpenAI's (``anthropic``, ``ollama``,
    ``responses``), for the quick start."""
    public_url: Callable[[], str] = lambda: ""
    """``network.public_url`` now (the gateway's tunnel URL as others reach it; empty:
    none), which the addresses the console shows derive from (:mod:`tooti.console.urls`)."""
    routing_policy: Callable[[], str] = lambda: ""
    """The routing policy in use now (a reload may swap it), for the config page."""
    sign_in: SignIn | None = None
    """The gateway's passwords, login links and sessions (shared with its admin API);
    built on :attr:`database` when not given."""
    passwords: Passwords = dataclasses.field(init=False)
    links: LoginLinks = dataclasses.field(init=False)
    sessions: ConsoleSessions = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        sign_in = self.sign_in or SignIn.of(self.database)
        self.passwords, self.links, self.sessions = (
            sign_in.passwords, sign_in.links, sign_in.sessions)
