"""Join tokens: which bearer secret admits a dialing peer, into which node group, and
for which account (the owner its nodes earn for).

Two sources: the static tokens of the config (``gateway.join_token(s)`` and each
``[gateway.groups.*]``'s), kept only as SHA-256 digests and compared in constant time,
whose nodes belong to the ``admin`` account; and, when the gateway has an accounts
database, the tokens minted per account (:class:`~tooti.accounts.join_directory.JoinTokenDirectory`,
looked up by digest after the static ones), whose nodes belong to the account the token
was minted for and, for a group's token, join that group. With neither configured,
only loopback (and in-memory) peers are admitted, as ``admin``'s.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.accounts.records import ADMIN_ACCOUNT
from tooti.groups import DEFAULT_TOKEN, bearer_token, named_tokens
from tooti.settings import GatewaySettings, GroupSettings


class Admission(NamedTuple):
    """Who a bearer token let in: its node group, the token's name, and the account
    its nodes belong to."""

    group: str = ""
    """``""`` = ungrouped."""
    token: str = ""
    """The name of the join token presented (``default`` for ``join_token``; a minted
    token's name, else its id); ``""`` when no token is configured (loopback peers)."""
    owner: str = ADMIN_ACCOUNT
    """The account id the peer's nodes are bound to and earn for: the account a minted
    token belongs to; ``admin`` for the static tokens and for loopback peers."""
    token_id: str = ""
    """A minted token's id (``""`` for static tokens and loopback peers)."""
    group_id: str = ""
    """A minted group token's group id in the accounts database (``""`` otherwise)."""


class TokenChanges(NamedTuple):
    """The join tokens a reload added, removed, or gave a new value, by name: a token
    name, or ``group/name`` for a node group's."""

    added: list[str]
    removed: list[str]
    replaced: list[str]


UNGROUPED = Admission()
"""No group, no token (a loopback or in-memory peer without configured tokens)."""

Tokens = str | Mapping[str, str]
"""One token (named ``default``), or several by name."""


class BearerAuth:
    """Checks a bearer secret (a node's join token, or the admin key).

    Secrets are kept only as SHA-256 digests and compared in constant time. With
    no secret configured, only loopback clients are accepted.

    ``join_token`` is one token (named ``default``) or several by name, all valid at
    once (rotation without downtime). ``groups`` (group name → its token or tokens)
    adds tokens per node group: a peer presenting a group's token is admitted into
    that group (see :meth:`identify`). ``directory`` holds the tokens minted per
    account, consulted when no static token matches. With any token configured (static
    or minted), every peer must present one.
    """

    def __init__(self, join_token: Tokens, groups: Mapping[str, Tokens] | None = None,
                 directory: JoinTokenDirectory | None = None) -> None:
        self._digests = [(Admission(group, name), hashlib.sha256(token.encode()).digest())
                         for group, tokens in [("", join_token), *(groups or {}).items()]
                         for name, token in _named(tokens).items() if token]
        self.directory = directory

    @property
    def open_to_network(self) -> bool:
        """True when a join token is configured or minted (non-loopback peers allowed)."""
        return bool(self._digests) or (self.directory is not None and len(self.directory) > 0)

    def changes(self, new: BearerAuth) -> TokenChanges:
        """How the tokens of ``new`` differ from these, by name (never the tokens)."""
        old_tokens, new_tokens = dict(self._digests), dict(new._digests)

        def names(admissions: Iterable[Admission]) -> list[str]:
            return sorted(f"{a.group}/{a.token}" if a.group else a.token for a in admissions)

        return TokenChanges(
            added=names(new_tokens.keys() - old_tokens.keys()),
            removed=names(old_tokens.keys() - new_tokens.keys()),
            replaced=names(a for a in old_tokens.keys() & new_tokens.keys()
                           if old_tokens[a] != new_tokens[a]))

    def check(self, authorization: bytes | None, client_host: str | None) -> str | None:
        """Return None if the peer is admitted, else the reason it is refused."""
        return self.identify(authorization, client_host)[0]

    def identify(self, authorization: bytes | None, client_host: str | None
                 ) -> tuple[str | None, Admission]:
        """``(None, admission)`` if the peer is admitted (its group, ``""`` =
        ungrouped, and the name of the token it presented), else ``(reason,
        Admission())``. Every configured token is compared, in constant time."""
        if not self.open_to_network:
            if client_host is None or client_host == "memory":
                return None, Admission()
            try:
                if ipaddress.ip_address(client_host).is_loopback:
                    return None, Admission()
            except ValueError:
                pass
            return "no token configured: only loopback clients are accepted", Admission()
        presented = hashlib.sha256(bearer_token(authorization)).digest()
        admitted: Admission | None = None
        for admission, digest in self._digests:
            if hmac.compare_digest(presented, digest):
                admitted = admission
        if admitted is None and self.directory is not None:
            grant = self.directory.lookup(presented)
            if grant is not None:
                admitted = Admission(grant.group, grant.name or grant.token_id,
                                     grant.account_id, grant.token_id, grant.group_id)
        if admitted is None:
            return "invalid token", Admission()
        return None, admitted


def _named(tokens: Tokens) -> Mapping[str, str]:
    return {DEFAULT_TOKEN: tokens} if isinstance(tokens, str) else tokens


def join_auth(settings: GatewaySettings, groups: Mapping[str, GroupSettings],
              directory: JoinTokenDirectory | None = None) -> BearerAuth:
    """The join tokens of ``settings`` (ungrouped) and of ``groups``, by name, then
    those minted per account in ``directory``."""
    return BearerAuth(named_tokens(settings.join_token, settings.join_tokens),
                      {name: named_tokens(group.join_token, group.join_tokens)
                       for name, group in groups.items()}, directory)
