"""TunnelSession over memory_pair() with real trio tasks.

An acceptor session (the gateway side) opens streams; a dialer session (the
node side) serves them with :class:`Service`. Rogue and silent peers are raw
transport ends driven by the test. Nothing here sleeps to wait for a
condition: tests wait on events, on ``session.closed`` or on
``trio.testing.wait_all_tasks_blocked``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from tooti.protocol import frames
from tooti.protocol.connection import (
    Connection,
    Event,
    FlowControlError,
    GoAwayReceived,
    HeartbeatAcked,
    HeartbeatReceived,
    HelloReceived,
    Limits,
    ModelsReceived,
    ProofReceived,
    RoutesReceived,
    Side,
    WelcomeReceived,
)
from tooti.protocol.frames import FLAG_ACK, FrameType
from tooti.transport import Transport, TransportClosed
from tooti.transport.memory import MemoryTransport, memory_pair
from tooti.tunnel import (
    FLUSH_TIMEOUT,
    InboundStream,
    OutboundStream,
    TunnelLost,
    TunnelSession,
)

WINDOW = 4096
LIMITS = Limits(max_frame_bytes=4096, max_streams=8, initial_window=WINDOW)
QUIET = 30.0
"""Heartbeat interval for tests that must see no heartbeats."""
FLOOD_TOTAL = 16 * WINDOW
END_INFO: dict[str, Any] = {
    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    "finish_reason": "stop",
}
REJECT_INFO: dict[str, Any] = {
    "error": {"status": 400, "code": "bad_body", "message": "no"}, "retryable": False,
}


# ------------------------------------------------------------------ harness


class Wire:
    """A transport wrapper that records the frame types it sends and can break."""

    def __init__(self, inner: MemoryTransport) -> None:
        self.inner = inner
        self.remote = inner.remote
        self.sent: set[FrameType] = set()
        self.broken = False
        self.gate = trio.Event()
        self.gate.set()

    async def send(self, message: bytes) -> None:
        await self.gate.wait()  # a test closes the gate to stall the writer
        if self.broken:
            raise TransportClosed("broken by the test")
        self.sent.add(FrameType(message[0]))
        await self.inner.send(message)

    async def send_many(self, messages: list[bytes]) -> None:
        for message in messages:
            await self.send(message)

    def write_nowait(self, messages: list[bytes]) -> bool:
        return False  # everything goes through send(), where the gate is

    pending = False

    async def receive(self, before_wait: Callable[[], None] | None = None) -> bytes:
        return await self.inner.receive(before_wait)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        await self.inner.aclose(code, reason)


class EventLog:
    """An ``on_event`` hook that keeps every event and lets a test wait for some."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = trio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def count(self, kind: type) -> int:
        return sum(1 for event in self.events if isinstance(event, kind))

    async def wait_for(self, kind: type, count: int = 1) -> None:
        while self.count(kind) < count:
            await self._changed.wait()


