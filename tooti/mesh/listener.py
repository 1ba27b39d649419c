"""The gateway's TCP listener: tunnels straight onto the socket, HTTP/1.1 to tooti's own
server, HTTP/2 to hypercorn.

Every accepted connection is looked at once: if it opens with a WebSocket upgrade
to :data:`~tooti.transport.websocket.TUNNEL_PATH`, the upgrade is answered here and
the tunnel runs on :class:`~tooti.transport.websocket.WebSocketTransport` over the
socket itself. A connection speaking HTTP/2 (ALPN ``h2`` over TLS, or the HTTP/2
preface sent as prior knowledge) is handed to hypercorn's per-connection server with
the bytes already read (:mod:`tooti.mesh.http_server`). Anything else (the OpenAI
API, the admin API, metrics) is HTTP/1.1, served by :class:`~tooti.mesh.http1.Http1Server`:
a lean loop per connection calling the ASGI app directly. A tunnel upgrade that
arrives later on a kept-alive HTTP/1.1 connection is handed back here, and served
like one on a fresh connection.

With TLS configured, every accepted connection first completes a TLS handshake
(bounded in time) with the certificate current at that moment (:mod:`tooti.tls`), and
is then looked at the same way: ``https://`` and ``wss://`` share the port, and HTTP/2
is chosen by ALPN. A plain HTTP request on a TLS port is answered with a 400.

Hostile clients meet the limits of :class:`Limits` here: at most ``max_connections``
connections at once (more are answered 503 and closed); from one address (an IPv6 /64)
at most ``max_connections_per_ip`` open at once and ``connection_rate`` new ones per
second after a burst of ``connection_burst`` (more are answered 429 and closed; on a
TLS port closed before any handshake, so a flood of handshakes costs no crypto), where
tunnels that proved their node's identity do not count; a connection that sends
nothing for ``keep_alive_timeout`` (before its first request or between requests) is
closed; a request head must be complete ``header_timeout`` after its first byte,
however slowly it trickles in (408, then close); a write a client does not read for
``send_timeout`` disconnects it. A malformed request (bad request line, header,
Content-Length or chunk; a head over the size limit) is answered with the OpenAI
error object, by :mod:`tooti.mesh.http1` (and on HTTP/2 by a small subclass of
hypercorn's protocol: :mod:`tooti.mesh.hypercorn_compat` holds all that touches
hypercorn's internals).
"""

from __future__ import annotations

import logging
import math
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.config import Config

from tooti import clock
from tooti.errors import APIError
from tooti.mesh.http import error_response
from tooti.mesh.http1 import H2_PREFACE, Http1Server
from tooti.mesh.http_server import Accepted, LimitedServer, Replay, replay, socket_of
from tooti.mesh.hypercorn_compat import ServedApp, bound_address
from tooti.mesh.ratelimit import (
    CONCURRENT,
    Limited,
    PerAddressLimiter,
    Slot,
    Throttle,
    address_key,
)
from tooti.settings import GatewaySettings
from tooti.tls import HANDSHAKE_TIMEOUT
from tooti.transport.websocket import MAX_HEAD_BYTES, RECEIVE_BYTES, TUNNEL_PATH

log = logging.getLogger("tooti.mesh.listener")

FD_RESERVE = 128
"""File descriptors kept out of ``max_connections`` (logs, databases, the listening
sockets, a node's own connections in the same process)."""
BUSY_LOG_EVERY = 60.0
"""Seconds between two warnings that connections are being refused at the limit."""
TUNNEL_PREFIX = b"GET " + TUNNEL_PATH.encode()
TLS_HANDSHAKE_RECORD = 0x16
"""The first byte of a TLS client's first record (the ClientHello)."""

@dataclass(frozen=True, slots=True)
class Limits:
    """What one client connection may take (``gateway.*`` settings of the same names)."""

    header_timeout: float
    keep_alive_timeout: float
    send_timeout: float
    max_connections: int
    max_connections_per_ip: int
    connection_rate: float
    connection_burst: int

    @classmethod
    def of(cls, settings: GatewaySettings) -> Limits:
        return cls(settings.header_timeout, settings.keep_alive_timeout,
                   settings.send_timeout, settings.max_connections,
                   settings.max_connections_per_ip, settings.connection_rate,
                   settings.connection_burst)


