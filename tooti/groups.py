"""Node groups: which group a request belongs to, from its bearer key.

A group (``[gateway.groups.NAME]``) has a join token, which admits nodes (and
relays) into it (see :class:`tooti.mesh.admission.BearerAuth`), and API keys,
whose requests belong to it. A request of group G is routed only to nodes of
G; a request with no group only to ungrouped nodes.

Keys are held only as SHA-256 digests and compared in constant time. A key
configured as ``sha256:<64 hex>`` is such a digest already, so a config file
need not hold the keys themselves. Hashing is
:func:`tooti.accounts.credentials.digest_bytes`, the one helper every secret goes
through.

The configured group names are reserved: the gateway hands them to
:class:`tooti.accounts.service.AccountService`, which refuses to create a database group
under one (so no operator can take over a configured group's nodes or traffic).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping

from tooti.accounts.credentials import digest, digest_bytes
from tooti.settings import GroupSettings

GROUP_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What a group name may be: 1..64 letters, digits, ``.``, ``_`` or ``-``."""
DEFAULT_TOKEN = "default"
"""The name ``join_token`` goes by among a group's (or the ungrouped) join tokens."""
DIGEST_PREFIX = "sha256:"
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def api_key_digest(key: str) -> bytes:
    """The SHA-256 digest of an API key as configured (raw, or ``sha256:<64 hex>``).

    Raises ValueError for a ``sha256:`` value that is not 64 hex digits, or an
    empty key.
    """
    if key.startswith(DIGEST_PREFIX):
        hexdigest = key[len(DIGEST_PREFIX):]
        if not _HEX_DIGEST.fullmatch(hexdigest):
            raise ValueError(f"a key written as '{DIGEST_PREFIX}...' must be followed by "
                             "64 hex digits (the SHA-256 of the key)")
        return bytes.fromhex(hexdigest)
    if not key:
        raise ValueError("an API key must not be empty")
    return digest_bytes(key)


def named_tokens(token: str, named: Mapping[str, str]) -> dict[str, str]:
    """A ``join_token`` (named :data:`DEFAULT_TOKEN`) and ``join_tokens``, by name."""
    return {**({DEFAULT_TOKEN: token} if token else {}), **named}


def bearer_token(authorization: bytes | None) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header (empty if none)."""
    if authorization and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip()
    return b""


def key_id_of(authorization: bytes | None) -> str:
    """A stable, non-secret id for the caller's API key (``anonymous`` without one)."""
    return _key_id(bearer_token(authorization))


def _key_id(token: bytes) -> str:
    return "key-" + digest(token)[:16] if token else "anonymous"


class GroupKeys:
    """Maps a request's bearer key to its group ("" = no group)."""

    def __init__(self, groups: Mapping[str, GroupSettings]) -> None:
        self._keys: list[tuple[bytes, str]] = [
            (api_key_digest(key), name)
            for name, group in groups.items() for key in group.api_keys
        ]

    def group_of(self, authorization: bytes | None) -> str:
        """The group whose api_keys hold the request's bearer key, else ``""``.

        Every configured digest is compared (in constant time), so the time taken
        does not depend on which key matched, or how far a guess got.
        """
        return self._group(bearer_token(authorization))

    def caller(self, authorization: bytes | None) -> tuple[str, str]:
        """``(key id, group)`` of a request's bearer key (see :func:`key_id_of`)."""
        token = bearer_token(authorization)
        return _key_id(token), self._group(token)

    def _group(self, token: bytes) -> str:
        if not self._keys or not token:
            return ""
        presented = digest_bytes(token)
        found = ""
        for key, name in self._keys:
            if hmac.compare_digest(presented, key):
                found = name
        return found