class Service:
    """The dialer's stream handler; ``meta["mode"]`` picks the behaviour.

    Per stream name it records when the handler started, was stopped from
    outside (``cancelled``: trio.Cancelled from the stream's scope, or
    TunnelLost from a send blocked on credit when the stream was cancelled),
    finished, and how many response bytes it has sent.
    """

    def __init__(self) -> None:
        self.started: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.cancelled: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.finished: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.sent: defaultdict[str, int] = defaultdict(int)
        self.release = trio.Event()
        self._modes: dict[str, Callable[[InboundStream, str], Awaitable[None]]] = {
            "echo": self._echo, "flood": self._flood, "hang": self._hang,
            "silent": self._silent, "reject": self._reject, "forget": self._forget,
            "crash": self._crash, "crash_later": self._crash_later,
        }

    async def __call__(self, stream: InboundStream) -> None:
        mode = str(stream.meta.get("mode", "silent"))
        name = str(stream.meta.get("name", mode))
        self.started[name].set()
        try:
            await self._modes[mode](stream, name)
        except (trio.Cancelled, TunnelLost):
            self.cancelled[name].set()
            raise
        finally:
            self.finished[name].set()

    async def _echo(self, stream: InboundStream, name: str) -> None:
        body = await stream.read_body(1 << 20)
        await stream.respond(200, {"content-type": "application/octet-stream"})
        for i in range(0, len(body), 1000):
            await stream.send(body[i : i + 1000])
            self.sent[name] += len(body[i : i + 1000])
        await stream.end(END_INFO)

    async def _flood(self, stream: InboundStream, name: str) -> None:
        await stream.respond(200, {"content-type": "text/event-stream"})
        for _ in range(FLOOD_TOTAL // 1024):
            await stream.send(b"f" * 1024)
            self.sent[name] += 1024
        await stream.end(END_INFO)

    async def _hang(self, stream: InboundStream, name: str) -> None:
        await stream.respond(200, {})
        await trio.sleep_forever()

    async def _silent(self, stream: InboundStream, name: str) -> None:
        await trio.sleep_forever()

    async def _reject(self, stream: InboundStream, name: str) -> None:
        await stream.end(REJECT_INFO)

    async def _forget(self, stream: InboundStream, name: str) -> None:
        return

    async def _crash(self, stream: InboundStream, name: str) -> None:
        raise RuntimeError("handler bug")

    async def _crash_later(self, stream: InboundStream, name: str) -> None:
        await self.release.wait()
        raise RuntimeError("handler bug after the tunnel broke")


async def handshake(
    dialer_end: Transport, acceptor_end: Transport, *, acceptor_limits: Limits = LIMITS,
    interval: float = QUIET,
) -> tuple[Connection, Connection]:
    """HELLO / WELCOME over the transports, as a node and a gateway do it."""
    dialer = Connection(Side.DIALER, LIMITS)
    acceptor = Connection(Side.ACCEPTOR, acceptor_limits)
    await dialer_end.send(dialer.send_hello("node-1", "node", "tooti/test", {"zone": "a"}))
    hello = acceptor.receive_message(await acceptor_end.receive())
    assert isinstance(hello, HelloReceived)
    version = acceptor.choose_version(hello.versions)
    await acceptor_end.send(acceptor.send_welcome(
        version, "session-1", interval, extra={"challenge": "Y2g="}, require_proof=True))
    welcome = dialer.receive_message(await dialer_end.receive())
    assert isinstance(welcome, WelcomeReceived) and welcome.heartbeat_interval == interval
    # PROOF (its signature is checked by the gateway, not by the state machine).
    await dialer_end.send(dialer.send_proof("c2ln"))
    assert acceptor.receive_message(await acceptor_end.receive()) == ProofReceived("c2ln")
    acceptor.proof_verified()
    return dialer, acceptor


@dataclass
class Pair:
    acceptor: TunnelSession
    dialer: TunnelSession
    a_wire: Wire
    d_wire: Wire
    a_events: EventLog
    d_events: EventLog


def node_stats() -> dict[str, Any]:
    return {"in_flight": 0, "queued": 0, "healthy": True}


@asynccontextmanager
async def running_pair(
    service: Service | None, *, interval: float = QUIET,
) -> AsyncIterator[Pair]:
    """Two sessions joined by a memory pair, each running in a task."""
    d_end, a_end = memory_pair()
    d_wire, a_wire = Wire(d_end), Wire(a_end)
    d_conn, a_conn = await handshake(d_wire, a_wire, interval=interval)
    a_events, d_events = EventLog(), EventLog()
    acceptor = TunnelSession(a_wire, a_conn, heartbeat_interval=interval, on_event=a_events,
                             name="gateway")
    dialer = TunnelSession(d_wire, d_conn, heartbeat_interval=interval, on_event=d_events,
                           handler=service, stats=node_stats, name="node")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(acceptor.run)
        nursery.start_soon(dialer.run)
        yield Pair(acceptor, dialer, a_wire, d_wire, a_events, d_events)
        acceptor.abort("test over")
        dialer.abort("test over")


async def exchange(
    session: TunnelSession, body: bytes, name: str = "echo",
) -> tuple[int, bytes, dict[str, Any] | None]:
    """One echo stream: (status, response body, END payload)."""
    out = await session.open_stream({"mode": "echo", "name": name}, body)
    head = await out.head()
    assert head is not None
    data = b"".join([chunk async for chunk in out.body()])
    return head.status, data, out.end_info


def buffered(out: OutboundStream) -> int:
    """Response bytes received on ``out`` but not yet read by its consumer."""
    return sum(len(chunk) for chunk in out._io.chunks)


async def next_frame(transport: Transport, ftype: FrameType) -> frames.Frame:
    """Receive frames until one of ``ftype`` arrives."""
    while True:
        frame = frames.decode(await transport.receive(), 1 << 20)
        if frame.type is ftype:
            return frame


# ------------------------------------------------------------------ end to end


async def test_every_frame_type_end_to_end() -> None:
    service = Service()
    with trio.fail_after(10):
        async with running_pair(service, interval=0.1) as pair:
            # MODELS
            await pair.dialer.send_frame(pair.dialer.conn.send_models([{"id": "m"}]))
            await pair.a_events.wait_for(ModelsReceived)
            assert [e for e in pair.a_events.events if isinstance(e, ModelsReceived)] == [
                ModelsReceived([{"id": "m"}])
            ]
            # ROUTES (a relay's advertisement of the nodes behind it; relays only)
            pair.acceptor.conn.accepts_routes = True
            await pair.dialer.send_frame(pair.dialer.conn.send_routes([{"id": "n1"}], ["n0"]))
            await pair.a_events.wait_for(RoutesReceived)
            assert RoutesReceived([{"id": "n1"}], ["n0"], False) in pair.a_events.events
            # HEARTBEAT both ways and its ACK; four beats outlive the 3-interval deadline.
            await pair.a_events.wait_for(HeartbeatReceived, 4)
            await pair.d_events.wait_for(HeartbeatAcked)
            await pair.a_events.wait_for(HeartbeatAcked)
            assert pair.acceptor.rtt is not None and pair.dialer.rtt is not None
            beat = next(e for e in pair.a_events.events if isinstance(e, HeartbeatReceived))
            assert beat.stats["healthy"] is True and isinstance(beat.stats["t"], float)
            # OPEN, request DATA with FIN, WINDOW, RESPONSE, response DATA, END: the
            # body is five windows long in both directions.
            body = bytes(range(256)) * 80
            assert await exchange(pair.acceptor, body) == (200, body, END_INFO)
            # CANCEL
            out = await pair.acceptor.open_stream({"mode": "hang", "name": "c"}, b"")
            assert await out.head() is not None
            await out.cancel("client gone")
            await service.cancelled["c"].wait()
            # GOAWAY
            await pair.acceptor.goaway("draining", "bye")
            await pair.d_events.wait_for(GoAwayReceived)
            assert GoAwayReceived("draining", "bye") in pair.d_events.events
            assert not pair.acceptor.conn.can_open_stream()
            assert not pair.dialer.conn.can_open_stream()
            with pytest.raises(FlowControlError):
                await pair.acceptor.open_stream({"mode": "echo"}, b"")
            assert pair.a_wire.sent | pair.d_wire.sent == set(FrameType)
            assert not pair.acceptor.closed.is_set() and not pair.dialer.closed.is_set()
    assert pair.acceptor.close_reason == pair.dialer.close_reason == "test over"


async def test_many_concurrent_streams() -> None:
    with trio.fail_after(10):
        async with running_pair(Service()) as pair:
            results: dict[int, tuple[int, bytes, dict[str, Any] | None]] = {}

            async def one(i: int) -> None:
                results[i] = await exchange(pair.acceptor, bytes([i]) * (1000 * i), f"s{i}")

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert results == {i: (200, bytes([i]) * (1000 * i), END_INFO) for i in range(8)}
            assert pair.acceptor.conn.active_streams == pair.dialer.conn.active_streams == 0


# ------------------------------------------------------------------ flow control


async def test_slow_reader_blocks_only_its_own_stream() -> None:
    service = Service()
    with trio.fail_after(10):
        async with running_pair(service) as pair:
            out_a = await pair.acceptor.open_stream({"mode": "flood", "name": "A"}, b"")
            assert await out_a.head() is not None
            await trio.testing.wait_all_tasks_blocked()
            # Nobody reads A: its responder filled the window and waits for credit.
            assert service.sent["A"] == WINDOW
            assert pair.dialer.conn.send_credit(out_a.id) == 0
            assert buffered(out_a) == WINDOW

            # B, five windows each way, completes on the same tunnel meanwhile.
            body = bytes(range(256)) * 80
            assert await exchange(pair.acceptor, body, name="B") == (200, body, END_INFO)
            await trio.testing.wait_all_tasks_blocked()
            assert service.sent["A"] == WINDOW and buffered(out_a) == WINDOW
            assert not service.finished["A"].is_set()

            # Reading A lets it finish; the responder is never more than a window ahead.
            got = 0
            async for chunk in out_a.body():
                got += len(chunk)
                assert buffered(out_a) <= WINDOW
                assert service.sent["A"] - got <= WINDOW
            assert got == FLOOD_TOTAL and out_a.end_info == END_INFO


async def test_request_body_waits_for_credit_from_the_handler() -> None:
    """A body larger than the window is sent as the handler reads it."""
    with trio.fail_after(10):
        async with running_pair(Service()) as pair:
            body = b"q" * (10 * WINDOW + 17)
            assert await exchange(pair.acceptor, body) == (200, body, END_INFO)


async def test_responder_ending_early_returns_the_stream_with_its_end() -> None:
    """END while the opener still waits for credit for its body is not a tunnel loss."""
    with trio.fail_after(10):
        async with running_pair(Service()) as pair:
            out = await pair.acceptor.open_stream({"mode": "reject"}, b"x" * (3 * WINDOW))
            assert await out.head() is None
            assert out.end_info == REJECT_INFO
            assert not pair.acceptor.conn.has_stream(out.id)
            assert await exchange(pair.acceptor, b"ok") == (200, b"ok", END_INFO)


async def test_open_crossing_our_goaway_is_refused_retryably_at_once() -> None:
    """A stream opened before the peer saw our GOAWAY gets a retryable 503 END, not silence."""
    with trio.fail_after(10):
        async with running_pair(Service()) as pair:
            pair.dialer.conn.send_goaway("draining", "")  # state only: not yet on the wire
            out = await pair.acceptor.open_stream({"mode": "echo"}, b"late")
            assert await out.head() is None
            assert out.end_info is not None
            assert out.end_info["retryable"] is True
            assert out.end_info["error"]["code"] == "draining"
            assert out.end_info["error"]["status"] == 503


# ------------------------------------------------------------------ cancellation and loss


@pytest.mark.parametrize("mode", ["hang", "flood"])
async def test_cancel_from_the_opener_cancels_the_handler(mode: str) -> None:
    """Idle after its head (hang) or blocked on credit (flood), the handler is cancelled."""
    service = Service()
    with trio.fail_after(10):
        async with running_pair(service) as pair:
            out = await pair.acceptor.open_stream({"mode": mode, "name": "x"}, b"")
            assert await out.head() is not None
            await trio.testing.wait_all_tasks_blocked()
            assert not service.finished["x"].is_set()
            await out.cancel("client gone")
            await service.cancelled["x"].wait()
            assert service.finished["x"].is_set()
            assert not pair.dialer.conn.has_stream(out.id)
            assert not pair.acceptor.conn.has_stream(out.id)
            await out.cancel("again")  # idempotent
            assert await exchange(pair.acceptor, b"after") == (200, b"after", END_INFO)


async def test_a_handler_answering_after_a_cancel_gets_tunnel_lost() -> None:
    """A handler that reaches respond() after the opener's CANCEL (no checkpoint in
    between, as after a shielded wait) sees TunnelLost, not a protocol-state error."""
    outcome: list[BaseException | None] = []
    reached = trio.Event()
    go = trio.Event()

    async def handler(stream: InboundStream) -> None:
        with trio.CancelScope(shield=True):
            reached.set()
            await go.wait()
        try:
            await stream.respond(200, {})
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    with trio.fail_after(10):
        async with running_pair(handler) as pair:  # type: ignore[arg-type]
            out = await pair.acceptor.open_stream({"mode": "late"}, b"")
            await reached.wait()
            await out.cancel("client gone")
            await trio.testing.wait_all_tasks_blocked()  # the CANCEL is written and read
            assert not pair.dialer.conn.has_stream(out.id)
            go.set()
            await trio.testing.wait_all_tasks_blocked()
    assert len(outcome) == 1 and isinstance(outcome[0], TunnelLost)


async def test_tunnel_loss_fails_outbound_streams_and_cancels_handlers() -> None:
    service = Service()
    lost: list[TunnelLost] = []
    with trio.fail_after(10):
        async with running_pair(service) as pair:
            with_head = await pair.acceptor.open_stream({"mode": "hang", "name": "a"}, b"")
            assert await with_head.head() is not None
            no_head = await pair.acceptor.open_stream({"mode": "silent", "name": "b"}, b"")
            await service.started["b"].wait()

            async def open_big() -> None:
                try:
                    await pair.acceptor.open_stream({"mode": "silent", "name": "c"},
                                                    b"x" * (3 * WINDOW))
                except TunnelLost as exc:
                    lost.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_big)
                await service.started["c"].wait()
                await trio.testing.wait_all_tasks_blocked()  # open_big waits for credit
                await pair.d_wire.inner.aclose()  # the link drops
            await pair.acceptor.closed.wait()
            await pair.dialer.closed.wait()

            assert len(lost) == 1
            with pytest.raises(TunnelLost):
                await no_head.head()
            with pytest.raises(TunnelLost):
                async for _ in with_head.body():
                    pass
            with pytest.raises(TunnelLost):
                await pair.acceptor.open_stream({"mode": "echo"}, b"")
            for name in "abc":
                assert service.cancelled[name].is_set()
    assert pair.acceptor.close_reason == "memory transport closed"


