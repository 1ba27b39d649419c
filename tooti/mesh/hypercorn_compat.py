"""The one place that reaches into hypercorn past its public API.

tooti's listener reads the first bytes of every connection itself (a tunnel upgrade
never reaches hypercorn) and hands the rest to hypercorn's HTTP/1.1 and HTTP/2
protocols. hypercorn has no public API for serving a connection it did not accept, so
this module uses its internals, and nothing else in the project does (outside it, only
``hypercorn.config.Config`` and ``hypercorn.trio.serve`` are used):

* :class:`ServedApp`: the ASGI app wrapped the way hypercorn calls it, with its
  config, hypercorn's worker context (the shutdown signal its protocols watch) and
  the ASGI lifespan state given to every connection.
* :class:`ConnectionServer`: the per-connection loop of hypercorn's trio
  ``TCPServer`` (read into the protocol, write what it sends, run an idle task while
  no request is in progress), over a :class:`ServedStream` (which hypercorn's own
  server does not take: it wants a ``trio.SSLStream``, and tells plain TCP by an
  ``AttributeError``), with HTTP/1.1 served by :class:`ErrorObjectH11`.
* :class:`ErrorObjectH11`: hypercorn's HTTP/1.1 protocol answering what h11 refuses
  with the OpenAI error object.

Every name, signature and attribute used here is pinned by
``tests/test_hypercorn_compat.py``, with the exact version in ``pyproject.toml``
(:data:`PINNED_VERSION`); see "The hypercorn seam" in ``docs/architecture.md`` for what
to do when hypercorn releases.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from tooti.errors import APIError
from tooti.mesh.http import protocol_error

PINNED_VERSION = "0.18.0"
"""The hypercorn release this module is written against (``pyproject.toml`` pins it)."""
MAX_RECV = 2**16
LINGER_SECONDS = 2.0
LINGER_BYTES = 2**20
"""After answering a malformed request the server half-closes, then reads and drops what
the client still sends (at most this long and this much) before closing: closing a socket
with unread bytes makes the kernel send RST, which can destroy the error answer in the
client's receive buffer before it reads it (nginx's "lingering close")."""
"""Bytes asked of the stream per read (hypercorn's own server reads as much)."""


class ServedStream(Protocol):
    """What :class:`ConnectionServer` needs of an accepted connection: its socket (for
    the addresses in the ASGI scope), whether it is TLS and what ALPN chose, and the
    half-closeable byte stream."""

    @property
    def socket(self) -> trio.socket.SocketType: ...

    @property
    def tls(self) -> bool:
        """The connection speaks TLS, its handshake done (the ASGI scheme is then
        ``https`` and ALPN picks the protocol)."""
        ...

    def selected_alpn_protocol(self) -> str | None:
        """The protocol ALPN chose (``h2`` serves HTTP/2); None without TLS or ALPN."""
        ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class ServedApp:
    """What hypercorn's protocols need to serve one listener's connections."""

    app: AppWrapper
    """The ASGI app as hypercorn calls it."""
    config: Config
    context: WorkerContext = field(default_factory=lambda: WorkerContext(None))
    """hypercorn's worker context: no request limit; its ``terminated`` event is the
    shutdown signal (:meth:`terminate`)."""
    state: LifespanState = field(default_factory=dict)
    """The ASGI lifespan state each connection's scope starts from (hypercorn copies it
    into every request's scope). No lifespan runs behind the listener: it stays empty."""

    @classmethod
    def of(cls, app: Any, config: Config) -> ServedApp:
        """``app`` (an ASGI callable) served with ``config``."""
        return cls(wrap_app(app, config.wsgi_max_body_size, None), config)

    @property
    def terminated(self) -> bool:
        """The listener is shutting down (:meth:`terminate` was called)."""
        return self.context.terminated.is_set()

    async def terminate(self) -> None:
        """Tell every connection the listener is shutting down: a connection between
        requests closes, a request in progress finishes first."""
        await self.context.terminated.set()


def bound_address(sock: socket.socket) -> str:
    """A listening socket's address as hypercorn prints it (``host:port``,
    ``[v6]:port``, ``unix:path``)."""
    return repr_socket_addr(sock.family, sock.getsockname())


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
        self.sent_error = False
        """Whether an error answer went out (the connection then lingers as it closes)."""
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
        answer the app starts meanwhile cannot interleave with it. Raises
        ``h11.LocalProtocolError`` if a response has begun (unless the request was
        found malformed: then the answer under way ends the connection)."""
        self.sent_error = True  # the connection lingers as it closes: see LINGER_SECONDS
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


class ConnectionServer:
    """hypercorn serving one accepted connection (the loop of its trio ``TCPServer``):
    the protocol ALPN chose (HTTP/1.1 as :class:`ErrorObjectH11`, or HTTP/2), fed what
    the stream reads, its writes sent in order, and :meth:`idle` run whenever no request
    is in progress. Awaiting it serves the connection until it closes."""

    def __init__(self, served: ServedApp, stream: ServedStream) -> None:
        self.served = served
        self.stream = stream
        self._send_lock = trio.Lock()
        self._idle_task = TrioSingleTask()
        self._task_group: TaskGroup | None = None
        self._protocol: ProtocolWrapper | None = None

    def __await__(self) -> Generator[Any, None, None]:
        return self.run().__await__()

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        stream, served = self.stream, self.served
        ssl = stream.tls
        alpn_protocol = stream.selected_alpn_protocol() if ssl else "http/1.1"
        try:
            sock = stream.socket
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                wrapper = ProtocolWrapper(
                    served.app, served.config, served.context, task_group,
                    ConnectionState(served.state), ssl, client, server, self._send,
                    alpn_protocol)
                if type(wrapper.protocol) is H11Protocol:
                    wrapper.protocol = ErrorObjectH11(
                        served.app, served.config, served.context, task_group,
                        wrapper.state, ssl, client, server, self._send)
                self._protocol = wrapper
                await wrapper.initiate()
                await self._idle_task.restart(task_group, self.idle)
                await self._read_data(wrapper)
        except OSError:
            pass
        finally:
            await self._close()

    async def idle(self) -> None:
        """While no request is in progress: close the connection after the config's
        ``keep_alive_timeout`` or at shutdown (hypercorn's rule; subclasses refine it)."""
        with trio.move_on_after(self.served.config.keep_alive_timeout):
            await self.served.context.terminated.wait()
        with trio.CancelScope(shield=True):
            await self.close()

    async def answer(self, error: APIError) -> None:
        """Answer ``error`` on an HTTP/1.1 connection with no response under way (on
        HTTP/2, or once a response has begun, nothing is sent)."""
        protocol = self._protocol.protocol if self._protocol is not None else None
        if isinstance(protocol, ErrorObjectH11):
            try:
                await protocol.send_error(error)
            except h11.LocalProtocolError:
                pass  # a response had begun (pipelining)

    async def close(self) -> None:
        """Close the connection from the server's side."""
        if self._protocol is not None:
            await self._protocol.handle(Closed())
        await self.stream.aclose()

    async def _send(self, event: Event) -> None:
        """What the protocol sends: bytes to write, a close, or the start or end of a
        request (which stops or restarts :meth:`idle`)."""
        if isinstance(event, RawData):
            async with self._send_lock:
                try:
                    with trio.CancelScope(shield=True):
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if self._protocol is not None:
                        await self._protocol.handle(Closed())
        elif isinstance(event, Closed):
            await self._close()
            if self._protocol is not None:
                await self._protocol.handle(Closed())
        elif isinstance(event, Updated) and self._task_group is not None:
            if event.idle:
                await self._idle_task.restart(self._task_group, self.idle)
            else:
                await self._idle_task.stop()

    async def _read_data(self, protocol: ProtocolWrapper) -> None:
        read_timeout = self.served.config.read_timeout or math.inf
        while True:
            try:
                with trio.fail_after(read_timeout):
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            await protocol.handle(RawData(bytes(data)))
            if not data:
                break
        await protocol.handle(Closed())

    async def _close(self) -> None:
        try:
            try:
                await self.stream.send_eof()
            except (trio.BrokenResourceError, trio.BusyResourceError,
                    trio.ClosedResourceError):
                return  # gone already
            protocol = self._protocol.protocol if self._protocol is not None else None
            if isinstance(protocol, ErrorObjectH11) and protocol.sent_error:
                await self._linger()
        finally:
            await self.stream.aclose()

    async def _linger(self) -> None:
        """Read and drop what the client still sends after an error answer, until it
        closes, ``LINGER_BYTES`` or ``LINGER_SECONDS`` (see :data:`LINGER_SECONDS`)."""
        dropped = 0
        with trio.move_on_after(LINGER_SECONDS):
            while dropped < LINGER_BYTES:
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.BrokenResourceError, trio.BusyResourceError,
                        trio.ClosedResourceError):
                    return
                if not data:
                    return
                dropped += len(data)
