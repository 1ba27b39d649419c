"""WebSocket transports for tunnels.

:class:`WebSocketTransport` runs RFC 6455 directly over a trio stream (plain TCP
or TLS), with the sans-I/O codec of :mod:`tooti.protocol.websocket`. Both ends of
a tunnel use it: the dialing side after :func:`connect`, the accepting side after
the listener (:mod:`tooti.mesh.listener`) answered the upgrade. The tunnel's
read loop calls :meth:`WebSocketTransport.receive` on the socket itself, so a
message costs one task switch, not the three of a general-purpose WebSocket
server (reader task, ASGI queue, application task).

:class:`ASGIWebSocketTransport` is the accepting side through the ASGI server:
used only when a tunnel upgrade arrives on a connection that already carried HTTP
requests (a reverse proxy reusing a kept-alive connection).
"""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from tooti.protocol.websocket import (
    OP_BINARY,
    OP_PONG,
    Close,
    FrameDecoder,
    Message,
    Ping,
    WebSocketError,
    accept_key,
    encode_close,
    encode_frame,
    new_key,
)
from tooti.tls import handshake_problem
from tooti.transport import TransportClosed

SUBPROTOCOL = "tooti.v1"
TUNNEL_PATH = "/tooti/v1/tunnel"
RECEIVE_BYTES = 65536
MAX_HEAD_BYTES = 16384
"""Largest HTTP head accepted in a WebSocket handshake, either way."""
MAX_REFUSAL_BODY = 4096
"""Bytes of a refused handshake's response body kept for the error message."""
CLOSED_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class HandshakeFailed(Exception):
    """The peer did not accept the WebSocket upgrade (``status`` 0: no HTTP answer)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}" if status else reason)
        self.status = status
        self.reason = reason


class _Borrowed:
    """The trio socket's own file descriptor, read and written directly (``os.read`` /
    ``os.write``: ``recv`` / ``send`` without flags) to skip trio's per-call machinery.
    Borrowed, never closed here (the trio stream owns it), and no second descriptor is
    made: a ``dup`` per tunnel doubled the descriptors of a gateway with 10,000 nodes
    (20,000 + its clients). Each call checks the trio socket is still open (its
    ``fileno()`` is -1 once closed), so a closed socket's number, perhaps reused since, is
    never touched; there is no checkpoint between that check and the call."""

    __slots__ = ("_sock",)

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock

    def fileno(self) -> int:
        fd = self._sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "socket closed")
        return fd

    def send(self, data: bytes) -> int:
        return os.write(self.fileno(), data)

    def recv(self, size: int) -> bytes:
        return os.read(self.fileno(), size)


class WebSocketTransport:
    """Binary WebSocket messages over a trio stream, one tunnel frame per message.

    ``client`` selects the side (a client masks what it sends and expects
    unmasked frames). ``buffered`` holds bytes that arrived with the handshake.
    Sending is serialised by a lock taken without a checkpoint when free; ping
    is answered with pong; a close frame from the peer is answered and ends the
    transport; a protocol violation closes it with the RFC 6455 code.

    Over plain TCP the transport reads and writes through a duplicate of the
    socket's descriptor (the same connection): input is taken as soon as the read
    loop is woken for it, and :meth:`write_nowait` writes without waiting, so a
    tunnel's read loop can pass frames on before it next waits. Over TLS (any other
    stream) it reads and writes through the stream only: the descriptor carries
    ciphertext.
    """

    def __init__(self, stream: trio.abc.Stream, remote: str, *, client: bool,
                 max_message: int, buffered: bytes = b"") -> None:
        self.remote = remote
        self._stream = stream
        self._client = client
        self._decoder = FrameDecoder(max_message=max_message, client=client)
        if buffered:
            self._decoder.feed(buffered)
        self._send_lock = trio.Lock()
        self._raw: _Borrowed | None = None
        if isinstance(stream, trio.SocketStream):
            self._raw = _Borrowed(stream.socket)
        self._leftover = b""
        self._more = True
        """The last read filled its buffer: read again before waiting."""
        self._peeked: Any = None
        """An event :meth:`peek_nowait` took from the decoder: :meth:`receive` returns it
        first (unless :meth:`drop_peeked` consumed it)."""
        self._closed = False
        self._close_sent = False
        self.close_code: int | None = None
        """The close code the peer sent, once it sent one."""

    async def send(self, message: bytes) -> None:
        """Send one binary message."""
        await self.send_many([message])

    async def send_many(self, messages: list[bytes]) -> None:
        """Send several binary messages with one write."""
        await self._write(self._frames(messages))

    def _frames(self, messages: list[bytes]) -> bytes:
        """The WebSocket frames of binary ``messages``; TransportClosed once closed."""
        if self._closed or self._close_sent:
            raise TransportClosed("websocket closed")
        mask = self._client
        return b"".join([encode_frame(OP_BINARY, m, mask=mask) for m in messages])

    def write_nowait(self, messages: list[bytes]) -> bool:
        """Write binary messages now, without waiting: False if that cannot be done (not
        plain TCP, or another write is under way), else True - what the socket did not
        take at once is written first by the next :meth:`send_many` (see
        :attr:`pending`)."""
        if self._raw is None or self._send_lock.locked():
            return False
        data = self._leftover + self._frames(messages)
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._closed = True
            raise TransportClosed("websocket closed: connection lost") from None
        self._leftover = data[sent:]
        return True

    @property
    def pending(self) -> bool:
        """True while bytes that :meth:`write_nowait` took wait to be written."""
        return bool(self._leftover)

    async def _write(self, data: bytes) -> None:
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # the usual case: no checkpoint before the write
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._leftover:
                data, self._leftover = self._leftover + data, b""
            await self._stream.send_all(data)
        except CLOSED_ERRORS:
            self._closed = True
            raise TransportClosed("websocket closed: connection lost") from None
        finally:
            lock.release()

    async def _receive_bytes(self) -> bytes | bytearray:
        """The next bytes from the connection (b"" at its end). Over plain TCP they are
        read straight off the socket: bytes that arrive while we wait are taken as soon
        as we are woken. When the last read filled the buffer (more is likely waiting)
        the socket is read at once, after a yield, so a busy tunnel does not starve the
        process's other tasks; otherwise (a paced stream: one frame, then nothing) the
        read waits for the socket first, which spares a ``recv`` failing with EAGAIN
        per message."""
        raw = self._raw
        if raw is None:
            return await self._stream.receive_some(RECEIVE_BYTES)
        if self._more:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = raw.recv(RECEIVE_BYTES)
            except BlockingIOError:
                self._more = False
            except OSError:
                return b""
            else:
                self._more = len(data) == RECEIVE_BYTES
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(raw)
            try:
                data = raw.recv(RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return b""
            self._more = len(data) == RECEIVE_BYTES
            return data

    # ------------------------------------------------------------ idle reading
    # A tunnel's read loop with nothing to do parks in the process's idle set
    # (:mod:`tooti.tunnel.idle`) instead of waiting on this socket; the idle set's task
    # reads for it with these three calls, all synchronous.

    def idle_fd(self) -> int:
        """The socket's descriptor when this transport can be read by the idle set (plain
        TCP, open, nothing buffered, peeked or waiting to be written, no write under way);
        else -1."""
        raw = self._raw
        if (raw is None or self._closed or self._leftover or self._peeked is not None
                or self._decoder.buffered or self._send_lock.locked()):
            return -1
        try:
            return raw.fileno()
        except OSError:
            return -1

    def read_nowait(self) -> bool:
        """Read what the socket holds, without waiting, into the decoder. False when the
        read loop must take over: the connection's end or an error (left for its next
        read to find again), or a full buffer (more is likely waiting)."""
        raw = self._raw
        if raw is None:
            return False
        try:
            data = raw.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return True
        except OSError:
            self._more = True  # the read loop reads at once and meets the error (or EOF)
            return False
        if not data:
            self._more = True
            return False
        self._decoder.feed(data)
        if len(data) == RECEIVE_BYTES:
            self._more = True
            return False
        return True

    def peek_nowait(self) -> bytes | None:
        """The next binary message if it is whole in the buffer, kept for :meth:`receive`
        until :meth:`drop_peeked`; None when there is none, or the next event is anything
        else (a ping, a close, a text message, a protocol error: left for
        :meth:`receive`, which raises the error again)."""
        event = self._peeked
        if event is None:
            try:
                event = self._decoder.next_event()
            except WebSocketError:
                return None
            if event is None:
                return None
            self._peeked = event
        if type(event) is Message and not event.text:
            return event.data
        return None

    def drop_peeked(self) -> None:
        """The peeked message was handled: :meth:`receive` will not return it."""
        self._peeked = None

    async def _close_stream(self) -> None:
        self._closed = True
        if self._raw is not None:
            raw, self._raw = self._raw, None
            trio.lowlevel.notify_closing(raw)
        await trio.aclose_forcefully(self._stream)

    async def receive(self, before_wait: Callable[[], None] | None = None) -> bytes:
        """The next binary message; a text message comes back prefixed with 0xff (which no
        tunnel frame starts with), so the tunnel rejects it. Messages already buffered
        are returned without a checkpoint. ``before_wait()`` is called before each read
        of the connection."""
        decoder = self._decoder
        while True:
            if self._closed:
                raise TransportClosed("websocket closed")
            try:
                event = self._peeked
                if event is None:
                    event = decoder.next_event()
                else:
                    self._peeked = None
            except WebSocketError as exc:
                await self._fail(exc.code, exc.message)
                raise TransportClosed(f"websocket protocol error: {exc.message}") from None
            if event is None:
                if before_wait is not None:
                    before_wait()
                try:
                    data = await self._receive_bytes()
                except CLOSED_ERRORS:
                    data = b""
                if not data:
                    self._closed = True
                    raise TransportClosed("websocket closed: connection lost")
                decoder.feed(data)
            elif type(event) is Message:
                return event.data if not event.text else b"\xff" + event.data
            elif type(event) is Ping:
                try:
                    await self._write(encode_frame(OP_PONG, event.payload, mask=self._client))
                except TransportClosed:
                    continue
            elif type(event) is Close:
                self.close_code = event.code
                await self._fail(event.code or 1000, "")
                raise TransportClosed(f"websocket closed ({event.code or 1005})")
            # a Pong needs nothing

    async def _fail(self, code: int, reason: str) -> None:
        """Answer with a close frame (if none was sent) and drop the connection."""
        if not self._close_sent:
            self._close_sent = True
            with trio.move_on_after(1), trio.CancelScope(shield=True):
                try:
                    await self._write(encode_close(code, reason, mask=self._client))
                except TransportClosed:
                    pass
        await self._close_stream()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` and ``reason``: send a close frame, wait for the peer's
        (the caller bounds the wait), then close the connection. Idempotent; after the
        connection was lost or closed by the peer it just releases the socket."""
        if self._closed:
            await self._close_stream()
            return
        try:
            if not self._close_sent:
                self._close_sent = True
                try:
                    await self._write(encode_close(code, reason, mask=self._client))
                except TransportClosed:
                    return
            while True:  # the peer's close frame ends it; anything else is dropped
                try:
                    event = self._decoder.next_event()
                except WebSocketError:
                    return
                if type(event) is Close:
                    return
                if event is None:
                    data = await self._receive_bytes()
                    if not data:
                        return
                    self._decoder.feed(data)
        except (*CLOSED_ERRORS, trio.BusyResourceError):  # busy: another task reads
            return
        finally:
            await self._close_stream()


