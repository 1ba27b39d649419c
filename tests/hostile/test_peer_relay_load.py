"""A relay with hundreds of nodes stays within its upstream's control budget: it re-sends
a node's whole ROUTES entry only when something that matters for routing changed, load
figures alone at most once per heartbeat interval and batched; and the budget a gateway
gives a relay grows with the nodes it advertises, while a real flood from a relay is
still cut off."""

from __future__ import annotations

from typing import Any

import trio

from tests.conftest import Network
from tests.hostile.peers import HostilePeer, hostile_peer, relayed_route
from tests.test_relay import start_relay
from tooti.backends.base import ModelInfo
from tooti.identity import Identity
from tooti.mesh.advertisements import RelayedNodes
from tooti.mesh.peer import Peer
from tooti.protocol.connection import RoutesReceived
from tooti.protocol.frames import FrameType

NODES = 300
MODELS = [{"id": f"model-{i:02d}", "max_concurrency": 4} for i in range(4)]


class _Conn:
    def can_open_stream(self) -> bool:
        return True


class _Session:
    """What a registry and a relay read of a node's tunnel (nodes held in memory)."""

    def __init__(self) -> None:
        self.closed = trio.Event()
        self.rtt: float | None = None
        self.close_reason = ""
        self.conn = _Conn()


def _memory_node(relay_id: str) -> Peer:
    """A node that proved itself to relay ``relay_id``, held in memory."""
    node = Identity.generate()
    session: Any = _Session()
    return Peer(id=node.id, role="node", session=session, address="memory",
                public_key=node.public_key, proof=relayed_route(node, relay_id, [])["proof"])


async def test_a_relay_sends_whole_entries_only_for_routing_changes(
        network: Network, monkeypatch: Any) -> None:
    gateway = network.gateway.registry
    interval = network.tunnel.heartbeat_interval
    received = {"frames": 0, "nodes": 0, "loads": 0}
    apply = RelayedNodes.apply

    def counting(self: RelayedNodes, event: RoutesReceived) -> None:
        received["frames"] += 1
        received["nodes"] += len(event.nodes)
        received["loads"] += len(getattr(event, "loads", ()))
        apply(self, event)

    monkeypatch.setattr(RelayedNodes, "apply", counting)
    relay = await start_relay(network, "relay-many")
    registry = relay.registry
    nodes = [_memory_node(relay.id) for _ in range(NODES)]
    for peer in nodes:
        registry.add(peer)
        registry.set_models(peer, [ModelInfo.from_wire(m) for m in MODELS])
    with trio.fail_after(10):
        await gateway.wait_until(lambda: all(p.id in gateway.peers for p in nodes))
    at_start = dict(received)
    rounds, steps = 4, 10
    for round_ in range(rounds):  # every node reports new load once per interval
        for step in range(steps):
            for peer in nodes[step::steps]:
                registry.heartbeat(peer, {"in_flight": round_ + 1, "healthy": True})
            await trio.sleep(interval / steps)  # pace the churn like real heartbeats
        changed = nodes[round_]  # and one node per interval changes its models
        registry.set_models(changed, [ModelInfo.from_wire({"id": f"new-{round_}"})])
    last = nodes[-1]
    with trio.fail_after(5 * interval):  # (a node's last heartbeat may be held back)
        await gateway.wait_until(
            lambda: gateway.peers[last.id].stats.get("in_flight", 0) >= rounds - 1
            and "new-3" in gateway.peers[nodes[3].id].models)
    entries = received["nodes"] - at_start["nodes"]
    frames = received["frames"] - at_start["frames"]
    print(f"{NODES} nodes, {rounds} intervals: {frames} ROUTES frames, {entries} whole "
          f"entries, {received['loads'] - at_start['loads']} load figures")
    assert entries <= rounds  # the model changes only, not every node every interval
    assert frames <= 4 * (rounds + 2)  # a few batched frames per interval
    assert not gateway.peers[relay.id].session.closed.is_set()
    await relay.kill()


async def _advertise(relay: HostilePeer, nodes: list[Identity]) -> list[dict[str, Any]]:
    entries = [relayed_route(node, relay.id, MODELS) for node in nodes]
    for first in range(0, len(entries), 20):
        await relay.send_json(FrameType.ROUTES, {"nodes": entries[first:first + 20]})
    return entries


async def test_a_relays_budget_grows_with_its_nodes_and_a_flood_is_still_cut(
        network: Network) -> None:
    registry = network.gateway.registry
    interval = network.tunnel.heartbeat_interval
    nodes = [Identity.generate() for _ in range(NODES)]
    async with hostile_peer(network.tunnel_url, role="relay") as relay:
        entries = await _advertise(relay, nodes)
        with trio.fail_after(10):
            await registry.wait_until(lambda: all(n.id in registry.peers for n in nodes))
        # An older relay re-sends each node's entry once per interval, one per frame:
        # over the base budget of 256 frames, within the relay's.
        steps = 10
        for round_ in range(4):
            for step in range(steps):
                for entry in entries[step::steps]:
                    entry["stats"] = {"in_flight": round_}
                    await relay.send_json(FrameType.ROUTES, {"nodes": [entry]})
                await trio.sleep(interval / steps)
        with trio.fail_after(5):
            await relay.heartbeat_acked()
        assert relay.id in registry.peers and not registry.peers[relay.id].penalized
        assert registry.peers[nodes[0].id].stats == {"in_flight": 3}

        with trio.fail_after(10 * interval):
            goaway = await relay.flood_until_goaway(FrameType.ROUTES, {"nodes": []})
    assert goaway is not None and goaway.code == "control_flood"
