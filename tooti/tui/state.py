"""A pure model of a gateway's network, built from its admin events stream.

Feed it the ``snapshot`` that opens ``GET /admin/v1/events`` and then every delta
(``{"seq", "kind", "ts", "data"}``); read peers, requests and totals back. It does
no I/O and never looks at the clock itself: every time-dependent answer takes
``now``, so it is deterministic under test.

Times kept here are the gateway's (event ``ts``). When the caller passes the local
time an event arrived (``received_at``), the offset between the two clocks is
tracked, so ``now`` can be given in local time even when the gateway's clock is
elsewhere.

This module holds the peers, the clocks and the totals; the requests and their rates
are :mod:`tooti.tui.flows`, and the views both build are :mod:`tooti.tui.views`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from tooti.tui.flows import RequestFlows
from tooti.tui.views import PeerView, RequestView, Totals

GONE_TTL = 120.0
"""Seconds a departed peer stays listed (as ``gone``) before it is forgotten."""
MAX_REQUESTS = 500
"""Requests kept; the oldest finished ones are dropped first."""
RATE_WINDOW = 60
"""Seconds of per-second history kept for the sparklines."""
RATE_AVERAGE = 10
"""Seconds the headline req/s and tok/s figures average over."""


class NetworkState:
    """Peers, requests and rates of one gateway, kept current by its events.

    The peers are kept here; the requests and their rates are a
    :class:`~tooti.tui.flows.RequestFlows` this state composes and tells nothing
    but the ``request.*`` events and the snapshot's summaries."""

    def __init__(self, gone_ttl: float = GONE_TTL, max_requests: int = MAX_REQUESTS,
                 window: int = RATE_WINDOW, average: int = RATE_AVERAGE) -> None:
        self.gone_ttl = gone_ttl
        self.peers: dict[str, PeerView] = {}
        self.flows = RequestFlows(max_requests, window, average, self._adjust_in_flight)
        """The requests, oldest first, and the per-second history of finished ones."""
        self.seq = 0
        """Sequence number of the newest event applied; older deltas are skipped."""
        self.queued = 0
        """Requests waiting for a slot, as of the last snapshot."""
        self.snapshots = 0
        """Snapshots applied (1 + reconnects)."""
        self.version = 0
        """Bumped on every change, so a view can tell when to redraw."""
        self.clock_offset = 0.0
        """Local time minus gateway time, from the last event's arrival."""
        self.last_ts = 0.0
        """Gateway time of the newest event seen."""

    @property
    def requests(self) -> OrderedDict[str, RequestView]:
        """Request id → view, oldest first."""
        return self.flows.requests

    @property
    def max_requests(self) -> int:
        """Requests kept; the oldest finished ones are dropped first."""
        return self.flows.max_requests

    @property
    def window(self) -> int:
        """Seconds of per-second history kept for the sparklines."""
        return self.flows.window

    @property
    def average(self) -> int:
        """Seconds the headline rates average over."""
        return self.flows.average

    # ------------------------------------------------------------ input

    def handle(self, kind: str, data: dict[str, Any], received_at: float | None = None) -> bool:
        """Apply one stream message: a ``snapshot`` body or a delta event."""
        if kind == "snapshot":
            self.apply_snapshot(data, received_at)
            return True
        return self.apply(data, received_at)

    def apply_snapshot(self, data: dict[str, Any], received_at: float | None = None) -> None:
        """Start over from a snapshot: its peers replace ours (absent ones are shown
        ``gone``), its requests are merged in, and deltas up to its ``seq`` are skipped."""
        self.seq = int(data.get("seq") or 0)
        self.queued = int(data.get("queued") or 0)
        self.snapshots += 1
        now = self._gateway_time(received_at)
        fresh = {}
        for described in data.get("peers") or []:
            peer = PeerView.from_describe(described)
            fresh[peer.id] = peer
        for peer_id, old in self.peers.items():
            if peer_id not in fresh:
                if not old.gone:
                    self._mark_gone(old, now, "not connected after reconnect")
                fresh[peer_id] = old
        self.peers = fresh
        newest = self.flows.merge_snapshot(data.get("requests") or [], now)
        if newest is not None:
            self.last_ts = max(self.last_ts, newest)
        self.version += 1

    def apply(self, event: dict[str, Any], received_at: float | None = None) -> bool:
        """Apply one delta; returns False if it was skipped (already in the snapshot)."""
        seq = int(event.get("seq") or 0)
        if seq <= self.seq:
            return False
        self.seq = seq
        ts = float(event.get("ts") or 0.0)
        self.last_ts = max(self.last_ts, ts)
        if received_at is not None and ts:
            self.clock_offset = received_at - ts
        kind = str(event.get("kind") or "")
        data = event.get("data") or {}
        if kind.startswith("peer."):
            self._peer_event(kind, data, ts)
        elif kind.startswith("request."):
            self.flows.event(kind, data, ts)
        else:
            return False
        self.version += 1
        return True

    def _peer_event(self, kind: str, data: dict[str, Any], ts: float) -> None:
        if kind in ("peer.joined", "peer.updated"):
            described = data.get("peer") or {}
            peer = PeerView.from_describe(described)
            self.peers[peer.id] = peer
        elif kind == "peer.left":
            peer_id = str(data.get("peer_id"))
            existing = self.peers.get(peer_id)
            if existing is None:
                existing = self.peers[peer_id] = PeerView(peer_id)
            self._mark_gone(existing, ts, str(data.get("reason") or "closed"))
        elif kind == "peer.cooldown":
            found = self.peers.get(str(data.get("peer_id")))
            model = data.get("model")
            if found is None or not isinstance(model, str):
                return
            record = found.per_model.setdefault(model, {})
            record.update({k: v for k, v in data.items() if k not in ("peer_id", "model")})
            if data.get("state") != "cooldown":
                record.pop("cooldown", None)
            if found.state in ("live", "cooldown") and found.per_model:
                cooling = all(r.get("state") == "cooldown" for r in found.per_model.values())
                found.state = "cooldown" if cooling else "live"

    def _mark_gone(self, peer: PeerView, ts: float, reason: str) -> None:
        peer.state = "gone"
        peer.left_at = ts
        peer.left_reason = reason
        peer.in_flight = 0

    def _adjust_in_flight(self, peer_id: str, delta: int) -> None:
        peer = self.peers.get(peer_id)
        if peer is not None and not peer.gone:
            peer.in_flight = max(0, peer.in_flight + delta)

    # ------------------------------------------------------------ time

    def _gateway_time(self, local: float | None) -> float:
        """Gateway time for local time ``local`` (the newest event's time without it)."""
        return self.last_ts if local is None else local - self.clock_offset

    def prune(self, now: float) -> bool:
        """Forget peers gone for longer than ``gone_ttl`` and old rate history
        (``now`` is local time); returns True if anything changed."""
        gateway_now = now - self.clock_offset
        expired = [p.id for p in self.peers.values()
                   if p.gone and p.left_at is not None
                   and gateway_now - p.left_at > self.gone_ttl]
        for peer_id in expired:
            del self.peers[peer_id]
        self.flows.forget_history(gateway_now)
        if expired:
            self.version += 1
        return bool(expired)

    # ------------------------------------------------------------ output

    def series(self, now: float, index: int) -> list[float]:
        """Per-second history of finished requests (``index`` 0) or completion tokens
        (1) over the last ``window`` seconds, oldest first (``now`` is local time)."""
        return self.flows.series(int(now - self.clock_offset), index)

    def rate(self, now: float, index: int) -> float:
        """Finished requests (``index`` 0) or completion tokens (1) per second over the
        last ``average`` seconds (``now`` is local time)."""
        return self.flows.rate(int(now - self.clock_offset), index)

    def totals(self, now: float) -> Totals:
        """Header figures at local time ``now``."""
        active = [r for r in self.requests.values() if r.active]
        return Totals(
            live_peers=sum(1 for p in self.peers.values() if p.state == "live"),
            peers=sum(1 for p in self.peers.values() if not p.gone),
            in_flight=len(active),
            queued=sum(1 for r in active if r.phase == "received"),
            req_rate=self.rate(now, 0), tok_rate=self.rate(now, 1),
            req_series=self.series(now, 0), tok_series=self.series(now, 1),
        )

    def requests_by_node(self, node: str) -> list[RequestView]:
        """Requests last routed to ``node``, newest first."""
        return self.flows.by_node(node)
