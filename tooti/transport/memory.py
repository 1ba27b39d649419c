"""In-memory transport: a gateway and a node in one process, same protocol."""

from __future__ import annotations

from collections.abc import Callable

import trio

from tooti.transport import TransportClosed

QUEUE = 64


class MemoryTransport:
    """One end of an in-memory message pipe (bounded, so it exerts backpressure)."""

    def __init__(
        self,
        send_channel: trio.MemorySendChannel[bytes],
        receive_channel: trio.MemoryReceiveChannel[bytes],
        remote: str = "memory",
    ) -> None:
        self._send = send_channel
        self._receive = receive_channel
        self.remote = remote
        self.close_code = 0
        self.close_reason = ""

    async def send(self, message: bytes) -> None:
        """Send one message to the other end."""
        try:
            await self._send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed("memory transport closed") from None

    async def send_many(self, messages: list[bytes]) -> None:
        """Send each message in turn."""
        for message in messages:
            await self.send(message)

    def write_nowait(self, messages: list[bytes]) -> bool:
        """Takes the messages only if the channel has room for all of them."""
        stats = self._send.statistics()
        if stats.current_buffer_used + len(messages) > stats.max_buffer_size:
            return False
        try:
            for message in messages:
                self._send.send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed("memory transport closed") from None
        return True

    pending = False

    async def receive(self, before_wait: Callable[[], None] | None = None) -> bytes:
        """Receive the next message from the other end (``before_wait()`` is called first
        if none is waiting)."""
        if before_wait is not None and not self._receive.statistics().current_buffer_used:
            before_wait()
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed("memory transport closed") from None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close both directions; the other end sees TransportClosed."""
        if not self.close_code:
            self.close_code, self.close_reason = code, reason
        await self._send.aclose()
        await self._receive.aclose()


def memory_pair(queue: int = QUEUE) -> tuple[MemoryTransport, MemoryTransport]:
    """Return two connected transports (dialer end, acceptor end)."""
    a_send, b_receive = trio.open_memory_channel[bytes](queue)
    b_send, a_receive = trio.open_memory_channel[bytes](queue)
    return (
        MemoryTransport(a_send, a_receive, "memory"),
        MemoryTransport(b_send, b_receive, "memory"),
    )
