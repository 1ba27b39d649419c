"""Built-in routing policies, registered through the ``tooti_routing_policies`` hook."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import Any

from tooti.hookspecs import hookimpl
from tooti.routing.base import CandidateSet, N, Node, RouteRequest, RoutingPolicy

_ID = attrgetter("id")


class LeastLoaded:
    """Fewest in-flight streams per advertised slot; then lowest TTFT (as measured by
    this gateway); ties at random.

    Returns only the best node: the router asks again, without the failed node, if it
    has to fail over. Given the router's :class:`CandidateSet` it reads the index
    (O(log n)); given a plain sequence it makes one pass.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._random = random.Random()

    def rank(self, request: RouteRequest, candidates: Sequence[N]) -> Sequence[N]:
        """The least-loaded candidate (as a one-element list)."""
        if isinstance(candidates, CandidateSet):
            peer = candidates.least_loaded(self._random)
            return [] if peer is None else [peer]
        model = request.model
        best: list[N] = []
        best_key = (float("inf"), float("inf"))
        for peer in candidates:
            key = (peer.load(model), _measured_ttft(peer, model))
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

    def rank(self, request: RouteRequest, candidates: Sequence[N]) -> Sequence[N]:
        """Rotate the candidates (sorted by id so the order is stable)."""
        if isinstance(candidates, CandidateSet):
            ordered = candidates.by_id()  # kept sorted by the index
        else:
            ordered = sorted(candidates, key=_ID)
        if not ordered:
            return ordered
        start = next(self._counter) % len(ordered)
        return ordered[start:] + ordered[:start]


class Latency:
    """Lowest time to first token as measured by this gateway (EWMA per node and model),
    then highest decode speed, then lowest load. Nodes not yet measured go first, so
    every node gets measured."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._random = random.Random()

    def rank(self, request: RouteRequest, candidates: Sequence[N]) -> Sequence[N]:
        """The fastest candidate (as a one-element list)."""
        if isinstance(candidates, CandidateSet):
            peer = candidates.min_by("fastest", self._random)
            return [] if peer is None else [peer]
        model = request.model

        def key(peer: N) -> tuple[float, float, float, float]:
            record = peer.health.get(model)
            ttft = record.ttft_ms if record and record.ttft_ms is not None else -1.0
            tps = record.tokens_per_s if record and record.tokens_per_s is not None else 0.0
            return (ttft, -tps, peer.load(model), self._random.random())

        return [min(candidates, key=key)] if candidates else []


class Weighted:
    """Random choice in proportion to operator weights.

    Options: ``weights`` maps node ids to weights (default ``default_weight``,
    1.0); a weight of 0 takes a node out of rotation unless nothing else is left.

    Draws by rejection: a uniformly drawn candidate is kept with probability its weight
    ÷ the largest weight, which takes a few draws instead of a weight per candidate;
    after ``REJECTION_DRAWS`` misses (very uneven weights) it draws from the cumulative
    weights. Either way each candidate comes out in proportion to its weight.
    """

    REJECTION_DRAWS = 32

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        options = options or {}
        weights = options.get("weights") or {}
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.default = float(options.get("default_weight", 1.0))
        self._random = random.Random()

    def rank(self, request: RouteRequest, candidates: Sequence[N]) -> Sequence[N]:
        """One candidate drawn by weight."""
        peers = list(candidates)
        if not peers:
            return []
        weights, default, rng = self.weights, self.default, self._random
        ceiling = max(default, max(weights.values(), default=0.0))
        if ceiling > 0.0:
            for _ in range(self.REJECTION_DRAWS):
                peer = rng.choice(peers)
                if rng.random() * ceiling < weights.get(peer.id, default):
                    return [peer]
        chances = list(map(max, itertools.repeat(0.0), map(
            weights.get, map(_ID, peers), itertools.repeat(default))))
        if not any(chances):
            return [rng.choice(peers)]
        return rng.choices(peers, weights=chances)


class Cheapest:
    """The cheapest advertised price (input + output per 1M tokens) among nodes whose
    measured TTFT meets ``max_ttft_ms`` (option; none = no ceiling); if none meets it,
    the cheapest overall. Ties go to the less loaded node."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        ceiling = (options or {}).get("max_ttft_ms")
        self.max_ttft_ms = None if ceiling is None else float(ceiling)

    def rank(self, request: RouteRequest, candidates: Sequence[N]) -> Sequence[N]:
        """The cheapest candidate meeting the latency ceiling (one-element list)."""
        model = request.model

        def price(peer: N) -> tuple[float, float]:
            info = peer.models.get(model)
            total = (info.price_input + info.price_output) if info else float("inf")
            return (total, peer.load(model))

        if not candidates:
            return []
        if isinstance(candidates, CandidateSet):
            within = candidates
            if self.max_ttft_ms is not None:
                within = candidates.at_most("ttft", self.max_ttft_ms)
            peer = (within or candidates).min_by("price")
            return [] if peer is None else [peer]
        fast = candidates
        if self.max_ttft_ms is not None:
            ceiling = self.max_ttft_ms
            fast = [p for p in candidates if _measured_ttft(p, model) <= ceiling]
        return [min(fast or candidates, key=price)]


def _measured_ttft(peer: Node, model: str) -> float:
    record = peer.health.get(model)
    return record.ttft_ms if record and record.ttft_ms is not None else 0.0


@hookimpl
def tooti_routing_policies() -> Mapping[str, Callable[[Mapping[str, Any]], RoutingPolicy]]:
    """The built-in policies."""
    return {
        "least-loaded": LeastLoaded,
        "round-robin": RoundRobin,
        "latency": Latency,
        "weighted": Weighted,
        "price": Cheapest,
    }
