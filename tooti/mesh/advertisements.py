"""Nodes reached through a relay: what a relay advertises, and how the next hop
takes it into its registry.

A relay sends ROUTES frames upstream listing every node behind it (its own
tunnels and, recursively, the nodes of relays behind it): id, public key, the
proof each node gave in its own handshake, models with prices and capacities,
load figures and the number of hops. The receiving gateway (or relay) checks
each node's proof itself, binds the id to the key exactly as for a direct
tunnel, and registers the node as reached through that relay's tunnel; the
node's streams are then opened on the relay's tunnel with the OPEN naming the
node. A node directly on the relay must have made its proof in a handshake with
that relay (session ids start with the relay's id), and a node already reached
directly or through another live relay is not taken over. Limits of this trust
(deeper hops, no expiry): ``docs/protocol.md`` § 4.6.
"""

from __future__ import annotations

import logging
from typing import Any

from tooti.backends.base import ModelInfo
from tooti.identity import PUBLIC_KEY_BYTES, b64, proof_message, unb64, verify
from tooti.mesh.events import BusEvent
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.protocol import schemas
from tooti.protocol.connection import ProtocolError, RoutesReceived
from tooti.protocol.schemas import MAX_HOPS, Proof, RouteEntry

log = logging.getLogger("tooti.gateway")

LOGGED_REFUSALS = 10
"""Refused entries of one ROUTES frame logged one by one (the rest are counted)."""


def advertised(peer: Peer, accepted: frozenset[str] = frozenset(schemas.ALL_ENDPOINTS)
               ) -> dict[str, Any]:
    """The ROUTES entry a relay sends upstream for one node it can reach, its models
    cut to the endpoint names ``accepted`` (what the upstream peer's WELCOME says it
    decodes: :func:`~tooti.protocol.schemas.announceable`), so an upstream older than
    a name the node serves is never sent it."""
    return {
        "id": peer.id,
        "public_key": b64(peer.public_key),
        "proof": peer.proof,
        "models": schemas.announceable([info.to_wire() for info in peer.models.values()],
                                       accepted),
        "stats": peer.stats,
        "labels": peer.labels,
        "software": peer.software,
        "hops": peer.hops + 1,
        "draining": peer.draining,
    }


def routing_state(peer: Peer) -> tuple[Any, ...]:
    """What of a node's ROUTES entry matters for routing (all but its load figures,
    though whether it reports itself healthy counts): a relay re-sends the whole entry
    only when this changed, load figures alone in ``loads``."""
    return (peer, peer.public_key, peer.proof, peer.models, peer.labels, peer.software,
            peer.hops, peer.draining, peer.stats.get("healthy", True) is not False)


def can_advertise(peer: Peer) -> bool:
    """True for a node (not a relay) that may be advertised one hop further up."""
    return (peer.role == "node" and bool(peer.public_key) and not peer.session.closed.is_set()
            and peer.hops + 1 <= MAX_HOPS)


