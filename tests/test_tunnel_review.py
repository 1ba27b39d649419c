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

import trio
import trio.testing

from tooti.protocol import frames
from tooti.protocol.frames import FrameType
from tooti.transport.memory import memory_pair
from tooti.tunnel import FLUSH_TIMEOUT, TunnelSession
from tooti.tunnel.session import Wakeup
from tooti.tunnel.streams import StreamIO

from tests.test_tunnel_session import QUIET, handshake


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
