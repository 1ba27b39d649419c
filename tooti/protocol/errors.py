"""The error every protocol layer raises when a peer breaks the protocol."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the protocol; the session must close with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
