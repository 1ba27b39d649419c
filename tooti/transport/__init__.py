"""Message transports that carry tunnel frames: WebSocket (both ends) and in-memory.

A transport moves whole binary messages; one message is one tunnel frame. The
tunnel session (:mod:`tooti.tunnel`) is written against :class:`Transport`
only, so a gateway and a node in the same process talk through
:func:`tooti.transport.memory.memory_pair` with exactly the same protocol as
over a real WebSocket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class TransportClosed(Exception):
    """The transport is closed (by either side, or the link failed)."""


class Transport(Protocol):
    """A bidirectional carrier of binary messages."""

    remote: str
    """Human-readable peer address (``127.0.0.1:51234``, ``memory``)."""

    async def send(self, message: bytes) -> None:
        """Send one message; raise :class:`TransportClosed` if closed."""
        ...

    async def send_many(self, messages: list[bytes]) -> None:
        """Send several messages in order, in as few writes as the carrier allows."""
        ...

    def write_nowait(self, messages: list[bytes]) -> bool:
        """Write messages without waiting or yielding if the carrier can (True: taken,
        in order, before anything sent later), else False (send them normally)."""
        ...

    @property
    def pending(self) -> bool:
        """True while messages :meth:`write_nowait` took still wait to be written (the
        next :meth:`send_many`, even of nothing, writes them first)."""
        ...

    async def receive(self, before_wait: Callable[[], None] | None = None) -> bytes:
        """Return the next message; raise :class:`TransportClosed` at the end. If it has
        to wait for input, it calls ``before_wait()`` first."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the transport (idempotent); ``code`` is a WebSocket close code."""
        ...
