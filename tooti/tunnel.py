"""The trio adapter around the sans-I/O tunnel connection.

:class:`TunnelSession` runs one :class:`~tooti.protocol.connection.Connection`
over one :class:`~tooti.transport.Transport`: a read loop that never blocks
on any single stream (stream data goes into per-stream buffers bounded by the
flow-control window, or is spliced onward by a hook), a writer task that sends
every frame queued since its last write in one write, a heartbeat task, and a
liveness watch (a peer silent for three heartbeat intervals is dead). Before a
read loop waits for input, the frames its input produced on any tunnel of the
process are written straight away (:func:`flush_queued`). Streams we open are
:class:`OutboundStream` objects consumed by the caller's own task (so the
caller's cancellation - a client going away - reaches the stream);
streams the peer opens are served by a handler in the session's nursery,
inside a cancel scope that a CANCEL frame or the tunnel's loss cancels.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from tooti import clock
from tooti.protocol import frames
from tooti.protocol.budget import ControlBudget, ControlLimits
from tooti.protocol.connection import (
    Connection,
    DataReceived,
    Event,
    FlowControlError,
    GoAwayReceived,
    HeartbeatAcked,
    HeartbeatReceived,
    Limits,
    ProtocolError,
    ResponseStarted,
    StreamCancelled,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
)
from tooti.settings import TunnelSettings
from tooti.transport import Transport, TransportClosed

log = logging.getLogger("tooti.tunnel")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TIMEOUT = 0.25
"""Seconds to wait for the peer to acknowledge a WebSocket close."""
FLUSH_TIMEOUT = 1.0
"""Longest :meth:`TunnelSession.flush` waits for queued frames to be written."""
OUTGOING_LIMIT = 1 << 20
"""Bytes of frames queued for the writer beyond which senders wait (backpressure)."""


class _Outbox:
    """Per trio run: the sessions with frames queued since the last read-loop flush,
    and whether a read loop is dispatching input right now."""

    __slots__ = ("dispatching", "queued")

    def __init__(self) -> None:
        self.queued: set[TunnelSession] = set()
        self.dispatching = False


_OUTBOX: trio.lowlevel.RunVar[_Outbox] = trio.lowlevel.RunVar("tooti_outbox")


def _outbox() -> _Outbox:
    try:
        return _OUTBOX.get()
    except LookupError:
        outbox = _Outbox()
        _OUTBOX.set(outbox)
        return outbox


def flush_queued() -> None:
    """Write, without waiting, the frames every session of this run has queued, where
    the transport can (see :meth:`TunnelSession.flush_nowait`); the writer task of a
    session with frames left over is woken. Read loops call it before they wait for
    more input, so what a batch of input produced - a relay's spliced frames, an OPEN
    it forwards - goes out in one write per tunnel, with no task switch in between."""
    queued = _outbox().queued
    while queued:
        queued.pop().flush_nowait()


class TunnelLost(Exception):
    """The tunnel closed (or the stream was cancelled) while a stream was open."""


class _StreamIO:
    """Adapter-side buffers and wake-ups of one stream."""

    __slots__ = ("changed", "chunks", "credit", "end", "fin", "head", "lost", "scope", "splice")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.fin = False
        self.head: ResponseStarted | None = None
        self.end: dict[str, Any] | None = None
        self.lost: str | None = None
        self.changed = trio.Event()
        self.credit = trio.Event()
        self.scope: trio.CancelScope | None = None
        self.splice: Splice | None = None

    def wake(self) -> None:
        self.changed.set()

    async def wait_changed(self) -> None:
        await self.changed.wait()
        self.changed = trio.Event()

    def fail(self, reason: str) -> None:
        self.lost = reason
        self.changed.set()
        self.credit.set()
        if self.scope is not None:
            self.scope.cancel()


StreamHandler = Callable[["InboundStream"], Awaitable[None]]
StreamOpener = Callable[["InboundStream"], None]
Splice = Callable[[ResponseStarted | DataReceived | StreamEnded], bool]
"""Sees a stream's RESPONSE, DATA and END in the read loop before they are buffered;
True means it took the event (nothing is buffered, nobody is woken)."""
EventHook = Callable[[Event], None]
StatsSource = Callable[[], dict[str, Any]]


class TunnelSession:
    """One live tunnel: frames in and out, streams, heartbeats, liveness.

    One class of ~450 lines on purpose: its tasks (read loop, writer, heartbeats,
    silence watch) and its two kinds of stream share one session's state - the
    :class:`~tooti.protocol.connection.Connection`, the outgoing queue with its
    backpressure events, the per-stream buffers and the close path that fails
    them all - and each frame's handling touches several of them in one step
    without a checkpoint in between. Split across classes, those would have to
    reach into each other's private state. What does stand alone is apart:
    per-stream buffers (:class:`_StreamIO`), the stream handles the callers use
    (:class:`InboundStream`, :class:`OutboundStream`), the per-run flush
    (:func:`flush_queued`) and the control-frame budget
    (:mod:`tooti.protocol.budget`).
    """

    def __init__(
        self,
        transport: Transport,
        conn: Connection,
        *,
        heartbeat_interval: float,
        stats: StatsSource | None = None,
        on_event: EventHook | None = None,
        handler: StreamHandler | None = None,
        opener: StreamOpener | None = None,
        name: str = "",
        control: ControlLimits | None = None,
    ) -> None:
        """``control`` bounds the connection frames the peer may send per heartbeat
        interval (see :mod:`tooti.protocol.budget`); None = unbounded."""
        self.transport = transport
        self.conn = conn
        self.heartbeat_interval = heartbeat_interval
        self.name = name or transport.remote
        self.rtt: float | None = None
        self.closed = trio.Event()
        self.close_reason = ""
        self.violation = ""
        """Why the peer broke the protocol (``code: message``), if that ended the
        session; empty otherwise."""
        self._close_code: tuple[int, str] | None = None
        self._control = control
        self.control_budget: ControlBudget | None = None
        """The running count of the peer's connection frames (while the session runs
        with ``control`` limits); a relay's grows with the nodes it advertises."""
        self._stats = stats or dict
        self._on_event = on_event
        self._handler = handler
        self._opener = opener
        self._streams: dict[int, _StreamIO] = {}
        self._nursery: trio.Nursery | None = None
        self._cancel_scope = trio.CancelScope()
        # Frames wait here for the writer task, which sends all that queued up since
        # its last write as one write (one system call, one wake-up of the peer).
        self._outgoing: list[bytes] = []
        self._queued = 0
        self._writing = False
        self._wake_writer = trio.Event()
        self._room = trio.Event()
        self._room.set()
        self._written = trio.Event()
        self._last_input = 0.0
        self._silence = trio.CancelScope()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the session until the transport closes, the peer times out or breaks
        the protocol, or :meth:`abort` is called. Never raises for peer faults."""
        code, reason = CLOSE_NORMAL, "closed"
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._last_input = clock.now()
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._heartbeats)
                    nursery.start_soon(self._watch_silence)
                    code, reason = await self._read_loop()
                    nursery.cancel_scope.cancel()
            if self._cancel_scope.cancelled_caught:
                code, reason = self._close_code or (CLOSE_GOING_AWAY,
                                                    self.close_reason or "aborted")
        finally:
            self.close_reason = self.close_reason or reason
            for io in list(self._streams.values()):
                io.fail(self.close_reason)
            self._streams.clear()
            self.conn.close()
            self.closed.set()
            left, self._outgoing = self._outgoing, []
            self._room.set()
            self._written.set()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                if left and not self._writing:  # e.g. the last ENDs before a drain's close
                    try:
                        await self.transport.send_many(left)
                    except TransportClosed:
                        pass
                await self.transport.aclose(code, reason)

    def abort(self, reason: str) -> None:
        """Stop the session now (its streams fail with ``reason``)."""
        self.close_reason = self.close_reason or reason
        self._cancel_scope.cancel()

    def violate(self, code: str, reason: str) -> None:
        """The peer broke a rule above the protocol (bad values, a flood): tell it
        GOAWAY ``code`` with ``reason`` and close with 1002, now. No further frame of
        the peer is processed."""
        if self.closed.is_set() or self._cancel_scope.cancel_called:
            return
        log.warning("tunnel %s: %s: %s, closing", self.name, code, reason)
        self.violation = f"{code}: {reason}"
        self.close_reason = f"protocol violation: {code}"
        self._close_code = (CLOSE_PROTOCOL_ERROR, code)
        try:
            self.enqueue(self.conn.send_goaway(code, reason))
        except (TunnelLost, RuntimeError):
            pass
        else:
            self.flush_nowait()  # now, before the cancellation can reach the writer
        self._cancel_scope.cancel()

    async def goaway(self, code: str, reason: str) -> None:
        """Tell the peer we accept no new streams (draining); returns once it is written
        (or after :data:`FLUSH_TIMEOUT`)."""
        await self.send_frame(self.conn.send_goaway(code, reason))
        await self.flush()

    async def send_frame(self, data: bytes) -> None:
        """Queue one encoded frame for the writer, waiting while the queue is over
        :data:`OUTGOING_LIMIT`; raises TunnelLost once the session has closed."""
        if not data:
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._queued >= OUTGOING_LIMIT and not self.closed.is_set():
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        self.enqueue(data)

    def enqueue(self, data: bytes) -> None:
        """Queue one encoded frame for the writer now, past the backpressure limit (for
        frames bounded otherwise: OPEN, WINDOW, frames spliced from another tunnel
        under flow control); raises TunnelLost once the session has closed."""
        if self.closed.is_set():
            raise TunnelLost(self.close_reason or "closed")
        self._outgoing.append(data)
        self._queued += len(data)
        outbox = _outbox()
        outbox.queued.add(self)
        if not outbox.dispatching:  # a read loop's input is flushed by that read loop
            self._wake_writer.set()

    def flush_nowait(self) -> None:
        """Write the queued frames now if the transport can without waiting; else (or
        for what the socket did not take) wake the writer task. A failed write ends the
        session."""
        if self._outgoing and not self._writing and not self.closed.is_set():
            try:
                taken = self.transport.write_nowait(
                    frames.merge_data(self._outgoing, self.conn.max_data_payload()))
            except TransportClosed:
                self.abort("transport closed")
                return
            if taken:
                self._outgoing, self._queued = [], 0
                self._room.set()
        if self._outgoing or self.transport.pending:
            self._wake_writer.set()

    async def _writer(self) -> None:
        """Write queued frames, all that accumulated at once; a failed write ends the
        session."""
        while True:
            if not self._outgoing and not self.transport.pending:
                self._written.set()
                await self._wake_writer.wait()
                self._wake_writer = trio.Event()
                continue
            batch, self._outgoing, self._queued = self._outgoing, [], 0
            self._room.set()
            if self._written.is_set():  # a flush may wait on the unset one: keep it
                self._written = trio.Event()
            self._writing = True  # stays set if cancelled mid-write: the framing is broken
            try:
                await self.transport.send_many(
                    frames.merge_data(batch, self.conn.max_data_payload()))
            except TransportClosed:
                self.abort("transport closed")
                return
            self._writing = False

    async def send_control(self, build: Callable[[Connection], bytes]) -> None:
        """Encode a control frame with ``build(conn)`` and send it. A connection that
        has closed (even between the tunnel's loss and this session's end) is a lost
        tunnel, like a closed transport."""
        if self.closed.is_set():
            raise TunnelLost(self.close_reason or "closed")
        try:
            frame = build(self.conn)
        except RuntimeError as exc:  # the connection refuses frames once it is closed
            raise TunnelLost(str(exc)) from None
        await self.send_frame(frame)

    async def flush(self) -> None:
        """Wait (up to :data:`FLUSH_TIMEOUT`) until every queued frame is written."""
        with trio.move_on_after(FLUSH_TIMEOUT):
            while ((self._outgoing or self._writing or self.transport.pending)
                   and not self.closed.is_set()):
                await self._written.wait()

    async def _send_quiet(self, data: bytes) -> None:
        try:
            await self.send_frame(data)
        except TunnelLost:
            return

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            stats = self._stats()
            stats["t"] = clock.now()
            await self._send_quiet(self.conn.send_heartbeat(stats))

    async def _read_loop(self) -> tuple[int, str]:
        timeout = 3 * self.heartbeat_interval
        self._last_input = clock.now()
        outbox = _outbox()
        budget = self.control_budget = None if self._control is None else ControlBudget(
            self._control, self.heartbeat_interval, self._last_input)
        try:
            with self._silence:
                while True:
                    try:
                        # Before it waits for input, the transport calls flush_queued:
                        # what this batch of input produced goes out first.
                        message = await self.transport.receive(flush_queued)
                    except TransportClosed as exc:
                        return CLOSE_NORMAL, str(exc)
                    self._last_input = clock.now()
                    try:
                        if budget is not None:
                            pause = budget.charge(message, self._last_input)
                            if pause is not None:  # over its budget: slow the peer down
                                flush_queued()
                                await trio.sleep_until(pause)
                        event = self.conn.receive_message(message)
                        if event is not None:
                            outbox.dispatching = True
                            try:
                                self._dispatch(event)  # on_event may raise ProtocolError
                            finally:
                                outbox.dispatching = False
                    except ProtocolError as exc:
                        log.warning("tunnel %s: protocol error %s, closing", self.name, exc)
                        self.violation = f"{exc.code}: {exc.message}"
                        self.close_reason = f"protocol error: {exc.code}"
                        await self._send_quiet(self.conn.send_goaway(exc.code, exc.message))
                        await self.flush()
                        return CLOSE_PROTOCOL_ERROR, exc.code
                    if self._cancel_scope.cancel_called:  # aborted while dispatching
                        await trio.lowlevel.checkpoint()
        finally:
            flush_queued()  # nothing this loop queued may wait for a flush that never comes
        log.warning("tunnel %s: peer silent for %.1fs, closing", self.name, timeout)
        self.close_reason = "heartbeat timeout"
        return CLOSE_GOING_AWAY, "heartbeat timeout"

    async def _watch_silence(self) -> None:
        """End the read loop once the peer has sent nothing for three heartbeat
        intervals (checked against the time of the last input, not per message)."""
        timeout = 3 * self.heartbeat_interval
        while True:
            await trio.sleep_until(self._last_input + timeout)
            if clock.now() >= self._last_input + timeout:
                self._silence.cancel()
                return

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            io = self._streams.get(event.stream_id)
            if io is not None:
                if io.splice is not None and io.splice(event):
                    return
                if event.data:
                    io.chunks.append(event.data)
                io.fin = io.fin or event.fin
                io.wake()
            return
        if isinstance(event, WindowUpdated):
            io = self._streams.get(event.stream_id)
            if io is not None:
                io.credit.set()
            return
        if isinstance(event, ResponseStarted):
            io = self._streams.get(event.stream_id)
            if io is not None:
                io.head = event
                if io.splice is not None and io.splice(event):
                    return
                io.wake()
            return
        if isinstance(event, StreamEnded):
            io = self._streams.pop(event.stream_id, None)
            if io is not None:
                if io.splice is not None:
                    io.splice(event)
                io.end = event.info
                io.wake()
                io.credit.set()
            return
        if isinstance(event, StreamOpened):
            self._accept_stream(event)
            return
        if isinstance(event, StreamCancelled):
            io = self._streams.pop(event.stream_id, None)
            if io is not None:
                io.fail(f"cancelled: {event.reason}")
            return
        if isinstance(event, HeartbeatReceived):
            sent_at = event.stats.get("t")
            # abs() < 1e300 keeps float() from overflowing on a huge JSON integer
            if (isinstance(sent_at, int | float) and abs(sent_at) < 1e300
                    and self._nursery is not None):
                self._nursery.start_soon(
                    self._send_quiet, self.conn.send_heartbeat_ack(float(sent_at))
                )
        elif isinstance(event, HeartbeatAcked):
            self.rtt = max(0.0, clock.now() - event.sent_at)
        elif isinstance(event, GoAwayReceived):
            log.info("tunnel %s: GOAWAY %s %s", self.name, event.code, event.reason)
        if self._on_event is not None:
            self._on_event(event)

    # ------------------------------------------------------------ streams we serve

    def _accept_stream(self, event: StreamOpened) -> None:
        io = _StreamIO()
        if event.body:
            io.chunks.append(event.body)
        io.fin = event.fin
        io.scope = trio.CancelScope()
        self._streams[event.stream_id] = io
        stream = InboundStream(self, event.stream_id, event.meta, io)
        assert self._nursery is not None
        if self._handler is None:
            self._refuse(stream, "not_serving", "peer serves no streams")
        elif self.conn.goaway_sent:
            self._refuse(stream, "draining", "peer is draining (GOAWAY sent)")
        else:
            if self._opener is not None:
                try:
                    self._opener(stream)
                except Exception:
                    log.exception("tunnel %s: stream %d opener failed", self.name, stream.id)
            self._nursery.start_soon(self._serve_stream, stream)

    def _refuse(self, stream: InboundStream, code: str, message: str) -> None:
        """Answer a stream we will not serve with a retryable 503 END."""
        assert self._nursery is not None
        self._nursery.start_soon(self._end_quiet, stream, {
            "error": {"code": code, "message": message, "status": 503}, "retryable": True})

    async def _end_quiet(self, stream: InboundStream, info: dict[str, Any]) -> None:
        """END a stream if still open; a lost tunnel is not an error here."""
        try:
            await stream.end(info)
        except TunnelLost:
            return

    async def _serve_stream(self, stream: InboundStream) -> None:
        io = stream._io
        assert io.scope is not None and self._handler is not None
        try:
            with io.scope:
                await self._handler(stream)
            if self.conn.has_stream(stream.id):
                log.error("tunnel %s: stream %d handler returned without END", self.name,
                          stream.id)
                await self._end_quiet(stream, _INTERNAL_ERROR)
        except TunnelLost:
            pass
        except Exception:
            log.exception("tunnel %s: stream %d handler failed", self.name, stream.id)
            await self._end_quiet(stream, _INTERNAL_ERROR)
        finally:
            self._streams.pop(stream.id, None)

    # ------------------------------------------------------------ streams we open

    async def open_stream(self, meta: dict[str, Any], body: bytes, *, fin: bool = True
                          ) -> OutboundStream:
        """Open a stream carrying ``body``; returns once the whole body is sent.

        With ``fin=False`` the request body continues: send the rest with
        :meth:`OutboundStream.send_body`. Raises :class:`FlowControlError` if
        the session cannot take a new stream and :class:`TunnelLost` if the
        tunnel fails meanwhile.
        """
        stream, rest = self.open_stream_nowait(meta, body, fin=fin)
        try:
            if rest:
                await self._send_data(stream.id, stream._io, rest, fin=fin)
        except BaseException:
            await stream.cancel("open failed")
            raise
        return stream

    def open_stream_nowait(self, meta: dict[str, Any], body: bytes, *, fin: bool = True
                           ) -> tuple[OutboundStream, bytes]:
        """Open a stream without waiting: the OPEN (with as much of ``body`` as fits) is
        queued at once; returns the stream and the part of ``body`` still to send (with
        :meth:`OutboundStream.send_body`). Raises like :meth:`open_stream`."""
        if self.closed.is_set():
            raise TunnelLost(self.close_reason or "closed")
        sid, frame, rest = self.conn.open_stream(meta, body, fin)
        io = _StreamIO()
        self._streams[sid] = io
        # Queued past the backpressure limit (OPENs are bounded by the stream limit):
        # OPENs go out in stream-id order, and no later CANCEL names an id the peer
        # never saw.
        self.enqueue(frame)
        return OutboundStream(self, sid, io), rest

    async def _send_data(self, sid: int, io: _StreamIO, data: bytes, fin: bool) -> None:
        """Send ``data`` on a stream, waiting for credit; split to the frame limit."""
        maximum = self.conn.max_data_payload()
        offset, total = 0, len(data)
        while True:
            if io.lost is not None:
                raise TunnelLost(io.lost)
            if io.end is not None:
                return  # the responder ended the stream early: the rest is moot
            if not self.conn.has_stream(sid):
                raise TunnelLost("stream closed")
            credit = self.conn.send_credit(sid)
            remaining = total - offset
            if remaining and credit == 0:
                io.credit = trio.Event()
                await io.credit.wait()
                continue
            n = min(credit, maximum, remaining)
            last = offset + n >= total
            await self.send_frame(
                self.conn.send_data(sid, data[offset : offset + n], fin and last)
            )
            offset += n
            if last:
                return

    def grant(self, sid: int, nbytes: int) -> None:
        """Report ``nbytes`` received on stream ``sid`` as consumed: a WINDOW frame is
        queued once enough credit has built up."""
        frame = self.conn.consumed(sid, nbytes)
        if frame and not self.closed.is_set():
            self.enqueue(frame)


_INTERNAL_ERROR: dict[str, Any] = {
    "error": {"code": "internal_error", "message": "node failed to serve", "status": 500}
}


class InboundStream:
    """A stream the peer opened: read its request, answer it."""

    def __init__(self, session: TunnelSession, stream_id: int, meta: dict[str, Any],
                 io: _StreamIO) -> None:
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

    async def respond(self, status: int, headers: dict[str, Any]) -> None:
        """Send the response head; raises TunnelLost if the stream is gone (cancelled
        by the peer, or the tunnel lost)."""
        conn = self.session.conn
        if self._io.lost is not None or not conn.has_stream(self.id):
            raise TunnelLost(self._io.lost or "stream closed")
        self.started = True
        await self.session.send_frame(conn.send_response(self.id, status, headers))

    async def send(self, data: bytes) -> None:
        """Send response body bytes, waiting for flow-control credit."""
        if data:
            await self.session._send_data(self.id, self._io, data, fin=False)

    async def end(self, info: dict[str, Any]) -> None:
        """Finish the stream with usage / finish reason / error details."""
        conn = self.session.conn
        if conn.has_stream(self.id):
            await self.session.send_frame(conn.send_end(self.id, info))


class OutboundStream:
    """A stream we opened: wait for the head, read the body, learn how it ended."""

    def __init__(self, session: TunnelSession, stream_id: int, io: _StreamIO) -> None:
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


__all__ = [
    "FlowControlError",
    "InboundStream",
    "OutboundStream",
    "TunnelLost",
    "TunnelSession",
]


REPLACED = "replaced"
"""GOAWAY code sent to a session superseded by a newer one with the same peer id."""


def limits_from(settings: TunnelSettings) -> Limits:
    """The protocol limits a tunnel end enforces, from settings."""
    return Limits(
        max_frame_bytes=settings.max_frame_bytes,
        max_streams=settings.max_streams,
        initial_window=settings.initial_window,
        max_control_bytes=settings.max_control_bytes,
    )


def control_limits_from(settings: TunnelSettings) -> ControlLimits:
    """The control-frame budget a tunnel end gives its peer, from settings."""
    return ControlLimits(
        frames=settings.control_frames_per_interval,
        bytes=settings.control_bytes_per_interval,
        heartbeats=settings.max_heartbeats_per_interval,
    )


async def drain_sessions(sessions: set[TunnelSession], grace: float,
                         wait_idle: Callable[[], Awaitable[None]], reason: str) -> None:
    """The one drain of every role: tell each session's peer GOAWAY (no new streams),
    wait up to ``grace`` for ``wait_idle`` (the owner's in-flight work), then send what
    is queued (the last streams' ENDs) and close every session."""
    for session in list(sessions):
        with trio.move_on_after(1):
            try:
                await session.goaway("draining", reason)
            except Exception:  # the peer is already gone
                log.debug("goaway to %s failed", session.name)
    with trio.move_on_after(grace):
        await wait_idle()
    for session in list(sessions):
        await session.flush()
        session.abort(reason)
