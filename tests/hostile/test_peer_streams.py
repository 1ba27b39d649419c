"""Finding 8b: a node advertising more slots than its tunnel carries. Requests beyond
the tunnel's stream limit queue and are served as streams free up (never held until
the queue timeout while capacity exists), and a node offers a stream limit that fits
the concurrency it advertises."""

from __future__ import annotations

import httpx
import trio
import trio.testing

from tests.conftest import Network
from tests.hostile.peers import HostilePeer, hostile_peer
from tooti.backends.simulated import SimulatedBackend
from tooti.protocol.connection import HeartbeatReceived, Limits, StreamOpened
from tooti.settings import BackendSettings

MODEL = "wide"
BODY = b'{"id":"x","object":"chat.completion","choices":[]}'


async def serve_held(peer: HostilePeer, opened: list[int], release: trio.Event) -> None:
    """Answer every stream the gateway opens, but only once ``release`` is set; then one
    at a time (each answer frees a stream for a queued request)."""
    conn = peer.conn
    waiting: list[int] = []

    async def answer(sid: int) -> None:
        await release.wait()
        await peer.send(conn.send_response(sid, 200, {"content-type": "application/json"}))
        await peer.send(conn.send_data(sid, BODY))
        await peer.send(conn.send_end(sid, {"usage": {"prompt_tokens": 1,
                                                      "completion_tokens": 1,
                                                      "total_tokens": 2}}))

    async with trio.open_nursery() as nursery:
        while True:
            event = conn.receive_message(await peer.transport.receive())
            if isinstance(event, StreamOpened):
                opened.append(event.stream_id)
                waiting.append(event.stream_id)
                nursery.start_soon(answer, event.stream_id)
            elif isinstance(event, HeartbeatReceived):
                await peer.send(conn.send_heartbeat({"healthy": True}))


async def test_requests_beyond_the_tunnel_limit_queue_and_are_served(
        network: Network) -> None:
    registry = network.gateway.registry
    network.gateway.proxy_settings.queue_timeout = 60  # a 429 here would be the bug
    async with hostile_peer(network.tunnel_url, limits=Limits(max_streams=4)) as peer:
        await peer.models([{"id": MODEL, "max_concurrency": 100}])
        with trio.fail_after(5):
            await registry.wait_until(lambda: bool(registry.candidates(MODEL)))
        assert registry.peers[peer.id].capacity(MODEL) == 4  # what the tunnel carries
        opened: list[int] = []
        release = trio.Event()
        statuses: list[int] = []

        async def one(http: httpx.AsyncClient) -> None:
            response = await http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_held, peer, opened, release)
            with trio.fail_after(20):
                async with network.client() as http, trio.open_nursery() as clients:
                    for _ in range(10):
                        clients.start_soon(one, http)
                    while len(opened) < 4 or network.gateway.proxy.queued < 6:
                        await trio.testing.wait_all_tasks_blocked(0.01)
                    assert len(opened) == 4  # the tunnel's limit, not the 100 advertised
                    release.set()
            nursery.cancel_scope.cancel()
    assert statuses == [200] * 10
    assert len(opened) == 10


async def test_a_node_offers_streams_for_the_slots_it_advertises(network: Network) -> None:
    backend = SimulatedBackend(BackendSettings(type="simulated", max_concurrency=1000))
    await network.add_node([backend], node_id="wide-node")
    peer = network.gateway.registry.peers["wide-node"]
    assert peer.session.conn.peer_limits.max_streams >= 1000
    assert peer.capacity("tooti-sim") == 1000
