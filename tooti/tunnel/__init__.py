"""The trio adapter around the sans-I/O tunnel connection.

:class:`TunnelSession` runs one :class:`~tooti.protocol.connection.Connection`
over one :class:`~tooti.transport.Transport`: a read loop that never blocks
on any single stream (stream data goes into per-stream buffers bounded by the
flow-control window, or is spliced onward by a hook), a writer task that sends
every frame queued since its last write in one write, and an entry in the run's shared
timer (``deadlines``) for its own heartbeats and the liveness watch (a peer silent for
three heartbeat intervals is dead); an acceptor answers a heartbeating peer's
HEARTBEATs and sends its own only with every tenth answer, and the read loop of an
acceptor's idle plain-TCP tunnel parks in the process's idle set (``idle``), whose one
task answers those HEARTBEATs inline, so an idle tunnel costs no task switch of its
own, one read and one write per interval. Before a
read loop waits for input, the frames its input produced on any tunnel of the
process are written straight away (:func:`flush_queued`). Streams we open are
:class:`OutboundStream` objects consumed by the caller's own task (so the
caller's cancellation - a client going away - reaches the stream);
streams the peer opens are served by a handler in the session's nursery,
inside a cancel scope that a CANCEL frame or the tunnel's loss cancels.

The modules: ``session`` (:class:`TunnelSession`), ``streams`` (the stream
handles and their buffers), ``outbox`` (the per-run flush), ``deadlines`` (the shared
timer), ``idle`` (the idle set), ``codes`` (close and GOAWAY codes) and ``lifecycle``
(limits from settings, :func:`drain_sessions`).
"""

from tooti.protocol.connection import FlowControlError
from tooti.tunnel.codes import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TIMEOUT,
    REPLACED,
)
from tooti.tunnel.lifecycle import control_limits_from, drain_sessions, limits_from
from tooti.tunnel.outbox import flush_queued
from tooti.tunnel.session import (
    FLUSH_TIMEOUT,
    OUTGOING_LIMIT,
    EventHook,
    StatsSource,
    TunnelSession,
)
from tooti.tunnel.streams import (
    InboundStream,
    OutboundStream,
    Splice,
    StreamHandler,
    StreamOpener,
    TunnelLost,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TIMEOUT",
    "FLUSH_TIMEOUT",
    "OUTGOING_LIMIT",
    "REPLACED",
    "EventHook",
    "FlowControlError",
    "InboundStream",
    "OutboundStream",
    "Splice",
    "StatsSource",
    "StreamHandler",
    "StreamOpener",
    "TunnelLost",
    "TunnelSession",
    "control_limits_from",
    "drain_sessions",
    "flush_queued",
    "limits_from",
]
