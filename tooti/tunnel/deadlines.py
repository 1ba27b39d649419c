"""One timer for every tunnel session of a trio run: :class:`SharedTimer`.

Why: a gateway with 10,000 idle node tunnels used to keep a timer task per session
(its own HEARTBEATs and the silence watch), and moved that task's cancel-scope
deadline on every heartbeat it received (trio's deadline heap grows one entry per move
and drops the stale ones later). A task costs memory per session and a wake-up each
time it is due; the deadline moves cost trio's heap work per heartbeat. Here every
session keeps *one* entry in one heap, checked *lazily*: a session records the time
of its last input as it reads (a float store, nothing else), and only when its entry
comes due does it look at the clock: if input arrived since, it re-arms for the new
deadline (one ``heapq`` push), otherwise it does what is due (send its own
HEARTBEAT, or end the read loop as silent). A session heartbeating every interval
costs this timer one callback per due time, never a task switch.

The heap is served by one task per trio run, :meth:`SharedTimer.run`, which sleeps
until the earliest entry (but at least :data:`GRANULARITY` after its last wake-up, so
thousands of sessions' spread-out due times cost a few dozen wake-ups a second, not
one each) and calls every due callback synchronously. That task is a
*system task* of the run (:func:`trio.lowlevel.spawn_system_task`): it serves every
nursery's sessions, so no one of them can own it (a session's nursery ends with the
session), and the run itself does - it is cancelled when the run's main task is done,
like trio's own run-wide services. It never raises: a callback's exception is logged
and the others still run. Started on first use (:func:`shared_timer`), one per run,
so each test's ``trio.run`` (and its autojump clock) has its own.

A wake-up far past its deadline (:data:`LATE`: the loop was blocked, e.g. by a long
synchronous job, or the process was starved of CPU) calls nothing for :data:`GRACE`
seconds first: the read loops take the input that piled up in their sockets meanwhile,
so a session is not taken for silent because its own process stalled.

Entries are cancelled lazily too (:meth:`Entry.cancel` clears the callback; the heap
drops it when it comes due), so a closed session is referenced at most until its last
deadline (a few heartbeat intervals).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable

import trio

log = logging.getLogger("tooti.tunnel")

GRANULARITY = 0.02
"""Seconds the serving task waits at least between two wake-ups: an entry is called at
most this late, and entries due close together are called in one wake-up (10,000
sessions heartbeating every 3 s are ~3,300 due times a second, served in ≤ 50
wake-ups)."""

LATE = 1.0
"""A wake-up this many seconds past its deadline means the loop was blocked (or the
process starved): the due entries then wait :data:`GRACE` more first."""
GRACE = 0.1
"""Seconds a late wake-up waits before calling the due entries, so the read loops take
the input that piled up meanwhile first: a session is not judged silent for a stall of
its own process (once in a row: a loop late every time still gets its verdicts)."""

Callback = Callable[[float], None]
"""Called with ``trio.current_time()`` when the entry comes due."""


class Entry:
    """One scheduled call; :meth:`cancel` before it is due drops it."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback: Callback | None = callback

    def cancel(self) -> None:
        """Do not call it (the heap forgets it when it comes due)."""
        self.callback = None


class SharedTimer:
    """A heap of :class:`Entry` served by one task (see the module docstring)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Entry]] = []
        self._order = itertools.count()
        self._scope: trio.CancelScope | None = None
        """The scope the serving task sleeps in, its deadline the earliest entry's."""
        self._woke = -math.inf
        """When the serving task last woke (it sleeps :data:`GRANULARITY` at least)."""

    def __len__(self) -> int:
        """Entries in the heap (cancelled ones included until they come due)."""
        return len(self._heap)

    def call_at(self, when: float, callback: Callback) -> Entry:
        """Call ``callback(now)`` once ``trio.current_time()`` reaches ``when``."""
        entry = Entry(when, callback)
        heapq.heappush(self._heap, (when, next(self._order), entry))
        scope = self._scope
        if scope is not None and when < scope.deadline:
            scope.deadline = max(when, self._woke + GRANULARITY)
        return entry

    async def run(self) -> None:
        """Serve the heap until cancelled (the run's end)."""
        heap = self._heap
        deferred = False
        while True:
            deadline = max(heap[0][0], self._woke + GRANULARITY) if heap else math.inf
            with trio.CancelScope(deadline=deadline) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = self._woke = trio.current_time()
            if now - scope.deadline > LATE and not deferred:
                deferred = True  # the loop was blocked: let the read loops catch up
                self._woke = now + GRACE - GRANULARITY
                continue
            deferred = False
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)[2]
                callback, entry.callback = entry.callback, None
                if callback is None:
                    continue
                try:
                    callback(now)
                except Exception:  # one session's fault never stops the others' timers
                    log.exception("tunnel timer callback %r failed", callback)


_TIMER: trio.lowlevel.RunVar[SharedTimer] = trio.lowlevel.RunVar("tooti_shared_timer")


def shared_timer() -> SharedTimer:
    """The current trio run's :class:`SharedTimer`, its task started on first use."""
    try:
        return _TIMER.get()
    except LookupError:
        timer = SharedTimer()
        _TIMER.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name="tooti shared tunnel timer")
        return timer
