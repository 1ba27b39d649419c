"""A pure model of a gateway's network, built from its admin events stream.

Feed it the ``snapshot`` that opens ``GET /admin/v1/events`` and then every delta
(``{"seq", "kind", "ts", "data"}``); read peers, requests and totals back. It does
no I/O and never looks at the clock itself: every time-dependent answer takes
``now``, so it is deterministic under test.

Times kept here are the gateway's (event ``ts``). When the caller passes the local
time an event arrived (``received_at``), the offset between the two clocks is
tracked, so ``now`` can be given in local time even when the gateway's clock is
elsewhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

GONE_TTL = 120.0
"""Seconds a departed peer stays listed (as ``gone``) before it is forgotten."""
MAX_REQUESTS = 500
"""Requests kept; the oldest finished ones are dropped first."""
RATE_WINDOW = 60
"""Seconds of per-second history kept for the sparklines."""
RATE_AVERAGE = 10
"""Seconds the headline req/s and tok/s figures average over."""

ACTIVE_PHASES = ("received", "routed", "first_token")
"""Request phases before ``finished``."""


@dataclass
class Step:
    """One step of a request's life: received, routed, first_token or finished."""

    kind: str
    ts: float
    node: str | None = None
    detail: str = ""


@dataclass
class RequestView:
    """What is known about one request, from its events."""

    id: str
    received_at: float = 0.0
    model: str = ""
    endpoint: str = ""
    stream: bool | None = None
    key_id: str = ""
    node: str | None = None
    attempts: int = 0
    phase: str = "received"
    """``received``, ``routed``, ``first_token``, ``finished``, or ``lost`` (the
    connection to the gateway was lost before the request finished)."""
    status: str | None = None
    """The gateway's final status (``ok``, ``error``, ``failed``, ``cancelled``, ...)."""
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    estimated: bool = False
    tok_s: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    nodes_tried: list[str] = field(default_factory=list)
    timeline: list[Step] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """True until the request finished (or was lost)."""
        return self.phase in ACTIVE_PHASES

    @property
    def state(self) -> str:
        """A one-word state for display."""
        if self.phase == "finished":
            return self.status or "finished"
        if self.phase == "received":
            return "queued"
        if self.phase == "routed":
            return "retrying" if self.attempts > 1 else "routed"
        if self.phase == "first_token":
            return "streaming"
        return self.phase

    @property
    def finished_at(self) -> float | None:
        """Gateway time the request finished, if it has."""
        for step in reversed(self.timeline):
            if step.kind == "finished":
                return step.ts
        return None


@dataclass
class PeerView:
    """One peer as last described by the gateway (``Peer.describe()``)."""

    id: str
    role: str = "node"
    via: str = "direct"
    """``direct``, or the relay the peer is reached through."""
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    software: str = ""
    models: list[str] = field(default_factory=list)
    in_flight: int = 0
    draining: bool = False
    rtt_ms: float | None = None
    connected_at: float | None = None
    state: str = "live"
    failures: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_at: float | None = None
    """Gateway time the peer left (``gone`` peers only)."""
    left_reason: str = ""

    @classmethod
    def from_describe(cls, data: dict[str, Any]) -> PeerView:
        """Build from one ``Peer.describe()`` dict (unknown keys are ignored)."""
        via = data.get("via") or "direct"
        return cls(
            id=str(data.get("id", "?")), role=str(data.get("role") or "node"),
            via=str(via), address=str(data.get("address") or ""),
            labels=dict(data.get("labels") or {}), software=str(data.get("software") or ""),
            models=list(data.get("models") or []), in_flight=int(data.get("in_flight") or 0),
            draining=bool(data.get("draining")), rtt_ms=_num(data.get("rtt_ms")),
            connected_at=_num(data.get("connected_at")), state=str(data.get("state") or "live"),
            failures=int(data.get("failures") or 0), stats=dict(data.get("stats") or {}),
            per_model={m: dict(v) for m, v in (data.get("per_model") or {}).items()},
        )

    @property
    def gone(self) -> bool:
        """True once the peer has left."""
        return self.state == "gone"

    @property
    def capacity(self) -> int:
        """Concurrent streams the peer advertises, over all its models."""
        total = sum(int(m.get("capacity") or 0) for m in self.per_model.values())
        if total:
            return total
        return int(self.stats.get("capacity") or 0)

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token the gateway measured (mean over models, by samples);
        the node's own figure when the gateway has measured nothing yet."""
        return self._measured("ttft_ms", "ttft_ms")

    @property
    def tok_s(self) -> float | None:
        """Decode tokens per second the gateway measured (mean over models, by samples)."""
        return self._measured("tokens_per_s", "tokens_per_s")

    def _measured(self, key: str, stats_key: str) -> float | None:
        total = weight = 0.0
        for record in self.per_model.values():
            value = _num(record.get(key))
            if value is not None:
                samples = max(1, int(record.get("samples") or 0))
                total += value * samples
                weight += samples
        if weight:
            return total / weight
        return _num(self.stats.get(stats_key))

    @property
    def cooldown_models(self) -> list[str]:
        """Models of this peer the gateway has in cooldown."""
        return [m for m, r in sorted(self.per_model.items()) if r.get("state") == "cooldown"]


