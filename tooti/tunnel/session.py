"""The trio adapter around the sans-I/O tunnel connection: :class:`TunnelSession`.

See :mod:`tooti.tunnel` for what a session runs; the streams it hands out are in
:mod:`tooti.tunnel.streams`, the per-run flush in :mod:`tooti.tunnel.outbox`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from tooti import clock
from tooti.protocol import frames
from tooti.protocol.budget import ControlBudget, ControlLimits
from tooti.protocol.connection import (
    Connection,
    DataReceived,
    Event,
    GoAwayReceived,
    HeartbeatAcked,
    HeartbeatReceived,
    ProtocolError,
    ResponseStarted,
    Side,
    StreamCancelled,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
)
from tooti.protocol.usage import end_error
from tooti.transport import Transport, TransportClosed
from tooti.tunnel.codes import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_TIMEOUT
from tooti.tunnel.deadlines import Entry, shared_timer
from tooti.tunnel.idle import IdleReadable, idle_set
from tooti.tunnel.outbox import Outbox, current_outbox, flush_queued
from tooti.tunnel.streams import (
    InboundStream,
    OutboundStream,
    StreamHandler,
    StreamIO,
    StreamOpener,
    TunnelLost,
)

log = logging.getLogger("tooti.tunnel")

FLUSH_TIMEOUT = 1.0
"""Longest :meth:`TunnelSession.flush` waits for queued frames to be written."""
ACCEPTOR_RTT_EVERY = 10
"""An acceptor sends its own HEARTBEAT (whose acknowledgement measures the round trip)
with every this many acknowledgements of a heartbeating peer's ones, instead of on its
own timer: see :meth:`TunnelSession._on_peer_heartbeat`."""
OUTGOING_LIMIT = 1 << 20
"""Bytes of frames queued for the writer beyond which senders wait (backpressure)."""
IDLE_SET = True
"""Whether an acceptor's idle plain-TCP tunnels park their read loops in the process's
:class:`~tooti.tunnel.idle.IdleSet` (see :mod:`tooti.tunnel.idle`)."""
IDLE_AFTER = 1.0
"""Seconds without a new stream before a tunnel's read loop parks in the idle set: a
tunnel carrying requests back to back keeps its read loop's own wait (a parked one
costs the idle set's task a step on the first frame of each answer)."""
_HEARTBEAT = bytes([frames.FrameType.HEARTBEAT])

EventHook = Callable[[Event], None]
StatsSource = Callable[[], dict[str, Any]]


class Wakeup:
    """The writer task's wake-up: trio's low-level park/reschedule instead of a new
    :class:`trio.Event` per wake-up (a node wakes its writer about once per streamed
    token). :meth:`set` reschedules the parked task, or leaves a mark the next
    :meth:`wait` consumes at once, so a wake-up between the task's check and its wait
    is never lost. One waiting task at a time."""

    __slots__ = ("_marked", "_task")

    def __init__(self) -> None:
        self._marked = False
        self._task: trio.lowlevel.Task | None = None

    def set(self) -> None:
        """Wake the waiting task (or mark the next wait to return at once)."""
        task = self._task
        if task is None:
            self._marked = True
            return
        self._task = None
        trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        """Wait for :meth:`set` (at once if it was called since the last wait)."""
        if self._marked:
            await trio.lowlevel.checkpoint()  # cancelled here: the mark stays
            self._marked = False
            return
        if self._task is not None:
            raise RuntimeError("Wakeup: another task is already waiting")
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        self._marked = False  # consumed: the task rechecks everything now


