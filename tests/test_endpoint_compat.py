"""Endpoint names across versions, over real tunnels: a node (or relay) announces to
each gateway or relay only the endpoint names that peer's WELCOME listed.

A gateway or relay older than the WELCOME ``endpoints`` member decoded a model entry's
``endpoints`` as a list of the usual three names and banned a node naming any other
(``bad_models``). Such an acceptor is simulated on a real station (:func:`make_old`):
its WELCOME leaves the member out, and its registry refuses model entries with the
old decoder (:class:`OldModelEntry`, as it was before the pass-through endpoints)
raising ``bad_models`` exactly where the old decoder did, so the session is penalized
(a direct node banned; a relayed node's entry refused).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import httpx
import msgspec
import trio
from msgspec import Meta, Struct

from tests.conftest import Network
from tests.spy import LIMIT
from tests.test_relay import RunningRelay, start_node, start_relay, until
from tooti.backends.base import ModelInfo
from tooti.backends.simulated import SimulatedBackend
from tooti.gateway.app import Gateway
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.mesh.station import Station
from tooti.node.node import Node
from tooti.protocol import control, frames
from tooti.protocol.schemas import (
    ALL_ENDPOINTS,
    ENDPOINTS,
    accepted_endpoints,
    announceable,
    convert,
)
from tooti.settings import BackendSettings, GatewaySettings

MODEL = "tooti-sim"
RERANK = {"model": MODEL, "query": "which is a fruit?",
          "documents": ["a carrot", "an apple", "a stone"], "top_n": 2}
CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


class OldModelEntry(Struct, frozen=True):
    """A model entry as gateways and relays before the pass-through endpoints decoded it
    (commit c33d701): any endpoint name but the usual three does not decode."""

    id: str
    endpoints: Annotated[
        list[Literal["chat/completions", "completions", "embeddings"]],
        Meta(max_length=8)] = msgspec.field(
            default_factory=lambda: ["chat/completions", "completions", "embeddings"])


class OldDecoder:
    """What :func:`make_old` installed: counts the model lists it decoded."""

    def __init__(self) -> None:
        self.decoded = 0
        self._more = trio.Event()

    def note(self) -> None:
        self.decoded += 1
        self._more.set()
        self._more = trio.Event()

    async def wait_for(self, count: int) -> None:
        """Wait (bounded) until ``count`` model lists decoded."""
        with trio.fail_after(LIMIT):
            while self.decoded < count:
                await self._more.wait()


def make_old(station: Station) -> OldDecoder:
    """Make ``station`` behave, towards its peers, as an acceptor older than the WELCOME
    ``endpoints`` member: its WELCOME lacks the member and every model entry it takes
    in (MODELS of a direct node, ROUTES models of a relayed one) goes through the old
    decoder, whose refusal is the old ``bad_models``."""
    station.admission.welcome_endpoints = None
    registry = station.registry
    set_models = registry.set_models
    decoder = OldDecoder()

    def old_set_models(peer: Peer, models: list[ModelInfo]) -> bool:
        convert([m.to_wire() for m in models], list[OldModelEntry], "bad_models", "MODELS")
        decoder.note()
        return set_models(peer, models)

    registry.set_models = old_set_models  # type: ignore[method-assign]
    return decoder


def every_endpoint() -> SimulatedBackend:
    """A simulated backend announcing all eight endpoint names (its default)."""
    return SimulatedBackend(BackendSettings(type="simulated"))


def served(registry: Registry, node_id: str) -> tuple[str, ...]:
    """The endpoints ``registry`` files for ``node_id``'s model."""
    return registry.peers[node_id].models[MODEL].endpoints


async def start_gateway(network: Network) -> tuple[Gateway, str]:
    """A second gateway in the test's nursery: it and its tunnel URL."""
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10),
                      network.tunnel)
    urls = await network.nursery.start(gateway.serve)
    return gateway, urls[0].replace("http://", "ws://") + "/tooti/v1/tunnel"


async def add_node(network: Network, node_id: str, **options: Any) -> Node:
    """A node with every endpoint dialing the network's gateway (or ``peers``), waited
    for (bounded) until the gateway routes to it."""
    with trio.fail_after(LIMIT):
        return await network.add_node([every_endpoint()], node_id, **options)


