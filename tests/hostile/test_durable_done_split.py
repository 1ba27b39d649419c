"""Durable usage when a node splits ``data: [DONE]`` across DATA frames (the tunnel
splits DATA wherever flow-control credit runs out, so an honest node can too).

The gateway held back a chunk holding the whole marker until settle, but relayed
``…data: [DO`` and then ``NE]\\n\\n`` as they came: the client saw the complete
``[DONE]`` before the request was settled, and a ``kill -9`` then could lose the row
of an answer the client saw complete. Now bytes that may be the start of the marker
wait for the next chunk, and the final event goes out only after settle."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from tests.hostile.peers import HostilePeer, hostile_peer
from tooti.billing.base import RequestContext, Usage
from tooti.gateway.app import Gateway
from tooti.protocol.connection import HeartbeatReceived, StreamOpened
from tooti.settings import GatewaySettings, TunnelSettings

MODEL = "splitter"
CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
SPLITS = {
    "mid-marker": [CONTENT + b"data: [DO", b"NE]\n\n"],
    "mid-prefix": [CONTENT + b"da", b"ta: [DONE]", b"\n\n"],
    "compact": [CONTENT + b"data:", b"[DONE]\n\n"],
}


class Spy:
    """A billing plugin that notes what the client had received when settle ran."""

    def __init__(self, received: bytearray) -> None:
        self.received = received
        self.at_settle: bytes | None = None

    async def run(self) -> None:
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        return None

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        await trio.testing.wait_all_tasks_blocked()  # whatever was sent has arrived
        self.at_settle = bytes(self.received)

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        return None

    async def close(self) -> None:
        return None


async def answer_split(peer: HostilePeer, chunks: list[bytes]) -> None:
    """Serve every stream with ``chunks`` as separate DATA frames, then END."""
    conn = peer.conn
    while True:
        event = conn.receive_message(await peer.transport.receive())
        if isinstance(event, StreamOpened):
            sid = event.stream_id
            await peer.send(conn.send_response(sid, 200, {"content-type": "text/event-stream"}))
            for chunk in chunks:
                await peer.send(conn.send_data(sid, chunk))
            await peer.send(conn.send_end(sid, {"usage": {
                "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
        elif isinstance(event, HeartbeatReceived):
            await peer.send(conn.send_heartbeat({"healthy": True}))


async def split_marker(nursery: trio.Nursery, chunks: list[bytes]) -> tuple[bytes, bytes]:
    """What the client had at settle, and all it got."""
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
        serving.start_soon(answer_split, peer, chunks)
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
    assert spy.at_settle is not None
    return spy.at_settle, bytes(received)


async def test_a_split_done_reaches_the_client_only_after_settle(
        nursery: trio.Nursery) -> None:
    for name, chunks in SPLITS.items():
        at_settle, whole = await split_marker(nursery, chunks)
        assert whole == b"".join(chunks), name
        assert b"[DONE]" not in at_settle, (name, at_settle)
        assert at_settle.startswith(CONTENT), name  # the content was not held back