async def test_abort_fails_streams_with_its_reason() -> None:
    service = Service()
    with trio.fail_after(10):
        async with running_pair(service) as pair:
            out = await pair.acceptor.open_stream({"mode": "silent", "name": "a"}, b"")
            await service.started["a"].wait()
            pair.acceptor.abort("operator said so")
            with pytest.raises(TunnelLost, match="operator said so"):
                await out.head()
            await pair.dialer.closed.wait()
            await service.cancelled["a"].wait()
    assert pair.a_wire.inner.close_code == 1001


@pytest.mark.parametrize(("mode", "code", "status"), [
    ("forget", "internal_error", 500),
    ("crash", "internal_error", 500),
    (None, "not_serving", 503),
])
async def test_streams_always_end(mode: str | None, code: str, status: int) -> None:
    """A handler that returns without END or raises, or no handler at all, still ENDs."""
    with trio.fail_after(10):
        async with running_pair(Service() if mode else None) as pair:
            out = await pair.acceptor.open_stream({"mode": mode or "echo"}, b"{}")
            assert await out.head() is None
            assert out.end_info is not None
            assert out.end_info["error"]["code"] == code
            assert out.end_info["error"]["status"] == status
            assert pair.dialer.conn.active_streams == 0


async def test_handler_failing_after_the_transport_broke_does_not_crash_run() -> None:
    service = Service()
    with trio.fail_after(10):
        async with running_pair(service) as pair:
            await pair.acceptor.open_stream({"mode": "crash_later"}, b"")
            await service.started["crash_later"].wait()
            pair.d_wire.broken = True
            service.release.set()
            await pair.dialer.closed.wait()
            await pair.acceptor.closed.wait()
    assert pair.dialer.close_reason == "transport closed"


