"""tooti's own HTTP/1.1 server: one lean loop per connection calling the ASGI app.

The listener (:mod:`tooti.mesh.listener`) hands every accepted connection that is not
a tunnel upgrade and does not speak HTTP/2 (ALPN ``h2``, or the HTTP/2 connection
preface sent as prior knowledge: those stay with hypercorn, :mod:`tooti.mesh.http_server`)
to :meth:`Http1Server.serve`. One :class:`Http1Connection` then serves the connection
in the listener's own task for the connection: it reads, parses with httptools
(llhttp, C), calls the ASGI app (``Station.__call__``) directly for each request in
turn, and writes what the app sends straight to the socket. There is no task per
request, no task group, no queue between the parser and the app and no event objects:
the app's ``receive`` reads the socket itself when it needs more of the body, and its
``send`` writes: on plain TCP straight to the socket (``os.write``) when it takes the
bytes at once, which spares trio's machinery and its yield per write (a stream writes
once per token); a write that would block waits as trio's ``send_all``, bounded by
``send_timeout``.

Measured (``bench/http1_server.py``: the listener with a trivial app, wrk keep-alive
POSTs, the server process's CPU per request; same loaded 2-core machine, same window):
a JSON answer 532 µs with hypercorn 0.18 + h11, 57 µs here at c=1 (445 / 46 µs at
c=16); a 33-part stream 2,883 / 217 µs at c=1 (2,098 / 167 µs at c=16). Parsing a
request head alone takes h11 ~28 µs and httptools ~1 µs.

Behaviour (the same as hypercorn's and tooti's limits before it, pinned by
``tests/hostile/test_http_*.py``, ``tests/hostile/test_tls.py`` and
``tests/test_http1.py``):

* **Keep-alive and pipelining.** Requests on a connection are served one after
  another, answers in order; bytes of the next request read early are parsed into a
  queue (one read at most while a request is served, so a pipelining client cannot
  make the server buffer without bound). A connection closes after
  :data:`KEEP_ALIVE_MAX_REQUESTS` requests (``connection: close`` on the last), when
  the client or the app says ``connection: close``, after an HTTP/1.0 request without
  ``keep-alive`` (one with it is answered ``connection: keep-alive``), and when an
  answer did not end cleanly. What is left of a request
  body the app answered without reading (a 404) is read and dropped, so the connection
  carries on (up to :data:`DISCARD_BYTES` within :data:`DISCARD_SECONDS`; past that
  it closes).
* **Timeouts** (:class:`~tooti.mesh.listener.Limits`): a connection that begins no
  request for ``keep_alive_timeout`` is closed (empty lines, which llhttp skips, do
  not restart that timer); a request head not complete
  ``header_timeout`` after its first byte is answered 408 (``header_timeout``) and
  closed; a write the client does not take within ``send_timeout`` disconnects it.
  Reading a body has no deadline here: the app bounds it (``gateway.body_timeout``).
* **Malformed requests** are answered with the OpenAI error object
  (:func:`tooti.mesh.http.protocol_error`) and ``connection: close``: 400
  ``invalid_http_request`` for what llhttp refuses (request line, header, Content-Length,
  Content-Length with Transfer-Encoding, chunk, an HTTP version other than 1.0/1.1, a
  method it does not know, obs-fold, bare LF) and for a missing or repeated Host on
  HTTP/1.1, 431 ``headers_too_large`` for a head over :data:`MAX_HEAD_BYTES`, or as
  many body bytes in a row that give no body byte (an endless chunk extension or
  trailer section: llhttp holds a header value however long it grows; trailer fields
  are dropped, never added to the request's headers), 501 for a Transfer-Encoding
  other than a lone ``chunked`` (all its header lines taken together). The connection
  then closes *lingering*: it half-closes and drops what the client still
  sends (at most :data:`LINGER_BYTES` for :data:`LINGER_SECONDS`), so the kernel does
  not reset the connection under an answer the client has not read yet. The same
  happens when the app answered without reading the whole body (a 413).
* **Bodies**: Content-Length and chunked request bodies; ``Expect: 100-continue`` is
  answered ``100 Continue`` when the app first asks for a body that has not arrived
  (not when it answers without reading it). Responses: the app's Content-Length when it
  gives one (a shorter body closes the connection, a longer one is an error of the
  app); else a response given in one body message gets a Content-Length, and a
  streamed one chunked framing (close-delimited for an HTTP/1.0 client). The head is
  written with the first body message, in the same write (an empty body message with
  ``more_body`` flushes it alone). HEAD, 1xx, 204 and 304 answers carry no body
  (1xx and 204 no Content-Length either). Every answer carries a ``date`` header
  and no ``server`` header (as hypercorn was configured).
* **Disconnects**: once the body has been read, ``receive`` waits for the client to go
  and then returns ``http.disconnect`` (``tooti.mesh.http.cancel_on_disconnect`` cancels
  the work on it); it also returns it once the answer is complete. A client that
  half-closes its side counts as gone. A write to a client that is gone is dropped
  (the app's ``send`` does not raise, as with hypercorn).
* **Upgrades**: a WebSocket ``GET`` upgrade to the tunnel path on a kept-alive
  connection is handed to the listener's tunnel handler with the bytes that followed
  its head (a fresh connection's upgrade never gets here: the listener takes it
  first); one to any other path is refused 404 in plain text, as before. ``CONNECT``
  is given to the app (which answers 405) and the connection closes. Any other
  ``Upgrade`` (``h2c`` included) is ignored and the request served as HTTP/1.1, which
  RFC 9110 allows, then the connection closes; its body too (``curl --http2 -d`` and
  Java's HttpClient send ``Upgrade: h2c`` on every cleartext POST): llhttp stops at the
  head of an upgrade, so a fresh parser is given a synthetic head with the request's
  framing and parses the body as this request's (:meth:`Http1Connection._resume_body`).
* **Shutdown** (:meth:`Http1Server.terminate`): connections waiting for a request
  (or in the middle of a head) close at once; a request being served finishes (the
  listener bounds it by the graceful timeout) and its connection then closes.

The ASGI scope is the one hypercorn built (``type``, ``asgi``, ``http_version``,
``method``, ``scheme``, ``path`` (percent-decoded), ``raw_path``, ``query_string``,
``root_path``, ``headers`` (names lower-cased, values stripped), ``client``,
``server``, ``state``, ``extensions``). ``scope["extensions"]`` carries, besides
nothing standard, one optional tooti extension an app may use and must not rely on
(hypercorn's HTTP/2 path does not give it):

* ``"tooti.http1"``: the :class:`Http1Connection` itself. Its
  :attr:`~Http1Connection.client_gone` says whether the client has left (a write
  failed or timed out, or a read saw it close), without a ``receive`` call.
  :attr:`~Http1Connection.fd` and :meth:`~Http1Connection.client_left` let a
  watch outside the connection (``tooti.mesh.http.DisconnectWatch``: one epoll set
  for all requests in flight) see the client close while the app waits, with no task
  per request, and tell the connection.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import unquote

import httptools
import trio

from tooti import clock
from tooti.errors import APIError
from tooti.mesh.http import error_response, protocol_error
from tooti.transport.websocket import TUNNEL_PATH, refusal_response

log = logging.getLogger("tooti.mesh.http1")

MAX_HEAD_BYTES: Final = 16 * 1024
"""Most bytes of a request head (request line and headers) held while it is incomplete;
past them it is answered 431. As h11 (``max_incomplete_event_size``, hypercorn's
default) did before: a head that arrives complete within one read is taken whole, so a
head is at most this plus one read (:data:`MAX_RECV`)."""
MAX_RECV: Final = 2**16
"""Bytes asked of the socket per read."""
KEEP_ALIVE_MAX_REQUESTS: Final = 1000
"""Requests served on one connection before it closes (hypercorn's default: a client
is moved to a new connection now and then, which lets a load balancer rebalance)."""
DISCARD_BYTES: Final = 2**18
DISCARD_SECONDS: Final = 1.0
"""What is left of a request body the app answered without reading is read and dropped
(up to this much, for up to this long) to keep the connection; past that it closes."""
YIELD_EVERY: Final = 16
"""A write the socket takes at once does not yield to other tasks; every this many
writes one does (a power of two), so a long burst of writes cannot starve them."""
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 2**20
"""After an error answer (or an answer that left part of the request body unread), the
server half-closes, then reads and drops what the client still sends (at most this long
and this much) before closing: closing a socket with unread bytes makes the kernel send
RST, which can destroy the answer in the client's receive buffer before it reads it
(nginx's "lingering close")."""

UpgradeHandler = Callable[[dict[str, str], bytes], Awaitable[None]]
"""Serves a tunnel upgrade that arrived on a kept-alive connection: given the request's
headers (names lower-cased, repeated ones joined with ``, ``) and the bytes that
followed its head; the connection is the tunnel's from then on and closes after it."""

DISCONNECT: Final = {"type": "http.disconnect"}
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
ASGI_VERSIONS: Final = {"spec_version": "2.1", "version": "3.0"}
NO_BODY_STATUSES: Final = frozenset({204, 304})
TUNNEL_PATH_BYTES: Final = TUNNEL_PATH.encode()
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n"
"""How an HTTP/2 client with prior knowledge opens a connection (served by hypercorn)."""

_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_METHODS: dict[bytes, str] = {}


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <phrase>\\r\\n`` (no phrase for a status without one)."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d \r\n" % status
    return line


class _Date:
    """The ``date`` header line, formatted once per second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def __call__(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


_date = _Date()


class _Head:
    """A parsed request head, queued until it is served."""

    __slots__ = (
        "body",
        "expect",
        "headers",
        "host",
        "keep_alive",
        "method",
        "trailing",
        "tunnel",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.url = url
        self.headers = headers
        self.method = "GET"
        self.version = "1.1"
        self.keep_alive = True
        self.host = False
        self.body = False
        """A Content-Length above 0 or a chunked body follows."""
        self.expect = False
        """``Expect: 100-continue``."""
        self.upgrade = b""
        """The ``upgrade`` header's value, lower-cased (with ``connection: upgrade``)."""
        self.tunnel = False
        """A WebSocket GET upgrade: the connection is a WebSocket's after it."""
        self.trailing = b""
        """For an upgrade that ends HTTP on the connection: the bytes after the head."""


class _Failure:
    """A request the parser refused, answered with ``status`` in its turn."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


class _Refused(Exception):
    """Raised in a parser callback to refuse the request with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


_END: Final = b""
"""Queued after the last body part of a request (an empty ``bytes``: no body part is
ever empty, llhttp does not call back for none)."""

_IDLE, _IN_HEAD, _IN_BODY = 0, 1, 2


class Http1Server:
    """The HTTP/1.1 side of one listener: the ASGI ``app`` every connection calls, and
    the shutdown signal (:meth:`terminate`)."""

    def __init__(self, app: Any, *, scheme: str = "http") -> None:
        self.app = app
        self.scheme = scheme
        self.terminated = False
        self.connections: set[Http1Connection] = set()

    def terminate(self) -> None:
        """Shut down: connections waiting for a request close now, and every connection
        closes once the request it is serving is answered."""
        self.terminated = True
        for connection in list(self.connections):
            connection.wake()

    async def serve(self, stream: trio.abc.HalfCloseableStream | trio.abc.Stream,
                    sock: trio.socket.SocketType, head: bytes, started: float,
                    limits: Any, on_upgrade: UpgradeHandler) -> None:
        """Serve the connection on ``stream`` (over ``sock``) until it closes; ``head``
        are the bytes the listener already read from it, the first of them at
        ``started`` (on :func:`tooti.clock.now`). ``limits`` has the
        ``keep_alive_timeout``, ``header_timeout`` and ``send_timeout`` to apply."""
        connection = Http1Connection(self, stream, sock, limits, on_upgrade)
        self.connections.add(connection)
        try:
            await connection.run(head, started)
        finally:
            self.connections.discard(connection)


def _address(sock: trio.socket.SocketType, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class Http1Connection:
    """One HTTP/1.1 connection: the parser's callbacks, the request loop, and the
    ``receive`` and ``send`` of the request being served."""


    def __init__(self, server: Http1Server, stream: Any, sock: trio.socket.SocketType,
                 limits: Any, on_upgrade: UpgradeHandler) -> None:
        self._server = server
        self._stream = stream
        self._limits = limits
        self._keep_alive_timeout: float = limits.keep_alive_timeout
        self._header_timeout: float = limits.header_timeout
        self._send_timeout: float = limits.send_timeout
        self._on_upgrade = on_upgrade
        self._client = _address(sock, True)
        self._server_address = _address(sock, False)
        self._scheme = server.scheme
        self._fd = sock.fileno() if isinstance(stream, trio.SocketStream) else -1
        """The socket's file descriptor, written to directly (-1: TLS, or closed)."""
        self._writes = 0
        self._parser = httptools.HttpRequestParser(self)
        self._events: deque[_Head | bytes | _Failure] = deque()
        self._phase = _IDLE
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._head_deadline = 0.0
        self._head_open = False
        self._refusal = 0
        self._last_head: _Head | None = None
        self._stopped = False
        """No more input is parsed (after a refusal or an upgrade)."""
        self._eof = False
        """The client has sent its last byte (or the connection broke)."""
        self._gone = False
        """The client is gone: nothing more is written."""
        self._waiting: trio.CancelScope | None = None
        self._requests = 0
        self._linger = False
        self._read_ahead = False
        self._te = b""
        self._cl = False
        self._cl_value = b""
        self._host = False
        self._progress = False
        """A head ended or body bytes came out of the parser since the last read."""
        self._stall = 0
        """Bytes of a body fed in a row that gave no body byte: chunk headers and
        extensions, trailer fields (llhttp holds a header value however long it gets,
        so these are bounded as a head is, by :data:`MAX_HEAD_BYTES`)."""
        self._resume = False
        """The next message the parser begins is the synthetic head that carries on the
        body of an ignored upgrade request (see :meth:`_resume_body`)."""
        self._upgrade_value = b""
        self._connection_value = b""
        self._expect_value = False
        self._reset_response()

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self._resume:
            return
        self._phase = _IN_HEAD
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._te = b""
        self._cl = self._host = self._expect_value = False
        self._upgrade_value = self._connection_value = b""
        if not self._head_open:
            self._head_deadline = clock.now() + self._header_timeout
        self._head_open = False

    def on_url(self, url: bytes) -> None:
        if not self._resume:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._resume:
            return  # the synthetic head's own
        if self._phase == _IN_BODY:
            return  # a trailer field: dropped (its bytes are bounded in _feed)
        name = name.lower()
        if value and value[-1] in b" \t":
            value = value.rstrip(b" \t")
        self._headers.append((name, value))
        if name == b"host":
            if self._host:
                raise _Refused(400)  # RFC 9112 3.2: more than one Host is a 400
            self._host = True
        elif name == b"content-length":
            self._cl = value != b"0"
            self._cl_value = value
        elif name == b"transfer-encoding":
            # every Transfer-Encoding line counts: "gzip" then "chunked" is "gzip, chunked"
            self._te = self._te + b", " + value.lower() if self._te else value.lower()
        elif name == b"connection":
            self._connection_value = value.lower()
        elif name == b"upgrade":
            self._upgrade_value = value.lower()
        elif name == b"expect":
            self._expect_value = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if self._resume:  # the synthetic head: what follows is the real request's body
            self._resume = False
            self._phase = _IN_BODY
            self._progress = True
            return
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Refused(400)
        if version == "1.1" and not self._host:
            raise _Refused(400)  # RFC 9112 3.2: a 1.1 request without Host is a 400
        if self._te and self._te != b"chunked":
            raise _Refused(501)
        head = _Head(self._url, self._headers)
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = _METHODS.setdefault(raw_method, raw_method.decode("ascii"))
        head.method = method
        head.version = version
        head.keep_alive = parser.should_keep_alive()
        head.host = self._host
        head.body = self._cl or bool(self._te)
        head.expect = self._expect_value
        if parser.should_upgrade():
            head.upgrade = self._upgrade_value if method != "CONNECT" else b"connect"
            connection = self._connection_value
            if (head.upgrade == b"websocket" and method == "GET"
                    and b"upgrade" in (token.strip() for token in connection.split(b","))):
                head.tunnel = True
        self._phase = _IN_BODY
        self._progress = True
        self._last_head = head
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        self._progress = True
        self._events.append(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._events.append(_END)

    # ------------------------------------------------------------ reading

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` into the event queue (heads, body parts, ends, refusals)."""
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                rest = data[upgrade.args[0]:]
                head = self._last_head
                if head is not None and (head.tunnel or head.upgrade == b"connect"):
                    head.trailing = rest
                    self._stopped = True
                    return
                # an Upgrade we ignore (h2c from curl --http2 or Java's HttpClient)
                self._parser = httptools.HttpRequestParser(self)
                if head is not None and head.body:
                    self._resume_body()
                if not rest:
                    return
                data = rest
                continue
            except httptools.HttpParserError as error:
                self._stopped = True
                self._events.append(_Failure(self._status_of(error)))
                return
            phase = self._phase
            if phase == _IN_HEAD:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._stopped = True
                    self._events.append(_Failure(431))
            elif phase == _IN_BODY:
                if self._progress:
                    self._progress = False
                    self._stall = 0
                else:
                    self._stall += len(data)
                    if self._stall > MAX_HEAD_BYTES:  # an endless chunk header or trailer
                        self._stopped = True
                        self._events.append(_Failure(431))
            return

    def _resume_body(self) -> None:
        """llhttp ended an upgrade request at its head, leaving its body unparsed (it
        takes what follows for the new protocol); the upgrade is ignored, so the body is
        this request's: the fresh parser is given a synthetic head with the same framing
        (swallowed by the callbacks), and parses the body that follows as this one's."""
        events = self._events
        if events and events[-1] is _END:
            events.pop()  # llhttp's early end of the message
        framing = (b"transfer-encoding: chunked\r\n" if self._te
                   else b"content-length: " + self._cl_value + b"\r\n")
        self._resume = True
        self._parser.feed_data(b"POST / HTTP/1.1\r\nhost: x\r\n" + framing + b"\r\n")

    def _status_of(self, error: Exception) -> int:
        cause = error.__context__
        if isinstance(cause, _Refused):
            return cause.status
        text = str(error)
        if "Transfer-Encoding" in text and "Content-Length" not in text:
            return 501  # h11 said so too: only chunked is supported
        return 400

    async def _read(self) -> bytes:
        """One read from the client (``b""``: it has closed, or the connection broke)."""
        try:
            data = await self._stream.receive_some(MAX_RECV)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self._eof = True
        return bytes(data) if type(data) is not bytes else data

    def wake(self) -> None:
        """The server is shutting down: stop waiting for a request."""
        if self._waiting is not None:
            self._waiting.cancel()

    async def _next_head(self) -> _Head | None:
        """The next request head (None: the connection is to close; a refusal or a
        timeout has been answered)."""
        events = self._events
        idle_deadline = clock.now() + self._keep_alive_timeout  # bytes that begin no
        while True:                                             # request don't extend it
            while events:
                item = events.popleft()
                if type(item) is _Head:
                    return item
                if type(item) is _Failure:
                    await self._refuse(protocol_error(item.status, MAX_HEAD_BYTES))
                    return None
            if self._eof or self._stopped:
                if self._phase == _IN_HEAD and self._eof and not self._stopped:
                    await self._refuse(protocol_error(400, MAX_HEAD_BYTES))  # cut off
                return None
            if self._server.terminated:
                return None
            in_head = self._phase == _IN_HEAD or self._head_open
            deadline = self._head_deadline if in_head else idle_deadline
            with trio.CancelScope(deadline=deadline) as waiting:
                self._waiting = waiting
                try:
                    data = await self._read()
                finally:
                    self._waiting = None
            if waiting.cancelled_caught:
                if in_head and not self._server.terminated:
                    await self._refuse(APIError(
                        408, f"request head not received within {self._header_timeout:g}s",
                        code="header_timeout"))
                return None
            if data:
                self._feed(data)

    # ------------------------------------------------------------ the loop

    async def run(self, head: bytes, started: float) -> None:
        """Serve requests until the connection is to close, then close it."""
        self._head_deadline = started + self._header_timeout
        self._head_open = True  # the first head began when the listener read ``head``
        self._feed(head)
        try:
            while True:
                request = await self._next_head()
                if request is None:
                    break
                if request.tunnel:
                    await self._upgrade(request)
                    return
                if not await self._serve(request):
                    break
        finally:
            await self._close()

    async def _upgrade(self, head: _Head) -> None:
        """A WebSocket upgrade on a kept-alive connection: the tunnel's, or a 404."""
        path = head.url.split(b"?", 1)[0]
        if path != TUNNEL_PATH_BYTES:
            await self._write(refusal_response(404, "unknown path"))
            self._linger = True
            return
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self._gone = True  # the tunnel writes from now on; the listener closes after it
        self._fd = -1
        await self._on_upgrade(headers, head.trailing)

    def _scope(self, head: _Head) -> dict[str, Any]:
        path, _, query = head.url.partition(b"?")
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:  # llhttp refuses these already
            text = path.decode("latin-1")
        return {
            "type": "http",
            "asgi": ASGI_VERSIONS,
            "http_version": head.version,
            "method": head.method,
            "scheme": self._scheme,
            "path": unquote(text) if "%" in text else text,
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": head.headers,
            "client": self._client,
            "server": self._server_address,
            "state": {},
            "extensions": {"tooti.http1": self},
        }

    def _reset_response(self) -> None:
        self._started = False
        self._head_sent = False
        self._complete = False
        self._status = 0
        self._pending = b""
        self._chunked = False
        self._remaining = -1
        self._no_body = False
        self._method_head = False
        self._close_after = False
        self._body_done = False
        self._expect = False
        self._continued = False
        self._version = "1.1"
        self._response_done: trio.Event | None = None
        self._read_ahead = False

    async def _serve(self, head: _Head) -> bool:
        """Serve one request; whether the connection may carry another."""
        self._requests += 1
        self._reset_response()
        self._method_head = head.method == "HEAD"
        self._version = head.version
        self._expect = head.expect and head.version == "1.1"
        self._close_after = (not head.keep_alive or bool(head.upgrade)
                             or self._requests >= KEEP_ALIVE_MAX_REQUESTS)
        try:
            await self._server.app(self._scope(head), self.receive, self.send)
        except Exception:
            log.exception("HTTP request %s %s failed in the app", head.method,
                          head.url[:200].decode("latin-1"))
        finally:
            done = self._response_done
            if done is not None:
                done.set()
        if not self._started:
            if not self._gone:
                await self._refuse(APIError(500, "internal error: no answer",
                                            code="internal_error"))
            return False
        if not self._complete or self._remaining > 0:
            return False  # an answer cut short: the client must see it end
        if self._close_after or self._gone or self._server.terminated:
            self._linger = not self._body_done  # the client may still be sending it
            return False
        if not await self._discard_body():
            self._linger = True
            return False
        if self._phase == _IN_HEAD:  # the next head began while this request was served:
            self._head_deadline = clock.now() + self._header_timeout  # its time starts now
        return True

    async def _discard_body(self) -> bool:
        """Read and drop what is left of a request body the app did not read (it
        answered without it: a 404, a 405), so that the connection can carry the next
        request: whether its end came within :data:`DISCARD_BYTES` and
        :data:`DISCARD_SECONDS` (else the connection closes)."""
        if self._body_done:
            return True
        events = self._events
        dropped = 0
        deadline = clock.now() + DISCARD_SECONDS
        while True:
            while events:
                item = events[0]
                if item is _END:
                    events.popleft()
                    return True
                if type(item) is not bytes:
                    return False  # the body is malformed
                events.popleft()
                dropped += len(item)
            if self._eof or self._stopped or dropped > DISCARD_BYTES:
                return False
            with trio.move_on_at(deadline):
                data = await self._read()
                if not data:
                    return False
                self._feed(data)
                continue
            return False

    # ------------------------------------------------------------ ASGI receive

    @property
    def fd(self) -> int:
        """The socket's descriptor while the connection is open on plain TCP (-1 over
        TLS or once closed): for a disconnect watch outside the connection
        (:class:`tooti.mesh.http.DisconnectWatch`)."""
        return self._fd

    def client_left(self) -> None:
        """A watch outside the connection saw the client close its side: it is gone
        (nothing more is written to it; ``receive`` returns ``http.disconnect``)."""
        self._gone = True

    @property
    def client_gone(self) -> bool:
        """The client has left (a read saw it close, or a write failed or timed out)."""
        return self._gone

    async def receive(self) -> dict[str, Any]:
        """The ASGI ``receive`` of the request being served."""
        if self._gone:
            return DISCONNECT
        if not self._body_done:
            return await self._receive_body()
        if self._complete:
            return DISCONNECT
        # The body is all read: wait for the client to go, or for the answer to end.
        if not (self._read_ahead or self._eof or self._stopped):
            data = await self._read()
            if not data:
                self._gone = True
                return DISCONNECT
            self._feed(data)  # the next request's bytes: kept for after this one
            self._read_ahead = True
        if not self._complete:
            if self._response_done is None:
                self._response_done = trio.Event()
            await self._response_done.wait()
        return DISCONNECT

    async def _receive_body(self) -> dict[str, Any]:
        events = self._events
        while True:
            parts: list[bytes] = []
            while events:
                item = events[0]
                if type(item) is bytes:
                    events.popleft()
                    if item is _END:
                        self._body_done = True
                        break
                    parts.append(item)
                else:
                    break
            if parts or self._body_done:
                body = parts[0] if len(parts) == 1 else b"".join(parts)
                return {"type": "http.request", "body": body,
                        "more_body": not self._body_done}
            if events or self._stopped:  # the body is malformed (a _Failure is next)
                return await self._malformed_body()
            if self._eof:
                self._gone = True
                return DISCONNECT
            if self._expect and not self._continued and not self._started:
                self._continued = True
                await self._write(CONTINUE)
            data = await self._read()
            if not data:
                self._gone = True
                return DISCONNECT
            self._feed(data)

    async def _malformed_body(self) -> dict[str, Any]:
        """The request's body broke the framing: answer 400 if no answer has begun
        (the connection then closes); else the answer under way ends the connection."""
        events = self._events
        status = 400
        if events and type(events[0]) is _Failure:
            failure = events.popleft()
            assert isinstance(failure, _Failure)
            status = failure.status
        self._stopped = True
        self._linger = True
        if not self._started:
            await self._refuse(protocol_error(status, MAX_HEAD_BYTES), close=False)
            self._started = self._complete = True
            self._gone = True
            return DISCONNECT
        self._close_after = True
        if not self._complete:
            if self._response_done is None:
                self._response_done = trio.Event()
            await self._response_done.wait()
        return DISCONNECT

    # ------------------------------------------------------------ ASGI send

    async def send(self, message: dict[str, Any]) -> None:
        """The ASGI ``send`` of the request being served: writes to the socket."""
        kind = message["type"]
        if kind == "http.response.body":
            if not self._started or self._complete:
                if self._gone:
                    return
                raise RuntimeError("http.response.body outside a response")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            out = b"" if self._head_sent else self._head(body, more)
            if body and not self._no_body:
                if self._chunked:
                    out += b"%x\r\n%b\r\n" % (len(body), body)
                else:
                    if self._remaining >= 0:
                        self._remaining -= len(body)
                        if self._remaining < 0:
                            raise RuntimeError("response body longer than its "
                                               "content-length")
                    out += body
            if not more:
                self._complete = True
                if self._chunked:
                    out += b"0\r\n\r\n"
                done = self._response_done
                if done is not None:
                    done.set()
            if out and not self._gone:
                await self._write(out)
        elif kind == "http.response.start":
            if self._started:
                if self._gone:
                    return
                raise RuntimeError("http.response.start sent twice")
            self._started = True
            self._status = message["status"]
            self._pending = message.get("headers", ())
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on HTTP/1.1")

    def _head(self, body: bytes, more: bool) -> bytes:
        """The response head (status line and headers), now that its first body part
        (``body``, the last if not ``more``) says how to frame the body."""
        self._head_sent = True
        status = int(self._status)
        headers: Any = self._pending
        self._pending = b""
        lines = [status_line(status)]
        length = -1
        close = self._close_after or self._server.terminated
        for name, value in headers:
            name = bytes(name).lower()
            if name == b"content-length":
                length = int(value)
                continue  # written below, once
            if name == b"connection":
                if b"close" in bytes(value).lower():
                    close = True
                continue  # written below, once
            elif name == b"transfer-encoding":
                continue  # the framing is this server's to choose
            lines.append(b"%b: %b\r\n" % (name, value))
        self._no_body = self._method_head or status < 200 or status in NO_BODY_STATUSES
        if length >= 0 and (status >= 200 and status != 204):  # RFC 9110 8.6: never on these
            lines.append(b"content-length: %d\r\n" % length)
            self._remaining = length if not self._no_body else -1
        elif self._no_body:
            pass
        elif not more:
            lines.append(b"content-length: %d\r\n" % len(body))
        elif self._version == "1.1":
            lines.append(b"transfer-encoding: chunked\r\n")
            self._chunked = True
        else:
            close = True  # HTTP/1.0: the body ends when the connection does
        if close:
            self._close_after = True
            lines.append(b"connection: close\r\n")
        elif self._version == "1.0":  # an HTTP/1.0 client closes unless told otherwise
            lines.append(b"connection: keep-alive\r\n")
        lines.append(_date())
        lines.append(b"\r\n")
        head = b"".join(lines)
        if head.count(b"\n") != len(lines) or b"\0" in head:
            raise ValueError("a response header name or value holds CR, LF or NUL")
        return head

    # ------------------------------------------------------------ writing, closing

    async def _write(self, data: bytes | memoryview) -> None:
        """Write ``data``; a client that does not take it within ``send_timeout`` (or
        is gone) is disconnected. Never raises: a failed write marks the client gone."""
        if self._gone:
            return
        fd = self._fd
        if fd >= 0:  # plain TCP: try the write at once, with no trio machinery
            try:
                sent = os.write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                await self._broken()
                return
            if sent == len(data):
                self._writes += 1
                if not self._writes & (YIELD_EVERY - 1):  # let other tasks run now and then
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            data = memoryview(data)[sent:]  # the socket's buffer is full: wait below
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = clock.now() + self._send_timeout
            try:
                await self._stream.send_all(data)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await self._broken()

    async def _broken(self) -> None:
        """A write failed or timed out: the client is gone, the connection is closed."""
        self._gone = True
        self._eof = True
        self._stopped = True
        self._fd = -1
        await trio.aclose_forcefully(self._stream)  # wakes a receive waiting on it

    async def _refuse(self, error: APIError, *, close: bool = True) -> None:
        """Answer ``error`` (the connection closes after it, lingering)."""
        self._linger = True
        if close:
            self._stopped = True
        await self._write(error_response(error, [(b"date", _date()[6:-2])]))

    async def _close(self) -> None:
        """Close the connection; after an error answer, or with request bytes unread,
        half-close and drop what the client still sends first (:data:`LINGER_SECONDS`)."""
        stream = self._stream
        self._fd = -1
        try:
            if self._linger and not self._gone and not self._eof:
                with trio.CancelScope(shield=True):
                    await self._linger_close(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def _linger_close(self, stream: Any) -> None:
        try:
            with trio.move_on_after(self._send_timeout):
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                OSError):
            return
        dropped = 0
        with trio.move_on_after(LINGER_SECONDS):
            while dropped < LINGER_BYTES:
                try:
                    data = await stream.receive_some(MAX_RECV)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if not data:
                    return
                dropped += len(data)