async def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await http.post(path, json=body)


async def answered_by(url: str, path: str, body: dict[str, Any], node_id: str) -> None:
    """POST ``body`` to ``path``: answered (200) by ``node_id``."""
    response = await post(url, path, body)
    assert response.status_code == 200, response.text
    assert response.headers["x-tooti-node"] == node_id


# ---------------------------------------------------------------- the rule, sans I/O


def test_an_old_welcome_decoder_ignores_the_endpoints_member() -> None:
    """The WELCOME struct (unchanged since before the member) ignores it, whatever it
    holds, so an old node dialing a new gateway is not refused."""
    obj = {"version": 1, "heartbeat_interval": 3.0, "session_id": "s",
           "limits": {"max_frame_bytes": 65536, "max_streams": 8, "initial_window": 65536},
           "endpoints": ["rerank", {"odd": 1}, "x" * 500]}
    welcome = control.convert(obj, control.Welcome, frames.FrameType.WELCOME)
    assert welcome.session_id == "s"
    assert control.extras(obj, control.Welcome)["endpoints"] == obj["endpoints"]


def test_accepted_endpoints_are_the_usual_three_plus_known_listed_names() -> None:
    usual = frozenset(ENDPOINTS)
    assert accepted_endpoints(None) == usual  # an old acceptor: no member
    assert accepted_endpoints("rerank") == usual  # malformed: the safe three
    assert accepted_endpoints(list(ALL_ENDPOINTS)) == frozenset(ALL_ENDPOINTS)
    assert accepted_endpoints(["rerank", "video/generations", 7, None]) == usual | {"rerank"}
    assert accepted_endpoints([]) == usual  # the three are v1's from the start


def test_announceable_cuts_each_entry_to_what_the_acceptor_decodes() -> None:
    models: list[dict[str, Any]] = [
        {"id": "all", "endpoints": list(ALL_ENDPOINTS)},
        {"id": "usual"},
        {"id": "embed", "endpoints": ["embeddings", "rerank"]},
        {"id": "speech-only", "endpoints": ["audio/speech"]}]
    old = announceable(models, frozenset(ENDPOINTS))
    # the usual three are left out (as a node older than the member sent them); an
    # entry with nothing left is not announced (it would read as the usual three)
    assert old == [{"id": "all"}, {"id": "usual"}, {"id": "embed", "endpoints": ["embeddings"]}]
    assert announceable(models, frozenset(ALL_ENDPOINTS)) is models
    assert [convert(e, OldModelEntry, "bad_models", "MODELS").id for e in old] == [
        "all", "usual", "embed"]
    assert models[0]["endpoints"] == list(ALL_ENDPOINTS)  # the input is not changed


# ---------------------------------------------------------------- over real tunnels


async def test_the_simulated_old_gateway_bans_a_node_naming_rerank(network: Network) -> None:
    """The control: a node announcing every name regardless of WELCOME (as nodes did
    before the member) is banned by the old gateway; so the tests below would fail if
    nodes stopped cutting their announcement."""
    make_old(network.gateway.station)
    node = await network.add_node([every_endpoint()], "careless", wait=False)
    node.dialer.accepted = lambda session: frozenset(ALL_ENDPOINTS)  # type: ignore[method-assign]
    registry = network.gateway.registry
    with trio.fail_after(LIMIT):
        await registry.wait_until(lambda: registry.banned("careless") is not None)
    assert "careless" not in registry.peers or not registry.peers["careless"].models


async def test_a_new_node_is_not_banned_by_an_old_gateway_and_serves_chat(
    network: Network,
) -> None:
    decoder = make_old(network.gateway.station)
    node = await add_node(network, "new-node")
    registry = network.gateway.registry
    assert registry.banned("new-node") is None
    assert served(registry, "new-node") == ENDPOINTS
    assert [node.dialer.accepted(s) for s in node.sessions] == [frozenset(ENDPOINTS)]
    await answered_by(network.url, "/v1/chat/completions", CHAT, "new-node")
    rerank = await post(network.url, "/v1/rerank", RERANK)
    assert rerank.status_code == 404  # the old gateway was never told of it
    # a later announcement (a model change) is cut as well, not only the first
    before = decoder.decoded
    await node.announce_models()
    await decoder.wait_for(before + 1)
    assert registry.banned("new-node") is None and "new-node" in registry.peers


