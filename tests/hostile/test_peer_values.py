"""Finding 3 (prices and models) and the cap on models: every value a node or a relay
advertises is checked where it enters; a bad one closes the peer's session with a
reason and bans it, and never reaches the registry."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.conftest import Network
from tests.hostile.peers import hostile_peer, relayed_route, watch
from tooti.identity import Identity
from tooti.protocol.frames import FrameType

GOOD = {"id": "m", "max_concurrency": 4, "price": {"input": 1.0, "output": 2.0}}
CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def model(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


BAD_MODELS = {
    "negative price": [model(price={"input": -1e6, "output": 0})],
    "huge price": [model(price={"input": 0, "output": 10**20})],
    "huge concurrency": [model(max_concurrency=10**20)],
    "zero concurrency": [model(max_concurrency=0)],
    "negative context": [model(context_length=-5)],
    "long id": [model(id="x" * 1000)],
    "empty id": [model(id="")],
    "control characters in id": [model(id="m\n\x1b[31m")],
    "endpoint not a string": [model(endpoints=[7])],
    "too many endpoint names": [model(endpoints=["rerank"] * 17)],
    "long owned_by": [model(owned_by="o" * 10_000)],
    "deep meta": [model(meta={"a": [[[[[[[[[[1]]]]]]]]]]})],
    "big meta": [model(meta={"k": "v" * 20_000})],
    "string price": [model(price={"input": "free"})],
    "3,200 models": [{"id": f"m{i}"} for i in range(3200)],
}


@pytest.mark.parametrize("models", list(BAD_MODELS.values()), ids=list(BAD_MODELS))
async def test_a_bad_model_entry_cuts_the_node_off_and_bans_it(
        network: Network, models: list[dict[str, Any]]) -> None:
    registry = network.gateway.registry
    identity = Identity.generate()
    async with hostile_peer(network.tunnel_url, identity=identity) as peer:
        await peer.models(models)
        with trio.fail_after(5):
            goaway = await peer.goaway()
    assert goaway is not None and goaway.code == "bad_models", goaway
    with trio.fail_after(5):
        await registry.wait_until(lambda: identity.id not in registry.peers)
    assert not any(m == "m" or (m.startswith("m") and m[1:].isdigit())
                   for m in registry.known_models)  # nothing of it was stored
    # Banned: the same node is refused at its next handshake, with the reason.
    async with hostile_peer(network.tunnel_url, identity=identity) as again:
        with trio.fail_after(5):
            refused = await again.goaway()
    assert refused is not None and refused.code == "banned" and "bad_models" in refused.reason


async def test_valid_values_at_the_bounds_are_accepted(network: Network) -> None:
    registry = network.gateway.registry
    models = [model(id=f"m{i}", price={"input": 1_000_000, "output": 0},
                    max_concurrency=10_000, meta={"a": {"b": {"c": 1}}}) for i in range(256)]
    async with hostile_peer(network.tunnel_url) as peer:
        await peer.models(models)
        with trio.fail_after(5):
            await registry.wait_until(lambda: peer.id in registry.peers
                                      and len(registry.peers[peer.id].models) == 256)
        assert registry.peers[peer.id].models["m0"].price_input == 1_000_000


async def test_bad_heartbeat_figures_are_a_violation(network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url) as peer:
        await peer.models([GOOD])
        with trio.fail_after(5):
            await registry.wait_until(lambda: peer.id in registry.peers)
        await peer.heartbeat(in_flight=-3, healthy=True, secret={"x": 1})
        with trio.fail_after(5):
            goaway = await peer.goaway()
    assert goaway is not None and goaway.code == "bad_field"


async def test_only_known_heartbeat_figures_are_stored(network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url) as peer:
        await peer.models([GOOD])
        with trio.fail_after(5):
            await peer.heartbeat_acked(in_flight=1, healthy=True, junk="x" * 30_000,
                                       nested={"a": [1]})
        assert registry.peers[peer.id].stats == {"in_flight": 1, "healthy": True}


async def test_a_relays_bad_entry_is_skipped_and_the_relay_stays(network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        good, bad = Identity.generate(), Identity.generate()
        await relay.send_json(FrameType.ROUTES, {"nodes": [
            relayed_route(good, relay.id, [GOOD]),
            relayed_route(bad, relay.id, [model(price={"input": -1e6, "output": -1e6})]),
        ]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: good.id in registry.peers)
        assert bad.id not in registry.peers and relay.id in registry.peers
        assert registry.peers[good.id].models["m"].price_input == 1.0


async def test_penalizing_a_relayed_node_drops_it_alone(network: Network) -> None:
    registry = network.gateway.registry
    violations = watch(network, {"peer.violation"})
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        one, two = Identity.generate(), Identity.generate()
        await relay.send_json(FrameType.ROUTES, {"nodes": [
            relayed_route(one, relay.id, [GOOD]), relayed_route(two, relay.id, [GOOD])]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: {one.id, two.id} <= registry.peers.keys())
        registry.penalize(registry.peers[one.id], "usage out of bounds")
        assert one.id not in registry.peers and two.id in registry.peers
        assert relay.id in registry.peers and not registry.peers[relay.id].session.closed.is_set()
        assert [e.data["peer_id"] for e in violations] == [one.id]
        # Its next advertisement through the relay is refused while the ban lasts.
        await relay.send_json(FrameType.ROUTES, {"nodes": [relayed_route(one, relay.id, [GOOD])],
                                                 "full": True})
        with trio.fail_after(5):
            await registry.wait_until(lambda: one.id in _shadowed(network, relay.id))
        assert one.id not in registry.peers


async def test_penalizing_a_direct_node_closes_its_session_with_the_reason(
        network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url) as peer:
        await peer.models([GOOD])
        with trio.fail_after(5):
            await registry.wait_until(lambda: peer.id in registry.peers)
        registry.penalize(registry.peers[peer.id], "usage out of bounds")
        with trio.fail_after(5):
            goaway = await peer.goaway()
    assert goaway is not None and goaway.code == "protocol_violation"
    assert goaway.reason == "usage out of bounds"
    with trio.fail_after(5):
        await registry.wait_until(lambda: peer.id not in registry.peers)
    assert registry.banned(peer.id) is not None


def _shadowed(network: Network, relay_id: str) -> set[str]:
    """Node ids the relay advertises that are kept aside (here: banned)."""
    from tooti.mesh.advertisements import RelayedNodes

    for listener in network.gateway.registry.bus.listeners:
        owner = getattr(listener, "__self__", None)
        if isinstance(owner, RelayedNodes) and owner.relay.id == relay_id:
            return set(owner.shadowed)
    return set()
