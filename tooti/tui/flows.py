"""The request flows ``tooti tui`` follows, and the per-second history of finished ones.

:class:`RequestFlows` keeps one :class:`~tooti.tui.views.RequestView` per request
(oldest first, at most ``max_requests``), folds the ``request.*`` events and the
snapshot's request summaries into them, and counts finished requests and their
completion tokens per gateway second for the rates and sparklines. It does no I/O
and never reads the clock; :class:`~tooti.tui.state.NetworkState` composes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from tooti.tui.views import ACTIVE_PHASES, RequestView, Step, as_float, as_int


class RequestFlows:
    """Requests of one gateway by id, oldest first, and their finishing rates.

    ``adjust_in_flight(peer_id, delta)`` is told when a request takes or lets go of a
    node, so the peers' in-flight counts follow the requests between snapshots."""

    def __init__(self, max_requests: int, window: int, average: int,
                 adjust_in_flight: Callable[[str, int], None]) -> None:
        self.max_requests = max_requests
        self.window = window
        self.average = average
        self.requests: OrderedDict[str, RequestView] = OrderedDict()
        """Request id → view, oldest first."""
        self._adjust_in_flight = adjust_in_flight
        self._buckets: dict[int, list[int]] = {}
        """Gateway second → [requests finished, completion tokens]."""

    # ------------------------------------------------------------ input

    def event(self, kind: str, data: dict[str, Any], ts: float) -> None:
        """Apply one ``request.*`` event that happened at gateway time ``ts``."""
        request_id = data.get("request_id")
        if not isinstance(request_id, str):
            return
        request = self.requests.get(request_id)
        if request is None:
            request = self.requests[request_id] = RequestView(request_id, received_at=ts)
            self._trim()
        was_active = request.active
        if kind == "request.received":
            request.model = str(data.get("model") or request.model)
            request.endpoint = str(data.get("endpoint") or "")
            request.stream = data.get("stream")
            request.key_id = str(data.get("key_id") or "")
            request.account = str(data.get("account") or "")
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
            request.ttft_ms = as_float(data.get("ttft_ms"))
            request.phase = "first_token"
            request.timeline.append(Step("first_token", ts, data.get("node"),
                                         _ms_detail(request.ttft_ms)))
        elif kind == "request.finished":
            if request.node and was_active and request.phase in ("routed", "first_token"):
                self._adjust_in_flight(request.node, -1)
            self._finish(request, data, ts)

    def merge_snapshot(self, summaries: Iterable[Any], now: float) -> float | None:
        """Fold a snapshot's request summaries (newest first) into our views; requests
        still active here but absent from it are marked ``lost`` at gateway time
        ``now``. Returns the newest step time folded in (None if none was)."""
        newest: float | None = None
        seen = set()
        for summary in reversed(list(summaries)):  # oldest first
            request_id = summary.get("request_id")
            if isinstance(request_id, str):
                seen.add(request_id)
                merged = self._merge_summary(request_id, summary)
                if merged is not None:
                    newest = merged if newest is None else max(newest, merged)
        for request in self.requests.values():
            if request.active and request.id not in seen:
                request.phase = "lost"
                request.timeline.append(Step("lost", now, None, "connection lost"))
        self._sort()
        self._trim()
        return newest

    def _finish(self, request: RequestView, data: dict[str, Any], ts: float) -> None:
        counted = request.phase == "finished"
        request.phase = "finished"
        request.status = str(data.get("status") or "finished")
        request.account = str(data.get("account") or request.account)
        node = data.get("node")
        if isinstance(node, str):
            request.node = node
        if data.get("model"):
            request.model = str(data["model"])
        request.attempts = int(data.get("attempts") or request.attempts)
        request.prompt_tokens = as_int(data.get("prompt_tokens"))
        request.completion_tokens = as_int(data.get("completion_tokens"))
        request.estimated = bool(data.get("estimated"))
        request.ttft_ms = as_float(data.get("ttft_ms"), request.ttft_ms)
        request.tok_s = as_float(data.get("tok_s"))
        request.latency_ms = as_float(data.get("latency_ms"))
        request.error = data.get("error") or None
        request.timeline.append(Step("finished", ts, request.node, request.status))
        if not counted:
            bucket = self._buckets.setdefault(int(ts), [0, 0])
            bucket[0] += 1
            bucket[1] += request.completion_tokens or 0

    def _merge_summary(self, request_id: str, summary: dict[str, Any]) -> float | None:
        """Fold one snapshot request summary (fields + timeline) into our view; returns
        the newest step time folded in (None if the summary was not used)."""
        timeline = [s for s in summary.get("timeline") or [] if isinstance(s, dict)]
        existing = self.requests.get(request_id)
        if existing is not None and len(existing.timeline) >= len(timeline):
            if existing.phase != "lost":
                return None  # we already know as much
        start = float(timeline[0].get("ts") or 0.0) if timeline else 0.0
        request = RequestView(request_id, received_at=start)
        if existing is not None and existing.phase == "finished":
            request.phase = "finished"  # already counted in the rates
        newest: float | None = None
        for step in timeline:
            kind = str(step.get("kind") or "")
            ts = float(step.get("ts") or 0.0)
            newest = ts if newest is None else max(newest, ts)
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
        request.account = str(summary.get("account") or "")
        node = summary.get("node")
        request.node = node if isinstance(node, str) else None
        request.ttft_ms = as_float(summary.get("ttft_ms"))
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
        return newest

    def _sort(self) -> None:
        ordered = sorted(self.requests.values(), key=lambda r: r.received_at)
        self.requests = OrderedDict((r.id, r) for r in ordered)

    def _trim(self) -> None:
        excess = len(self.requests) - self.max_requests
        if excess <= 0:
            return
        for request_id in [r.id for r in self.requests.values() if not r.active][:excess]:
            del self.requests[request_id]
        while len(self.requests) > self.max_requests:  # all active: drop the oldest
            self.requests.popitem(last=False)

    def forget_history(self, gateway_now: float) -> None:
        """Drop the per-second counts older than ``window`` seconds before
        ``gateway_now``."""
        oldest = int(gateway_now) - self.window
        for second in [s for s in self._buckets if s <= oldest]:
            del self._buckets[second]

    # ------------------------------------------------------------ output

    def series(self, last: int, index: int) -> list[float]:
        """Per-second history of finished requests (``index`` 0) or completion tokens
        (1) over the ``window`` seconds up to gateway second ``last``, oldest first."""
        return [float(self._buckets.get(s, (0, 0))[index])
                for s in range(last - self.window + 1, last + 1)]

    def rate(self, last: int, index: int) -> float:
        """Finished requests (``index`` 0) or completion tokens (1) per second over the
        ``average`` seconds up to gateway second ``last``."""
        total = sum(self._buckets.get(s, (0, 0))[index]
                    for s in range(last - self.average + 1, last + 1))
        return total / self.average

    def by_node(self, node: str) -> list[RequestView]:
        """Requests last routed to ``node``, newest first."""
        return [r for r in reversed(self.requests.values()) if r.node == node]


def _ms_detail(ms: float | None) -> str:
    return "" if ms is None else f"ttft {ms:.0f} ms"