# ------------------------------------------------------------------ rogue and silent peers

ROGUE_LIMITS = Limits(max_frame_bytes=4096, max_streams=2, initial_window=WINDOW)


def rogue_open(sid: int, body: bytes = b"", fin: bool = True) -> bytes:
    return frames.encode_open(sid, {"mode": "silent", "name": f"rogue-{sid}"}, body, fin)


ROGUE_CASES = [
    pytest.param([b"\x07\x00\x00"], "frame_truncated", id="truncated"),
    pytest.param([b"\xff" + b"a text message"], "unknown_frame_type", id="garbage"),
    pytest.param([frames.HEADER.pack(FrameType.DATA, 0x80, 1) + b"x"], "unknown_flags",
                 id="unknown-flags"),
    pytest.param([frames.encode(FrameType.MODELS, 0, b" " * 5000)], "frame_too_large",
                 id="oversized"),
    pytest.param([frames.encode(FrameType.DATA, 1, b"x")], "bad_stream_id",
                 id="never-opened"),
    pytest.param([frames.encode_window(2, 100)], "bad_stream_id", id="never-opened-own-id"),
    pytest.param([rogue_open(2)], "bad_stream_id", id="wrong-parity"),
    pytest.param([rogue_open(1), rogue_open(3), rogue_open(5)], "too_many_streams",
                 id="too-many-streams"),
    pytest.param([rogue_open(1, b"x" * 4000, fin=False),
                  frames.encode(FrameType.DATA, 1, b"y" * 200)], "flow_control",
                 id="data-beyond-credit"),
    pytest.param([frames.encode(FrameType.HEARTBEAT, 0, b"[" * 3000)], "bad_json",
                 id="deeply-nested-json"),
    pytest.param([frames.encode(FrameType.HEARTBEAT, 0, b'{"t":1' + b"0" * 400 + b"}",
                                FLAG_ACK)], "bad_field", id="huge-number"),
    pytest.param([frames.encode_json(FrameType.HELLO, 0, {})], "unexpected_frame",
                 id="second-hello"),
]