def connection_cap(wanted: int) -> int:
    """``wanted`` connections, or fewer if the file-descriptor limit cannot hold them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted <= soft - FD_RESERVE:
        return wanted
    cap = max(soft - FD_RESERVE, 1)
    log.warning("gateway.max_connections %d is beyond the file-descriptor limit (%d, "
                "ulimit -n): at most %d connections at once", wanted, soft, cap)
    return cap


BUSY = APIError(503, "the gateway is at its connection limit; retry shortly",
                code="too_many_connections", type="service_unavailable",
                headers={"retry-after": "1"})


def too_many_from(limited: Limited) -> APIError:
    """The 429 for a connection over its address's limits."""
    code = "too_many_connections_per_ip" if limited.limit == CONCURRENT \
        else "connection_rate_limited"
    retry = max(1, math.ceil(min(limited.retry_after, 3600.0)))
    return APIError(429, limited.reason, code=code, headers={"retry-after": str(retry)})


def peer_host(stream: trio.SocketStream) -> str | None:
    """The client address of an accepted connection (None if the socket cannot tell)."""
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A tunnel upgrade request read off a fresh connection."""

    stream: Accepted
    headers: dict[str, str]
    """Header names lower-cased; a repeated header's values joined with ``, ``."""
    client: tuple[str, int] | None
    buffered: bytes
    """Bytes that followed the request head (the peer's first frames, if any)."""
    proven: Callable[[], None] = lambda: None
    """To call once the peer has proven its identity: the connection then no longer
    counts toward its address's ``max_connections_per_ip``."""


TunnelHandler = Callable[[UpgradeRequest], Awaitable[None]]


async def _read_upgrade(stream: Accepted, limits: Limits
                        ) -> tuple[bytes, float, UpgradeRequest | None]:
    """Read just enough to tell a tunnel upgrade from anything else. Returns the bytes
    read, when the first of them arrived and, for a well-formed upgrade to the tunnel
    path, the request. A connection silent for ``keep_alive_timeout`` returns no bytes;
    one whose head is not complete ``header_timeout`` after its first byte returns
    what it sent (hypercorn then answers 408 at once)."""
    data = b""
    with trio.move_on_after(limits.keep_alive_timeout):
        data = bytes(await stream.receive_some(RECEIVE_BYTES))
    started = clock.now()
    if not data:
        return data, started, None
    event: h11.Request | None = None
    with trio.move_on_at(started + limits.header_timeout):
        while (len(data) < len(TUNNEL_PREFIX) and TUNNEL_PREFIX.startswith(data)) \
                or (len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data)):
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return data, started, None
            data += chunk
        if not data.startswith(TUNNEL_PREFIX):
            return data, started, None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        conn.receive_data(data)
        while event is None:
            try:
                next_event = conn.next_event()
            except h11.RemoteProtocolError:
                return data, started, None  # hypercorn answers it
            if isinstance(next_event, h11.Request):
                event = next_event
                break
            chunk = await stream.receive_some(RECEIVE_BYTES)
            if not chunk:
                return data, started, None
            data += chunk
            conn.receive_data(bytes(chunk))
    if event is None:
        return data, started, None  # too slow: hypercorn answers 408
    path = event.target.split(b"?", 1)[0]
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    upgrade = headers.get("upgrade", "").lower()
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if path != TUNNEL_PATH.encode() or upgrade != "websocket" or "upgrade" not in connection:
        return data, started, None
    buffered, _ = conn.trailing_data
    client = _client_of(socket_of(stream))
    return data, started, UpgradeRequest(stream, headers, client, bytes(buffered))


def _client_of(sock: trio.socket.SocketType) -> tuple[str, int] | None:
    """The client's address and port (None if the socket cannot tell)."""
    try:
        peer = sock.getpeername()
        return str(peer[0]), int(peer[1])
    except (OSError, IndexError, TypeError):
        return None


