"""Growing delays between attempts: re-dialling a peer, restarting a crashed child or a
billing plugin, reconnecting the TUI's event stream.

:class:`Backoff` only computes the delays. It does no I/O and reads no clock: the caller
waits each delay out itself (``await trio.sleep(backoff.next())``) and calls
:meth:`Backoff.reset` once an attempt went well, by whatever measure it uses.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays ``base``, ``base * factor``, ``base * factor**2`` … at most ``cap``, each
    scaled by a factor drawn uniformly from ``jitter`` (``(1.0, 1.0)``: none) with
    ``rng`` (a fresh :class:`random.Random` unless one is given, e.g. seeded in a test).

    ``attempts`` counts the delays handed out since the last :meth:`reset`."""

    __slots__ = ("_delay", "attempts", "base", "cap", "factor", "jitter", "rng")

    def __init__(self, base: float, cap: float, *, factor: float = 2.0,
                 jitter: tuple[float, float] = (1.0, 1.0),
                 rng: random.Random | None = None) -> None:
        if not 0 <= base <= cap:
            raise ValueError(f"backoff needs 0 <= base <= cap, got {base:g} and {cap:g}")
        if factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {factor:g}")
        if not 0 <= jitter[0] <= jitter[1]:
            raise ValueError(f"backoff jitter must be a range of factors >= 0, got {jitter}")
        self.base = base
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.attempts = 0
        self._delay = base

    def next(self) -> float:
        """The delay to wait before the next attempt; each call makes the following
        one ``factor`` times longer, up to ``cap`` (before jitter)."""
        delay = self._delay
        self._delay = min(self.cap, self._delay * self.factor)
        self.attempts += 1
        low, high = self.jitter
        if low == high == 1.0:
            return delay
        return delay * self.rng.uniform(low, high)

    def reset(self) -> None:
        """An attempt went well: the next delay is ``base`` again."""
        self._delay = self.base
        self.attempts = 0

    def hold_at_cap(self) -> None:
        """Wait the longest delay from now on, until :meth:`reset` (a peer that must not
        be pressed, e.g. one telling us another process took our place)."""
        self._delay = self.cap
