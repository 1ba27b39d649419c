"""A lean pooled HTTP/1.1 client on trio sockets, for the node's requests to its backend.

Why not httpx: on a node at one request at a time, httpx, httpcore and h11 were about
60 % of the node's CPU per request (a py-spy profile of ``bench/overhead.py``): the
layered request/response objects, the connection pool's locks and h11's pure-Python
event parser cost far more than the one POST and the few kilobytes a backend answers.
This client does only what the node's request path needs, with the response parsed by
llhttp (``httptools``, C): one parser per connection, callbacks that append to a list.
``bench/http_client_micro.py`` measures it against httpx (and h11's parsing against
httptools') on one CPU.

What it does:

* ``POST``/``GET`` one request on an ``http://`` or ``https://`` origin; the request
  head and a small body leave in one ``send_all``. A body is ``bytes`` (sent with
  ``content-length``) or an async iterator of byte pieces (sent as they come, with
  ``transfer-encoding: chunked``: the node's streamed uploads).
* The answer's head is read before :meth:`HttpClient.send` returns a
  :class:`Response`; its body is then read as raw (de-chunked, never decompressed) byte
  chunks: ``content-length``, ``chunked``, or read until the server closes. Bytes that
  arrive together come out as one chunk.
* Keep-alive pool per origin (scheme, host, port), last-in first-out, bounded:
  at most ``max_connections`` requests in flight at once (more wait, in arrival
  order), at most ``max_idle`` idle connections kept, each for ``idle_expiry``
  seconds. A connection goes back to the pool only when its answer was read to the
  end and both sides allow keep-alive (no ``Connection: close``, HTTP/1.1).
* A pooled connection the server closed while idle is noticed before use (it is
  readable: EOF or stray bytes) and dropped. If a reused connection still fails
  before a single byte of the answer arrived, and the body is bytes (can be sent
  again), the request is retried once on a fresh connection: the server closed it
  under us, the usual keep-alive race.
* ``https://``: :class:`trio.SSLStream` with a verifying default context, the CA
  file from ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set (as httpx reads them), else
  certifi's bundle when installed (httpx's default), else the system store; a
  context can be given instead (``ssl_context``).
* ``connect_timeout`` bounds the TCP connect and TLS handshake; there is no read
  timeout (the gateway owns deadlines).
* The upstream is a peer too: the response head is bounded to
  :data:`MAX_HEAD_BYTES` bytes and :data:`MAX_HEADERS` header lines
  (:class:`ProtocolFailed` beyond), and so are chunk headers, extensions and trailers
  (body bytes in a row that give no body byte; trailer fields are dropped); a body
  is read only as the caller asks. Nothing after the end of an answer is parsed: a
  second answer smuggled behind the first (more bytes than its Content-Length) joins
  neither its body nor its headers, and the connection is not reused.
* :meth:`Response.close` (synchronous, so it works while cancelled) returns the
  connection to the pool, or closes its socket when the answer was not read to the
  end: the server sees the disconnect at once, which is how it learns the client
  went away. Cancellation anywhere inside :meth:`HttpClient.send` closes the
  connection too.

Errors: :class:`ConnectFailed` (the connection could not be made: refused, DNS,
timeout, TLS verification), :class:`ProtocolFailed` (anything after: the server
closed the connection, sent a malformed or oversized head, the body broke). Both
are :class:`HttpError`. Proxies are not supported: the caller uses httpx when an
environment proxy applies (:func:`tooti.backends.http_util.env_proxy`).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import trio

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "ConnectFailed",
    "HttpClient",
    "HttpError",
    "ProtocolFailed",
    "Response",
    "default_ssl_context",
]

MAX_HEAD_BYTES = 64 * 1024
"""Most bytes of a response head (status line and headers) accepted from the upstream."""
MAX_HEADERS = 100
"""Most header lines accepted in one response head."""
RECEIVE_SIZE = 65_536
"""Bytes asked of the socket per read."""
_ONE_WRITE = 16_384
"""Bodies up to this size leave in the same write as the request head."""
_URL_CACHE = 256


class HttpError(Exception):
    """A request failed in transport (not an HTTP error status: those are answers)."""


class ConnectFailed(HttpError):
    """No connection to the origin could be made (refused, DNS, timeout, TLS)."""


class ProtocolFailed(HttpError):
    """The connection failed after it was made: closed early, malformed or oversized
    answer, a broken body."""


class _Extra(Exception):
    """Raised in a parser callback: a second message began after the answer ended."""


class _Closed(Exception):
    """The server closed the connection (EOF) before the answer was complete."""


def default_ssl_context() -> ssl.SSLContext:
    """A verifying client context: ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set, else
    certifi's CA bundle when installed, else the system's; ALPN ``http/1.1``."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        try:
            import certifi
        except ImportError:  # pragma: no cover - certifi comes with httpx
            pass
        else:
            cafile = certifi.where()
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Origin:
    """Where a URL points: scheme, host, port, and the ``Host`` header's value."""

    __slots__ = ("host", "host_header", "key", "port", "tls")

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.tls = scheme == "https"
        self.host = host
        self.port = port
        self.key = (scheme, host, port)
        default = 443 if self.tls else 80
        shown = f"[{host}]" if ":" in host else host
        self.host_header = (shown if port == default else f"{shown}:{port}").encode("idna")


