"""Idle tunnels read by one task (:mod:`tooti.tunnel.idle`), over real loopback TCP.

An acceptor session (the gateway side) runs over a plain-TCP
:class:`~tooti.transport.websocket.WebSocketTransport`; the test drives the dialer's end
(a client-side WebSocket transport and a :class:`Connection`) by hand. What is pinned:
an idle session's read loop parks in the run's idle set and its peer's HEARTBEATs are
acknowledged there (the read loop stays parked); anything else - a stream's frames, a
ping, part of a frame, the connection's end, a protocol violation, silence - reaches
the read loop and is handled as before; a session that is idle again parks again.
Nothing sleeps to wait for a condition: the tests wait on frames, on
``session.closed`` or on ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from tests.test_tunnel_session import handshake
from tooti.protocol import frames
from tooti.protocol.budget import ControlLimits
from tooti.protocol.connection import (
    Connection,
    Event,
    HeartbeatReceived,
    ResponseStarted,
    StreamOpened,
)
from tooti.protocol.frames import FLAG_ACK, FrameType
from tooti.protocol.websocket import OP_BINARY, OP_PING, FrameDecoder, Pong, encode_frame
from tooti.transport.websocket import WebSocketTransport
from tooti.tunnel import EventHook, TunnelSession
from tooti.tunnel import session as session_module
from tooti.tunnel.idle import idle_set

MAX = 1 << 20


@dataclass
class Tunnel:
    session: TunnelSession
    peer: WebSocketTransport
    """The dialer's end, driven by the test."""
    peer_conn: Connection
    peer_stream: trio.SocketStream


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


@asynccontextmanager
async def tunnel(*, interval: float = 30.0, control: ControlLimits | None = None,
                 on_event: EventHook | None = None) -> AsyncIterator[Tunnel]:
    client, server = await tcp_pair()
    peer = WebSocketTransport(client, "gateway", client=True, max_message=MAX)
    ours = WebSocketTransport(server, "node", client=False, max_message=MAX)
    peer_conn, conn = await handshake(peer, ours, interval=interval)
    session = TunnelSession(ours, conn, heartbeat_interval=interval, name="node",
                            control=control, on_event=on_event)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.testing.wait_all_tasks_blocked()
        yield Tunnel(session, peer, peer_conn, client)
        session.abort("test over")
    if client.socket.fileno() >= 0:  # not closed by the test
        await peer.aclose()


async def next_frame(peer: WebSocketTransport, ftype: FrameType) -> frames.Frame:
    while True:
        frame = frames.decode(await peer.receive(), MAX)
        if frame.type is ftype:
            return frame


async def test_an_idle_session_parks_and_acknowledges_heartbeats_there() -> None:
    async with tunnel() as t:
        watch = idle_set()
        assert len(watch) == 1  # the read loop is parked, not waiting on its socket
        for beat in range(3):
            sent = t.session._last_input
            await t.peer.send(t.peer_conn.send_heartbeat({"t": 100.0 + beat}))
            ack = await next_frame(t.peer, FrameType.HEARTBEAT)
            while not ack.flags & FLAG_ACK:  # the acceptor's own rides along at times
                ack = await next_frame(t.peer, FrameType.HEARTBEAT)
            assert frames.decode_json(ack, MAX) == {"t": 100.0 + beat}
            assert t.session._last_input >= sent
            assert len(watch) == 1  # handled in the idle set: still parked
        assert not t.session.closed.is_set()


async def test_heartbeats_arriving_together_are_all_acknowledged() -> None:
    async with tunnel() as t:
        await t.peer.send_many([t.peer_conn.send_heartbeat({"t": float(i)}) for i in range(5)])
        seen: list[float] = []
        while len(seen) < 5:
            frame = await next_frame(t.peer, FrameType.HEARTBEAT)
            if frame.flags & FLAG_ACK:
                seen.append(frames.decode_json(frame, MAX)["t"])
        assert seen == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert len(idle_set()) == 1