@pytest.mark.parametrize(("messages", "code"), ROGUE_CASES)
async def test_rogue_peer_gets_goaway_and_a_clean_close(messages: list[bytes],
                                                        code: str) -> None:
    service = Service()
    rogue, a_end = memory_pair()
    _, a_conn = await handshake(rogue, a_end, acceptor_limits=ROGUE_LIMITS)
    session = TunnelSession(a_end, a_conn, heartbeat_interval=QUIET, handler=service,
                            name="rogue")
    with trio.fail_after(10):
        async with running_pair(Service()) as healthy, trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            assert await exchange(healthy.acceptor, b"before") == (200, b"before", END_INFO)
            for message in messages:
                await rogue.send(message)
            goaway = await next_frame(rogue, FrameType.GOAWAY)
            assert frames.decode_json(goaway, 1 << 16)["code"] == code
            with pytest.raises(TransportClosed):
                await rogue.receive()
            await session.closed.wait()
            # The rogue's handlers were cancelled; the healthy tunnel never noticed.
            for name in service.started:
                await service.cancelled[name].wait()
            assert await exchange(healthy.acceptor, b"after") == (200, b"after", END_INFO)
            assert not healthy.acceptor.closed.is_set()
    assert session.close_reason == f"protocol error: {code}"
    assert (a_end.close_code, a_end.close_reason) == (1002, code)
    if code == "too_many_streams":
        assert set(service.started) == {"rogue-1", "rogue-3"}