async def test_a_new_gateway_gets_the_pass_through_endpoints(network: Network) -> None:
    node = await add_node(network, "new-node")
    assert served(network.gateway.registry, "new-node") == ALL_ENDPOINTS
    assert [node.dialer.accepted(s) for s in node.sessions] == [frozenset(ALL_ENDPOINTS)]
    await answered_by(network.url, "/v1/rerank", RERANK, "new-node")


async def test_one_node_announces_per_tunnel_to_an_old_and_a_new_gateway(
    network: Network,
) -> None:
    """A node dialing gateways of different versions: each is told what it decodes."""
    make_old(network.gateway.station)
    new, new_tunnel = await start_gateway(network)
    await add_node(network, "both", peers=[network.tunnel_url, new_tunnel])
    await until(new.registry, lambda: "both" in new.registry.peers
                and bool(new.registry.peers["both"].models))
    assert served(network.gateway.registry, "both") == ENDPOINTS
    assert served(new.registry, "both") == ALL_ENDPOINTS
    assert network.gateway.registry.banned("both") is None
    new_url = new_tunnel.replace("ws://", "http://").removesuffix("/tooti/v1/tunnel")
    await answered_by(network.url, "/v1/chat/completions", CHAT, "both")
    await answered_by(new_url, "/v1/rerank", RERANK, "both")
    new.shutdown()


async def test_a_new_relay_tells_an_old_gateway_only_the_usual_three(
    network: Network,
) -> None:
    """old gateway ← new relay ← new node: the node tells the relay everything (the
    relay's WELCOME lists what it carries), the relay tells the old gateway the usual
    three; the node is not refused and serves chat through the relay."""
    make_old(network.gateway.station)
    relay = await start_relay(network, "relay-new")
    registry = network.gateway.registry
    await until(registry, lambda: "relay-new" in registry.peers)
    await start_node(network, "behind", [relay.tunnel_url])
    assert served(relay.registry, "behind") == ALL_ENDPOINTS
    assert served(registry, "behind") == ENDPOINTS
    assert registry.peers["behind"].via == "relay-new"
    assert registry.banned("behind", "relay-new") is None
    await answered_by(network.url, "/v1/chat/completions", CHAT, "behind")


async def test_an_old_relay_hears_only_the_usual_three_and_passes_them_on(
    network: Network,
) -> None:
    """new gateway ← old relay ← new node: the old relay's WELCOME lacks the member, so
    the node announces it the usual three (it is not banned there), and a new relay
    chained above the old one keeps the pass-through names for nodes that sent them."""
    old = await start_relay(network, "relay-old")
    make_old(old.listener)
    registry = network.gateway.registry
    await until(registry, lambda: "relay-old" in registry.peers)
    await start_node(network, "behind-old", [old.tunnel_url])
    assert old.registry.banned("behind-old") is None
    assert served(old.registry, "behind-old") == ENDPOINTS
    assert served(registry, "behind-old") == ENDPOINTS
    await answered_by(network.url, "/v1/chat/completions", CHAT, "behind-old")


async def test_a_chain_of_new_relays_carries_rerank(network: Network) -> None:
    """new gateway ← new relay ← new relay ← new node: every hop lists every name."""
    top: RunningRelay = await start_relay(network, "relay-top")
    registry = network.gateway.registry
    await until(registry, lambda: "relay-top" in registry.peers)
    lower = await start_relay(network, "relay-lower", upstream=top.tunnel_url)
    await until(top.registry, lambda: "relay-lower" in top.registry.peers)
    await start_node(network, "deep", [lower.tunnel_url])
    assert served(registry, "deep") == ALL_ENDPOINTS
    assert registry.peers["deep"].hops == 2
    await answered_by(network.url, "/v1/rerank", RERANK, "deep")

