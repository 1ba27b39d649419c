"""Built-in routing policies, registered through the ``tooti_routing_policies`` hook."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tooti.gateway.registry import Peer
from tooti.hookspecs import hookimpl
from tooti.routing.base import RouteRequest, RoutingPolicy


class LeastLoaded:
    """Fewest in-flight streams per advertised slot; then lowest TTFT; ties at random.

    Returns only the best node (one pass, no sort): the router asks again,
    without the failed node, if it has to fail over.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._random = random.Random()

    def rank(self, request: RouteRequest, candidates: Sequence[Peer]) -> Sequence[Peer]:
        """The least-loaded candidate (as a one-element list)."""
        model = request.model
        best: list[Peer] = []
        best_key = (float("inf"), float("inf"))
        for peer in candidates:
            key = (peer.load(model), _ttft(peer))
            if key < best_key:
                best, best_key = [peer], key
            elif key == best_key:
                best.append(peer)
        if len(best) > 1:
            return [self._random.choice(best)]
        return best


class RoundRobin:
    """Each request starts at the next candidate in turn."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._counter = itertools.count()

    def rank(self, request: RouteRequest, candidates: Sequence[Peer]) -> Sequence[Peer]:
        """Rotate the candidates (sorted by id so the order is stable)."""
        ordered = sorted(candidates, key=lambda p: p.id)
        if not ordered:
            return ordered
        start = next(self._counter) % len(ordered)
        return ordered[start:] + ordered[:start]


def _ttft(peer: Peer) -> float:
    value = peer.stats.get("ttft_ms")
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0


@hookimpl
def tooti_routing_policies() -> Mapping[str, Callable[[Mapping[str, Any]], RoutingPolicy]]:
    """The built-in policies."""
    return {"least-loaded": LeastLoaded, "round-robin": RoundRobin}
