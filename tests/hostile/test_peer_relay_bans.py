"""Violations seen through a relay: every new one after the node is registered again is
acted on, and they ban the route through that relay (counting against the relay), not
the node id on every path."""

from __future__ import annotations

import trio

from tests.conftest import Network
from tests.hostile.peers import hostile_peer
from tests.hostile.test_peer_values import GOOD, _route
from tooti.identity import Identity
from tooti.gateway.registry import Registry
from tooti.protocol.frames import FrameType


def _end_bans(registry: Registry) -> None:
    """Every ban ends now."""
    now = trio.current_time()
    for key, (_, reason) in list(registry.bans.items()):
        registry.bans[key] = (now, reason)


async def test_a_relayed_node_is_penalized_again_after_its_ban(network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        node = Identity.generate()
        entry = _route(node, relay.id, [GOOD])
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
