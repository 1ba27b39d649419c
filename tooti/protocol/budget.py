"""How much control traffic one peer may make a tunnel end handle (sans-I/O).

Every connection frame (HEARTBEAT, MODELS, ROUTES, GOAWAY, ...) costs the
receiver a JSON decode and whatever it does with the content, and nothing in
the protocol itself bounds how often a peer sends one. A
:class:`ControlBudget` counts them per heartbeat interval: a peer over its
frame or byte budget is slowed (its read loop pauses until the next interval),
one over budget for :attr:`ControlLimits.strikes` intervals in a row is
disconnected (``control_flood``), and heartbeats beyond a small number per
interval are a violation at once (``heartbeat_flood``). Stream frames are not
counted: flow control and the stream limit bound them, and each costs O(1).

A relay speaks for many nodes, so its budget grows with the nodes it advertises
(:meth:`ControlBudget.advertising`): one more frame and half a control payload
more per node and interval, room to re-send every node's ROUTES entry once per
interval (an entry larger than that is never sent).
"""

from __future__ import annotations

from dataclasses import dataclass

from tooti.protocol.errors import ProtocolError
from tooti.protocol.frames import CONNECTION_FRAMES, FrameType

_COUNTED = frozenset(int(t) for t in CONNECTION_FRAMES)
_HEARTBEAT = int(FrameType.HEARTBEAT)


@dataclass(frozen=True)
class ControlLimits:
    """Connection frames one peer may send per heartbeat interval."""

    frames: int = 256
    """Connection frames per interval before the peer is slowed."""
    bytes: int = 4 * 1024 * 1024
    """Bytes of connection frames per interval before the peer is slowed."""
    heartbeats: int = 8
    """HEARTBEAT frames (ACKs included) per interval; one more is a violation."""
    strikes: int = 3
    """Consecutive intervals over budget after which the peer is disconnected."""


class ControlBudget:
    """The running count of one peer's connection frames (see the module docstring)."""

    __slots__ = ("bytes", "extra_bytes", "extra_frames", "frames", "heartbeats", "interval",
                 "limits", "over", "started", "strikes")

    def __init__(self, limits: ControlLimits, interval: float, now: float) -> None:
        self.limits = limits
        self.interval = interval
        self.started = now
        self.frames = self.bytes = self.heartbeats = 0
        self.over = False
        """The current interval went over the frame or byte budget."""
        self.strikes = 0
        """Intervals in a row, before the current one, that went over budget."""
        self.extra_frames = self.extra_bytes = 0
        """Allowed beyond :attr:`limits` (a relay's, for its nodes: :meth:`advertising`)."""

    def advertising(self, nodes: int, max_control_bytes: int) -> None:
        """The peer is a relay that advertises ``nodes`` nodes: allow one frame and half
        of ``max_control_bytes`` more per node and interval (a relay sends no ROUTES
        frame larger than that, so it may re-send every node's entry once per interval
        on top of the base budget)."""
        self.extra_frames = nodes
        self.extra_bytes = nodes * (max_control_bytes // 2)

    def charge(self, message: bytes, now: float) -> float | None:
        """Count one received message. Returns None while the peer is within budget,
        else the time until which to stop reading from it; raises ProtocolError
        (``heartbeat_flood``, ``control_flood``) for a violation."""
        if not message or message[0] not in _COUNTED:
            return None
        if now >= self.started + self.interval:
            self.strikes = self.strikes + 1 if self.over else 0
            self.started, self.over = now, False
            self.frames = self.bytes = self.heartbeats = 0
        limits = self.limits
        if message[0] == _HEARTBEAT:
            self.heartbeats += 1
            if self.heartbeats > limits.heartbeats:
                raise ProtocolError(
                    "heartbeat_flood",
                    f"more than {limits.heartbeats} heartbeats in {self.interval:g}s")
        self.frames += 1
        self.bytes += len(message)
        frames, size = limits.frames + self.extra_frames, limits.bytes + self.extra_bytes
        if self.frames <= frames and self.bytes <= size:
            return None
        if not self.over:
            self.over = True
            if self.strikes + 1 >= limits.strikes:
                raise ProtocolError(
                    "control_flood",
                    f"over the control budget ({frames} frames, {size} bytes "
                    f"per {self.interval:g}s) for {limits.strikes} intervals in a row")
        return self.started + self.interval
