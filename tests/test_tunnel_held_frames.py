"""Held frames: a stream handler that queues its frames without waking the session's
writer task (``InboundStream.respond/send(..., hold=True)``) and writes them itself
before it waits (``flush_nowait``, ``end``), as the node does per request and per
paced token.

Over a real loopback TCP connection (WebSocket both ways, the node side masking):
held frames reach the peer when the handler flushes, ends, or waits for credit, and
the writer task is not woken for them. Each test is bounded by ``fail_after``: a held
frame that never left would hang it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from tooti.backends.http_client import HttpClient
from tooti.protocol.connection import Connection, Limits, Side
from tooti.transport.websocket import WebSocketTransport
from tooti.tunnel import InboundStream, TunnelSession
from tooti.tunnel.session import Wakeup

LIMITS = Limits(max_streams=16)
END = {"finish_reason": "stop"}
Handler = Callable[[InboundStream], Awaitable[None]]


@asynccontextmanager
async def tunnel(handler: Handler) -> AsyncIterator[tuple[TunnelSession, TunnelSession]]:
    """A gateway-side and a node-side session over loopback TCP (node serves
    ``handler``), after HELLO / WELCOME / PROOF."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    node_end = WebSocketTransport(client, "gateway", client=True, max_message=1 << 21)
    gateway_end = WebSocketTransport(server, "node", client=False, max_message=1 << 21)
    node_conn, gateway_conn = Connection(Side.DIALER, LIMITS), Connection(Side.ACCEPTOR, LIMITS)
    await node_end.send(node_conn.send_hello("node-1", "node", "test", {}))
    hello = gateway_conn.receive_message(await gateway_end.receive())
    version = gateway_conn.choose_version(hello.versions)  # type: ignore[union-attr]
    await gateway_end.send(gateway_conn.send_welcome(version, "s", 30.0,
                                                     extra={"challenge": "Y2g="},
                                                     require_proof=True))
    node_conn.receive_message(await node_end.receive())
    await node_end.send(node_conn.send_proof("c2ln"))
    gateway_conn.receive_message(await gateway_end.receive())
    gateway_conn.proof_verified()
    gateway = TunnelSession(gateway_end, gateway_conn, heartbeat_interval=30.0)
    node = TunnelSession(node_end, node_conn, heartbeat_interval=30.0, handler=handler)
    node._wake_writer = CountingWakeup()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run)
        nursery.start_soon(node.run)
        yield gateway, node
        gateway.abort("test over")
        node.abort("test over")


class CountingWakeup(Wakeup):
    """The writer's wake-up, counting :meth:`set` calls."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def set(self) -> None:
        self.count += 1
        super().set()


def count_writer_wakes(session: TunnelSession) -> CountingWakeup:
    """The node session's writer wake-up (installed by :func:`tunnel` before it
    runs), its count reset: the wake-ups from now on."""
    wakeup = session._wake_writer
    assert isinstance(wakeup, CountingWakeup)
    wakeup.count = 0
    return wakeup


async def test_held_frames_leave_with_the_end_and_never_wake_the_writer() -> None:
    async def handler(stream: InboundStream) -> None:
        await stream.read_body(1024)
        await stream.respond(200, {"content-type": "application/json"}, hold=True)
        await stream.send(b'{"a":', hold=True)
        await stream.send(b"1}", hold=True)
        await stream.end(END)

    with trio.fail_after(5):
        async with tunnel(handler) as (gateway, node):
            wakes = count_writer_wakes(node)
            for _ in range(3):
                out = await gateway.open_stream({"endpoint": "x"}, b"{}")
                head = await out.head()
                assert head is not None and head.status == 200
                body = b"".join([chunk async for chunk in out.body()])
                assert body == b'{"a":1}' and out.end_info == END
            assert wakes.count == 0  # the handler wrote its frames itself


async def test_frames_not_held_still_wake_the_writer() -> None:
    async def handler(stream: InboundStream) -> None:
        await stream.respond(200, {})
        await stream.send(b"x")
        await stream.end(END)

    with trio.fail_after(5):
        async with tunnel(handler) as (gateway, node):
            wakes = count_writer_wakes(node)
            out = await gateway.open_stream({"endpoint": "x"}, b"")
            assert b"".join([chunk async for chunk in out.body()]) == b"x"
            assert wakes.count >= 1


async def test_flush_nowait_sends_held_frames_before_the_handler_waits() -> None:
    """A paced stream: each token held, then flushed before the wait for the next."""
    go = [trio.Event() for _ in range(3)]

    async def handler(stream: InboundStream) -> None:
        await stream.respond(200, {"content-type": "text/event-stream"}, hold=True)
        for index in range(3):
            await stream.send(b"t%d" % index, hold=True)
            stream.flush_nowait()
            await go[index].wait()  # set only once the gateway side got the token
        await stream.end(END)

    with trio.fail_after(5):
        async with tunnel(handler) as (gateway, node):
            wakes = count_writer_wakes(node)
            out = await gateway.open_stream({"endpoint": "x"}, b"")
            assert (await out.head()) is not None
            for index in range(3):
                assert await out.next_chunk() == b"t%d" % index
                go[index].set()
            assert await out.next_chunk() is None and out.end_info == END
            assert wakes.count == 0


async def test_held_frames_are_flushed_before_a_wait_for_credit() -> None:
    """More than the peer's window, all held: the handler must flush before it waits
    for the WINDOW that only its flushed frames can earn."""
    size = LIMITS.initial_window * 3

    async def handler(stream: InboundStream) -> None:
        await stream.respond(200, {}, hold=True)
        for _ in range(0, size, 16384):
            await stream.send(b"z" * 16384, hold=True)
        await stream.end(END)

    with trio.fail_after(10):
        async with tunnel(handler) as (gateway, _node):
            out = await gateway.open_stream({"endpoint": "x"}, b"")
            total = 0
            async for chunk in out.body():
                total += len(chunk)
            assert total == size and out.end_info == END


async def test_a_handler_returning_with_held_frames_has_them_written() -> None:
    """Held frames of a handler that ends without END still leave (its END is the
    session's internal error)."""
    async def handler(stream: InboundStream) -> None:
        await stream.respond(200, {}, hold=True)
        await stream.send(b"partial", hold=True)

    with trio.fail_after(5):
        async with tunnel(handler) as (gateway, _node):
            out = await gateway.open_stream({"endpoint": "x"}, b"")
            head = await out.head()
            assert head is not None and head.status == 200
            assert b"".join([chunk async for chunk in out.body()]) == b"partial"
            info: Any = out.end_info
            assert info["error"]["code"] == "internal_error"


async def test_the_lean_client_calls_before_wait_before_it_waits_for_the_body() -> None:
    """``Response.before_wait`` runs before the body's read waits for the socket (and
    not while the answer is already buffered)."""
    release = trio.Event()

    async def server(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab")
        await release.wait()
        await stream.send_all(b"cd")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        client = HttpClient()
        with trio.fail_after(5):
            response = await client.send("GET", f"http://127.0.0.1:{port}/")
            calls: list[int] = []
            response.before_wait = lambda: (calls.append(1), release.set()) and None
            chunks = [chunk async for chunk in response]
            response.close()
        assert b"".join(chunks) == b"abcd"
        assert len(calls) == 1  # "ab" came with the head: one wait, for "cd"
        await client.aclose()
        nursery.cancel_scope.cancel()
