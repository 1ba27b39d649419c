"""The HTTP/2 side of an accepted connection: the stream hypercorn reads, and its limits.

The listener (:mod:`tooti.mesh.listener`) reads the first bytes of every connection
itself; HTTP/1.1 is served by :mod:`tooti.mesh.http1`, and a connection speaking HTTP/2
(ALPN ``h2``, or prior knowledge) is served here: :class:`Replay` puts the bytes
already read back in front of the stream (and bounds each write by ``send_timeout``),
and :class:`LimitedServer` is hypercorn's per-connection server
(:class:`~tooti.mesh.hypercorn_compat.ConnectionServer`, which also answers what h11
refuses with the OpenAI error object, should hypercorn ever serve HTTP/1.1 again)
with the keep-alive and header timeouts.
"""

from __future__ import annotations

import math
from typing import Protocol

import trio

from tooti import clock
from tooti.errors import APIError
from tooti.mesh.hypercorn_compat import ConnectionServer, ServedApp

Accepted = trio.SocketStream | trio.SSLStream[trio.SocketStream]
"""An accepted connection: plain TCP, or TLS with its handshake done."""


class ConnectionTimeouts(Protocol):
    """The timeouts :class:`LimitedServer` applies (the listener's ``Limits``)."""

    @property
    def keep_alive_timeout(self) -> float: ...

    @property
    def header_timeout(self) -> float: ...


def socket_of(stream: Accepted) -> trio.socket.SocketType:
    """The TCP socket under an accepted connection."""
    return stream.transport_stream.socket if isinstance(stream, trio.SSLStream) \
        else stream.socket


class Replay(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return bytes already taken from it. It tells
    when input next arrives (:meth:`next_arrival`), and a write that waits longer than
    ``send_timeout`` for the client to read breaks the connection."""

    def __init__(self, stream: Accepted, head: bytes, send_timeout: float = math.inf
                 ) -> None:
        self._stream = stream
        self._head = head
        self._send_timeout = send_timeout
        self._arrival: trio.Event | None = None
        self._sending = trio.Lock()
        self.at_eof = False
        """The client has sent its last byte."""
        self.socket = socket_of(stream)

    def next_arrival(self) -> trio.Event:
        """An event set when the next bytes (or the end of input) arrive, or when
        :meth:`wake` is called."""
        self._arrival = trio.Event()
        return self._arrival

    def wake(self) -> None:
        """Set the pending :meth:`next_arrival` event (the server is shutting down)."""
        if self._arrival is not None:
            self._arrival.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._head:
            head, self._head = self._head, b""
            await trio.lowlevel.checkpoint()
            return head
        data = await self._stream.receive_some(max_bytes)
        self.at_eof = not data
        if self._arrival is not None:
            self._arrival.set()
            self._arrival = None
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # hypercorn shields its writes from cancellation; this deadline still applies.
        with trio.move_on_after(self._send_timeout):
            # the server already serializes its writes (its send lock); the lock is
            # for send_eof, so a free one is taken without the extra yield of acquire().
            try:
                self._sending.acquire_nowait()
            except trio.WouldBlock:
                await self._sending.acquire()
            try:
                await self._stream.send_all(data)
            finally:
                self._sending.release()
            return
        await trio.aclose_forcefully(self._stream)
        raise trio.BrokenResourceError("the client stopped reading")

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        # hypercorn may half-close (its reader saw the client go) while the app's last
        # write is under way: wait for it rather than fail with BusyResourceError.
        if isinstance(self._stream, trio.SocketStream):
            async with self._sending:
                await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    @property
    def tls(self) -> bool:
        """False: plain TCP (:class:`TLSReplay` says True)."""
        return False

    def selected_alpn_protocol(self) -> str | None:
        """None: no TLS, no ALPN."""
        return None


class TLSReplay(Replay):
    """The same over TLS (hypercorn then serves the connection as ``https`` and picks
    HTTP/2 if ALPN chose it). The handshake is already done; there is no half-close in
    TLS, so ``send_eof`` does nothing."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], head: bytes,
                 send_timeout: float = math.inf) -> None:
        super().__init__(stream, head, send_timeout)
        self._tls = stream

    @property
    def tls(self) -> bool:
        return True

    def selected_alpn_protocol(self) -> str | None:
        protocol: str | None = self._tls.selected_alpn_protocol()
        return protocol


def replay(stream: Accepted, head: bytes, send_timeout: float = math.inf) -> Replay:
    """``stream`` with ``head`` (bytes already read from it) put back in front."""
    if isinstance(stream, trio.SSLStream):
        return TLSReplay(stream, head, send_timeout)
    return Replay(stream, head, send_timeout)


class LimitedServer(ConnectionServer):
    """hypercorn's per-connection server with the listener's timeouts.

    :meth:`idle` runs whenever no request is in progress (from the start, and again
    after each response) and is cancelled once a request head is complete. Here it
    waits ``keep_alive_timeout`` for the next request's first byte (closing a silent
    connection), then ``header_timeout`` from that byte for the rest of the head
    (answering 408 when it does not come). The first request's first byte was read by
    the listener, at ``head_started`` (on :func:`tooti.clock.now`).
    """

    def __init__(self, served: ServedApp, stream: Replay, limits: ConnectionTimeouts,
                 head_started: float) -> None:
        super().__init__(served, stream)
        self._connection = stream
        self._limits = limits
        self._head_started: float | None = head_started

    async def idle(self) -> None:
        connection, served = self._connection, self.served
        started, self._head_started = self._head_started, None
        if started is None:  # wait for the next request's first byte
            arrival = connection.next_arrival()
            with trio.move_on_after(self._limits.keep_alive_timeout):
                await arrival.wait()
            started = clock.now() if arrival.is_set() else None
        if started is not None:  # a head has begun: the rest has until the deadline
            deadline = started + self._limits.header_timeout
            while not (connection.at_eof or served.terminated) and clock.now() < deadline:
                with trio.move_on_at(deadline):
                    await connection.next_arrival().wait()
        if connection.at_eof:
            return  # hypercorn's reader answers a cut-off head and ends the connection
        with trio.CancelScope(shield=True):
            if started is not None and not served.terminated:
                await self.answer(APIError(408, "request head not received within "
                                           f"{self._limits.header_timeout:g}s",
                                           code="header_timeout"))
            await self.close()