class TunnelSession:
    """One live tunnel: frames in and out, streams, heartbeats, liveness.

    One class of ~450 lines on purpose: its tasks (read loop, writer, heartbeats,
    silence watch) and its two kinds of stream share one session's state - the
    :class:`~tooti.protocol.connection.Connection`, the outgoing queue with its
    backpressure events, the per-stream buffers and the close path that fails
    them all - and each frame's handling touches several of them in one step
    without a checkpoint in between. Split across classes, those would have to
    reach into each other's private state. What does stand alone is apart:
    per-stream buffers (:class:`StreamIO`) and the stream handles the callers use
    (:class:`InboundStream`, :class:`OutboundStream`) in :mod:`tooti.tunnel.streams`,
    the per-run flush (:func:`flush_queued`) in :mod:`tooti.tunnel.outbox` and the
    control-frame budget (:mod:`tooti.protocol.budget`).
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
        self._streams: dict[int, StreamIO] = {}
        self._nursery: trio.Nursery | None = None
        self._cancel_scope = trio.CancelScope()
        # Frames wait here for the writer task, which sends all that queued up since
        # its last write as one write (one system call, one wake-up of the peer).
        self._outgoing: list[bytes] = []
        self._queued = 0
        self._writing = False
        self._wake_writer = Wakeup()
        self._room = trio.Event()
        self._room.set()
        self._written: trio.Event | None = None
        """Set once the writer is idle, for :meth:`flush`; made only when a flush waits
        (not one Event per batch written)."""
        self._last_input = 0.0
        self._silence = trio.CancelScope()
        self._own_due = 0.0
        """When this side's next HEARTBEAT is due (see :meth:`_on_timer`)."""
        self._timer: Entry | None = None
        """This session's entry in the run's :class:`~tooti.tunnel.deadlines.SharedTimer`
        (its own HEARTBEATs and the silence watch; no task of its own)."""
        self._peer_heartbeats = 0
        """HEARTBEATs received from the peer (an acceptor piggybacks its own on every
        :data:`ACCEPTOR_RTT_EVERY`-th one's acknowledgement)."""
        self._idle_reader: IdleReadable | None = None
        """The transport, when this session's read loop may park in the process's idle
        set (:mod:`tooti.tunnel.idle`): an acceptor's plain-TCP WebSocket tunnel."""
        self._busy_at = -math.inf
        """When the last stream was opened (either way); see :data:`IDLE_AFTER`."""
        self._idle_problem: Exception | float | None = None
        self._outbox = Outbox()
        """The run's outbox, from the read loop's start (:meth:`_take` marks dispatches in it)."""
        """What the idle set left for the read loop: a protocol error to close with, or
        the time until which the peer, over its control budget, is not read."""

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
                    if (IDLE_SET and self.conn.side is Side.ACCEPTOR
                            and isinstance(self.transport, IdleReadable)):
                        self._idle_reader = self.transport
                    nursery.start_soon(self._writer)
                    self._start_timer()
                    code, reason = await self._read_loop()
                    nursery.cancel_scope.cancel()
            if self._cancel_scope.cancelled_caught:
                code, reason = self._close_code or (CLOSE_GOING_AWAY,
                                                    self.close_reason or "aborted")
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.close_reason = self.close_reason or reason
            for io in list(self._streams.values()):
                io.fail(self.close_reason)
            self._streams.clear()
            self.conn.close()
            self.closed.set()
            left, self._outgoing = self._outgoing, []
            self._room.set()
            if self._written is not None:
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

    async def send_frame(self, data: bytes, *, wake: bool = True) -> None:
        """Queue one encoded frame for the writer, waiting while the queue is over
        :data:`OUTGOING_LIMIT`; raises TunnelLost once the session has closed.
        ``wake=False``: see :meth:`enqueue`."""
        if not data:
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._queued >= OUTGOING_LIMIT and not self.closed.is_set():
            self.flush_nowait()  # a held queue goes out before we wait for room
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        self.enqueue(data, wake=wake)

    def enqueue(self, data: bytes, *, wake: bool = True) -> None:
        """Queue one encoded frame for the writer now, past the backpressure limit (for
        frames bounded otherwise: OPEN, WINDOW, frames spliced from another tunnel
        under flow control); raises TunnelLost once the session has closed.

        ``wake=False`` holds the frame: the writer task is not woken, and the caller
        promises to call :meth:`flush_nowait` before it next waits (a stream handler
        that has more to send at once: its frames leave in one write, made by the
        handler itself, without a wake-up of the writer task). A read loop's
        :func:`flush_queued` and the end of a stream's handler flush held frames too."""
        if self.closed.is_set():
            raise TunnelLost(self.close_reason or "closed")
        self._outgoing.append(data)
        self._queued += len(data)
        outbox = current_outbox()
        outbox.queued.add(self)
        if wake and not outbox.dispatching:  # a read loop's input is flushed by it
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
        elif self._written is not None and not self._writing:
            # All written here, and the writer may stay parked: a waiting flush() is done.
            self._written.set()
            self._written = None

    async def _writer(self) -> None:
        """Write queued frames, all that accumulated at once; a failed write ends the
        session. The write is first tried without waiting (``write_nowait``: on plain
        TCP one ``send`` on the socket, none of trio's per-write machinery); only what
        the socket did not take, or a transport that cannot write so, is awaited (a node
        wakes its writer about once per streamed token)."""
        while True:
            if not self._outgoing and not self.transport.pending:
                if self._written is not None:
                    self._written.set()
                    self._written = None
                await self._wake_writer.wait()
                continue
            batch, self._outgoing, self._queued = self._outgoing, [], 0
            self._room.set()
            messages = frames.merge_data(batch, self.conn.max_data_payload())
            try:
                if messages and not self.transport.pending \
                        and self.transport.write_nowait(messages):
                    continue  # taken; a rest the socket did not take is pending: next round
            except TransportClosed:
                self.abort("transport closed")
                return
            self._writing = True  # stays set if cancelled mid-write: the framing is broken
            try:
                await self.transport.send_many(messages)
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
                if self._written is None:
                    self._written = trio.Event()
                await self._written.wait()

    async def _send_quiet(self, data: bytes) -> None:
        try:
            await self.send_frame(data)
        except TunnelLost:
            return

    def _heartbeat_frame(self) -> bytes:
        stats = self._stats()
        stats["t"] = clock.now()
        return self.conn.send_heartbeat(stats)

    def _start_timer(self) -> None:
        """Arm this side's HEARTBEATs and the silence watch in the run's shared timer
        (:mod:`tooti.tunnel.deadlines`): the first own heartbeat one interval from now."""
        self._own_due = clock.now() + self.heartbeat_interval
        self._timer = shared_timer().call_at(self._own_due, self._on_timer)

    def _on_timer(self, now: float) -> None:
        """The shared timer's call when this session's entry is due: the next own
        HEARTBEAT or three heartbeat intervals after the last input, whichever comes
        first, checked lazily against the time of the last input (the read loop only
        records it, per message; an acceptor's peer heartbeat only moves
        :attr:`_own_due`, see :meth:`_on_peer_heartbeat`). Silence ends the read loop;
        a due heartbeat is written at once (queued for the writer if the socket does
        not take it); otherwise it re-arms for the new first deadline."""
        self._timer = None
        if self.closed.is_set():
            return
        silent_at = self._last_input + 3 * self.heartbeat_interval
        if now >= silent_at:
            self._silence.cancel()
            return
        if now >= self._own_due:
            self._own_due = now + self.heartbeat_interval
            if self._queued < OUTGOING_LIMIT:  # else the peer reads nothing: no growth
                try:
                    frame = self._heartbeat_frame()
                except RuntimeError:  # the connection closed meanwhile
                    return
                except Exception:  # a stats source failed: end the session, never its watch
                    log.exception("tunnel %s: heartbeat failed, closing", self.name)
                    self.abort("heartbeat failed")
                    return
                # Straight to the socket when it takes it: no writer wake-up per heartbeat.
                self._outgoing.append(frame)
                self._queued += len(frame)
                self.flush_nowait()
        self._timer = shared_timer().call_at(min(self._own_due, silent_at), self._on_timer)

    def _on_peer_heartbeat(self, sent_at: object) -> None:
        """Acknowledge a peer's HEARTBEAT (queued: the read loop writes it with the rest
        of its input's answers, no task is started). An acceptor (a gateway or relay)
        also postpones its own next heartbeat to 1.5 intervals from now and sends one only
        with every :data:`ACCEPTOR_RTT_EVERY`-th acknowledgement (to measure the round
        trip), since the acknowledgement is input enough for the peer's silence watch:
        one wake-up and one write per idle tunnel and interval. A HEARTBEAT without a
        usable ``t`` is not acknowledged, so it postpones nothing: the acceptor's own
        timer keeps feeding the peer's silence watch every interval. Neither an
        acknowledgement nor an own HEARTBEAT is queued while the outgoing queue is over
        :data:`OUTGOING_LIMIT` (a peer that sends but does not read cannot grow it)."""
        # abs() < 1e300 keeps float() from overflowing on a huge JSON integer
        if not (isinstance(sent_at, int | float) and abs(sent_at) < 1e300):
            return  # nothing to acknowledge (every field is optional): own timer as usual
        if self._queued >= OUTGOING_LIMIT:
            return  # a backlog the peer does not read: acknowledgements would only grow it
        frames_out = [self.conn.send_heartbeat_ack(float(sent_at))]
        if self.conn.side is Side.ACCEPTOR:
            now = clock.now()
            if self._peer_heartbeats % ACCEPTOR_RTT_EVERY == 0:
                frames_out.append(self._heartbeat_frame())
            self._peer_heartbeats += 1
            # Only recorded: the shared timer finds it when the old due time comes.
            self._own_due = now + 1.5 * self.heartbeat_interval
        for frame in frames_out:
            self.enqueue(frame)

    async def _read_loop(self) -> tuple[int, str]:
        timeout = 3 * self.heartbeat_interval
        self._last_input = clock.now()
        self._outbox = current_outbox()
        budget = self.control_budget = None if self._control is None else ControlBudget(
            self._control, self.heartbeat_interval, self._last_input)
        reader = self._idle_reader
        idle = None if reader is None else idle_set()
        try:
            with self._silence:
                while True:
                    if (idle is not None and not self._streams and reader is not None
                            and self._last_input - self._busy_at >= IDLE_AFTER
                            and reader.idle_fd() >= 0):  # nothing more to read at once
                        flush_queued()  # what the last input produced goes out first
                        if (fd := self._idle_fd()) >= 0:
                            await idle.park(self, fd)  # until the idle set hands over
                            problem, self._idle_problem = self._idle_problem, None
                            if isinstance(problem, ProtocolError):
                                return await self._protocol_error(problem)
                            if isinstance(problem, Exception):  # ends the session, as here
                                raise problem
                            if problem is not None:  # over its budget: slow the peer down
                                flush_queued()
                                await trio.sleep_until(problem)
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
                        self._take(message)  # on_event may raise ProtocolError
                    except ProtocolError as exc:
                        return await self._protocol_error(exc)
                    if self._cancel_scope.cancel_called:  # aborted while dispatching
                        await trio.lowlevel.checkpoint()
        finally:
            flush_queued()  # nothing this loop queued may wait for a flush that never comes
        log.warning("tunnel %s: peer silent for %.1fs, closing", self.name, timeout)
        self.close_reason = "heartbeat timeout"
        return CLOSE_GOING_AWAY, "heartbeat timeout"

    def _take(self, message: bytes) -> None:
        """Decode one message of the peer's and dispatch its event, the run's outbox told
        a dispatch is under way (what it queues is written after the batch); the read
        loop's and the idle set's one way in."""
        event = self.conn.receive_message(message)
        if event is not None:
            outbox = self._outbox
            outbox.dispatching = True
            try:
                self._dispatch(event)
            finally:
                outbox.dispatching = False

    async def _protocol_error(self, exc: ProtocolError) -> tuple[int, str]:
        """The peer broke the protocol: GOAWAY, flush, and the close code to end with."""
        log.warning("tunnel %s: protocol error %s, closing", self.name, exc)
        self.violation = f"{exc.code}: {exc.message}"
        self.close_reason = f"protocol error: {exc.code}"
        await self._send_quiet(self.conn.send_goaway(exc.code, exc.message))
        await self.flush()
        return CLOSE_PROTOCOL_ERROR, exc.code

    def _idle_fd(self) -> int:
        """The socket to park the read loop on when the session is idle (an idle-set
        transport, no stream open, nothing queued or being written, nothing buffered
        in the transport); else -1."""
        reader = self._idle_reader
        if (reader is None or self._streams or self._outgoing or self._writing
                or self._cancel_scope.cancel_called):
            return -1
        return reader.idle_fd()

    def take_idle_input(self) -> bool:
        """Called by the idle set (:mod:`tooti.tunnel.idle`) when this session's parked
        socket is readable: read it without waiting and handle whole HEARTBEAT frames here,
        as the read loop would (input time recorded, control budget charged, the ACK
        written at once when the socket takes it). Returns whether the session is still
        idle; False hands over to the read loop (another frame or part of one is
        buffered, the connection ended, a write is left over, or a problem for the read
        loop to act on is in :attr:`_idle_problem`)."""
        reader = self._idle_reader
        if reader is None or not reader.read_nowait():
            return False
        outbox = current_outbox()
        budget = self.control_budget
        while (message := reader.peek_nowait()) is not None and message[:1] == _HEARTBEAT:
            reader.drop_peeked()
            now = self._last_input = clock.now()
            try:
                pause = None if budget is None else budget.charge(message, now)
                self._take(message)  # on_event may raise ProtocolError
            except Exception as exc:  # the read loop acts on it as on its own input's
                self._idle_problem = exc
                return False
            if pause is not None:
                self._idle_problem = pause
                return False
            if self._cancel_scope.cancel_called:  # aborted while dispatching (violate())
                return False  # nothing more of the peer's is processed
        if self._outgoing:
            outbox.queued.discard(self)
            self.flush_nowait()  # the ACK, straight to the socket when it takes it
        return self._idle_fd() >= 0

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
            try:
                self._on_peer_heartbeat(event.stats.get("t"))
            except (TunnelLost, RuntimeError):  # closing: nothing more to acknowledge
                pass
        elif isinstance(event, HeartbeatAcked):
            self.rtt = max(0.0, clock.now() - event.sent_at)
        elif isinstance(event, GoAwayReceived):
            log.info("tunnel %s: GOAWAY %s %s", self.name, event.code, event.reason)
        if self._on_event is not None:
            self._on_event(event)

    # ------------------------------------------------------------ streams we serve

    def _accept_stream(self, event: StreamOpened) -> None:
        io = StreamIO()
        if event.body:
            io.chunks.append(event.body)
        io.fin = event.fin
        io.scope = trio.CancelScope()
        self._streams[event.stream_id] = io
        self._busy_at = self._last_input
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
        self._nursery.start_soon(self._end_quiet, stream,
                                 end_error(503, code, message, retryable=True))

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
            if self._outgoing:  # frames a handler held (see enqueue) leave now
                self.flush_nowait()

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
        io = StreamIO()
        self._streams[sid] = io
        self._busy_at = clock.now()
        # Queued past the backpressure limit (OPENs are bounded by the stream limit):
        # OPENs go out in stream-id order, and no later CANCEL names an id the peer
        # never saw. Outside a read loop's dispatch it is written at once when the
        # socket takes it (a request's OPEN: no wake-up of the writer task per request);
        # what it does not take, or a transport that cannot write so, wakes the writer.
        self._outgoing.append(frame)
        self._queued += len(frame)
        outbox = current_outbox()
        outbox.queued.add(self)
        if not outbox.dispatching:
            self.flush_nowait()
        return OutboundStream(self, sid, io), rest

    async def _send_data(self, sid: int, io: StreamIO, data: bytes, fin: bool,
                         wake: bool = True) -> None:
        """Send ``data`` on a stream, waiting for credit; split to the frame limit.
        ``wake=False`` holds the frames (see :meth:`enqueue`); held frames are flushed
        before a wait for credit."""
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
                self.flush_nowait()  # what is held goes out before the wait
                io.credit = trio.Event()
                await io.credit.wait()
                continue
            n = min(credit, maximum, remaining)
            last = offset + n >= total
            await self.send_frame(
                self.conn.send_data(sid, data[offset : offset + n], fin and last), wake=wake
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
