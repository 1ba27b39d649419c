"""The gateway's in-process event bus: peer and request life cycles, as they happen.

Publishing never blocks and never fails the request path: each subscriber has
a bounded buffer, and a subscriber that falls behind is dropped (its stream
ends with a ``dropped`` event) instead of being waited for. A synchronous
listener that raises is logged (at most once a minute per listener, with the
count of failures since) and the other listeners and subscribers still get the
event. The bus also keeps the last few hundred requests so a new subscriber
starts from a snapshot.

Event kinds: ``peer.joined``, ``peer.updated`` (heartbeat figures),
``peer.left``, ``peer.cooldown`` (entered or left); ``request.received``,
``request.routed`` (node, attempt), ``request.first_token``,
``request.finished`` (status, tokens, TTFT, tok/s, error).
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from tooti import clock
from tooti.mesh.ratelimit import Throttle

log = logging.getLogger("tooti.gateway")

SUBSCRIBER_BUFFER = 1024
RECENT_REQUESTS = 500
_NO_NODE: Any = object()
"""An event without a ``node`` member (``None`` is a value)."""
LISTENER_LOG_INTERVAL = 60.0
"""Seconds between two log lines about the same failing listener."""


@dataclass(frozen=True, slots=True)
class BusEvent:
    """One event: a sequence number, a kind, a wall-clock time and its data."""

    seq: int
    kind: str
    ts: float
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"seq": self.seq, "kind": self.kind, "ts": self.ts, "data": self.data}


@dataclass(eq=False)
class Subscription:
    """A subscriber's bounded queue of events."""

    send: trio.MemorySendChannel[BusEvent]
    receive: trio.MemoryReceiveChannel[BusEvent]
    dropped: bool = False
    reason: str = ""
    """Why the bus stopped feeding this subscriber (``subscriber fell behind``, ...)."""


@dataclass
class EventBus:
    """Fan-out of gateway events to subscribers and synchronous listeners."""

    buffer: int = SUBSCRIBER_BUFFER
    recent_limit: int = RECENT_REQUESTS
    recent: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    """Request id → the request's latest summary (newest last)."""
    listeners: list[Callable[[BusEvent], None]] = field(default_factory=list)
    """Called synchronously for every event (e.g. the Prometheus metrics)."""
    last_seq: int = 0
    """Sequence number of the newest event (a snapshot is current up to it)."""
    closed: str = ""
    """Why :meth:`close_all` ended every subscription ("" while open): a subscription
    taken after it ends at once, with this reason (a drain ends the admin streams)."""
    _subscribers: set[Subscription] = field(default_factory=set)
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _failure_log: Throttle = field(default_factory=lambda: Throttle(LISTENER_LOG_INTERVAL))
    """Which failing listener may be logged now (each at most once an interval)."""

    def publish(self, kind: str, **data: Any) -> None:
        """Record and fan out one event; never blocks."""
        event = BusEvent(next(self._seq), kind, clock.wall(), data)
        self.last_seq = event.seq
        if kind.startswith("request."):
            self._remember(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                self._listener_failed(listener, event)
        if not self._subscribers:  # the usual case: no admin stream open
            return
        for sub in list(self._subscribers):
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                self._drop(sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(sub)

    def _listener_failed(self, listener: Callable[[BusEvent], None], event: BusEvent
                         ) -> None:
        """Log a listener's exception, at most once per ``LISTENER_LOG_INTERVAL``."""
        if not self._failure_log.allow(listener):
            return
        unlogged = self._failure_log.refused_since(listener)
        log.exception("event listener %r failed on %s%s", listener, event.kind,
                      f" ({unlogged} more failures since its last report)" if unlogged
                      else "")

    def _remember(self, event: BusEvent) -> None:
        data = event.data
        request_id = data.get("request_id")
        if not isinstance(request_id, str):
            return
        recent = self.recent
        entry = recent.get(request_id)
        if entry is None:
            entry = recent[request_id] = {"request_id": request_id, "timeline": []}
            while len(recent) > self.recent_limit:
                recent.popitem(last=False)
        entry.update(data)  # its request_id is the entry's own
        state = entry["state"] = event.kind[8:]  # after "request."
        node = data.get("node", _NO_NODE)
        entry["timeline"].append({"kind": state, "ts": event.ts} if node is _NO_NODE
                                 else {"kind": state, "ts": event.ts, "node": node})

    def _drop(self, sub: Subscription) -> None:
        """A subscriber fell behind: tell it (best effort) and stop feeding it."""
        sub.dropped = True
        sub.reason = "subscriber fell behind"
        self._subscribers.discard(sub)
        sub.send.close()

    def close_all(self, reason: str) -> None:
        """End every subscription (their streams end with a ``dropped`` event), and
        every one taken from now on."""
        self.closed = reason
        for sub in list(self._subscribers):
            sub.reason = reason
            self._subscribers.discard(sub)
            sub.send.close()

    def subscribe(self) -> Subscription:
        """A new subscriber; call :meth:`unsubscribe` when done."""
        send, receive = trio.open_memory_channel[BusEvent](self.buffer)
        sub = Subscription(send, receive)
        if self.closed:
            sub.reason = self.closed
            send.close()
        else:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop feeding ``sub``."""
        self._subscribers.discard(sub)
        sub.send.close()

    @property
    def subscribers(self) -> int:
        """Number of live subscribers."""
        return len(self._subscribers)

    def recent_requests(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` request summaries, newest first."""
        items = list(self.recent.values())[-limit:] if limit > 0 else []
        return list(reversed(items))
