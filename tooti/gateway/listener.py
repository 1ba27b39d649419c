"""The gateway's TCP listener: tunnels straight onto the socket, HTTP to hypercorn.

Every accepted connection is looked at once: if it opens with a WebSocket upgrade
to :data:`~tooti.transport.websocket.TUNNEL_PATH`, the upgrade is answered here and
the tunnel runs on :class:`~tooti.transport.websocket.WebSocketTransport` over the
socket itself; anything else (the OpenAI API, the admin API, metrics, HTTP/2) is
handed to hypercorn's per-connection server with the bytes already read. A tunnel
upgrade that arrives later on a kept-alive HTTP connection still works, through
the ASGI app (slower, same protocol).

With TLS configured, every accepted connection first completes a TLS handshake
(bounded in time) with the certificate current at that moment (:mod:`tooti.tls`), and
is then looked at the same way: ``https://`` and ``wss://`` share the port, and HTTP/2
is chosen by ALPN. A plain HTTP request on a TLS port is answered with a 400.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from tooti.errors import APIError
from tooti.tls import HANDSHAKE_TIMEOUT
from tooti.transport.websocket import MAX_HEAD_BYTES, RECEIVE_BYTES, TUNNEL_PATH

log = logging.getLogger("tooti.gateway.listener")

HEAD_TIMEOUT = 10.0
"""Seconds a connection that starts like a tunnel upgrade has to send its whole head."""
TUNNEL_PREFIX = b"GET " + TUNNEL_PATH.encode()
TLS_HANDSHAKE_RECORD = 0x16
"""The first byte of a TLS client's first record (the ClientHello)."""

Accepted = trio.SocketStream | trio.SSLStream[trio.SocketStream]
"""An accepted connection: plain TCP, or TLS with its handshake done."""


def socket_of(stream: Accepted) -> trio.socket.SocketType:
    """The TCP socket under an accepted connection."""
    return stream.transport_stream.socket if isinstance(stream, trio.SSLStream) \
        else stream.socket


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A tunnel upgrade request read off a fresh connection."""

    stream: Accepted
    headers: dict[str, str]
    """Header names lower-cased; a repeated header's values joined with ``, ``."""
    client: tuple[str, int] | None
    buffered: bytes
    """Bytes that followed the request head (the peer's first frames, if any)."""


TunnelHandler = Callable[[UpgradeRequest], Awaitable[None]]


