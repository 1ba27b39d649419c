"""Fuzzing every control frame from a connected, authenticated peer: over a real
tunnel, after the real handshake, a node (or relay) sends arbitrary payloads - JSON of
random shape, huge and negative numbers, deep nesting, long strings, non-JSON - as
MODELS, HEARTBEAT, ROUTES, GOAWAY, RESPONSE / END on streams the gateway opened,
WINDOW and CANCEL. After each, the gateway still answers ``/healthz`` and a normal
chat request through an honest node, and its registry holds only valid values."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Network
from tests.hostile.peers import HostilePeer, hostile_peer
from tooti.gateway.app import Gateway
from tooti.protocol import frames
from tooti.protocol.connection import HeartbeatReceived, StreamOpened
from tooti.protocol.frames import FrameType
from tooti.protocol.schemas import ModelEntry, Stats
from tooti.settings import GatewaySettings, TunnelSettings
from tooti.transport import TransportClosed

CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
EXAMPLES = settings(max_examples=15, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

numbers = st.one_of(
    st.integers(), st.sampled_from([10**20, -(10**20), 2**63, -1, 0, 2**31, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 5e-324]))
texts = st.one_of(st.text(max_size=20), st.sampled_from(["", "x" * 5000, "\x00\n\x1b[2J",
                                                         "chat/completions", "m"]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(texts, inner, max_size=5)),
    max_leaves=25)
KEYS = ["id", "models", "price", "input", "output", "max_concurrency", "context_length",
        "endpoints", "meta", "owned_by", "warm", "healthy", "in_flight", "queued", "t",
        "capacity", "ttft_ms", "code", "reason", "nodes", "removed", "full", "hops",
        "public_key", "proof", "stats", "labels", "status", "headers", "usage", "error",
        "prompt_tokens", "completion_tokens", "retryable", "finish_reason"]
objects = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
model_entries = st.dictionaries(st.sampled_from(KEYS[:10]), json_values, max_size=8).map(
    lambda entry: {"id": "fuzz", **entry})


def deep(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


raw_payloads = st.one_of(
    objects.map(msgspec.json.encode),
    st.builds(lambda entries: msgspec.json.encode({"models": entries}),
              st.lists(model_entries, max_size=4)),
    st.sampled_from([b"", b"null", b"[]", b"NaN", b'{"t": Infinity}', b"{" * 10, deep(50),
                     deep(5000), b'{"models": 1e999}', b"\xff\xfe", b'{"t": 1e400}']),
    st.binary(max_size=64))


async def still_serving(network: Network, http: httpx.AsyncClient) -> None:
    """The gateway answers health and a chat through the honest node, and keeps only
    valid values."""
    with trio.fail_after(10):
        assert (await http.get("/healthz")).status_code == 200
        response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    for peer in network.gateway.registry.peers.values():
        for info in peer.models.values():
            msgspec.convert(info.to_wire(), ModelEntry)  # raises if out of bounds
        msgspec.convert(peer.stats, Stats)
        assert set(peer.stats) <= set(Stats.__struct_fields__)


async def fuzz_once(network: Network, frame: bytes, role: str = "node",
                    on_stream: bool = False) -> None:
    async with network.client() as http, hostile_peer(network.tunnel_url, role=role) as peer:
        if role == "node":
            await peer.models([{"id": "fuzz-model"}])
        if on_stream:
            await answer_with(network, http, peer, frame)
        else:
            await peer.send(frame)
            await settle(peer)
        await still_serving(network, http)


async def settle(peer: HostilePeer) -> None:
    """Wait until the gateway handled what was sent (it echoed a heartbeat) or closed."""
    try:
        with trio.fail_after(10):
            await peer.heartbeat_acked()
    except TransportClosed:
        return


async def answer_with(network: Network, http: httpx.AsyncClient, peer: HostilePeer,
                      frame: bytes) -> None:
    """Have the gateway open a stream to the peer and answer it with ``frame`` (its
    stream id filled in), then END it if it is still open."""
    async def request() -> None:
        await http.post("/v1/chat/completions", json={**CHAT, "model": "fuzz-model"})

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            registry = network.gateway.registry
            await registry.wait_until(lambda: bool(registry.candidates("fuzz-model")))
            nursery.start_soon(request)
            try:
                while True:
                    event = peer.conn.receive_message(await peer.transport.receive())
                    if isinstance(event, StreamOpened):
                        break
                    if isinstance(event, HeartbeatReceived):
                        await peer.send(peer.conn.send_heartbeat({}))
                sid = event.stream_id.to_bytes(4, "big")
                await peer.send(frame[:2] + sid + frame[6:])
                if peer.conn.has_stream(event.stream_id):
                    await peer.send(peer.conn.send_end(event.stream_id, {}))
                await settle(peer)
            except TransportClosed:
                pass  # the gateway cut us off: the request fails over or fails


def control(ftype: FrameType) -> st.SearchStrategy[bytes]:
    return raw_payloads.map(lambda payload: frames.encode(ftype, 0, payload))


async def on_gateway(work: Callable[[Network], Awaitable[None]]) -> None:
    """Run ``work`` against a fresh gateway with an honest node (hypothesis runs each
    example in a trio run of its own)."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=5), tunnel)
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(gateway.serve)
        network = Network(nursery, gateway, urls[0], tunnel)
        await network.add_node(node_id="honest")
        await work(network)
        gateway.shutdown()
        nursery.cancel_scope.cancel()


@EXAMPLES
@given(frame=st.one_of(control(FrameType.MODELS), control(FrameType.HEARTBEAT),
                       control(FrameType.GOAWAY),
                       raw_payloads.map(lambda p: frames.encode(FrameType.HEARTBEAT, 0, p,
                                                                frames.FLAG_ACK))))
def test_fuzzed_node_control_frames(frame: bytes) -> None:
    trio.run(on_gateway, lambda network: fuzz_once(network, frame))


@EXAMPLES
@given(payload=raw_payloads, nodes=st.lists(objects, max_size=3),
       removed=st.lists(json_values, max_size=3), full=json_values)
def test_fuzzed_routes_from_a_relay(payload: bytes, nodes: list[Any], removed: list[Any],
                                    full: Any) -> None:
    shaped = msgspec.json.encode({"nodes": nodes, "removed": removed, "full": full})

    async def work(network: Network) -> None:
        for body in (payload, shaped):
            await fuzz_once(network, frames.encode(FrameType.ROUTES, 0, body), role="relay")

    trio.run(on_gateway, work)


@EXAMPLES
@given(ftype=st.sampled_from([FrameType.RESPONSE, FrameType.END, FrameType.CANCEL,
                              FrameType.WINDOW, FrameType.DATA]),
       payload=st.one_of(raw_payloads, objects.map(lambda o: msgspec.json.encode(
           {"status": 200, "headers": {}, **o})), st.integers(0, 2**32 - 1).map(
           lambda n: n.to_bytes(4, "big"))))
def test_fuzzed_stream_frames(ftype: FrameType, payload: bytes) -> None:
    frame = frames.encode(ftype, 1, payload)
    trio.run(on_gateway, lambda network: fuzz_once(network, frame, on_stream=True))