class RelayedNodes:
    """The nodes one relay's tunnel advertises, kept in a registry."""

    def __init__(self, registry: Registry, relay: Peer, limit: int = 1024,
                 max_models: int = 256) -> None:
        self.registry = registry
        self.relay = relay
        self.limit = limit
        """Most nodes this relay may have registered at once."""
        self.max_models = max_models
        """Most models one node may advertise (an entry with more is refused)."""
        self.nodes: dict[str, Peer] = {}
        """Nodes this relay advertises, by id (registered, or displaced by a direct
        tunnel that has connected since)."""
        self.shadowed: dict[str, Peer] = {}
        """Proven nodes that were not registered because the node is reached directly or
        through another relay: they take over the moment that route goes away."""
        registry.bus.listeners.append(self._on_event)

    def _on_event(self, event: BusEvent) -> None:
        """A peer left: if it was a node this relay can reach, route to it through us."""
        if event.kind != "peer.left" or self.relay.session.closed.is_set():
            return
        node_id = event.data.get("peer_id")
        if not isinstance(node_id, str) or node_id in self.registry.peers:
            return
        peer = self.nodes.get(node_id) or self.shadowed.get(node_id)
        if peer is not None and self.registry.add_relayed(peer):
            self.shadowed.pop(node_id, None)
            self.nodes[node_id] = peer
            self.registry.set_models(peer, list(peer.models.values()))

    def apply(self, event: RoutesReceived) -> None:
        """Add, update or remove nodes as the relay says. A malformed or unproven
        entry is skipped with a warning; the relay's other nodes are unaffected."""
        for node_id in event.removed:  # first, so they make room for new ones
            self._remove(node_id)
        refused: list[tuple[str, Exception]] = []
        for entry in event.nodes:
            try:
                self._upsert(entry)
            except Exception as exc:  # one bad entry never costs the relay its session
                refused.append((str(entry.get("id"))[:128], exc))
        for node_id, error in refused[:LOGGED_REFUSALS]:  # a bounded number of lines
            log.warning("relay %s: node %r refused: %s", self.relay.id, node_id, error)
        if len(refused) > LOGGED_REFUSALS:
            log.warning("relay %s: %d more node entries of one ROUTES frame refused",
                        self.relay.id, len(refused) - LOGGED_REFUSALS)
        if event.full:
            listed = {entry["id"] for entry in event.nodes}
            for node_id in set(self.nodes) | set(self.shadowed):
                if node_id not in listed:
                    self._remove(node_id)
        for raw in event.loads:
            self._load(raw)
        budget = self.relay.session.control_budget
        if budget is not None:  # the relay speaks for its nodes: its budget grows
            budget.advertising(len(self.nodes) + len(self.shadowed),
                               self.relay.session.conn.limits.max_control_bytes)

    def _load(self, raw: dict[str, Any]) -> None:
        """New load figures of a node this relay advertised (a node it has not is
        skipped: its entry may have been refused)."""
        load = schemas.convert(raw, schemas.RouteLoad, "bad_routes", "ROUTES load")
        peer = self.nodes.get(load.id) or self.shadowed.get(load.id)
        if peer is None:
            return
        stats = schemas.stats_dict(load.stats)
        if self.registry.peers.get(peer.id) is peer:
            self.registry.heartbeat(peer, stats)  # cheap, coalesced
        else:
            peer.stats = stats

    def clear(self) -> None:
        """The relay's tunnel closed: every node behind it leaves the registry (and may
        be taken over at once by another relay that reaches it)."""
        self.shadowed.clear()
        for node_id in list(self.nodes):
            self._remove(node_id)
        if self._on_event in self.registry.bus.listeners:
            self.registry.bus.listeners.remove(self._on_event)

    def mark_draining(self) -> None:
        """The relay sent GOAWAY: none of its nodes takes new streams through it."""
        for peer in self.nodes.values():
            peer.draining = True
            self.registry.peer_updated(peer)
        self.registry.changed()

    def _remove(self, node_id: str) -> None:
        self.shadowed.pop(node_id, None)
        peer = self.nodes.pop(node_id, None)
        if peer is not None:
            self.registry.remove(peer)

    def _upsert(self, raw: dict[str, Any]) -> None:
        entry = schemas.convert(raw, RouteEntry, "bad_routes", "ROUTES entry")
        if len(entry.models) > self.max_models:
            raise ValueError(f"{len(entry.models)} models, over the limit of "
                             f"{self.max_models} per node (tunnel.max_models_per_peer)")
        node_id, hops = entry.id, entry.hops
        models = {m.id: m for m in map(ModelInfo.from_wire, entry.models)}
        stats = schemas.stats_dict(entry.stats)
        draining = entry.draining or self.relay.draining
        proof = {"challenge": entry.proof.challenge, "session_id": entry.proof.session_id,
                 "signature": entry.proof.signature}
        peer = self.nodes.get(node_id) or self.shadowed.get(node_id)
        if peer is None or peer.proof != proof or b64(peer.public_key) != entry.public_key:
            if peer is None and len(self.nodes) + len(self.shadowed) >= self.limit:
                raise ValueError(f"the relay already has {self.limit} nodes here "
                                 "(tunnel.max_relayed_nodes)")
            public_key = self._check_proof(node_id, entry.public_key, entry.proof, hops)
            if peer is not None:
                self._remove(node_id)
            peer = Peer(
                id=node_id, role="node", session=self.relay.session,
                address=f"via {self.relay.id}", labels=entry.labels,
                software=entry.software, via=self.relay.id, hops=hops,
                public_key=public_key, proof=proof, group=self.relay.group,
                token=self.relay.token, owner=self.relay.owner,
                token_id=self.relay.token_id, group_id=self.relay.group_id,
                stream_limit=self.relay.stream_limit,
            )
            peer.stats, peer.draining, peer.models = stats, draining, models
            self._register(peer)
            return
        peer.labels, peer.hops = entry.labels, hops
        registered = self.registry.peers.get(node_id) is peer
        if registered and models == peer.models and draining == peer.draining:
            self.registry.heartbeat(peer, stats)  # load figures only: cheap, coalesced
            return
        peer.stats, peer.draining = stats, draining
        if not registered:
            # Reached directly or through another relay (or a direct tunnel had taken it
            # over and has closed since): keep it current, register it if free.
            peer.models = models
            self._register(peer)
        elif not self.registry.set_models(peer, list(models.values())):
            self.registry.changed()  # draining flipped
            self.registry.peer_updated(peer)

    def _register(self, peer: Peer) -> None:
        """Register a proven node through this relay, or keep it aside while another
        route to it lives."""
        if self.registry.add_relayed(peer):
            self.shadowed.pop(peer.id, None)
            self.nodes[peer.id] = peer
            self.registry.set_models(peer, list(peer.models.values()))
            log.info("peer %s serves %s (via %s)", peer.id, peer.models_summary(),
                     self.relay.id)
        else:
            self.nodes.pop(peer.id, None)
            self.shadowed[peer.id] = peer

    def _check_proof(self, node_id: str, key_text: str, proof: Proof, hops: int) -> bytes:
        """The node's public key, once its handshake proof verifies; else ProtocolError.

        A node directly on the relay (``hops`` 1) must have made its proof for this very
        relay: the relay's session ids start with its own id, and the signature covers
        the session id, so another peer cannot replay the proof under its own name."""
        public_key = unb64(key_text, PUBLIC_KEY_BYTES)
        if public_key is None:
            raise ProtocolError("bad_routes", "public_key must be a base64 Ed25519 key")
        if hops == 1 and not proof.session_id.startswith(self.relay.id + "."):
            raise ProtocolError("bad_proof", f"the proof was not made for relay {self.relay.id}")
        challenge, signature = unb64(proof.challenge), unb64(proof.signature)
        if challenge is None or signature is None or not verify(
                public_key, signature, proof_message(challenge, proof.session_id, node_id)):
            raise ProtocolError("bad_proof", "the node's proof does not verify")
        self.registry.bind_identity(node_id, public_key)
        return public_key