@dataclass(frozen=True)
class Totals:
    """Headline figures for the header."""

    live_peers: int
    peers: int
    in_flight: int
    queued: int
    req_rate: float
    tok_rate: float
    req_series: list[float]
    tok_series: list[float]


class NetworkState:
    """Peers, requests and rates of one gateway, kept current by its events."""

    def __init__(self, gone_ttl: float = GONE_TTL, max_requests: int = MAX_REQUESTS,
                 window: int = RATE_WINDOW, average: int = RATE_AVERAGE) -> None:
        self.gone_ttl = gone_ttl
        self.max_requests = max_requests
        self.window = window
        self.average = average
        self.peers: dict[str, PeerView] = {}
        self.requests: OrderedDict[str, RequestView] = OrderedDict()
        """Request id → view, oldest first."""
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
        self._buckets: dict[int, list[int]] = {}
        """Gateway second → [requests finished, completion tokens]."""

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
        seen = set()
        for summary in reversed(data.get("requests") or []):  # oldest first
            request_id = summary.get("request_id")
            if isinstance(request_id, str):
                seen.add(request_id)
                self._merge_summary(request_id, summary)
        for request in self.requests.values():
            if request.active and request.id not in seen:
                request.phase = "lost"
                request.timeline.append(Step("lost", now, None, "connection lost"))
        self._sort_requests()
        self._trim_requests()
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
            self._request_event(kind, data, ts)
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

    def _request_event(self, kind: str, data: dict[str, Any], ts: float) -> None:
        request_id = data.get("request_id")
        if not isinstance(request_id, str):
            return
        request = self.requests.get(request_id)
        if request is None:
            request = self.requests[request_id] = RequestView(request_id, received_at=ts)
            self._trim_requests()
        was_active = request.active
        if kind == "request.received":
            request.model = str(data.get("model") or request.model)
            request.endpoint = str(data.get("endpoint") or "")
            request.stream = data.get("stream")
            request.key_id = str(data.get("key_id") or "")
            request.received_at = ts
            request.timeline.append(Step("received", ts, None, request.endpoint))
        elif kind == "request.routed":
            node = data.get("node")
            if request.node and was_active and request.phase == "routed":
                self._adjust_in_flight(request.node, -1)  # failover: the last node let go
            request.node = node if isinstance(node, str) else request.node
            request.attempts = int(data.get("attempt") or request.attempts + 1)
            request.model = str(data.get("model") or request.model)
            if request.node:
                request.nodes_tried.append(request.node)
                self._adjust_in_flight(request.node, +1)
            request.phase = "routed"
            request.timeline.append(Step("routed", ts, request.node,
                                         f"attempt {request.attempts}"))
        elif kind == "request.first_token":
            request.ttft_ms = _num(data.get("ttft_ms"))
            request.phase = "first_token"
            request.timeline.append(Step("first_token", ts, data.get("node"),
                                         _ms_detail(request.ttft_ms)))
        elif kind == "request.finished":
            if request.node and was_active and request.phase in ("routed", "first_token"):
                self._adjust_in_flight(request.node, -1)
            self._finish(request, data, ts)

    def _finish(self, request: RequestView, data: dict[str, Any], ts: float) -> None:
        counted = request.phase == "finished"
        request.phase = "finished"
        request.status = str(data.get("status") or "finished")
        node = data.get("node")
        if isinstance(node, str):
            request.node = node
        if data.get("model"):
            request.model = str(data["model"])
        request.attempts = int(data.get("attempts") or request.attempts)
        request.prompt_tokens = _int(data.get("prompt_tokens"))
        request.completion_tokens = _int(data.get("completion_tokens"))
        request.estimated = bool(data.get("estimated"))
        request.ttft_ms = _num(data.get("ttft_ms"), request.ttft_ms)
        request.tok_s = _num(data.get("tok_s"))
        request.latency_ms = _num(data.get("latency_ms"))
        request.error = data.get("error") or None
        request.timeline.append(Step("finished", ts, request.node, request.status))
        if not counted:
            bucket = self._buckets.setdefault(int(ts), [0, 0])
            bucket[0] += 1
            bucket[1] += request.completion_tokens or 0

    def _merge_summary(self, request_id: str, summary: dict[str, Any]) -> None:
        """Fold one snapshot request summary (fields + timeline) into our view."""
        timeline = [s for s in summary.get("timeline") or [] if isinstance(s, dict)]
        existing = self.requests.get(request_id)
        if existing is not None and len(existing.timeline) >= len(timeline):
            if existing.phase != "lost":
                return  # we already know as much
        start = float(timeline[0].get("ts") or 0.0) if timeline else 0.0
        request = RequestView(request_id, received_at=start)
        if existing is not None and existing.phase == "finished":
            request.phase = "finished"  # already counted in the rates
        for step in timeline:
            kind = str(step.get("kind") or "")
            ts = float(step.get("ts") or 0.0)
            self.last_ts = max(self.last_ts, ts)
            node = step.get("node")
            if kind == "routed":
                request.attempts += 1
                if isinstance(node, str):
                    request.nodes_tried.append(node)
            detail = f"attempt {request.attempts}" if kind == "routed" else ""
            request.timeline.append(Step(kind, ts, node if isinstance(node, str) else None,
                                         detail))
        request.model = str(summary.get("model") or "")
        request.endpoint = str(summary.get("endpoint") or "")
        request.stream = summary.get("stream")
        request.key_id = str(summary.get("key_id") or "")
        node = summary.get("node")
        request.node = node if isinstance(node, str) else None
        request.ttft_ms = _num(summary.get("ttft_ms"))
        state = str(summary.get("state") or "received")
        if timeline and timeline[0].get("kind") == "received":
            request.timeline[0].detail = request.endpoint
        for entry in request.timeline:
            if entry.kind == "first_token":
                entry.detail = _ms_detail(request.ttft_ms)
        if state == "finished":
            if request.timeline and request.timeline[-1].kind == "finished":
                request.timeline.pop()  # _finish appends it again, with its detail
            finished_ts = float(timeline[-1].get("ts") or 0.0) if timeline else 0.0
            self._finish(request, summary, finished_ts)
        else:
            request.phase = state if state in ACTIVE_PHASES else "received"
        self.requests[request_id] = request

    def _adjust_in_flight(self, peer_id: str, delta: int) -> None:
        peer = self.peers.get(peer_id)
        if peer is not None and not peer.gone:
            peer.in_flight = max(0, peer.in_flight + delta)

    def _sort_requests(self) -> None:
        ordered = sorted(self.requests.values(), key=lambda r: r.received_at)
        self.requests = OrderedDict((r.id, r) for r in ordered)

    def _trim_requests(self) -> None:
        excess = len(self.requests) - self.max_requests
        if excess <= 0:
            return
        for request_id in [r.id for r in self.requests.values() if not r.active][:excess]:
            del self.requests[request_id]
        while len(self.requests) > self.max_requests:  # all active: drop the oldest
            self.requests.popitem(last=False)

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
        oldest = int(gateway_now) - self.window
        for second in [s for s in self._buckets if s <= oldest]:
            del self._buckets[second]
        if expired:
            self.version += 1
        return bool(expired)

    # ------------------------------------------------------------ output

    def series(self, now: float, index: int) -> list[float]:
        """Per-second history of finished requests (``index`` 0) or completion tokens
        (1) over the last ``window`` seconds, oldest first (``now`` is local time)."""
        last = int(now - self.clock_offset)
        return [float(self._buckets.get(s, (0, 0))[index])
                for s in range(last - self.window + 1, last + 1)]

    def rate(self, now: float, index: int) -> float:
        """Finished requests (``index`` 0) or completion tokens (1) per second over the
        last ``average`` seconds (``now`` is local time)."""
        last = int(now - self.clock_offset)
        total = sum(self._buckets.get(s, (0, 0))[index]
                    for s in range(last - self.average + 1, last + 1))
        return total / self.average

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
        return [r for r in reversed(self.requests.values()) if r.node == node]


def _num(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _ms_detail(ms: float | None) -> str:
    return "" if ms is None else f"ttft {ms:.0f} ms"
