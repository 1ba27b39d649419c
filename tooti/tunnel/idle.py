"""Idle tunnels read by one task: :class:`IdleSet`.

Why: a gateway with 10,000 idle node tunnels receives ~3,300 HEARTBEATs a second.
Read the usual way, each one wakes that tunnel's read loop through trio's I/O manager
(an ``epoll_ctl`` to arm the socket, the event, a task step resuming the read loop's
chain of coroutines, an ``epoll_ctl`` to disarm it): about half the gateway's CPU per
heartbeat. Here the read loop of a tunnel with nothing to do *parks* instead: its
socket joins one private ``select.epoll`` set of the process, registered once for as
long as the tunnel stays idle (level-triggered, no per-heartbeat ``epoll_ctl``), and
one task (:meth:`IdleSet.run`) waits for that set to be readable. When it is, the task
takes the ready descriptors (``epoll.poll(0)``) and, for each, calls the session
synchronously (:meth:`~tooti.tunnel.session.TunnelSession.take_idle_input`): the
session reads the socket without waiting, handles whole HEARTBEAT frames inline (the
time of the input recorded, the ACK written with a non-blocking ``send`` when the
socket takes it) and says whether it is still idle. Anything else - another frame,
part of a frame, the connection's end or an error, an ACK the socket did not take,
a peer over its control budget - *hands over*: the descriptor leaves the set and the
read loop is rescheduled; it finds the bytes already in its transport's decoder and
carries on as usual until it is idle again. Many heartbeats arriving together cost
one task step between them.

"Idle" is decided by the session (:meth:`~tooti.tunnel.session.TunnelSession._idle_fd`):
an acceptor's plain-TCP WebSocket tunnel with no stream open, nothing queued or
pending to write and nothing buffered in its decoder. TLS tunnels (the socket carries
ciphertext), in-memory transports and the dialing side keep the read loop's own wait.

A parked read loop is cancelled as before (its session's silence watch, an abort, the
nursery's end): the abort callback takes its descriptor out of the set first, so no
closed (and perhaps reused) descriptor stays registered. The set's task is a *system
task* of the trio run, like :mod:`tooti.tunnel.deadlines`' timer (it serves every
nursery's sessions, none of which can own it), started on first use (:func:`idle_set`),
one per run. It never raises: a session's failure while handling its input is logged
and hands that session over to its read loop.
"""

from __future__ import annotations

import logging
import select
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

if TYPE_CHECKING:
    from tooti.tunnel.session import TunnelSession

log = logging.getLogger("tooti.tunnel")

MAX_EVENTS = 1024
"""Ready descriptors taken per ``epoll.poll``; more wait for the next pass (after a
checkpoint, so other tasks run in between)."""


@runtime_checkable
class IdleReadable(Protocol):
    """What a transport offers to be read by the idle set (the plain-TCP WebSocket
    transport, :class:`tooti.transport.websocket.WebSocketTransport`)."""

    def idle_fd(self) -> int:
        """The socket's descriptor while it can be read here, else -1."""
        ...

    def read_nowait(self) -> bool:
        """Read without waiting into the decoder; False: the read loop must take over."""
        ...

    def peek_nowait(self) -> bytes | None:
        """The next whole binary message, kept until :meth:`drop_peeked`; else None."""
        ...

    def drop_peeked(self) -> None:
        """The peeked message was handled."""
        ...


class IdleSet:
    """The process's set of parked read loops (see the module docstring)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._parked: dict[int, tuple[TunnelSession, trio.lowlevel.Task]] = {}

    def __len__(self) -> int:
        """Read loops parked now."""
        return len(self._parked)

    async def park(self, session: TunnelSession, fd: int) -> None:
        """Park the calling read loop until its session hands over (returns) or the task
        is cancelled (raises). ``fd`` is the session's socket, not in the set yet. Once
        the set has stopped (the run's end) it returns at once: the loop reads itself."""
        if self._epoll.closed:
            return
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # a stale registration of a closed, reused number
            self._epoll.modify(fd, select.EPOLLIN)
        task = trio.lowlevel.current_task()
        self._parked[fd] = (session, task)

        def abort(_: object) -> trio.lowlevel.Abort:
            parked = self._parked.get(fd)
            if parked is not None and parked[1] is task:  # not a later tunnel on that number
                self._forget(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _forget(self, fd: int) -> None:
        self._parked.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # already gone with its socket, or set closed
            pass

    def _hand_over(self, fd: int) -> None:
        parked = self._parked.get(fd)
        self._forget(fd)
        if parked is not None:
            trio.lowlevel.reschedule(parked[1])

    async def run(self) -> None:
        """Serve the set until cancelled (the run's end)."""
        epoll = self._epoll
        parked = self._parked
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _events in epoll.poll(0, MAX_EVENTS):
                    entry = parked.get(fd)
                    if entry is None:  # not ours any more
                        self._forget(fd)
                        continue
                    try:
                        idle = entry[0].take_idle_input()
                    except Exception:  # one session's fault never stops the others
                        log.exception("tunnel %s: idle input failed", entry[0].name)
                        idle = False
                    if not idle:
                        self._hand_over(fd)
        finally:
            for fd in list(parked):
                self._hand_over(fd)
            epoll.close()


_IDLE: trio.lowlevel.RunVar[IdleSet] = trio.lowlevel.RunVar("tooti_idle_set")


def idle_set() -> IdleSet:
    """The current trio run's :class:`IdleSet`, its task started on first use."""
    try:
        return _IDLE.get()
    except LookupError:
        watch = IdleSet()
        _IDLE.set(watch)
        trio.lowlevel.spawn_system_task(watch.run, name="tooti idle tunnel set")
        return watch