async def test_flush_returns_once_written_while_the_writer_takes_new_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A flush waiting while the writer is busy returns when the queue is written, even
    if the writer took another batch meanwhile (it used to wait out FLUSH_TIMEOUT, which
    held every drain up by a second)."""
    async with running_pair(Service()) as pair:
        node = pair.dialer
        pair.d_wire.gate = trio.Event()  # the writer stalls on its next write

        async def heartbeat() -> None:
            await node.send_control(lambda conn: conn.send_heartbeat({"t": 0.0}))

        await heartbeat()
        await trio.testing.wait_all_tasks_blocked()  # the writer holds the first batch
        await heartbeat()  # queued behind it: the writer's next batch
        flushed: list[float] = []

        async def flush() -> None:
            await node.flush()
            flushed.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()  # the flush is waiting
            assert not flushed  # nor has it timed out
            opened = trio.current_time()
            pair.d_wire.gate.set()
        assert flushed and flushed[0] - opened < FLUSH_TIMEOUT / 10


async def test_heartbeat_with_an_unusable_timestamp_is_harmless() -> None:
    peer, a_end = memory_pair()
    _, a_conn = await handshake(peer, a_end)
    session = TunnelSession(a_end, a_conn, heartbeat_interval=QUIET)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            huge = b'{"t":1' + b"0" * 400 + b"}"
            await peer.send(frames.encode(FrameType.HEARTBEAT, 0, huge))  # not echoed
            await peer.send(frames.encode_json(FrameType.HEARTBEAT, 0, {"t": 2.5}))
            ack = await next_frame(peer, FrameType.HEARTBEAT)
            while ack.flags != FLAG_ACK:  # the acceptor's own heartbeat rides along
                ack = await next_frame(peer, FrameType.HEARTBEAT)
            assert frames.decode_json(ack, 1 << 16) == {"t": 2.5}  # the first ack
            session.abort("done")
    assert session.close_reason == "done"


@pytest.mark.parametrize("side", [Side.ACCEPTOR, Side.DIALER])
async def test_silent_peer_is_declared_dead(side: Side) -> None:
    """A peer that goes quiet after the handshake is gone after three intervals."""
    interval = 0.05
    d_end, a_end = memory_pair()
    d_conn, a_conn = await handshake(d_end, a_end, interval=interval)
    if side is Side.ACCEPTOR:
        ours, silent, conn = a_end, d_end, a_conn
    else:
        ours, silent, conn = d_end, a_end, d_conn
    session = TunnelSession(ours, conn, heartbeat_interval=interval, handler=Service())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            nursery.start_soon(session.run)
            out = await session.open_stream({"mode": "echo"}, b"")
            await session.closed.wait()
            assert trio.current_time() - started >= 3 * interval
    assert session.close_reason == "heartbeat timeout"
    assert ours.close_code == 1001
    with pytest.raises(TunnelLost, match="heartbeat timeout"):
        await out.head()
    # The silent peer saw our OPEN and heartbeats, then the close.
    seen: list[FrameType] = []
    with pytest.raises(TransportClosed):
        while True:
            seen.append(frames.decode(await silent.receive(), 1 << 20).type)
    assert seen[0] is FrameType.OPEN and FrameType.HEARTBEAT in seen

