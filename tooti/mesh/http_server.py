"""hypercorn's per-connection HTTP server, with tooti's limits and error objects.

The listener (:mod:`tooti.mesh.listener`) reads the first bytes of every connection
itself; what is not a tunnel upgrade is served here: :class:`Replay` puts the bytes
already read back in front of the stream (and bounds each write by ``send_timeout``),
:class:`LimitedServer` is hypercorn's per-connection server with the keep-alive and
header timeouts, and :class:`ErrorObjectH11` is hypercorn's HTTP/1.1 protocol answering
what h11 refuses with the OpenAI error object. These lean on hypercorn 0.18 internals
(``TCPServer``, ``H11Protocol``), hence the pin below 0.19 in ``pyproject.toml``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState

from tooti.errors import APIError
from tooti.mesh.http import protocol_error

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
            # hypercorn already serializes its writes (TCPServer.send_lock); the lock is
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


class TLSReplay(Replay):
    """The same over TLS, with what hypercorn looks for in a TLS stream (it then serves
    the connection as ``https`` and picks HTTP/2 if ALPN chose it). The handshake is
    already done; there is no half-close in TLS, so ``send_eof`` does nothing."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], head: bytes,
                 send_timeout: float = math.inf) -> None:
        super().__init__(stream, head, send_timeout)
        self.transport_stream = stream.transport_stream
        self._tls = stream

    async def do_handshake(self) -> None:
        await self._tls.do_handshake()

    def selected_alpn_protocol(self) -> str | None:
        protocol: str | None = self._tls.selected_alpn_protocol()
        return protocol


def replay(stream: Accepted, head: bytes, send_timeout: float = math.inf) -> Replay:
    """``stream`` with ``head`` (bytes already read from it) put back in front."""
    if isinstance(stream, trio.SSLStream):
        return TLSReplay(stream, head, send_timeout)
    return Replay(stream, head, send_timeout)


class ErrorObjectH11(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, except that what h11 refuses (a bad request line,
    header, Content-Length or chunk: 400; a head over the size limit: 431; an unknown
    transfer coding: 501) is answered with the OpenAI error object instead of an empty
    body. hypercorn 0.18 has no hook for it; ``_send_error_response`` is the one
    method it calls for these answers.

    Two races of hypercorn's are closed too: its writes and its close go out in the order
    they are made (the app's task could close the connection under the reader task's
    error answer, which was then lost); and a request body found malformed while its
    answer is under way (the app answered without reading it: a 405, a 413) no longer
    cuts that answer off after its head: the connection closes when the answer ends.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        send = self.send
        in_order = trio.Lock()  # taken at once (no yield) when free: first come, first out

        async def send_in_order(event: Event) -> None:
            if isinstance(event, Closed) and self.connection.our_state is h11.SEND_BODY \
                    and self.connection.their_state is h11.ERROR:
                return  # hypercorn closes when the answer ends (it cannot recycle)
            if isinstance(event, RawData | Closed):
                async with in_order:
                    await send(event)
            else:
                await send(event)

        self.send = send_in_order

    async def _send_error_response(self, status_code: int) -> None:
        await self.send_error(protocol_error(status_code, self.config.h11_max_incomplete_size))

    async def send_error(self, error: APIError) -> None:
        """Answer ``error`` (the connection closes after it), in one write, so that an
        answer the app starts meanwhile cannot interleave with it."""
        body = error.to_json()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", b"%d" % len(body)), (b"connection", b"close"),
                   *self.config.response_headers("h11")]
        try:
            data = b"".join(self.connection.send(event) or b"" for event in (
                h11.Response(status_code=error.status, headers=headers), h11.Data(data=body),
                h11.EndOfMessage()))
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return  # an answer is under way already
        await self.send(RawData(data=data))


class LimitedServer(TCPServer):
    """hypercorn's per-connection server with the listener's timeouts.

    hypercorn runs ``_idle_timeout`` whenever no request is in progress (from the
    start, and again after each response) and cancels it once a request head is
    complete. Here it waits ``keep_alive_timeout`` for the next request's first byte
    (closing a silent connection), then ``header_timeout`` from that byte for the
    rest of the head (answering 408 when it does not come). The first request's
    first byte was read by the listener, at ``head_started``.
    """

    def __init__(self, app: AppWrapper, config: Config, context: WorkerContext,
                 stream: Replay, limits: ConnectionTimeouts, head_started: float) -> None:
        super().__init__(app, config, context, ConnectionState({}),
                         stream)  # type: ignore[arg-type]
        self._connection = stream
        self._limits = limits
        self._head_started: float | None = head_started

    # hypercorn builds its protocol inside run(); swap in the HTTP/1.1 one above.
    @property
    def protocol(self) -> ProtocolWrapper:
        return self._wrapper

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        if type(wrapper.protocol) is H11Protocol:
            wrapper.protocol = ErrorObjectH11(
                wrapper.app, wrapper.config, wrapper.context, wrapper.task_group,
                wrapper.state, wrapper.ssl, wrapper.client, wrapper.server, wrapper.send)
        self._wrapper = wrapper

    async def _idle_timeout(self) -> None:
        connection, terminated = self._connection, self.context.terminated
        started, self._head_started = self._head_started, None
        if started is None:  # wait for the next request's first byte
            arrival = connection.next_arrival()
            with trio.move_on_after(self._limits.keep_alive_timeout):
                await arrival.wait()
            started = trio.current_time() if arrival.is_set() else None
        if started is not None:  # a head has begun: the rest has until the deadline
            deadline = started + self._limits.header_timeout
            while not (connection.at_eof or terminated.is_set()) \
                    and trio.current_time() < deadline:
                with trio.move_on_at(deadline):
                    await connection.next_arrival().wait()
        if connection.at_eof:
            return  # hypercorn's reader answers a cut-off head and ends the connection
        with trio.CancelScope(shield=True):
            protocol = self._wrapper.protocol
            if started is not None and not terminated.is_set() \
                    and isinstance(protocol, ErrorObjectH11):
                timeout = APIError(408, "request head not received within "
                                   f"{self._limits.header_timeout:g}s", code="header_timeout")
                try:
                    await protocol.send_error(timeout)
                except h11.LocalProtocolError:
                    pass  # a response had begun (pipelining); just close
            await self._initiate_server_close()