class _Replay(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return bytes already taken from it."""

    def __init__(self, stream: Accepted, head: bytes) -> None:
        self._stream = stream
        self._head = head
        self.socket = socket_of(stream)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._head:
            data, self._head = self._head, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self._stream, trio.SocketStream):
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _TLSReplay(_Replay):
    """The same over TLS, with what hypercorn looks for in a TLS stream (it then serves
    the connection as ``https`` and picks HTTP/2 if ALPN chose it). The handshake is
    already done; there is no half-close in TLS, so ``send_eof`` does nothing."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], head: bytes) -> None:
        super().__init__(stream, head)
        self.transport_stream = stream.transport_stream
        self._tls = stream

    async def do_handshake(self) -> None:
        await self._tls.do_handshake()

    def selected_alpn_protocol(self) -> str | None:
        protocol: str | None = self._tls.selected_alpn_protocol()
        return protocol


def replay(stream: Accepted, head: bytes) -> _Replay:
    """``stream`` with ``head`` (bytes already read from it) put back in front."""
    if isinstance(stream, trio.SSLStream):
        return _TLSReplay(stream, head)
    return _Replay(stream, head)


async def _read_upgrade(stream: Accepted, idle_timeout: float
                        ) -> tuple[bytes, UpgradeRequest | None]:
    """Read just enough to tell a tunnel upgrade from anything else. Returns the bytes
    read and, for a well-formed upgrade to the tunnel path, the request. A connection
    silent for ``idle_timeout`` returns what it sent (hypercorn's keep-alive limit)."""
    data = b""
    with trio.move_on_after(idle_timeout):
        while len(data) < len(TUNNEL_PREFIX) and TUNNEL_PREFIX.startswith(data):
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return data, None
            data += chunk
    if not data.startswith(TUNNEL_PREFIX):
        return data, None
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(data)
    with trio.move_on_after(HEAD_TIMEOUT):
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return data, None
            if isinstance(event, h11.Request):
                break
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return data, None
            data += chunk
            conn.receive_data(bytes(chunk))
    if not isinstance(event, h11.Request):
        return data, None  # too slow: hypercorn answers (or times out) the rest
    path = event.target.split(b"?", 1)[0]
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    upgrade = headers.get("upgrade", "").lower()
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if path != TUNNEL_PATH.encode() or upgrade != "websocket" or "upgrade" not in connection:
        return data, None
    buffered, _ = conn.trailing_data
    try:
        peer = socket_of(stream).getpeername()
        client: tuple[str, int] | None = (str(peer[0]), int(peer[1]))
    except (OSError, IndexError, TypeError):
        client = None
    return data, UpgradeRequest(stream, headers, client, bytes(buffered))


PLAIN_HTTP_ON_TLS = APIError(400, "this port speaks TLS: use https:// (wss:// for tunnels)",
                             code="tls_required")


def _error_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying ``error`` (the connection closes after it)."""
    body = error.to_json()
    return (b"HTTP/1.1 %d Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (error.status, len(body), body))


async def _over_tls(then: Callable[[Accepted], Awaitable[None]],
                    context: Callable[[], ssl.SSLContext], seconds: float,
                    stream: trio.SocketStream) -> None:
    """Complete the TLS handshake of an accepted connection within ``seconds``,
    with the certificate current now, then hand the TLS stream to ``then``. A client
    that does not complete it is closed (one that sent plain HTTP gets a 400 first)."""
    secured = trio.SSLStream(stream, context(), server_side=True, https_compatible=True)
    done = False
    with trio.move_on_after(seconds):
        try:
            first = await stream.socket.recv(1, socket.MSG_PEEK)
            if first and first[0] != TLS_HANDSHAKE_RECORD:
                if first.isalpha():  # the start of an HTTP method
                    await _refuse_plain_http(stream)
            elif first:
                await secured.do_handshake()
                done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("TLS handshake failed: %s", exc.__cause__ or exc)
    if not done:
        await trio.aclose_forcefully(stream)
        return
    await then(secured)


async def _refuse_plain_http(stream: trio.SocketStream) -> None:
    """Read a plain HTTP request's head and answer it with :data:`PLAIN_HTTP_ON_TLS`."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
        chunk = await stream.receive_some(RECEIVE_BYTES)
        if not chunk:
            return
        head += chunk
    await stream.send_all(_error_response(PLAIN_HTTP_ON_TLS))
    await stream.send_eof()


async def serve(app: Any, config: Config, on_tunnel: TunnelHandler,
                shutdown_trigger: Callable[[], Awaitable[object]], *,
                tls: Callable[[], ssl.SSLContext] | None = None,
                handshake_timeout: float = HANDSHAKE_TIMEOUT,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``config.bind`` until ``shutdown_trigger`` returns; reports the bound
    URLs. Connections opening with a tunnel upgrade go to ``on_tunnel``, the rest to
    hypercorn serving the ASGI ``app`` (keep-alive, HTTP/2, graceful shutdown as
    configured). With ``tls`` (which returns the server context to use now) every
    connection speaks TLS, and must complete its handshake within
    ``handshake_timeout`` seconds."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    context = WorkerContext(None)
    sockets = config.create_sockets()
    listeners: list[trio.SocketListener] = []
    binds: list[str] = []
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(("https://" if tls is not None else "http://")
                     + repr_socket_addr(sock.family, sock.getsockname()))
    if sockets.secure_sockets or sockets.quic_sockets:
        raise ValueError("the gateway listener takes its TLS context as tls=, not from "
                         "hypercorn's certfile")

    async def connection(stream: Accepted) -> None:
        try:
            head, upgrade = await _read_upgrade(stream, config.keep_alive_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        if upgrade is not None:
            try:
                await on_tunnel(upgrade)
            except Exception:  # one tunnel's failure must not stop the listener
                log.exception("tunnel from %s failed", upgrade.client)
            finally:
                await trio.aclose_forcefully(stream)
            return
        if not head:
            await trio.aclose_forcefully(stream)
            return
        await TCPServer(wrapped, config, context, ConnectionState({}),
                        replay(stream, head))  # type: ignore[arg-type]

    handler: Callable[[trio.SocketStream], Awaitable[None]] = connection
    if tls is not None:
        handler = partial(_over_tls, connection, tls, handshake_timeout)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(partial(trio.serve_listeners, handler, [listener],
                                             handler_nursery=handlers))
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        await context.terminated.set()
        handlers.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
