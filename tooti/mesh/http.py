"""Small HTTP helpers: reading bounded bodies, sending whole responses (through ASGI or
straight to a socket), and answering what a server meets outside the app."""

from __future__ import annotations

import logging
import select
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import trio

from tooti.errors import APIError
from tooti.mesh.ratelimit import Throttle
from tooti.transport.websocket import closing_response

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
_encoder = msgspec.json.Encoder()


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """Return the first value of request header ``name`` (lower-case), if any."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI server's lifespan startup and shutdown (nothing to set up)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(scope: Scope, receive: Receive, limit: int, seconds: float = 60.0
                    ) -> bytes:
    """Read the whole request body; APIError(413) past ``limit`` bytes, APIError(408) if
    it has not all arrived ``seconds`` after the head (a client trickling it in).

    The 413 says ``connection: close``: the rest of the body is never read, so the
    connection cannot carry another request, and a keep-alive client must be told (else
    its next request on that connection fails)."""
    declared = header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise APIError(413, f"request body over the {limit}-byte limit",
                               code="request_too_large", headers={"connection": "close"})
        except ValueError:
            raise APIError(400, "bad content-length header", code="invalid_header") from None
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(seconds):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body over the {limit}-byte limit",
                                   code="request_too_large", headers={"connection": "close"})
                parts.append(chunk)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)
    raise APIError(408, f"request body not received within {seconds:g}s",
                   code="body_timeout")


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Headers, content_type: bytes = JSON
) -> None:
    """Send a complete response with a content-length."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any, headers: Headers) -> None:
    """Send ``obj`` as a JSON response."""
    await send_bytes(send, status, _encoder.encode(obj), headers)


