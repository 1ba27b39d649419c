"""Live peers known to a gateway, and which of them serve which model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tooti.backends.base import ModelInfo
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

    @property
    def live(self) -> bool:
        """True while the tunnel is up and the peer takes new streams."""
        return (
            not self.draining
            and not self.session.closed.is_set()
            and self.stats.get("healthy", True) is not False
        )

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
        }


class Registry:
    """Peers by id, with an index from model id to the peers serving it."""

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self._by_model: dict[str, list[Peer]] = {}
        self.known_models: set[str] = set()
        """Every model id ever advertised here (unknown vs. unavailable)."""
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, re-checking on every registry change."""
        while not condition():
            await self._changed.wait()

    def changed(self) -> None:
        """Wake everyone waiting in :meth:`wait_until` (peer state changed)."""
        self._changed.set()
        self._changed = trio.Event()

    def add(self, peer: Peer) -> Peer | None:
        """Register ``peer``; returns the peer it replaces (same id), if any."""
        old = self.peers.get(peer.id)
        self.peers[peer.id] = peer
        self._reindex()
        log.info("peer %s joined from %s (%s)", peer.id, peer.address, peer.role)
        return old

    def remove(self, peer: Peer) -> None:
        """Forget ``peer`` if it is still the registered one for its id."""
        if self.peers.get(peer.id) is peer:
            del self.peers[peer.id]
            self._reindex()
            log.info("peer %s left (%s)", peer.id, peer.session.close_reason or "closed")

    def set_models(self, peer: Peer, models: list[ModelInfo]) -> None:
        """Replace the models a peer serves."""
        peer.models = {m.id: m for m in models}
        self.known_models.update(peer.models)
        self._reindex()

    def candidates(self, model: str) -> list[Peer]:
        """Live peers serving ``model``."""
        return [p for p in self._by_model.get(model, ()) if p.live]

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
