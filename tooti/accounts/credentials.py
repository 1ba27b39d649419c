"""Secrets the gateway hands out (API keys, join tokens, invite and credit codes):
generated here with a recognisable prefix, shown once, stored only as a SHA-256 digest
plus a short visible prefix for listing. They are 32 random bytes, so an unsalted
SHA-256 is as strong as the secret (passwords, which are guessable, use argon2).

**API keys carry a checksum.** An API key is exactly ``sk-tooti-`` + 43 base64url
characters (the 32 random bytes) + 6 base64url characters of checksum: the CRC-32 of the
prefix and the random part (as GitHub's tokens do). :func:`is_api_key` checks the shape
and the checksum without any lookup, so the gateway refuses made-up, mistyped or
truncated keys before they cost a database round trip
(:mod:`tooti.accounts.directory`). The checksum is public, not a MAC: it stops accidents
and blind floods, not an attacker who computes it (a 2^-32 chance for a random guess);
those still meet the directory's bounded lookups. Join tokens, invite and credit codes
keep the plain shape (kind + 43 characters): they are looked up in memory or only by
authenticated accounts.

Every secret is hashed by :func:`digest` / :func:`digest_bytes` (one helper, used by
the key directory, the gateway's configured keys and :mod:`tooti.groups`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import zlib

API_KEY = "sk-tooti-"
JOIN_TOKEN = "tj-tooti-"
INVITE = "ti-tooti-"
CREDIT_CODE = "tc-tooti-"
VISIBLE = 6
"""Random characters kept visible after the kind prefix, for listing (``sk-tooti-AbC123…``)."""
RANDOM_CHARS = 43
"""Base64url characters of the 32 random bytes of every secret."""
CHECKSUM_CHARS = 6
"""Base64url characters of an API key's CRC-32 checksum."""
API_KEY_LENGTH = len(API_KEY) + RANDOM_CHARS + CHECKSUM_CHARS
"""The exact length of an API key (58)."""
_API_KEY_SHAPE = re.compile(
    rb"sk-tooti-[A-Za-z0-9_-]{%d}[A-Za-z0-9_-]{%d}" % (RANDOM_CHARS, CHECKSUM_CHARS))


def checksum(body: bytes) -> bytes:
    """The 6 base64url characters of the CRC-32 of ``body`` (an API key without them)."""
    return base64.urlsafe_b64encode(zlib.crc32(body).to_bytes(4, "big")).rstrip(b"=")


def generate(kind: str) -> str:
    """A new secret of ``kind`` (one of the prefixes above); an API key ends with its
    checksum (see the module docstring)."""
    secret = kind + secrets.token_urlsafe(32)
    if kind == API_KEY:
        secret += checksum(secret.encode()).decode()
    return secret


def is_api_key(secret: bytes) -> bool:
    """Whether ``secret`` has an API key's exact shape and a right checksum (no lookup:
    a key this fails cannot be one the gateway generated)."""
    if len(secret) != API_KEY_LENGTH or _API_KEY_SHAPE.fullmatch(secret) is None:
        return False
    body, check = secret[:-CHECKSUM_CHARS], secret[-CHECKSUM_CHARS:]
    return secrets.compare_digest(checksum(body), check)


def digest_bytes(secret: str | bytes) -> bytes:
    """The SHA-256 of a secret (raw bytes, for constant-time compares in memory)."""
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def digest(secret: str | bytes) -> str:
    """The SHA-256 hex digest a secret is stored and looked up by."""
    return digest_bytes(secret).hex()


def visible_prefix(secret: str) -> str:
    """The part of a secret shown in listings: its kind and a few characters."""
    for kind in (API_KEY, JOIN_TOKEN, INVITE, CREDIT_CODE):
        if secret.startswith(kind):
            return secret[:len(kind) + VISIBLE]
    return secret[:VISIBLE]


def new_id(kind: str) -> str:
    """A non-secret id (``acct_…``, ``key_…``): safe to log and show."""
    return f"{kind}_{secrets.token_hex(8)}"
