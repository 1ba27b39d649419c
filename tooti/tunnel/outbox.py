"""The per-run outbox: which tunnel sessions have frames queued since the last
read-loop flush, and the flush every read loop runs before it waits for input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from tooti.tunnel.session import TunnelSession


class Outbox:
    """Per trio run: the sessions with frames queued since the last read-loop flush,
    and whether a read loop is dispatching input right now."""

    __slots__ = ("dispatching", "queued")

    def __init__(self) -> None:
        self.queued: set[TunnelSession] = set()
        self.dispatching = False


_OUTBOX: trio.lowlevel.RunVar[Outbox] = trio.lowlevel.RunVar("tooti_outbox")


def current_outbox() -> Outbox:
    """The outbox of the current trio run (made on first use)."""
    try:
        return _OUTBOX.get()
    except LookupError:
        outbox = Outbox()
        _OUTBOX.set(outbox)
        return outbox


def flush_queued() -> None:
    """Write, without waiting, the frames every session of this run has queued, where
    the transport can (see :meth:`TunnelSession.flush_nowait`); the writer task of a
    session with frames left over is woken. Read loops call it before they wait for
    more input, so what a batch of input produced - a relay's spliced frames, an OPEN
    it forwards - goes out in one write per tunnel, with no task switch in between."""
    queued = current_outbox().queued
    while queued:
        queued.pop().flush_nowait()