def _parse_url(url: str) -> tuple[_Origin, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return _Origin(parts.scheme, parts.hostname, port), target.encode("ascii")


class _Connection:
    """One HTTP/1.1 connection and its response parser (httptools callbacks)."""

    __slots__ = (
        "body",
        "complete",
        "extra",
        "fresh",
        "generation",
        "head_bytes",
        "head_done",
        "head_size",
        "headers",
        "idle_since",
        "keep_alive",
        "origin",
        "parser",
        "raw",
        "received",
        "sized",
        "socket",
        "stalled",
        "status",
        "stream",
    )

    def __init__(self, origin: _Origin, stream: trio.abc.Stream, sock: Any,
                 generation: int, raw: socket.socket | None = None) -> None:
        self.origin = origin
        self.raw = raw
        """The stdlib socket of a plain-TCP connection (read directly, see
        :meth:`receive`); None over TLS."""
        self.generation = generation
        """The pool's generation when made (an :meth:`HttpClient.aclose` later: not pooled)."""
        self.stream = stream
        self.socket = sock
        """The stdlib socket under the stream (closed synchronously, polled when idle)."""
        self.parser = httptools.HttpResponseParser(self)
        self.fresh = True
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.sized = False
        """The answer says how its body ends (content-length or chunked)."""
        self.head_bytes = 0
        """Bytes fed while the head was incomplete (bounds a head that never ends)."""
        self.head_size = 0
        """The header lines' size (bounds a head that arrived in one read)."""
        self.received = 0
        self.extra = False
        """Bytes followed the answer's end (never reused then, and never parsed: a second
        answer smuggled behind the first joins neither its body nor its headers)."""
        self.stalled = 0
        """Body bytes fed in a row that gave no body byte (chunk headers and extensions,
        trailers: llhttp holds one header value however long it grows), bounded by
        :data:`MAX_HEAD_BYTES`."""

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True
            raise _Extra  # stops the parser: nothing after the answer is parsed

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a trailer field: dropped (bounded in feed)
        if len(self.headers) >= MAX_HEADERS:
            raise ProtocolFailed(f"the upstream sent more than {MAX_HEADERS} header lines")
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD_BYTES:
            raise ProtocolFailed(f"the upstream's answer head exceeds {MAX_HEAD_BYTES} bytes")
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self.sized = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = []
            self.sized = False
            return
        self.status = status
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of an interim answer
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    # -- I/O

    def feed(self, data: bytes | bytearray) -> None:
        """Parse ``data``; ProtocolFailed on a malformed answer."""
        self.received += len(data)
        in_body = self.head_done
        if not in_body:
            self.head_bytes += len(data)
        elif self.complete:
            self.extra = True  # bytes after the end of the answer: not parsed
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise ProtocolFailed("the upstream answered with a protocol upgrade") from exc
        except httptools.HttpParserError as exc:
            if self.complete:
                self.extra = True
                return  # the answer ended before what broke the parser: it stands
            raise ProtocolFailed(f"malformed answer from the upstream: {exc}") from exc
        if not self.head_done:
            if self.head_bytes > MAX_HEAD_BYTES + RECEIVE_SIZE:
                raise ProtocolFailed(
                    f"the upstream's answer head exceeds {MAX_HEAD_BYTES} bytes")
        elif not in_body or self.body or self.complete:
            self.stalled = 0
        else:
            self.stalled += len(data)
            if self.stalled > MAX_HEAD_BYTES:
                raise ProtocolFailed(f"the upstream sent over {MAX_HEAD_BYTES} bytes of "
                                     "chunk headers or trailers")

    async def receive(self) -> None:
        """Read once from the socket and parse it; at EOF, end a body that runs to the
        close, else raise :class:`_Closed`.

        On plain TCP the read waits for the socket to be readable first, then reads
        once: the answer (or a model's next token) is rarely there already, and trio's
        ``receive_some`` would try a read that fails (EAGAIN) before every wait."""
        raw = self.raw
        try:
            if raw is None:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            else:
                while True:
                    await trio.lowlevel.wait_readable(raw)
                    try:
                        data = raw.recv(RECEIVE_SIZE)
                    except BlockingIOError:  # pragma: no cover - a spurious wake-up
                        continue
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Closed(str(exc) or type(exc).__name__) from exc
        if data:
            self.feed(data)
        elif self.head_done and not self.sized and not self.complete:
            self.complete = True  # a body read until the server closes: this is its end
            self.keep_alive = False
        else:
            raise _Closed("the upstream closed the connection")

    def usable(self, now: float, expiry: float) -> bool:
        """Whether an idle connection may carry another request: not expired, and not
        readable (readable while idle means the server closed it or sent stray bytes)."""
        if now - self.idle_since > expiry:
            return False
        try:
            readable, _, _ = select.select([self.socket], (), (), 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        """Close the socket at once (no TLS close_notify, no checkpoint: safe while
        cancelled); the server sees the connection end."""
        try:
            self.socket.close()
        except OSError:  # pragma: no cover
            pass



async def read_limited(body: AsyncIterator[bytes], limit: int) -> bytes:
    """Up to ``limit`` bytes of ``body`` (an error body, read best effort): a failure of
    the transport, or what a caller's ``body_error`` made of it, ends it early."""
    data = bytearray()
    try:
        async for chunk in body:
            data += chunk
            if len(data) >= limit:
                break
    except Exception:  # HttpError, or what body_error made of it
        pass
    return bytes(data[:limit])

class Response:
    """A response whose head has arrived; iterate for the raw body chunks, then
    :meth:`close` (always: it releases the connection)."""

    __slots__ = ("_client", "_conn", "_done", "before_wait", "body_error", "headers",
                 "status")

    def __init__(self, client: HttpClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self._done = False
        self.body_error: Callable[[HttpError], Exception] | None = None
        """Makes what iterating raises when the body breaks (None: the
        :class:`ProtocolFailed` itself), so a caller can hand the answer on as its own
        iterator without wrapping every chunk."""
        self.before_wait: Callable[[], None] | None = None
        """Called (if set) each time iterating the body is about to wait for the
        socket: a caller that holds output until then (the node's tunnel frames, see
        :meth:`tooti.tunnel.InboundStream.send`) writes it there."""
        self.status = conn.status
        self.headers = conn.headers
        """(lower-case name, value) pairs as the upstream sent them."""

    def header(self, name: bytes, default: str = "") -> str:
        """The first value of header ``name`` (lower-case), decoded as latin-1."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return default

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if self._done:
            raise StopAsyncIteration
        while not conn.body:
            if conn.complete:
                self._done = True
                raise StopAsyncIteration
            if self.before_wait is not None:
                self.before_wait()
            try:
                await conn.receive()
            except (_Closed, ProtocolFailed) as exc:
                failed = ProtocolFailed(f"the answer's body broke: {exc}")
                raise (failed if self.body_error is None else self.body_error(failed)) \
                    from exc
        pieces = conn.body
        conn.body = []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body; a transport failure ends it early."""
        return await read_limited(self, limit)

    async def aclose(self) -> None:
        """:meth:`close` (no checkpoint: an awaitable form for callers that close
        other answers too)."""
        self.close()

    def close(self) -> None:
        """Release the connection: back to the pool if the answer was read to its end
        and keep-alive holds, else closed (the server sees the disconnect)."""
        conn, self._done = self._conn, True
        if conn is None:
            return
        self._conn = None  # type: ignore[assignment]
        self._client._release(conn, conn.complete and not conn.body)


class HttpClient:
    """A pool of HTTP/1.1 connections (see the module docstring).

    ``headers`` are sent with every request (before the request's own); ``ssl_context``
    replaces :func:`default_ssl_context` for ``https://`` origins.
    """

    def __init__(
        self, *, headers: dict[str, str] | None = None, connect_timeout: float = 10.0,
        max_connections: int = 1000, max_idle: int = 100, idle_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "tooti",
    ) -> None:
        """Remember the settings; connections are made on demand."""
        self.connect_timeout = connect_timeout
        self.max_connections = max(1, max_connections)
        self.max_idle = max(0, min(max_idle, self.max_connections))
        self.idle_expiry = idle_expiry
        self._ssl_context = ssl_context
        merged = {"user-agent": user_agent, "accept": "*/*"}
        merged.update({k.lower(): v for k, v in (headers or {}).items()})
        self._static = b"".join(
            f"{name}: {value}\r\n".encode("latin-1") for name, value in merged.items()
            if name not in ("host", "content-length", "transfer-encoding", "connection"))
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._idle_count = 0
        self._active = 0
        self._waiting = trio.lowlevel.ParkingLot()
        self._urls: dict[str, tuple[_Origin, bytes]] = {}
        self._generation = 0
        self.opened = 0
        """Connections made so far (for tests and benchmarks)."""

    # -- the pool

    def _origin(self, url: str) -> tuple[_Origin, bytes]:
        found = self._urls.get(url)
        if found is None:
            if len(self._urls) >= _URL_CACHE:
                self._urls.clear()
            found = self._urls[url] = _parse_url(url)
        return found

    async def _acquire(self) -> None:
        if self._active >= self.max_connections or self._waiting:
            await self._waiting.park()  # a finishing request hands its place over
        else:
            self._active += 1

    def _leave(self) -> None:
        if self._waiting:
            self._waiting.unpark()
        else:
            self._active -= 1

    def _pooled(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if conn.usable(now, self.idle_expiry):
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        self._leave()
        if (reusable and conn.keep_alive and not conn.extra
                and conn.generation == self._generation
                and self._idle_count < self.max_idle):
            conn._reset()
            conn.fresh = False
            conn.idle_since = trio.current_time()
            self._idle.setdefault(conn.origin.key, []).append(conn)
            self._idle_count += 1
        else:
            conn.close()

    async def _connect(self, origin: _Origin) -> _Connection:
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await trio.open_tcp_stream(origin.host, origin.port)
                stream: trio.abc.Stream = tcp
                if origin.tls:
                    if self._ssl_context is None:
                        self._ssl_context = default_ssl_context()
                    stream = trio.SSLStream(tcp, self._ssl_context,
                                            server_hostname=origin.host,
                                            https_compatible=True)
                    try:
                        await stream.do_handshake()
                    except BaseException:
                        tcp.socket.close()
                        raise
        except trio.TooSlowError as exc:
            raise ConnectFailed(f"connect timeout after {self.connect_timeout:g} s") from exc
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise ConnectFailed(_connect_cause(exc)) from exc
        self.opened += 1
        raw = None if origin.tls else _stdlib_socket(tcp.socket)
        return _Connection(origin, stream, tcp.socket, self._generation, raw)

    # -- requests

    async def send(
        self, method: str, url: str, body: bytes | AsyncIterator[bytes] = b"",
        content_type: str | None = None,
    ) -> Response:
        """Send one request and return the answer once its head has arrived.

        Raises :class:`ConnectFailed` or :class:`ProtocolFailed`; a cancellation
        closes the connection. The caller must :meth:`Response.close` the answer.
        """
        origin, target = self._origin(url)
        head = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ",
                origin.host_header, b"\r\n", self._static]
        if content_type is not None:
            head += [b"content-type: ", content_type.encode("latin-1"), b"\r\n"]
        replayable = isinstance(body, bytes)
        if isinstance(body, bytes):
            if body or method != "GET":
                head += [b"content-length: ", b"%d" % len(body), b"\r\n"]
        else:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        request = b"".join(head)
        await self._acquire()
        try:
            for attempt in (0, 1):
                conn = self._pooled(origin) if attempt == 0 else None
                if conn is None:
                    conn = await self._connect(origin)
                try:
                    await self._exchange(conn, request, body)
                except (_Closed, ProtocolFailed) as exc:
                    conn.close()
                    if (attempt == 0 and not conn.fresh and replayable
                            and conn.received == 0 and isinstance(exc, _Closed)):
                        continue  # the server closed the idle connection under us
                    if isinstance(exc, ProtocolFailed):
                        raise
                    raise ProtocolFailed(str(exc)) from exc
                except BaseException:
                    conn.close()
                    raise
                return Response(self, conn)
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException:
            self._leave()
            raise

    async def _exchange(self, conn: _Connection, request: bytes,
                        body: bytes | AsyncIterator[bytes]) -> None:
        """Write the request, read the answer's head."""
        stream = conn.stream
        try:
            if isinstance(body, bytes):
                if len(body) <= _ONE_WRITE:
                    data = request + body
                    sent = 0
                    if conn.raw is not None:  # one send, none of trio's machinery
                        try:
                            sent = conn.raw.send(data)
                        except BlockingIOError:  # pragma: no cover - a full send buffer
                            sent = 0
                    if sent < len(data):
                        await stream.send_all(data[sent:])
                else:
                    await stream.send_all(request)
                    await stream.send_all(body)
            else:
                await stream.send_all(request)
                async for piece in body:
                    if piece:
                        await stream.send_all(b"%x\r\n%b\r\n" % (len(piece), piece))
                await stream.send_all(b"0\r\n\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Closed(f"sending the request failed: {exc}") from exc
        while not conn.head_done:
            await conn.receive()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when released. The
        client stays usable (new connections are made)."""
        self._generation += 1
        idle, self._idle, self._idle_count = self._idle, {}, 0
        for conns in idle.values():
            for conn in conns:
                conn.close()
        await trio.lowlevel.checkpoint()


def _stdlib_socket(sock: Any) -> socket.socket | None:
    """The stdlib socket inside a trio socket (trio keeps it as ``_sock``), or None if
    this trio has no such attribute (then the stream's own methods are used)."""
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


def _connect_cause(exc: BaseException) -> str:
    """Why a connect failed, in words (``connection refused``, the OS's reason)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed: {seen}"
        if isinstance(seen, BaseExceptionGroup) and seen.exceptions:
            seen = seen.exceptions[0]
            continue
        seen = seen.__cause__ or seen.__context__
    return f"cannot connect: {exc}"
