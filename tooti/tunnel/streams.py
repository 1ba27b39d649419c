"""The streams of a tunnel session as their users see them.

:class:`InboundStream` is a stream the peer opened (read the request, answer it);
:class:`OutboundStream` is one we opened (wait for the head, read the body). Both read
from a :class:`StreamIO`, the per-stream buffers and wake-ups the session's read loop
fills, and send through their :class:`~tooti.tunnel.session.TunnelSession`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from tooti.protocol.connection import DataReceived, ResponseStarted, StreamEnded

if TYPE_CHECKING:
    from tooti.tunnel.session import TunnelSession


class TunnelLost(Exception):
    """The tunnel closed (or the stream was cancelled) while a stream was open."""


class StreamIO:
    """Adapter-side buffers and wake-ups of one stream.

    The wake-up is trio's low-level park/reschedule, not a :class:`trio.Event`: the
    session's read loop calls :meth:`wake` once per frame of the stream (once per token
    of a streamed answer), and an Event costs a new object, a parking lot and its
    bookkeeping each time. :meth:`wake` reschedules the tasks parked in
    :meth:`wait_changed`, or, when none is, leaves a mark the next
    :meth:`wait_changed` consumes (so a change between a reader's check and its wait is
    never lost: the semantics of an Event replaced after each wait)."""

    __slots__ = ("_changed", "_waiters", "chunks", "credit", "end", "fin", "head", "lost",
                 "scope", "splice")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.fin = False
        self.head: ResponseStarted | None = None
        self.end: dict[str, Any] | None = None
        self.lost: str | None = None
        self.credit = trio.Event()
        self.scope: trio.CancelScope | None = None
        self.splice: Splice | None = None
        self._changed = False
        self._waiters: list[trio.lowlevel.Task] = []

    def wake(self) -> None:
        """Something changed: wake the waiting readers (or mark it for the next one)."""
        waiters = self._waiters
        if not waiters:
            self._changed = True
            return
        if len(waiters) == 1:
            trio.lowlevel.reschedule(waiters.pop())
            return
        self._waiters = []
        for task in waiters:
            trio.lowlevel.reschedule(task)

    async def wait_changed(self) -> None:
        """Wait until :meth:`wake` is called (at once if it was since the last wait);
        a checkpoint either way."""
        if self._changed:
            # Cleared after the checkpoint: a reader cancelled there leaves the mark for
            # the next one, as an Event that stays set would.
            await trio.lowlevel.checkpoint()
            self._changed = False
            return
        task = trio.lowlevel.current_task()
        waiters = self._waiters
        waiters.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            if task in self._waiters:
                self._waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        self._changed = False  # this wake-up is consumed (a later one marks again)

    def fail(self, reason: str) -> None:
        self.lost = reason
        self.wake()
        self.credit.set()
        if self.scope is not None:
            self.scope.cancel()


StreamHandler = Callable[["InboundStream"], Awaitable[None]]
StreamOpener = Callable[["InboundStream"], None]
Splice = Callable[[ResponseStarted | DataReceived | StreamEnded], bool]
"""Sees a stream's RESPONSE, DATA and END in the read loop before they are buffered;
True means it took the event (nothing is buffered, nobody is woken)."""


class InboundStream:
    """A stream the peer opened: read its request, answer it."""

    def __init__(self, session: TunnelSession, stream_id: int, meta: dict[str, Any],
                 io: StreamIO) -> None:
        self.session = session
        self.id = stream_id
        self.meta = meta
        self._io = io
        self.started = False
        self.context: Any = None
        """Whatever the session's opener attached to the stream for its handler."""

    async def read_body(self, limit: int) -> bytes:
        """Collect the whole request body (granting credit as it is consumed).

        Raises ValueError if it exceeds ``limit`` bytes and TunnelLost if the
        stream or tunnel dies first.
        """
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.read_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                raise ValueError(f"request body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def read_chunk_nowait(self) -> bytes | None:
        """The request body piece already buffered (credit granted), or None."""
        io = self._io
        if not io.chunks:
            return None
        chunk = io.chunks.popleft()
        self.session.grant(self.id, len(chunk))
        return chunk

    @property
    def body_arrived(self) -> bool:
        """True once the request body's end has arrived (all of it buffered or taken)."""
        return self._io.fin

    @property
    def body_complete(self) -> bool:
        """True once the whole request body has arrived and been taken."""
        return self._io.fin and not self._io.chunks

    async def read_chunk(self) -> bytes | None:
        """The next piece of the request body as it arrives (credit is granted once it
        is taken), or None once the body is complete; raises TunnelLost on loss."""
        io = self._io
        while True:
            if io.chunks:
                chunk = io.chunks.popleft()
                self.session.grant(self.id, len(chunk))
                await trio.lowlevel.checkpoint_if_cancelled()
                return chunk
            if io.fin:
                return None
            if io.lost is not None:
                raise TunnelLost(io.lost)
            await io.wait_changed()

    async def respond(self, status: int, headers: dict[str, Any], *,
                      hold: bool = False) -> None:
        """Send the response head; raises TunnelLost if the stream is gone (cancelled
        by the peer, or the tunnel lost). ``hold``: see :meth:`send`."""
        conn = self.session.conn
        if self._io.lost is not None or not conn.has_stream(self.id):
            raise TunnelLost(self._io.lost or "stream closed")
        self.started = True
        await self.session.send_frame(conn.send_response(self.id, status, headers),
                                      wake=not hold)

    async def send(self, data: bytes, *, hold: bool = False) -> None:
        """Send response body bytes, waiting for flow-control credit.

        ``hold=True`` queues the frames without waking the session's writer task: the
        caller promises to call :meth:`flush_nowait` (or :meth:`end`) before it next
        waits for anything else, and the frames then leave in one write made by this
        task (no writer wake-up: a task step and a scheduler pass fewer per request,
        and per token of a paced stream). A wait for credit or queue room flushes
        first, and so does the end of the stream's handler."""
        if data:
            await self.session._send_data(self.id, self._io, data, fin=False,
                                          wake=not hold)

    def flush_nowait(self) -> None:
        """Write what this stream's session holds now (see :meth:`send`), where the
        socket takes it without waiting; the writer task writes the rest."""
        self.session.flush_nowait()

    async def end(self, info: dict[str, Any]) -> None:
        """Finish the stream with usage / finish reason / error details; the frames
        queued so far are written at once where the socket takes them."""
        session = self.session
        conn = session.conn
        if conn.has_stream(self.id):
            await session.send_frame(conn.send_end(self.id, info), wake=False)
        session.flush_nowait()


class OutboundStream:
    """A stream we opened: wait for the head, read the body, learn how it ended."""

    def __init__(self, session: TunnelSession, stream_id: int, io: StreamIO) -> None:
        self.session = session
        self.id = stream_id
        self._io = io

    @property
    def splice(self) -> Splice | None:
        """The hook that takes this stream's answer as it is decoded (None: buffered)."""
        return self._io.splice

    @splice.setter
    def splice(self, hook: Splice | None) -> None:
        self._io.splice = hook

    @property
    def end_info(self) -> dict[str, Any] | None:
        """The END payload once the stream has ended, else None."""
        return self._io.end

    async def head(self) -> ResponseStarted | None:
        """Wait for the response head; None means the stream ended without one
        (see :attr:`end_info`). Raises TunnelLost if the tunnel died."""
        io = self._io
        while True:
            if io.head is not None:
                return io.head
            if io.end is not None:
                return None
            if io.lost is not None:
                raise TunnelLost(io.lost)
            await io.wait_changed()

    async def next_chunk(self) -> bytes | None:
        """The next response body chunk, or None at END; raises TunnelLost on loss."""
        return await self.next_data(0)

    async def next_data(self, limit: int) -> bytes | None:
        """Like :meth:`next_chunk`, but joins the chunks already buffered (up to ``limit``
        bytes) into one piece, so a forwarder sends fewer, larger frames."""
        io = self._io
        while True:
            if io.chunks:
                data = io.chunks.popleft()
                if io.chunks and len(data) + len(io.chunks[0]) <= limit:
                    parts = [data]
                    size = len(data)
                    while io.chunks and size + len(io.chunks[0]) <= limit:
                        chunk = io.chunks.popleft()
                        parts.append(chunk)
                        size += len(chunk)
                    data = b"".join(parts)
                self.session.grant(self.id, len(data))
                return data
            if io.end is not None:
                return None
            if io.lost is not None:
                raise TunnelLost(io.lost)
            await io.wait_changed()

    async def send_body(self, data: bytes, fin: bool) -> None:
        """Send more request body (after ``open_stream(..., fin=False)``); ``fin`` ends it."""
        if data or fin:
            await self.session._send_data(self.id, self._io, data, fin=fin)

    async def body(self) -> AsyncIterator[bytes]:
        """Yield response body chunks until END; raises TunnelLost on loss."""
        while (chunk := await self.next_chunk()) is not None:
            yield chunk

    async def cancel(self, reason: str) -> None:
        """Abandon the stream (idempotent); the peer cancels its work."""
        self.session._streams.pop(self.id, None)
        frame = self.session.conn.send_cancel(self.id, reason)
        if frame:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.session._send_quiet(frame)

