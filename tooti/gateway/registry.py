"""Live peers known to a gateway, and which of them serve which model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tooti.backends.base import ModelInfo
from tooti.gateway.events import EventBus
from tooti.gateway.health import ModelHealth
from tooti.identity import DERIVED_PREFIX, derive_id
from tooti.protocol.connection import ProtocolError
from tooti.tunnel import TunnelSession

log = logging.getLogger("tooti.gateway")


@dataclass(eq=False)
class Peer:
    """One node (or relay) with a live tunnel to this gateway."""

    id: str
    role: str
    session: TunnelSession
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    software: str = ""
    models: dict[str, ModelInfo] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    """Streams this gateway has open on the peer, by model."""
    stats: dict[str, Any] = field(default_factory=dict)
    """The peer's last HEARTBEAT payload."""
    connected_at: float = field(default_factory=time.time)
    draining: bool = False
    failures: int = 0
    health: dict[str, ModelHealth] = field(default_factory=dict)
    """What this gateway measured for each model on this peer."""

    @property
    def live(self) -> bool:
        """True while the tunnel is up and the peer takes new streams."""
        return (
            not self.draining
            and not self.session.closed.is_set()
            and self.stats.get("healthy", True) is not False
        )

    def health_of(self, model: str) -> ModelHealth:
        """This peer's measured record for ``model`` (created on first use)."""
        record = self.health.get(model)
        if record is None:
            record = self.health[model] = ModelHealth()
        return record

    def capacity(self, model: str) -> int:
        """Concurrent streams the peer advertises for ``model``."""
        info = self.models.get(model)
        return max(1, info.max_concurrency) if info else 1

    def has_slot(self, model: str) -> bool:
        """True while in-flight streams for ``model`` are below its capacity and the
        tunnel can take another stream (its ``max_streams`` limit)."""
        return (self.in_flight.get(model, 0) < self.capacity(model)
                and self.session.conn.can_open_stream())

    def load(self, model: str) -> float:
        """In-flight streams for ``model`` divided by its advertised capacity."""
        info = self.models.get(model)
        capacity = info.max_concurrency if info else 1
        return self.in_flight.get(model, 0) / max(1, capacity)

    def total_in_flight(self) -> int:
        """Streams open on this peer across every model."""
        return sum(self.in_flight.values())

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for admin and health endpoints."""
        return {
            "id": self.id, "role": self.role, "address": self.address, "labels": self.labels,
            "software": self.software, "models": sorted(self.models),
            "in_flight": self.total_in_flight(), "draining": self.draining,
            "rtt_ms": None if self.session.rtt is None else round(self.session.rtt * 1000, 3),
            "connected_at": self.connected_at,
            "state": self.state(),
            "failures": self.failures,
            "stats": self.stats,
            "per_model": {
                model: {
                    "in_flight": self.in_flight.get(model, 0),
                    "capacity": self.capacity(model),
                    "price": {"input": info.price_input, "output": info.price_output},
                    **self.health_of(model).describe(),
                }
                for model, info in sorted(self.models.items())
            },
        }

    def state(self) -> str:
        """``live``, ``draining``, ``unhealthy``, ``cooldown`` (every model) or ``gone``."""
        if self.session.closed.is_set():
            return "gone"
        if self.draining:
            return "draining"
        if self.stats.get("healthy", True) is False:
            return "unhealthy"
        if self.models and all(self.health_of(m).in_cooldown for m in self.models):
            return "cooldown"
        return "live"


class Registry:
    """Peers by id, with an index from model id to the peers serving it."""

    def __init__(self, bus: EventBus | None = None) -> None:
        self.bus = bus or EventBus()
        """Where peer changes are published."""
        self.peers: dict[str, Peer] = {}
        self._by_model: dict[str, list[Peer]] = {}
        self.known_models: set[str] = set()
        """Every model id ever advertised here (unknown vs. unavailable)."""
        self.identities: dict[str, bytes] = {}
        """Chosen node names → the public key that first proved each (trust on first use)."""
        self._changed = trio.Event()
        self._slot_events: dict[str, trio.Event] = {}

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, re-checking on every registry change."""
        while not condition():
            await self._changed.wait()

    def changed(self) -> None:
        """Wake everyone waiting in :meth:`wait_until` (peer state changed)."""
        self._changed.set()
        self._changed = trio.Event()

    def bind_identity(self, peer_id: str, public_key: bytes) -> None:
        """Accept ``public_key`` for ``peer_id`` or raise ProtocolError ``identity_mismatch``.

        A derived id (``tooti-…``) must be the key's own; a chosen name is bound to
        the first key that proves it here and refused to any other key afterwards.
        """
        if peer_id.startswith(DERIVED_PREFIX):
            if derive_id(public_key) != peer_id:
                raise ProtocolError("identity_mismatch",
                                    f"{peer_id} is not the id of the presented key")
            return
        bound = self.identities.setdefault(peer_id, public_key)
        if bound != public_key:
            raise ProtocolError("identity_mismatch",
                                f"node id {peer_id} belongs to another key")

    def add(self, peer: Peer) -> Peer | None:
        """Register ``peer``; returns the peer it replaces (same id), if any."""
        old = self.peers.get(peer.id)
        self.peers[peer.id] = peer
        self._reindex()
        log.info("peer %s joined from %s (%s)", peer.id, peer.address, peer.role)
        self.bus.publish("peer.joined", peer=peer.describe())
        return old

    def remove(self, peer: Peer) -> None:
        """Forget ``peer`` if it is still the registered one for its id."""
        if self.peers.get(peer.id) is peer:
            del self.peers[peer.id]
            self._reindex()
            log.info("peer %s left (%s)", peer.id, peer.session.close_reason or "closed")
            self.bus.publish("peer.left", peer_id=peer.id,
                             reason=peer.session.close_reason or "closed")

    def set_models(self, peer: Peer, models: list[ModelInfo]) -> None:
        """Replace the models a peer serves."""
        peer.models = {m.id: m for m in models}
        self.known_models.update(peer.models)
        self._reindex()
        self.peer_updated(peer)

    def peer_updated(self, peer: Peer) -> None:
        """Publish a peer's current state (models, load, health, cooldowns)."""
        if self.peers.get(peer.id) is peer:
            self.bus.publish("peer.updated", peer=peer.describe())

    def candidates(self, model: str) -> list[Peer]:
        """Live peers serving ``model`` and not in cooldown for it."""
        out = []
        for peer in self._by_model.get(model, ()):
            if peer.live:
                record = peer.health.get(model)
                if record is None or not record.in_cooldown:
                    out.append(peer)
        return out

    def with_free_slot(self, model: str) -> tuple[bool, list[Peer]]:
        """In one pass: whether any candidate (see :meth:`candidates`) serves ``model``,
        and the candidates with a free slot for it (the routing hot path)."""
        any_candidate = False
        free = []
        for peer in self._by_model.get(model, ()):
            if not peer.live:
                continue
            record = peer.health.get(model)
            if record is not None and record.in_cooldown:
                continue
            any_candidate = True
            if peer.has_slot(model):
                free.append(peer)
        return any_candidate, free

    def serving(self, model: str) -> list[Peer]:
        """Live peers serving ``model``, cooldown or not."""
        return [p for p in self._by_model.get(model, ()) if p.live]

    async def wait_for_slot(self, model: str) -> None:
        """Wait until a stream of ``model`` ends somewhere or the peers change."""
        event = self._slot_events.get(model)
        if event is None:
            event = self._slot_events[model] = trio.Event()
        changed = self._changed
        async with trio.open_nursery() as nursery:
            async def either(wait: Callable[[], Any]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(either, event.wait)
            nursery.start_soon(either, changed.wait)

    def release(self, peer: Peer, model: str) -> None:
        """A stream of ``model`` on ``peer`` ended: free its slot, wake one queue."""
        peer.in_flight[model] -= 1
        event = self._slot_events.pop(model, None)
        if event is not None:
            event.set()

    def live_models(self) -> dict[str, list[Peer]]:
        """Model id → live peers serving it (models with none are left out)."""
        out: dict[str, list[Peer]] = {}
        for model, peers in self._by_model.items():
            live = [p for p in peers if p.live]
            if live:
                out[model] = live
        return out

    def _reindex(self) -> None:
        index: dict[str, list[Peer]] = {}
        for peer in self.peers.values():
            for model in peer.models:
                index.setdefault(model, []).append(peer)
        self._by_model = index
        self.changed()
