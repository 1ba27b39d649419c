"""``region-affinity``: an example tooti routing policy plugin.

Prefer nodes whose HELLO label ``region`` equals the region the request asks
for — the ``x-tooti-region`` header, else the ``default_region`` option — and
fall back to the other nodes when no node of that region can take it. Within
each group the least-loaded node wins (in-flight streams per advertised slot,
then lowest reported time to first token), ties broken at random.

Config::

    [routing]
    policy = "region-affinity"

    [routing.options]
    default_region = "eu"        # used when a request has no x-tooti-region header
    # header = "x-tooti-region"  # request header to read (any case)
    # label = "region"           # node label to compare with

Regions compare case-insensitively, surrounding spaces ignored. The policy
runs on every request, so :meth:`RegionAffinity.rank` is one pass over the
candidates with no sorting and no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic

from tooti.hookspecs import hookimpl
from tooti.routing.base import N, Node, RouteRequest, RoutingPolicy

__all__ = ["DEFAULT_HEADER", "DEFAULT_LABEL", "POLICY_NAME", "RegionAffinity",
           "tooti_routing_policies"]

POLICY_NAME = "region-affinity"
DEFAULT_HEADER = "x-tooti-region"
DEFAULT_LABEL = "region"


def _normalise(region: object) -> str:
    return region.strip().casefold() if isinstance(region, str) else ""


def _option(options: Mapping[str, Any], name: str, default: str) -> str:
    value = options.get(name, default)
    if not isinstance(value, str):
        raise ValueError(f"routing.options.{name} must be a string, not {type(value).__name__}")
    return value


class _Best(Generic[N]):
    """The least-loaded peer seen so far in one group, ties chosen uniformly at random."""

    __slots__ = ("key", "peer", "rng", "ties")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.peer: N | None = None
        self.key = (float("inf"), float("inf"))
        self.ties = 0

    def offer(self, peer: N, key: tuple[float, float]) -> None:
        if key < self.key:
            self.peer, self.key, self.ties = peer, key, 1
        elif key == self.key:
            # Reservoir sampling: the k-th tie replaces the choice with probability 1/k.
            self.ties += 1
            if self.rng.randrange(self.ties) == 0:
                self.peer = peer


class RegionAffinity:
    """Least-loaded node of the requested region first, then the least-loaded other node.

    ``rank`` returns at most two peers: the best one in the requested region
    (if any is a candidate) followed by the best one elsewhere. The router
    only uses the first, and asks again without it when it has to fail over,
    so the fallback is reached even when a whole region is down or refuses.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Read ``default_region``, ``header`` and ``label`` from ``[routing.options]``."""
        options = options or {}
        self.default_region = _normalise(_option(options, "default_region", ""))
        self.header = _option(options, "header", DEFAULT_HEADER).lower()
        self.label = _option(options, "label", DEFAULT_LABEL)
        self._random = random.Random()

    def region_of(self, request: RouteRequest) -> str:
        """The (normalised) region ``request`` asks for; empty when it asks for none."""
        return _normalise(request.headers.get(self.header)) or self.default_region

    def rank(self, request: RouteRequest, candidates: Sequence[N]) -> Sequence[N]:
        """The best candidate in the requested region, then the best one outside it."""
        region = self.region_of(request)
        model = request.model
        local: _Best[N] = _Best(self._random)
        other: _Best[N] = _Best(self._random)
        label = self.label
        for peer in candidates:
            key = (peer.load(model), _ttft(peer))
            if region and _normalise(peer.labels.get(label)) == region:
                local.offer(peer, key)
            else:
                other.offer(peer, key)
        return [p for p in (local.peer, other.peer) if p is not None]


def _ttft(peer: Node) -> float:
    value = peer.stats.get("ttft_ms")
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0


@hookimpl
def tooti_routing_policies() -> Mapping[str, Callable[[Mapping[str, Any]], RoutingPolicy]]:
    """Provide the ``region-affinity`` routing policy."""
    return {POLICY_NAME: RegionAffinity}
