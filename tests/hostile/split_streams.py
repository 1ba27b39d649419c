"""A gateway whose only node is a hostile peer answering every stream with chosen DATA
frames, and a billing plugin noting what the client had received when settle ran: how
the split-stream tests watch what the client and billing see of a node's bytes."""

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
