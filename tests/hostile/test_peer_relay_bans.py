"""Violations seen through a relay: every new one after the node is registered again is
acted on, and they ban the route through that relay (counting against the relay), not
the node id on every path."""

from __future__ import annotations

import trio

from tests.conftest import Network
from tests.hostile.peers import hostile_peer, relayed_route
from tests.hostile.test_peer_values import GOOD
from tooti.identity import Identity
from tooti.mesh.registry import Registry
from tooti.protocol.frames import FrameType


def _end_bans(registry: Registry) -> None:
    """Every ban ends now."""
    now = trio.current_time()
    entries = registry.bans.entries
    for key, (_, reason) in list(entries.items()):
        entries[key] = (now, reason)


async def test_a_relayed_node_is_penalized_again_after_its_ban(network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        node = Identity.generate()
        entry = relayed_route(node, relay.id, [GOOD])
        await relay.send_json(FrameType.ROUTES, {"nodes": [entry]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: node.id in registry.peers)
        registry.penalize(registry.peers[node.id], "usage out of bounds")
        assert node.id not in registry.peers
        _end_bans(registry)  # as if peer_ban_seconds had passed
        # The relay re-sends the same proof: the node is registered again...
        await relay.send_json(FrameType.ROUTES, {"nodes": [entry]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: node.id in registry.peers)
        # ...and its next violation is acted on like the first.
        registry.penalize(registry.peers[node.id], "usage out of bounds again")
        assert node.id not in registry.peers
        await relay.send_json(FrameType.ROUTES, {"nodes": [entry]})
        await relay.heartbeat_acked()  # the gateway has handled the ROUTES
        assert node.id not in registry.peers


async def test_a_violation_through_a_relay_bans_that_route_only(network: Network) -> None:
    """A hostile relay can forge what a node says (END usage, its ROUTES entry): what it
    reports bans the node's route through it, not the node on its other paths."""
    registry = network.gateway.registry
    node = Identity.generate()
    async with hostile_peer(network.tunnel_url, role="relay") as liar:
        await liar.send_json(FrameType.ROUTES, {"nodes": [relayed_route(node, liar.id, [GOOD])]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: node.id in registry.peers)
        async with hostile_peer(network.tunnel_url, role="relay") as honest:
            await honest.send_json(FrameType.ROUTES,
                                   {"nodes": [relayed_route(node, honest.id, [GOOD])]})
            await honest.heartbeat_acked()  # kept aside: the node is reached through liar
            registry.penalize(registry.peers[node.id], "usage out of bounds")
            # The honest relay's route takes over at once...
            assert registry.peers[node.id].via == honest.id
            assert registry.banned(node.id) is None
        with trio.fail_after(5):
            await registry.wait_until(lambda: node.id not in registry.peers)
        # ...the liar's route stays refused...
        assert registry.banned(node.id, via=liar.id) is not None
        await liar.send_json(FrameType.ROUTES, {"nodes": [relayed_route(node, liar.id, [GOOD])]})
        await liar.heartbeat_acked()
        assert node.id not in registry.peers
        # ...and the relay that reported it is still connected, one strike down.
        assert liar.id in registry.peers and registry.peers[liar.id].penalized is False
    # The node dials in directly: admitted.
    async with hostile_peer(network.tunnel_url, identity=node) as direct:
        await direct.models([GOOD])
        with trio.fail_after(5):
            await registry.wait_until(lambda: node.id in registry.peers
                                      and not registry.peers[node.id].via)


async def test_with_strikes_on_a_relay_with_three_violating_nodes_is_cut_off(
        network: Network) -> None:
    registry = network.gateway.registry
    registry.bans.relay_strikes = 3
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        nodes = [Identity.generate() for _ in range(4)]
        await relay.send_json(FrameType.ROUTES, {
            "nodes": [relayed_route(node, relay.id, [GOOD]) for node in nodes]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: all(n.id in registry.peers for n in nodes))
        # The same node twice is one strike.
        registry.penalize(registry.peers[nodes[0].id], "usage out of bounds")
        _end_bans(registry)
        await relay.send_json(FrameType.ROUTES,
                              {"nodes": [relayed_route(nodes[0], relay.id, [GOOD])]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: nodes[0].id in registry.peers)
        registry.penalize(registry.peers[nodes[0].id], "usage out of bounds")
        registry.penalize(registry.peers[nodes[1].id], "usage out of bounds")
        assert not registry.peers[relay.id].session.closed.is_set()
        registry.penalize(registry.peers[nodes[2].id], "usage out of bounds")
        with trio.fail_after(5):
            goaway = await relay.goaway()
    assert goaway is not None and goaway.code == "protocol_violation"
    assert "3 nodes" in goaway.reason
    with trio.fail_after(5):
        await registry.wait_until(lambda: relay.id not in registry.peers
                                  and nodes[3].id not in registry.peers)
    refusal = registry.banned(relay.id)
    assert refusal is not None
    # Its nodes were not banned themselves.
    assert registry.banned(nodes[0].id) is None and registry.banned(nodes[3].id) is None


async def test_by_default_violating_nodes_never_get_their_relay_banned(
        network: Network) -> None:
    """Strikes are off by default: lying nodes minted behind an honest relay lose their
    own routes, and the relay with its other nodes stays."""
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        nodes = [Identity.generate() for _ in range(5)]
        await relay.send_json(FrameType.ROUTES, {
            "nodes": [relayed_route(node, relay.id, [GOOD]) for node in nodes]})
        with trio.fail_after(5):
            await registry.wait_until(lambda: all(n.id in registry.peers for n in nodes))
        for node in nodes[:4]:
            registry.penalize(registry.peers[node.id], "usage out of bounds")
        await relay.heartbeat_acked()
        assert relay.id in registry.peers and registry.banned(relay.id) is None
        assert not registry.peers[relay.id].session.closed.is_set()
        assert nodes[4].id in registry.peers
        assert all(registry.banned(n.id, via=relay.id) is not None for n in nodes[:4])
