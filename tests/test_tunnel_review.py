"""A review's findings on the tunnel session, pinned (trio's autojump clock, no sleeps to
wait for a condition; the fake peers pace their own frames on the virtual clock).

- A stuck writer (a backlog over :data:`~tooti.tunnel.session.OUTGOING_LIMIT`) never holds
  up the silence watch, and a peer that sends but does not read cannot grow the backlog
  with acknowledgements or our own heartbeats.
- An acceptor whose peer heartbeats without a usable ``t`` (every HEARTBEAT field is
  optional) still sends its own HEARTBEAT every interval: nothing was acknowledged, so
  nothing is postponed.
- :meth:`TunnelSession.flush` returns once :meth:`TunnelSession.flush_nowait` wrote the
  queue, even though the writer task stayed parked.
- A stream reader (and the writer's :class:`~tooti.tunnel.session.Wakeup`) cancelled at
  the checkpoint of a wait that found the mark leaves the mark for the next wait.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.test_tunnel_session import QUIET, Wire, handshake
from tooti.protocol import frames
from tooti.protocol.frames import FLAG_ACK, FrameType
from tooti.transport.memory import memory_pair
from tooti.tunnel import FLUSH_TIMEOUT, TunnelSession
from tooti.tunnel.session import OUTGOING_LIMIT, Wakeup
from tooti.tunnel.streams import StreamIO

INTERVAL = 1.0


async def test_stuck_writer_and_silent_peer_closes_within_three_intervals(
        autojump_clock: trio.testing.MockClock) -> None:
    d_end, a_end = memory_pair()
    d_conn, _ = await handshake(d_end, a_end, interval=INTERVAL)
    wire = Wire(d_end)
    wire.gate = trio.Event()  # the writer never gets its bytes out
    session = TunnelSession(wire, d_conn, heartbeat_interval=INTERVAL)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            session.enqueue(frames.encode(FrameType.GOAWAY, 0, b"first"))
            await trio.testing.wait_all_tasks_blocked()  # the writer holds it, stuck
            started = trio.current_time()
            filler = frames.encode(FrameType.GOAWAY, 0, b"x" * 60_000)
            while session._queued < OUTGOING_LIMIT + len(filler):
                session.enqueue(filler)
            await session.closed.wait()
    assert session.close_reason == "heartbeat timeout"
    assert trio.current_time() - started <= 3 * INTERVAL + 0.1


async def test_a_peer_that_does_not_read_cannot_grow_the_backlog(
        autojump_clock: trio.testing.MockClock) -> None:
    peer, a_end = memory_pair()
    _, a_conn = await handshake(peer, a_end, interval=INTERVAL)
    wire = Wire(a_end)
    wire.gate = trio.Event()
    session = TunnelSession(wire, a_conn, heartbeat_interval=INTERVAL)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        session.enqueue(frames.encode(FrameType.GOAWAY, 0, b"first"))
        await trio.testing.wait_all_tasks_blocked()  # the writer holds it, stuck
        filler = frames.encode(FrameType.GOAWAY, 0, b"x" * 60_000)
        while session._queued < OUTGOING_LIMIT:
            session.enqueue(filler)
        backlog = session._queued
        for beat in range(20):  # heartbeats with a usable t, never reading a byte back
            await peer.send(frames.encode_json(FrameType.HEARTBEAT, 0, {"t": float(beat)}))
            await trio.sleep(INTERVAL)
        assert not session.closed.is_set()  # the peer is not silent
        assert session._queued == backlog  # no acknowledgement, no own heartbeat queued
        session.abort("done")


@pytest.mark.parametrize("stats", [{}, {"t": 1e301}, {"t": "soon"}])
async def test_acceptor_heartbeats_every_interval_when_nothing_is_acknowledged(
        autojump_clock: trio.testing.MockClock, stats: dict[str, object]) -> None:
    """The dialer sends HEARTBEATs without a usable ``t``: it gets no acknowledgement,
    so the acceptor's own HEARTBEATs are its only input and come every interval."""
    peer, a_end = memory_pair()
    _, a_conn = await handshake(peer, a_end, interval=INTERVAL)
    session = TunnelSession(a_end, a_conn, heartbeat_interval=INTERVAL)
    arrivals: list[float] = []

    async def read() -> None:
        while True:
            frame = frames.decode(await peer.receive(), 1 << 20)
            if frame.type is FrameType.HEARTBEAT:
                assert not frame.flags & FLAG_ACK  # nothing to acknowledge
                arrivals.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        nursery.start_soon(read)
        start = trio.current_time()
        for _ in range(12):  # a dialer's own heartbeats, paced on the virtual clock
            await peer.send(frames.encode_json(FrameType.HEARTBEAT, 0, stats))
            await trio.sleep(INTERVAL)
        assert not session.closed.is_set()
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip([start, *arrivals], arrivals, strict=False)]
    assert len(arrivals) >= 10
    assert max(gaps) <= INTERVAL + 0.1


