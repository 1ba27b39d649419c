"""The relay's advertising upstream: every node it can reach, in ROUTES frames
(:mod:`tooti.mesh.advertisements` builds each entry, with the proof the node gave in its
own handshake), kept current on each upstream session as nodes join, leave, change
models or report load. Each upstream session is told only the endpoint names its
WELCOME listed (the usual three to an upstream older than the list): the names the
relay's nodes announce, intersected with what that upstream decodes."""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import msgspec
import trio

from tooti import clock
from tooti.mesh.advertisements import advertised, can_advertise, routing_state
from tooti.mesh.events import BusEvent
from tooti.mesh.registry import Registry
from tooti.protocol.connection import Connection
from tooti.protocol.schemas import ALL_ENDPOINTS
from tooti.settings import TunnelSettings
from tooti.tunnel import TunnelSession

log = logging.getLogger("tooti.relay")
_json = msgspec.json.Encoder()

ROUTES_BUDGET = 0.5
"""Share of the control-payload limit one ROUTES frame may use (the rest is headroom)."""
PEER_EVENTS = frozenset({"peer.joined", "peer.updated", "peer.left", "peer.cooldown"})


class Advertiser:
    """Advertises the nodes in ``registry`` on each upstream session."""

    def __init__(self, registry: Registry, tunnel: TunnelSettings, interval: float) -> None:
        """``interval``: how long changes are batched before a ROUTES frame goes out."""
        self.registry = registry
        self.tunnel = tunnel
        self.interval = interval

    async def on_session(self, session: TunnelSession,
                         accepted: frozenset[str] = frozenset(ALL_ENDPOINTS)) -> None:
        """Advertise every node we can reach on a new upstream session, then each change
        (batched over ``advertise_interval``) for as long as the session lives. A node's
        whole entry goes out only when something that matters for routing changed (models,
        labels, draining, its session, ...); new load figures alone go out in ``loads``,
        at most once per heartbeat interval and batched, so an honest relay's control
        traffic stays far within its upstream's budget however many nodes it has.
        ``accepted``: the endpoint names the upstream's WELCOME listed (models are
        advertised with only those)."""
        dirty: set[str] = set()
        wake = trio.Event()
        state = _Advertised(accepted)

        def listener(event: BusEvent) -> None:
            nonlocal wake
            if event.kind not in PEER_EVENTS:
                return
            data = event.data
            peer_id = data.get("peer_id") or (data.get("peer") or {}).get("id")
            if isinstance(peer_id, str):
                dirty.add(peer_id)
                wake.set()

        self.registry.bus.listeners.append(listener)
        try:
            await self._send_routes(session, [p.id for p in self.registry.peers.values()],
                                    state)
            loads_at = clock.now() + session.heartbeat_interval
            while not session.closed.is_set():
                with trio.move_on_at(loads_at if state.loads else math.inf):
                    await wake.wait()
                wake = trio.Event()
                if dirty:
                    await trio.sleep(self.interval)
                    ids, dirty = list(dirty), set()
                    await self._send_routes(session, ids, state)
                if state.loads and clock.now() >= loads_at:
                    await self._send_loads(session, state)
                    loads_at = clock.now() + session.heartbeat_interval
        finally:
            self.registry.bus.listeners.remove(listener)

    async def _send_routes(self, session: TunnelSession, ids: list[str],
                           state: _Advertised) -> None:
        """ROUTES for ``ids`` (advertised if reachable, removed if not), split so that
        no frame exceeds the control-payload budget. A node whose routing state is as
        last sent is only noted in ``state.loads`` if its figures changed."""
        budget = int(self.tunnel.max_control_bytes * ROUTES_BUDGET)
        nodes: list[msgspec.Raw] = []  # each entry encoded once, to measure and to send
        removed: list[str] = []
        size = 0
        for peer_id in ids:
            peer = self.registry.peers.get(peer_id)
            if peer is not None and not can_advertise(peer) and peer.role != "node":
                continue  # a relay or gateway below us: its nodes are advertised, not it
            reachable = peer is not None and can_advertise(peer)
            if peer is not None and reachable:
                routing = routing_state(peer)
                if state.sent.get(peer_id) == routing:
                    if state.stats.get(peer_id) != peer.stats:
                        state.loads.add(peer_id)
                    continue
                state.sent[peer_id], state.stats[peer_id] = routing, peer.stats
                state.loads.discard(peer_id)
            else:
                state.forget(peer_id)
            entry: msgspec.Raw | None = (
                msgspec.Raw(_json.encode(advertised(peer, state.accepted)))
                if peer is not None and reachable else None)
            cost = len(entry) if entry is not None else len(peer_id) + 4
            if cost > budget:  # one node's labels and models alone would break the frame
                log.warning("node %r not advertised upstream: its entry is %d bytes, over "
                            "the %d-byte budget", peer_id[:128], cost, budget)
                entry, cost = None, len(peer_id) + 4
                state.forget(peer_id)
            if size + cost > budget and (nodes or removed):
                await session.send_control(
                    partial(Connection.send_routes, nodes=nodes, removed=removed))
                nodes, removed, size = [], [], 0
            if entry is not None:
                nodes.append(entry)
            else:
                removed.append(peer_id)
            size += cost
        if nodes or removed:
            await session.send_control(
                partial(Connection.send_routes, nodes=nodes, removed=removed))

    async def _send_loads(self, session: TunnelSession, state: _Advertised) -> None:
        """The figures of every node in ``state.loads`` (advertised, only its load
        changed), in as few ROUTES frames as fit."""
        budget = int(self.tunnel.max_control_bytes * ROUTES_BUDGET)
        loads: list[msgspec.Raw] = []
        size = 0
        for peer_id in state.loads:
            peer = self.registry.peers.get(peer_id)
            if peer is None or state.sent.get(peer_id) != routing_state(peer):
                continue  # gone or changed since: its entry goes out (or went) whole
            state.stats[peer_id] = peer.stats
            load = msgspec.Raw(_json.encode({"id": peer_id, "stats": peer.stats}))
            if size + len(load) > budget and loads:
                await session.send_control(
                    partial(Connection.send_routes, nodes=[], removed=[], loads=loads))
                loads, size = [], 0
            loads.append(load)
            size += len(load)
        state.loads.clear()
        if loads:
            await session.send_control(
                partial(Connection.send_routes, nodes=[], removed=[], loads=loads))


class _Advertised:
    """What one upstream session was told of each node."""

    __slots__ = ("accepted", "loads", "sent", "stats")

    def __init__(self, accepted: frozenset[str]) -> None:
        self.accepted = accepted
        """The endpoint names this session's peer decodes."""
        self.sent: dict[str, tuple[Any, ...]] = {}
        """Node id → its routing state (:func:`routing_state`) as last advertised."""
        self.stats: dict[str, dict[str, Any]] = {}
        """Node id → the load figures last advertised."""
        self.loads: set[str] = set()
        """Nodes whose figures alone changed since: sent with the next ``loads``."""

    def forget(self, peer_id: str) -> None:
        self.sent.pop(peer_id, None)
        self.stats.pop(peer_id, None)
        self.loads.discard(peer_id)