def _speaks_http2(stream: Accepted, head: bytes) -> bool:
    """The connection speaks HTTP/2: chosen by ALPN, or opened with the HTTP/2 preface
    (prior knowledge)."""
    if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() == "h2":
        return True
    return head.startswith(H2_PREFACE)


PLAIN_HTTP_ON_TLS = APIError(400, "this port speaks TLS: use https:// (wss:// for tunnels)",
                             code="tls_required")


async def _handshake(stream: trio.SocketStream, context: Callable[[], ssl.SSLContext],
                     seconds: float) -> trio.SSLStream[trio.SocketStream] | None:
    """Complete the TLS handshake of an accepted connection within ``seconds``, with the
    certificate current now: the TLS stream, or None if the client did not complete it
    (one that sent plain HTTP got a 400 first)."""
    secured = trio.SSLStream(stream, context(), server_side=True, https_compatible=True)
    with trio.move_on_after(seconds):
        try:
            first = await stream.socket.recv(1, socket.MSG_PEEK)
            if first and first[0] != TLS_HANDSHAKE_RECORD:
                if first.isalpha():  # the start of an HTTP method
                    await _refuse_plain_http(stream)
            elif first:
                await secured.do_handshake()
                return secured
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("TLS handshake failed: %s", exc.__cause__ or exc)
    return None


async def _refuse_plain_http(stream: trio.SocketStream) -> None:
    """Read a plain HTTP request's head and answer it with :data:`PLAIN_HTTP_ON_TLS`."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
        chunk = await stream.receive_some(RECEIVE_BYTES)
        if not chunk:
            return
        head += chunk
    await stream.send_all(error_response(PLAIN_HTTP_ON_TLS))
    await stream.send_eof()


class _Opening:
    """The connections that have sent no request yet (in their TLS handshake, before
    their first request head is complete, or tunnels whose peer has not proven its
    identity), each in a cancel scope that :meth:`close` cancels: at shutdown they are
    closed at once instead of holding it up."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._closed = False

    @contextmanager
    def guard(self) -> Iterator[trio.CancelScope]:
        """A cancel scope for one connection's opening, cancelled at :meth:`close` (at
        once if that came first)."""
        scope = trio.CancelScope()
        if self._closed:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def forget(self, scope: trio.CancelScope) -> None:
        """Leave ``scope`` alone at :meth:`close` (its connection is past its opening)."""
        self._scopes.discard(scope)

    def close(self) -> None:
        self._closed = True
        for scope in self._scopes:
            scope.cancel()


