"""Join tokens: which bearer secret admits a dialing peer, and into which node group.

Secrets are kept only as SHA-256 digests and compared in constant time; with none
configured, only loopback (and in-memory) peers are admitted.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from tooti.groups import DEFAULT_TOKEN, bearer_token, named_tokens
from tooti.settings import GatewaySettings, GroupSettings


class Admission(NamedTuple):
    """Who a bearer token let in: its node group and the token's name."""

    group: str = ""
    """``""`` = ungrouped."""
    token: str = ""
    """The name of the join token presented (``default`` for ``join_token``); ``""``
    when no token is configured (loopback peers)."""


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
    that group (see :meth:`identify`). With any token configured, every peer must
    present one.
    """

    def __init__(self, join_token: Tokens, groups: Mapping[str, Tokens] | None = None
                 ) -> None:
        self._digests = [(Admission(group, name), hashlib.sha256(token.encode()).digest())
                         for group, tokens in [("", join_token), *(groups or {}).items()]
                         for name, token in _named(tokens).items() if token]

    @property
    def open_to_network(self) -> bool:
        """True when a join token is configured (non-loopback peers allowed)."""
        return bool(self._digests)

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
        if admitted is None:
            return "invalid token", Admission()
        return None, admitted


def _named(tokens: Tokens) -> Mapping[str, str]:
    return {DEFAULT_TOKEN: tokens} if isinstance(tokens, str) else tokens


def join_auth(settings: GatewaySettings, groups: Mapping[str, GroupSettings]) -> BearerAuth:
    """The join tokens of ``settings`` (ungrouped) and of ``groups``, by name."""
    return BearerAuth(named_tokens(settings.join_token, settings.join_tokens),
                      {name: named_tokens(group.join_token, group.join_tokens)
                       for name, group in groups.items()})
