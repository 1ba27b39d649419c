"""A node's SSE events as the client and billing see them, however the node's bytes
are cut into DATA frames (the tunnel splits DATA wherever flow-control credit runs
out, so an honest node can split anywhere) and whichever line ends it writes.

The gateway counted events by the ``\\n\\n`` inside each DATA frame: an event whose
blank line was split across two frames was not counted, nor was any event of a
``\\r\\n`` stream, so a node that reported no usage was billed for too few tokens.
Now it reads the stream with the shared SSE decoder: each event is counted once and
goes out whole, with ``\\n`` line ends, and ``[DONE]`` still waits for settle."""

from __future__ import annotations

from typing import Any

import httpx
import trio
import trio.testing

from tests.hostile.peers import HostilePeer, hostile_peer
from tooti.billing.base import RequestContext, Usage
from tooti.gateway.app import Gateway
from tooti.protocol.connection import HeartbeatReceived, StreamOpened
from tooti.settings import GatewaySettings, TunnelSettings

MODEL = "splitter"


def token(text: str, eol: bytes = b"\n") -> bytes:
    """One content event of a chat stream, with line end ``eol``."""
    return (b'data: {"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
            % text.encode() + eol + eol)


class Spy:
    """A billing plugin that notes the usage settled and what the client had then."""

    def __init__(self, received: bytearray) -> None:
        self.received = received
        self.at_settle: bytes | None = None
        self.usage: Usage | None = None

    async def run(self) -> None:
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        return None

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        await trio.testing.wait_all_tasks_blocked()  # whatever was sent has arrived
        self.at_settle = bytes(self.received)
        self.usage = usage

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        return None

    async def close(self) -> None:
        return None


async def answer(peer: HostilePeer, chunks: list[bytes], end: dict[str, Any]) -> None:
    """Serve every stream with ``chunks`` as separate DATA frames, then END ``end``."""
    conn = peer.conn
    while True:
        event = conn.receive_message(await peer.transport.receive())
        if isinstance(event, StreamOpened):
            sid = event.stream_id
            await peer.send(conn.send_response(sid, 200, {"content-type": "text/event-stream"}))
            for chunk in chunks:
                await peer.send(conn.send_data(sid, chunk))
            await peer.send(conn.send_end(sid, end))
        elif isinstance(event, HeartbeatReceived):
            await peer.send(conn.send_heartbeat({"healthy": True}))


async def relayed(nursery: trio.Nursery, chunks: list[bytes],
                  end: dict[str, Any] | None = None) -> tuple[Spy, bytes]:
    """The billing spy after one streamed request the node answers with ``chunks`` (and
    END ``end``, no usage by default), and all the client got."""
    received = bytearray()
    spy = Spy(received)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10),
                      TunnelSettings(heartbeat_interval=0.5), billing=[spy])
    urls = await nursery.start(gateway.serve)
    tunnel_url = urls[0].replace("http://", "ws://") + "/tooti/v1/tunnel"
    registry = gateway.registry
    async with hostile_peer(tunnel_url) as peer, trio.open_nursery() as serving:
        await peer.models([{"id": MODEL}])
        with trio.fail_after(5):
            await registry.wait_until(lambda: bool(registry.candidates(MODEL)))
        serving.start_soon(answer, peer, chunks, end or {})
        with trio.fail_after(10):
            async with httpx.AsyncClient(base_url=urls[0]) as http, http.stream(
                    "POST", "/v1/chat/completions", json={
                        "model": MODEL, "stream": True,
                        "messages": [{"role": "user", "content": "hi"}]}) as response:
                assert response.status_code == 200
                async for part in response.aiter_raw():
                    received += part
        serving.cancel_scope.cancel()
    gateway.shutdown()
    assert spy.at_settle is not None and spy.usage is not None
    return spy, bytes(received)


async def test_an_event_split_between_its_newlines_is_counted_once(
        nursery: trio.Nursery) -> None:
    one, two, three = token("a"), token("b"), token("c")
    chunks = [one + two[:-1], two[-1:] + three[:-1], three[-1:] + b"data: [DONE]\n\n"]
    spy, whole = await relayed(nursery, chunks)
    assert whole == b"".join(chunks)
    assert spy.usage is not None and spy.usage.estimated
    assert spy.usage.completion_tokens == 4  # three tokens and [DONE], each counted once
    assert spy.at_settle == one + two + three  # [DONE] waited for settle


async def test_a_crlf_stream_is_counted_and_its_done_held(nursery: trio.Nursery) -> None:
    events = [token(text, b"\r\n") for text in "abc"]
    chunks = [events[0] + events[1][:-1], events[1][-1:] + events[2],
              b"data: [DO", b"NE]\r\n\r", b"\n"]
    spy, whole = await relayed(nursery, chunks)
    normal = b"".join(token(text) for text in "abc")
    assert whole == normal + b"data: [DONE]\n\n"  # line ends written \n
    assert spy.usage is not None and spy.usage.completion_tokens == 4
    assert spy.at_settle == normal


async def test_a_done_split_in_its_blank_line_is_held(nursery: trio.Nursery) -> None:
    chunks = [token("a") + b"data: [DONE]\n", b"\n"]
    spy, whole = await relayed(nursery, chunks, {"usage": {
        "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    assert whole == b"".join(chunks)
    assert spy.at_settle == token("a")