# ---------------------------------------------------------------- handshake


def _reason_of(body: bytes) -> str:
    return body[:MAX_REFUSAL_BODY].decode("utf-8", "replace").strip() or "(no reason given)"


async def connect(url: str, *, subprotocol: str, headers: Sequence[tuple[bytes, bytes]] = (),
                  max_message: int, ssl_context: ssl.SSLContext | None = None
                  ) -> WebSocketTransport:
    """Dial a ``ws://`` or ``wss://`` URL and complete the WebSocket handshake, asking for
    ``subprotocol``; the caller bounds the time. Raises :class:`HandshakeFailed` if the
    peer refuses or answers something else, OSError if it cannot be reached."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise HandshakeFailed(0, f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    stream: trio.abc.Stream
    if secure:
        stream = await _open_tls(parts.hostname, port,
                                 ssl_context or ssl.create_default_context())
    else:
        stream = await trio.open_tcp_stream(parts.hostname, port)
    try:
        return await _client_handshake(stream, parts, subprotocol, headers, max_message, url)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _open_tls(host: str, port: int, context: ssl.SSLContext
                    ) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection whose handshake is done: the peer's certificate was checked
    against ``context`` for ``host``. A failed handshake is :class:`HandshakeFailed`
    saying why (the certificate check's verdict, or that the peer speaks no TLS)."""
    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context,
                                                 https_compatible=True)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeFailed(0, f"TLS handshake with {host} failed: "
                                 f"{handshake_problem(exc)}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _client_handshake(stream: trio.abc.Stream, parts: Any, subprotocol: str,
                            headers: Sequence[tuple[bytes, bytes]], max_message: int,
                            url: str) -> WebSocketTransport:
    key = new_key()
    host = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    request = h11.Request(method="GET", target=target, headers=[
        (b"host", host.encode()), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-key", key.encode()), (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", subprotocol.encode()), *headers])
    try:
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        response = await _next_event(stream, conn)
        if isinstance(response, h11.InformationalResponse) and response.status_code == 101:
            answer = {name.lower(): value for name, value in response.headers}
            if answer.get(b"sec-websocket-accept", b"").decode() != accept_key(key):
                raise HandshakeFailed(101, "wrong Sec-WebSocket-Accept")
            chosen = answer.get(b"sec-websocket-protocol", b"").decode()
            if chosen != subprotocol:
                raise HandshakeFailed(101, f"peer chose subprotocol {chosen!r}")
            buffered, _ = conn.trailing_data
            return WebSocketTransport(stream, url, client=True, max_message=max_message,
                                      buffered=bytes(buffered))
        if not isinstance(response, h11.Response):
            raise HandshakeFailed(0, "no HTTP response to the upgrade")
        body = b""
        while len(body) < MAX_REFUSAL_BODY:
            event = await _next_event(stream, conn)
            if not isinstance(event, h11.Data):
                break
            body += event.data
        raise HandshakeFailed(response.status_code, _reason_of(body))
    except h11.ProtocolError as exc:
        raise HandshakeFailed(0, f"bad HTTP answer to the upgrade: {exc}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__ or exc  # a TLS failure says why only in its cause
        raise HandshakeFailed(0, f"connection lost during the handshake: {cause}") from None


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(RECEIVE_BYTES)))


