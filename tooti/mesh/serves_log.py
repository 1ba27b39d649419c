"""The ``peer X serves ...`` log line of one tunnel: what an operator reads to see a
node's models arrive, finish loading and change, bounded against a node that changes
them at will."""

from __future__ import annotations

import logging
from collections.abc import Callable

import tooti.clock
from tooti.mesh.peer import Peer

log = logging.getLogger("tooti.gateway")

BURST = 4
"""Lines a peer's changes may log in a row (first models, loaded, a reload, ...)."""
EVERY = 30.0
"""Seconds that earn one more line once the burst is spent."""


class ServesLog:
    """Logs at INFO what a peer serves (``peer X serves a, b (loading)``) each time that
    text changes: a model added or removed, or one that finished loading. A peer that
    keeps changing (a hostile node flipping a model between loading and ready, up to its
    control-frame limit) gets :data:`BURST` lines in a row, then one per :data:`EVERY`
    seconds at most; a line after some were held back says how many. Repeats of the
    same models and states log nothing. The admin API and ``tooti tui`` always show the
    current state."""

    def __init__(self, *, burst: int = BURST, every: float = EVERY,
                 clock: Callable[[], float] = tooti.clock.now) -> None:
        self.burst, self.every, self._clock = burst, every, clock
        self._tokens = float(burst)
        self._stamp: float | None = None
        self._seen = ""
        self.held_back = 0
        """Changes not logged since the last line."""

    def note(self, peer: Peer, via: str = "") -> None:
        """``peer``'s models may have changed: log them if the text differs from what
        was last seen and the budget allows (``via``: the relay it is reached through)."""
        summary = peer.models_summary()
        if summary == self._seen:
            return
        self._seen = summary
        now = self._clock()
        if self._stamp is not None:
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._stamp) / self.every)
        self._stamp = now
        if self._tokens < 1:
            self.held_back += 1
            return
        self._tokens -= 1
        where = f" (via {via})" if via else ""
        held = (f" ({self.held_back} earlier changes not logged)" if self.held_back
                else "")
        self.held_back = 0
        log.info("peer %s serves %s%s%s", peer.id, summary, where, held)