async def test_acceptor_still_rides_on_acknowledgements_for_a_usable_t(
        autojump_clock: trio.testing.MockClock) -> None:
    """The economy the fix keeps: a dialer heartbeating with ``t`` gets an ACK each time
    and the acceptor's own HEARTBEAT only with every tenth one."""
    peer, a_end = memory_pair()
    _, a_conn = await handshake(peer, a_end, interval=INTERVAL)
    session = TunnelSession(a_end, a_conn, heartbeat_interval=INTERVAL)
    acks, own = 0, 0

    async def read() -> None:
        nonlocal acks, own
        while True:
            frame = frames.decode(await peer.receive(), 1 << 20)
            if frame.type is FrameType.HEARTBEAT:
                if frame.flags & FLAG_ACK:
                    acks += 1
                else:
                    own += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        nursery.start_soon(read)
        for beat in range(20):
            await peer.send(frames.encode_json(FrameType.HEARTBEAT, 0, {"t": float(beat)}))
            await trio.sleep(INTERVAL)
        nursery.cancel_scope.cancel()
    assert acks == 20 and own == 2


async def test_flush_returns_when_flush_nowait_wrote_the_queue(
        autojump_clock: trio.testing.MockClock) -> None:
    """A held frame (enqueue wake=False), a flush() waiting on it, then flush_nowait()
    writes it with the writer task never woken: the flush returns at once, not after
    FLUSH_TIMEOUT."""
    peer, a_end = memory_pair()
    _, a_conn = await handshake(peer, a_end, interval=QUIET)
    session = TunnelSession(a_end, a_conn, heartbeat_interval=QUIET)
    flushed: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.testing.wait_all_tasks_blocked()
        session.enqueue(a_conn.send_heartbeat({"t": 1.0}), wake=False)

        async def flush() -> None:
            await session.flush()
            flushed.append(trio.current_time())

        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed
        wrote = trio.current_time()
        session.flush_nowait()
        await trio.testing.wait_all_tasks_blocked()
        assert flushed and flushed[0] - wrote < FLUSH_TIMEOUT / 10
        frame = frames.decode(await peer.receive(), 1 << 20)
        assert frame.type is FrameType.HEARTBEAT
        session.abort("done")


async def test_a_reader_cancelled_on_the_mark_leaves_it(
        autojump_clock: trio.testing.MockClock) -> None:
    io = StreamIO()
    io.wake()
    with trio.CancelScope() as scope:
        scope.cancel()
        await io.wait_changed()  # raises Cancelled at its checkpoint
    assert scope.cancelled_caught
    with trio.move_on_after(1) as waited:
        await io.wait_changed()  # the mark is still there: returns at once
    assert not waited.cancelled_caught


async def test_the_writer_wakeup_cancelled_on_the_mark_leaves_it(
        autojump_clock: trio.testing.MockClock) -> None:
    wakeup = Wakeup()
    wakeup.set()
    with trio.CancelScope() as scope:
        scope.cancel()
        await wakeup.wait()
    assert scope.cancelled_caught
    with trio.move_on_after(1) as waited:
        await wakeup.wait()
    assert not waited.cancelled_caught