async def serve(app: Any, config: Config, on_tunnel: TunnelHandler,
                shutdown_trigger: Callable[[], Awaitable[object]], *,
                tls: Callable[[], ssl.SSLContext] | None = None,
                handshake_timeout: float = HANDSHAKE_TIMEOUT,
                limits: Limits | Callable[[], Limits] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``config.bind`` until ``shutdown_trigger`` returns; reports the bound
    URLs. Connections opening with a tunnel upgrade go to ``on_tunnel``, the rest to
    hypercorn serving the ASGI ``app`` (keep-alive, HTTP/2, graceful shutdown as
    configured). With ``tls`` (which returns the server context to use now) every
    connection speaks TLS, and must complete its handshake within
    ``handshake_timeout`` seconds. ``limits`` (default: the settings' defaults) bound
    every connection and their number; given as a function, it is asked at every accept
    (a configuration reload): a new connection gets the limits current then, and the
    ones open keep theirs."""
    fixed = limits if isinstance(limits, Limits) else Limits.of(GatewaySettings())

    def current() -> Limits:
        return limits() if callable(limits) else fixed

    now = current()
    cap = connection_cap(now.max_connections)
    open_count = 0
    busy_log = Throttle(BUSY_LOG_EVERY)
    per_address = PerAddressLimiter(now.connection_rate, now.connection_burst,
                                    now.max_connections_per_ip)
    refusal_log = Throttle(BUSY_LOG_EVERY)
    served: set[Replay] = set()
    opening = _Opening()
    served_app = ServedApp.of(app, config)
    http1 = Http1Server(app, scheme="https" if tls is not None else "http")
    sockets = config.create_sockets()
    listeners: list[trio.SocketListener] = []
    binds: list[str] = []
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(("https://" if tls is not None else "http://")
                     + bound_address(sock))
    if sockets.secure_sockets or sockets.quic_sockets:
        raise ValueError("the gateway listener takes its TLS context as tls=, not from "
                         "hypercorn's certfile")

    async def connection(stream: trio.SocketStream, slot: Slot, limits: Limits) -> None:
        accepted: Accepted | None = stream
        head, started, upgrade = b"", 0.0, None
        with opening.guard():
            try:
                if tls is not None:
                    accepted = await _handshake(stream, tls, handshake_timeout)
                if accepted is not None:
                    head, started, upgrade = await _read_upgrade(accepted, limits)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                head, upgrade = b"", None
        if accepted is None or not head:  # no request (or shutting down)
            await trio.aclose_forcefully(accepted or stream)
            return
        if upgrade is not None:
            try:
                await tunnel(upgrade, slot)
            finally:
                await trio.aclose_forcefully(accepted)
            return
        if _speaks_http2(accepted, head):  # ALPN h2, or h2c with prior knowledge
            replayed = replay(accepted, head, limits.send_timeout)
            served.add(replayed)
            try:
                await LimitedServer(served_app, replayed, limits, started)
            finally:
                served.discard(replayed)
            return
        sock = socket_of(accepted)

        async def on_upgrade(headers: dict[str, str], buffered: bytes) -> None:
            await tunnel(UpgradeRequest(accepted, headers, _client_of(sock), buffered), slot)

        await http1.serve(accepted, sock, head, started, limits, on_upgrade)

    async def tunnel(upgrade: UpgradeRequest, slot: Slot) -> None:
        """Serve a tunnel upgrade (its connection counts toward its address's limit until
        the peer has proven its identity, and shutdown closes it until then)."""
        with opening.guard() as unproven:

            def proven() -> None:
                slot.release()
                opening.forget(unproven)

            try:
                await on_tunnel(replace(upgrade, proven=proven))
            except Exception:  # one tunnel's failure must not stop the listener
                log.exception("tunnel from %s failed", upgrade.client)

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal open_count, now, cap
        limits = current()
        if limits is not now:  # reloaded: new connections count by the new limits
            if limits.max_connections != now.max_connections:
                cap = connection_cap(limits.max_connections)
            per_address.rate, per_address.burst = limits.connection_rate, limits.connection_burst
            per_address.concurrent = limits.max_connections_per_ip
            now = limits
        host = peer_host(stream)
        try:
            slot = per_address.acquire(host, "new connections", held="open connections")
        except Limited as limited:
            key = address_key(host)
            if refusal_log.allow(key):
                log.warning("connection from %s refused: %s (more from it this minute at "
                            "debug level)", key, limited.reason)
            else:
                log.debug("connection from %s refused: %s", key, limited.reason)
            await _refuse(stream, too_many_from(limited) if tls is None else None)
            return
        with slot:
            if open_count >= cap:
                if busy_log.allow():
                    log.warning("%d connections open (gateway.max_connections): refusing "
                                "new ones", open_count)
                await _refuse(stream, BUSY if tls is None else None)
                return
            open_count += 1
            try:
                await connection(stream, slot, limits)
            finally:
                open_count -= 1
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
        await served_app.terminate()
        http1.terminate()  # connections between requests close now
        opening.close()  # connections with no request yet close now
        for waiting in served:
            waiting.wake()  # connections waiting for a request close now
        handlers.cancel_scope.deadline = clock.now() + config.graceful_timeout


async def _refuse(stream: trio.SocketStream, error: APIError | None) -> None:
    """Answer ``error`` (if any: a TLS client cannot read it before its handshake) and
    close the connection."""
    if error is not None:
        with trio.move_on_after(1):
            try:
                await stream.send_all(error_response(error))
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
    await trio.aclose_forcefully(stream)