@pytest.mark.parametrize("idle_after", [0.0, 3600.0])
async def test_a_stream_reaches_the_read_loop_and_the_session_parks_again(
        monkeypatch: pytest.MonkeyPatch, idle_after: float) -> None:
    """After a stream the read loop parks again at its next input, once no stream was
    opened for IDLE_AFTER seconds (a tunnel carrying requests back to back keeps its
    own wait)."""
    monkeypatch.setattr(session_module, "IDLE_AFTER", idle_after)
    async with tunnel() as t:
        watch = idle_set()
        for round_ in range(2):
            opened = trio.Event()
            result: list[object] = []

            async def request(opened: trio.Event, result: list[object]) -> None:
                out = await t.session.open_stream({"model": "m"}, b"hello")
                opened.set()
                head = await out.head()
                body = b"".join([chunk async for chunk in out.body()])
                result.extend([head, body, out.end_info])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(request, opened, result)
                event = t.peer_conn.receive_message(await t.peer.receive())
                while isinstance(event, HeartbeatReceived):  # the acceptor's own
                    event = t.peer_conn.receive_message(await t.peer.receive())
                assert isinstance(event, StreamOpened) and event.body == b"hello"
                sid = event.stream_id
                await opened.wait()
                await t.peer.send_many([
                    t.peer_conn.send_response(sid, 200, {}),
                    t.peer_conn.send_data(sid, b"answer", False),
                ])
                await trio.testing.wait_all_tasks_blocked()
                await t.peer.send(t.peer_conn.send_end(sid, {"finish_reason": "stop"}))
            head, body, end = result
            assert isinstance(head, ResponseStarted) and head.status == 200
            assert body == b"answer" and end == {"finish_reason": "stop"}, round_
            await t.peer.send(t.peer_conn.send_heartbeat({"t": 1.0}))
            ack = await next_frame(t.peer, FrameType.HEARTBEAT)
            while not ack.flags & FLAG_ACK:
                ack = await next_frame(t.peer, FrameType.HEARTBEAT)
            await trio.testing.wait_all_tasks_blocked()
            assert len(watch) == (1 if idle_after == 0 else 0)


async def test_a_heartbeat_in_pieces_and_a_ping_are_answered() -> None:
    async with tunnel() as t:
        frame = encode_frame(OP_BINARY, t.peer_conn.send_heartbeat({"t": 7.0}), mask=True)
        await t.peer_stream.send_all(frame[:5])
        await trio.testing.wait_all_tasks_blocked()
        await t.peer_stream.send_all(frame[5:])
        ack = await next_frame(t.peer, FrameType.HEARTBEAT)
        while not ack.flags & FLAG_ACK:
            ack = await next_frame(t.peer, FrameType.HEARTBEAT)
        assert frames.decode_json(ack, MAX) == {"t": 7.0}
        await trio.testing.wait_all_tasks_blocked()
        assert len(idle_set()) == 1  # the read loop took it (in pieces) and parked again
        # A ping: answered by the transport's read, through the read loop.
        await t.peer_stream.send_all(encode_frame(OP_PING, b"hi", mask=True))
        decoder = FrameDecoder(max_message=MAX, client=True)
        with trio.fail_after(5):
            event = None
            while event is None:
                decoder.feed(await t.peer_stream.receive_some(4096))
                event = decoder.next_event()
        assert isinstance(event, Pong) and event.payload == b"hi"
        # The read loop took the ping inside its transport's read; it parks again after
        # the next message it gets.
        await t.peer.send(t.peer_conn.send_heartbeat({"t": 8.0}))
        ack = await next_frame(t.peer, FrameType.HEARTBEAT)
        while not ack.flags & FLAG_ACK:
            ack = await next_frame(t.peer, FrameType.HEARTBEAT)
        assert frames.decode_json(ack, MAX) == {"t": 8.0}
        await trio.testing.wait_all_tasks_blocked()
        assert len(idle_set()) == 1 and not t.session.closed.is_set()


async def test_the_peer_closing_ends_a_parked_session() -> None:
    async with tunnel() as t:
        assert len(idle_set()) == 1
        with trio.fail_after(5):
            await t.peer_stream.aclose()
            await t.session.closed.wait()
        assert t.session.close_reason.startswith("websocket closed")
        assert len(idle_set()) == 0