def upgrade_response(key: str, subprotocol: str) -> bytes:
    """The server's ``101 Switching Protocols`` for a request with Sec-WebSocket-Key ``key``."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key).encode()
            + b"\r\nSec-WebSocket-Protocol: " + subprotocol.encode() + b"\r\n\r\n")


def refusal_response(status: int, reason: str) -> bytes:
    """A plain-text HTTP refusal of an upgrade (the connection closes after it; a 429 or
    503 says when to retry)."""
    retry = [(b"retry-after", b"1")] if status in (429, 503) else []
    return closing_response(status, b"text/plain; charset=utf-8", reason.encode(), retry)


def closing_response(status: int, content_type: bytes, body: bytes,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response written straight to a socket, outside any HTTP server;
    the connection closes after it."""
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b"Refused"
    lines = [b"HTTP/1.1 %d %s" % (status, phrase), b"content-type: " + content_type,
             b"content-length: %d" % len(body), *(b"%s: %s" % (k, v) for k, v in headers),
             b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---------------------------------------------------------------- through ASGI


ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class ASGIWebSocketTransport:
    """The accepting side: an ASGI websocket connection served by hypercorn."""

    def __init__(self, receive: ASGIReceive, send: ASGISend, remote: str) -> None:
        self._receive = receive
        self._send = send
        self.remote = remote
        self._closed = False

    async def send(self, message: bytes) -> None:
        """Send one binary message."""
        if self._closed:
            raise TransportClosed("websocket closed")
        try:
            await self._send({"type": "websocket.send", "bytes": message})
        except Exception as exc:  # hypercorn raises various errors once closed
            self._closed = True
            raise TransportClosed(f"websocket closed: {exc!r}") from None

    async def send_many(self, messages: list[bytes]) -> None:
        """Send each message in turn (ASGI has no batch send)."""
        for message in messages:
            await self.send(message)

    def write_nowait(self, messages: list[bytes]) -> bool:
        """ASGI cannot write without waiting: always False."""
        return False

    pending = False

    async def receive(self, before_wait: Callable[[], None] | None = None) -> bytes:
        """Receive one message (text frames come back prefixed so they fail to decode);
        ``before_wait()`` is called first."""
        if self._closed:
            raise TransportClosed("websocket closed")
        if before_wait is not None:
            before_wait()
        event = await self._receive()
        kind = event["type"]
        if kind == "websocket.receive":
            data = event.get("bytes")
            if data is not None:
                return bytes(data)
            return b"\xff" + str(event.get("text") or "").encode()
        self._closed = True
        raise TransportClosed(f"websocket closed ({event.get('code', 1005)})")

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        except Exception:  # already gone: nothing left to close
            return
