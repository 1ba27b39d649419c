"""The gateway's TCP listener: tunnels straight onto the socket, HTTP to hypercorn.

Every accepted connection is looked at once: if it opens with a WebSocket upgrade
to :data:`~tooti.transport.websocket.TUNNEL_PATH`, the upgrade is answered here and
the tunnel runs on :class:`~tooti.transport.websocket.WebSocketTransport` over the
socket itself; anything else (the OpenAI API, the admin API, metrics, HTTP/2) is
handed to hypercorn's per-connection server with the bytes already read. A tunnel
upgrade that arrives later on a kept-alive HTTP connection still works, through
the ASGI app (slower, same protocol).
"""

from __future__ import annotations

import logging
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

from tooti.transport.websocket import MAX_HEAD_BYTES, RECEIVE_BYTES, TUNNEL_PATH

log = logging.getLogger("tooti.gateway.listener")

HEAD_TIMEOUT = 10.0
"""Seconds a connection that starts like a tunnel upgrade has to send its whole head."""
TUNNEL_PREFIX = b"GET " + TUNNEL_PATH.encode()


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A tunnel upgrade request read off a fresh connection."""

    stream: trio.SocketStream
    headers: dict[str, str]
    """Header names lower-cased; a repeated header's values joined with ``, ``."""
    client: tuple[str, int] | None
    buffered: bytes
    """Bytes that followed the request head (the peer's first frames, if any)."""


TunnelHandler = Callable[[UpgradeRequest], Awaitable[None]]


class _Replay(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return bytes already taken from it."""

    def __init__(self, stream: trio.SocketStream, head: bytes) -> None:
        self._stream = stream
        self._head = head
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
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
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _read_upgrade(stream: trio.SocketStream, idle_timeout: float
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
            conn.receive_data(chunk)
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
        peer = stream.socket.getpeername()
        client: tuple[str, int] | None = (str(peer[0]), int(peer[1]))
    except (OSError, IndexError, TypeError):
        client = None
    return data, UpgradeRequest(stream, headers, client, bytes(buffered))


async def serve(app: Any, config: Config, on_tunnel: TunnelHandler,
                shutdown_trigger: Callable[[], Awaitable[object]], *,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``config.bind`` until ``shutdown_trigger`` returns; reports the bound
    URLs. Connections opening with a tunnel upgrade go to ``on_tunnel``, the rest to
    hypercorn serving the ASGI ``app`` (keep-alive, HTTP/2, graceful shutdown as
    configured)."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    context = WorkerContext(None)
    sockets = config.create_sockets()
    listeners: list[trio.SocketListener] = []
    binds: list[str] = []
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append("http://" + repr_socket_addr(sock.family, sock.getsockname()))
    if sockets.secure_sockets or sockets.quic_sockets:
        raise ValueError("the gateway listener serves plain TCP only; put TLS in front of it")

    async def connection(stream: trio.SocketStream) -> None:
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
                        _Replay(stream, head))  # type: ignore[arg-type]

    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(partial(trio.serve_listeners, connection, [listener],
                                             handler_nursery=handlers))
            task_status.started(binds)
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        await context.terminated.set()
        handlers.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