async def send_error(send: Send, error: APIError, headers: Headers) -> None:
    """Send an OpenAI error object with its status (and extra headers)."""
    extra = [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await send_bytes(send, error.status, error.to_json(), headers + extra)


ANSWERED_GRACE = 10.0
"""Seconds an answer that was all sent but its closing part (see
:attr:`ResponseSend.answered`) may still take to finish after its client left."""


class ResponseSend:
    """The ASGI ``send`` of one request, remembering how far its response got: whether
    it has started (an error can still be answered), whether all of its answer was
    handed to the server but a closing part the app holds back (:attr:`answered`),
    and whether its last body part was handed to the server (the client was served in
    full)."""

    __slots__ = ("answered", "complete", "send", "started", "status", "watched")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.status = 0
        """The response's HTTP status once it has started (0 before)."""
        self.answered = False
        """Set by the app: the answer is complete and all of it was sent but a closing
        part held until its bookkeeping is done (a stream's ``data: [DONE]``, held until
        the node's END has arrived and the request has settled). A client leaving now
        was served: :func:`cancel_on_disconnect` lets the work finish."""
        self.complete = False
        self.watched: _Watched | None = None
        """Set while :class:`DisconnectWatch` watches the request: a write that finds
        the client gone (the connection closed the socket) tells the watch."""

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self.send(message)
        watched = self.watched
        if watched is not None and watched.connection.client_gone:
            watched.fire()  # a write failed or timed out: the socket left the epoll set


class _Watched:
    """One request in :class:`DisconnectWatch`: what to do when its client closes."""

    __slots__ = ("cancel", "connection", "tracked")

    def __init__(self, connection: Any, tracked: ResponseSend, cancel: trio.CancelScope
                 ) -> None:
        self.connection = connection
        self.tracked = tracked
        self.cancel = cancel

    def fire(self) -> None:
        """The client closed its side (or the connection broke): as the watcher task of
        :func:`cancel_on_disconnect` does on ``http.disconnect``."""
        self.connection.client_left()
        tracked = self.tracked
        if tracked.complete:
            return
        if tracked.answered:  # only the closing part is left: let it finish
            scope = self.cancel
            scope.deadline = min(scope.deadline, trio.current_time() + ANSWERED_GRACE)
            return
        self.cancel.cancel()


class DisconnectWatch:
    """Sees clients of requests in flight close their connections, with no task per
    request: one epoll set (Linux) holding the socket of every request that waits for its
    answer, registered for ``EPOLLRDHUP`` only (the peer closed its side; a reset or
    error is always reported), and one task (:meth:`run`, owned by the gateway's
    nursery) waiting for that set to be readable. A request registers its socket before
    its work and removes it after: two ``epoll_ctl`` calls, where the watcher task of
    :func:`cancel_on_disconnect` costs a task spawned, two task steps and a nursery.
    Bytes of a pipelined next request do not wake it (no ``EPOLLIN``); they stay in the
    socket for the connection to read after the answer.

    Used only for tooti's own HTTP/1.1 connections on plain TCP (the
    ``"tooti.http1"`` scope extension's :attr:`~tooti.mesh.http1.Http1Connection.fd`);
    TLS connections, HTTP/2 and a watch that is not running take the watcher task. A
    client lost on a write (``send_timeout``, a reset) is seen by the write itself:
    the connection closes the socket, which leaves the set without an event, so each
    ``send`` of the request (:class:`ResponseSend`) checks
    :attr:`~tooti.mesh.http1.Http1Connection.client_gone` after it."""

    def __init__(self) -> None:
        self._epoll: Any = None
        self._watched: dict[int, _Watched] = {}

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is watching (requests may register)."""
        return self._epoll is not None

    async def run(self) -> None:
        """Watch until cancelled; requests still registered then are no longer watched
        (they finish, or the gateway's shutdown cancels them)."""
        epoll = select.epoll()
        self._epoll = epoll
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _events in epoll.poll(0):
                    entry = self._watched.pop(fd, None)
                    try:
                        epoll.unregister(fd)
                    except OSError:
                        pass
                    if entry is not None:
                        entry.fire()
        finally:
            self._epoll = None
            self._watched.clear()
            epoll.close()

    async def watch(self, connection: Any, tracked: ResponseSend,
                    work: Callable[[Send], Awaitable[None]]) -> bool:
        """Run ``work(tracked)``, cancelled if the client of ``connection`` (an
        ``Http1Connection`` on plain TCP) closes first; as :func:`cancel_on_disconnect`."""
        fd = connection.fd
        epoll = self._epoll
        with trio.CancelScope() as cancel:
            entry = _Watched(connection, tracked, cancel)
            try:
                epoll.register(fd, _RDHUP)
            except FileExistsError:  # a stale registration of a closed, reused number
                epoll.modify(fd, _RDHUP)
            self._watched[fd] = entry
            tracked.watched = entry
            try:
                await work(tracked)
            finally:
                tracked.watched = None
                if self._watched.get(fd) is entry:
                    del self._watched[fd]
                    if self._epoll is epoll:
                        try:
                            epoll.unregister(fd)
                        except OSError:  # closed by a failed write meanwhile
                            pass
        return tracked.complete


_RDHUP = getattr(select, "EPOLLRDHUP", 0x2000)


async def cancel_on_disconnect(
    receive: Receive, send: Send, work: Callable[[Send], Awaitable[None]],
    *, watch: DisconnectWatch | None = None, connection: Any = None,
) -> bool:
    """Run ``work(send)`` until it finishes or the client disconnects.

    Returns True if the response was completed (its last body part handed to
    the server), False if the client left first. Hypercorn reports a client's
    disconnect only as an ``http.disconnect`` message; it does not cancel the
    app. A watcher task waits for that message (after the body has been read,
    so nothing else is received) and cancels ``work``, which propagates the
    cancellation down the tunnel to the backend. Hypercorn also sends
    ``http.disconnect`` once a response is complete; the watcher ignores it
    then, so a finished response is never taken for a cancelled one. Nor does it
    cancel an answer that was all sent but its closing part (:attr:`ResponseSend.answered`:
    a stream whose ``[DONE]`` waits for the node's END and the settle): a client that
    stops reading at the last token (or at a finish reason) was served in full, so the
    work gets up to :data:`ANSWERED_GRACE` seconds more to finish and record it.

    With ``watch`` (running) and ``connection`` (the ``"tooti.http1"`` scope extension,
    on plain TCP, whose client has not left), the client's close is seen by
    :class:`DisconnectWatch` instead, with no task: the same outcomes.
    """
    tracked = send if isinstance(send, ResponseSend) else ResponseSend(send)
    if (watch is not None and connection is not None and watch.running
            and connection.fd >= 0 and not connection.client_gone):
        return await watch.watch(connection, tracked, work)
    # The watcher's own scope: once the work is done only the watcher is cancelled
    # (the request's task is not, which spares it a Cancelled of its own).
    watching = trio.CancelScope()
    try:
        async with trio.open_nursery() as nursery:

            async def watcher() -> None:
                with watching:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if tracked.complete:
                        return
                    if tracked.answered:  # only the closing part is left: let it finish
                        scope = nursery.cancel_scope
                        scope.deadline = min(scope.deadline,
                                             trio.current_time() + ANSWERED_GRACE)
                        return
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watcher)
            await work(tracked)
            watching.cancel()
    except BaseExceptionGroup as group:
        # The watcher never raises, so the group holds ``work``'s own exception.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return tracked.complete


def error_response(error: APIError, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response carrying ``error``, for answers written straight to a
    socket outside hypercorn; the connection closes after it."""
    return closing_response(error.status, JSON, error.to_json(), [
        *((k.encode(), v.encode()) for k, v in error.headers.items()), *headers])


def protocol_error(status: int, max_head_bytes: int) -> APIError:
    """The error object for a request the HTTP parser refused (``status`` is its hint:
    400 malformed, 431 head too large, 501 unsupported transfer coding)."""
    if status == 431:
        return APIError(431, f"request head over the {max_head_bytes}-byte limit",
                        code="headers_too_large")
    if status == 501:
        return APIError(501, "unsupported transfer-encoding (only chunked is accepted)",
                        code="invalid_http_request", type="invalid_request_error")
    return APIError(status, "malformed HTTP request (bad request line, header, "
                    "content-length or chunk)", code="invalid_http_request",
                    type="invalid_request_error")


class InternalErrors:
    """Reports requests that failed on a bug rather than on anything the client sent.

    Each is one error line naming the request id and the exception's type; its
    traceback is logged with the first occurrence of each exception type per
    ``every`` seconds (and at debug level always), so a client that can trigger the
    bug at will cannot flood the log with tracebacks.
    """

    def __init__(self, log: logging.Logger, every: float = 60.0) -> None:
        self._log = log
        self._tracebacks = Throttle(every)

    def report(self, request_id: str, exc: Exception) -> APIError:
        """Log ``exc`` and return the 500 answered to the client."""
        kind = type(exc)
        first = self._tracebacks.allow(kind)
        self._log.error("request %s failed: %s (an internal error)", request_id,
                        kind.__name__, exc_info=exc if first else None)
        if not first:
            self._log.debug("traceback of request %s", request_id, exc_info=exc)
        return APIError(500, f"internal error (request {request_id}); the gateway's log "
                        "has the details", code="internal_error")
