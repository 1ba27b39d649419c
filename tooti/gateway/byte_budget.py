"""A gateway-wide budget of bytes held in memory (non-streamed answers being collected).

Each holder (one answer) takes a :class:`Share`, reserves before it keeps a byte and
releases its share on every path. A reservation that does not fit waits for room; bound
the wait with a trio timeout. Holders that all wait while each holds part of the budget
would starve each other (each needs more than is left), so the oldest waiting holder is
served first and, when it cannot be, the youngest other waiting holder is refused at
once (its reservation raises :class:`BudgetExhausted`) and its bytes are counted free
(wound-wait): older answers finish, newer ones are refused early instead of all of them
late. :attr:`ByteBudget.high_water` records the most ever reserved at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import trio


class BudgetExhausted(Exception):
    """A reservation that will not be granted: larger than the whole budget, or refused
    so that an older holder can go on."""


@dataclass(eq=False)
class Share:
    """What one holder has reserved (see :meth:`ByteBudget.share`)."""

    budget: ByteBudget
    seq: int
    held: int = 0
    refused: bool = False
    """Refused in favour of an older holder: every later reservation fails."""

    def try_reserve(self, size: int) -> bool:
        """Reserve ``size`` more bytes now, if they fit and nobody waits."""
        budget = self.budget
        if self.refused or budget._waiting or budget.used + size > budget.limit:
            return False
        budget._take(self, size)
        return True

    async def reserve(self, size: int) -> None:
        """Reserve ``size`` more bytes, waiting for room (cancel the wait to give up);
        :class:`BudgetExhausted` if it can never be granted or was refused."""
        if self.try_reserve(size):
            return
        budget = self.budget
        if self.refused:
            raise BudgetExhausted("refused to let an older answer finish")
        if size > budget.limit:
            raise BudgetExhausted(f"{size} bytes exceed the whole budget of {budget.limit}")
        waiter = _Waiter(self, size)
        budget._waiting.append(waiter)
        budget._grant()
        try:
            await waiter.done.wait()
        except BaseException:  # cancelled: leave the queue (a grant is given back below)
            if waiter in budget._waiting:
                budget._waiting.remove(waiter)
                budget._grant()
            raise
        if self.refused:
            raise BudgetExhausted("refused to let an older answer finish")

    def release(self) -> None:
        """Give back everything this share holds (idempotent)."""
        if self.held:
            self.budget.used -= self.held
            self.held = 0
            self.budget._grant()


@dataclass(eq=False)
class _Waiter:
    share: Share
    size: int
    done: trio.Event = field(default_factory=trio.Event)


class ByteBudget:
    """At most :attr:`limit` bytes reserved at once, over every :class:`Share`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.high_water = 0
        """The most bytes ever reserved at once."""
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def idle(self) -> bool:
        """Nothing reserved and nobody waiting."""
        return self.used == 0 and not self._waiting

    def share(self) -> Share:
        """A new holder's share (younger than every earlier one)."""
        return Share(self, next(self._seq))

    def _take(self, share: Share, size: int) -> None:
        share.held += size
        self.used += size
        if self.used > self.high_water:
            self.high_water = self.used

    def _grant(self) -> None:
        """Serve the oldest waiter while it fits; when it does not, refuse the youngest
        other waiter holding bytes (their release may let the oldest go on)."""
        while self._waiting:
            oldest = min(self._waiting, key=lambda w: w.share.seq)
            if self.used + oldest.size <= self.limit:
                self._waiting.remove(oldest)
                self._take(oldest.share, oldest.size)
                oldest.done.set()
                continue
            holding = [w for w in self._waiting if w is not oldest and w.share.held]
            if not holding:
                return
            victim = max(holding, key=lambda w: w.share.seq)
            self._waiting.remove(victim)
            victim.share.refused = True
            self.used -= victim.share.held  # its holder drops the bytes as it unwinds
            victim.share.held = 0
            victim.done.set()
