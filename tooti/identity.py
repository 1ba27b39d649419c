"""Node identity: an Ed25519 keypair, and the proof of possession used in the handshake.

Every node has a keypair, kept in its data directory (``node_key.pem``, mode
0600) and created on first start. Its **derived id** is ``tooti-`` followed by
the base32 of the first 16 bytes of SHA-256 of the public key: self-certifying,
nobody else can present a key that derives to it. An operator may instead name
a node (``node.id``); a gateway then binds that name to the first key it sees
for it and refuses any other key for the same name (trust on first use). Names
starting with ``tooti-`` are reserved for derived ids.

In the tunnel handshake the node sends its public key in HELLO, the gateway
answers WELCOME with a random challenge, and the node answers PROOF: a
signature over :func:`proof_message` (the challenge, the session id and the
node id), so the proof cannot be replayed on another session or for another id.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

DERIVED_PREFIX = "tooti-"
KEY_FILE = "node_key.pem"
RELAY_KEY_FILE = "relay_key.pem"
PUBLIC_KEY_BYTES = 32
CHALLENGE_BYTES = 32


def derive_id(public_key: bytes) -> str:
    """The self-certifying node id of a raw 32-byte Ed25519 public key."""
    digest = hashlib.sha256(public_key).digest()[:16]
    return DERIVED_PREFIX + base64.b32encode(digest).decode().rstrip("=").lower()


def proof_message(challenge: bytes, session_id: str, peer_id: str) -> bytes:
    """The bytes a node signs to prove it holds the key for ``peer_id`` in this session."""
    return b"\0".join((b"tooti-proof-v1", challenge, session_id.encode(), peer_id.encode()))


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def b64(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, size: int | None = None) -> bytes | None:
    """Decode base64 text; None if it is not valid (or not ``size`` bytes)."""
    if not isinstance(text, str):
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    if size is not None and len(data) != size:
        return None
    return data


class Identity:
    """A node's keypair."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh keypair, kept only in memory."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path, key_file: str = KEY_FILE) -> Identity:
        """The keypair in ``data_dir`` (file ``key_file``), created (mode 0600) if there
        is none."""
        path = data_dir / key_file
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            identity = cls.generate()
            data_dir.mkdir(parents=True, exist_ok=True)
            pem = identity._private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            return identity
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return cls(key)

    @property
    def id(self) -> str:
        """The derived (self-certifying) node id."""
        return derive_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message``."""
        return self._private.sign(message)