async def test_a_silent_peer_is_declared_dead_while_parked(
        autojump_clock: trio.testing.MockClock) -> None:
    async with tunnel(interval=1.0) as t:
        assert len(idle_set()) == 1
        start = trio.current_time()
        await t.session.closed.wait()
        assert t.session.close_reason == "heartbeat timeout"
        assert 3.0 <= trio.current_time() - start <= 3.2
        assert len(idle_set()) == 0


async def test_a_heartbeat_flood_seen_in_the_idle_set_closes_with_goaway() -> None:
    limits = ControlLimits(heartbeats=2)
    async with tunnel(control=limits) as t:
        await t.peer.send_many([t.peer_conn.send_heartbeat({"t": float(i)})
                                for i in range(4)])
        goaway = await next_frame(t.peer, FrameType.GOAWAY)
        assert frames.decode_json(goaway, MAX)["code"] == "heartbeat_flood"
        with trio.fail_after(5):
            await t.session.closed.wait()
        assert t.session.violation.startswith("heartbeat_flood")
        assert len(idle_set()) == 0



async def test_a_violation_found_in_the_idle_set_stops_reading_the_peer() -> None:
    """The session's owner rejects a HEARTBEAT's values (``violate``) while the idle set
    handles it: the heartbeats behind it in the same read are not processed."""
    seen: list[Event] = []
    holder: list[TunnelSession] = []

    def on_event(event: Event) -> None:
        seen.append(event)
        if isinstance(event, HeartbeatReceived):
            holder[0].violate("bad_field", "heartbeat figures out of range")

    async with tunnel(on_event=on_event) as t:
        holder.append(t.session)
        await t.peer.send_many([t.peer_conn.send_heartbeat({"in_flight": -1})
                                for _ in range(3)])
        goaway = await next_frame(t.peer, FrameType.GOAWAY)
        assert frames.decode_json(goaway, MAX)["code"] == "bad_field"
        with trio.fail_after(5):
            await t.session.closed.wait()
    assert len([e for e in seen if isinstance(e, HeartbeatReceived)]) == 1
    assert t.session.violation.startswith("bad_field")


async def test_an_owner_exception_in_the_idle_set_ends_the_session_as_in_the_read_loop(
) -> None:
    """An exception other than a protocol error from the session's owner (a bug while
    handling a HEARTBEAT) ends the session, as it does when the read loop dispatches
    the frame itself; the idle set does not swallow it and park the tunnel again."""

    def on_event(event: Event) -> None:
        if isinstance(event, HeartbeatReceived):
            raise TypeError("a bug in the owner")

    with pytest.raises(BaseExceptionGroup) as caught:
        async with tunnel(on_event=on_event) as t:
            assert len(idle_set()) == 1
            await t.peer.send(t.peer_conn.send_heartbeat({"t": 1.0}))
            with trio.fail_after(5):
                await t.session.closed.wait()
    assert caught.value.subgroup(TypeError) is not None


async def test_a_failing_stats_source_ends_the_session_instead_of_its_silence_watch(
        autojump_clock: trio.testing.MockClock) -> None:
    """A stats source that raises when the session's own HEARTBEAT is due ends the
    session; the shared timer must not drop the entry and leave a tunnel with neither
    heartbeats nor a silence watch (a half-open connection would never be noticed)."""
    calls: list[int] = []

    def stats() -> dict[str, object]:
        calls.append(1)
        raise ValueError("stats source broke")

    client, server = await tcp_pair()
    peer = WebSocketTransport(client, "gateway", client=True, max_message=MAX)
    ours = WebSocketTransport(server, "node", client=False, max_message=MAX)
    _, conn = await handshake(peer, ours, interval=1.0)
    session = TunnelSession(ours, conn, heartbeat_interval=1.0, name="node", stats=stats)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        with trio.fail_after(30):
            await session.closed.wait()
    assert calls
    assert session.close_reason == "heartbeat failed"
    await peer.aclose()
