"""Choosing the node for one request (least-loaded, ties broken at random)."""

from __future__ import annotations

import random

from tooti.gateway.registry import Peer, Registry


def choose(registry: Registry, model: str, exclude: set[str]) -> Peer | None:
    """Return the least-loaded live peer for ``model`` not in ``exclude``.

    Load is in-flight streams over advertised capacity; ties are broken at
    random so equal nodes share traffic.
    """
    best: list[Peer] = []
    best_load = float("inf")
    for peer in registry.candidates(model):
        if peer.id in exclude:
            continue
        load = peer.load(model)
        if load < best_load:
            best, best_load = [peer], load
        elif load == best_load:
            best.append(peer)
    if not best:
        return None
    return best[0] if len(best) == 1 else random.choice(best)
