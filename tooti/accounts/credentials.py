"""Secrets the gateway hands out (API keys, join tokens, invite and credit codes):
generated here with a recognisable prefix, shown once, stored only as a SHA-256 digest
plus a short visible prefix for listing. They are 32 random bytes, so an unsalted
SHA-256 is as strong as the secret (passwords, which are guessable, use argon2)."""

from __future__ import annotations

import hashlib
import secrets

API_KEY = "sk-tooti-"
JOIN_TOKEN = "tj-tooti-"
INVITE = "ti-tooti-"
CREDIT_CODE = "tc-tooti-"
VISIBLE = 6
"""Random characters kept visible after the kind prefix, for listing (``sk-tooti-AbC123…``)."""


def generate(kind: str) -> str:
    """A new secret of ``kind`` (one of the prefixes above)."""
    return kind + secrets.token_urlsafe(32)


def digest(secret: str | bytes) -> str:
    """The SHA-256 hex digest a secret is stored and looked up by."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()


def visible_prefix(secret: str) -> str:
    """The part of a secret shown in listings: its kind and a few characters."""
    for kind in (API_KEY, JOIN_TOKEN, INVITE, CREDIT_CODE):
        if secret.startswith(kind):
            return secret[:len(kind) + VISIBLE]
    return secret[:VISIBLE]


def new_id(kind: str) -> str:
    """A non-secret id (``acct_…``, ``key_…``): safe to log and show."""
    return f"{kind}_{secrets.token_hex(8)}"
