"""``/metrics``: Prometheus text exposition of the gateway, fed by the event bus.

:class:`GatewayMetrics` (a gateway's and a relay's ``/metrics``) holds counters and
histograms of finished requests, updated from ``request.finished`` and
``billing.settle_late`` bus events, and gauges read from the registry at scrape time
(peers by state, in-flight streams, cooldowns, queued requests).

Every process that serves ``/metrics`` (the gateway, the relay and, on
``node.admin_listen``, a node) also exposes the health of the process itself, read at
scrape time by :class:`ProcessGauges` and prometheus_client's ``ProcessCollector``:

``tooti_tasks``
    The trio tasks alive in the process, counted by walking the task tree from
    ``trio.lowlevel.current_root_task()`` (every task, system tasks included). A count
    that grows while the load stays the same is a task leak; ``bench/soak.py`` compares
    it at idle moments of a long run. Walking costs O(tasks) per scrape and nothing
    between scrapes.
``process_open_fds``, ``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ...
    The standard process metrics (Linux ``/proc/self``; absent elsewhere).

:func:`process_metrics` renders only those process figures (what a node serves).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tooti.mesh.events import BusEvent, EventBus
from tooti.mesh.registry import Registry
from tooti.protocol.numbers import is_number

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MAX_AMOUNT = 1e18
"""Largest figure one event may add to a metric (anything beyond counts as 0)."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _LiveState(Collector):
    """Gauges read from the registry at scrape time."""

    def __init__(self, registry: Registry, queued: Callable[[], int]) -> None:
        self.registry = registry
        self.queued = queued

    def collect(self) -> Iterator[Metric]:
        peers = GaugeMetricFamily("tooti_peers", "Connected peers by state", labels=["state"])
        counts: dict[str, int] = {}
        in_flight = GaugeMetricFamily("tooti_in_flight_streams",
                                      "Streams open on nodes, by node and model",
                                      labels=["node", "model"])
        cooldowns = GaugeMetricFamily("tooti_cooldowns", "Node models in cooldown",
                                      labels=["node", "model"])
        for peer in self.registry.peers.values():
            state = peer.state()
            counts[state] = counts.get(state, 0) + 1
            for model, n in peer.in_flight.items():
                in_flight.add_metric([peer.id, model], n)
            for model, record in peer.health.items():
                if record.in_cooldown:
                    cooldowns.add_metric([peer.id, model], 1)
        for state, n in sorted(counts.items()):
            peers.add_metric([state], n)
        queued = GaugeMetricFamily("tooti_queued_requests", "Requests waiting for a free slot")
        queued.add_metric([], float(self.queued()))
        yield from (peers, in_flight, cooldowns, queued)


def count_tasks() -> int | None:
    """The trio tasks alive in the calling trio run (None outside one)."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return None
    if root is None:
        return None
    count = 0
    pending = [root]
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


class ProcessGauges(Collector):
    """``tooti_tasks``: the trio tasks of this process, counted at scrape time."""

    def collect(self) -> Iterator[Metric]:
        tasks = count_tasks()
        if tasks is not None:
            gauge = GaugeMetricFamily("tooti_tasks", "Trio tasks alive in this process")
            gauge.add_metric([], float(tasks))
            yield gauge


def add_process_collectors(registry: CollectorRegistry) -> None:
    """Register the process figures (:class:`ProcessGauges` and the standard
    ``process_*`` metrics) on ``registry``."""
    registry.register(ProcessGauges())
    ProcessCollector(registry=registry)


def process_metrics() -> bytes:
    """The Prometheus text of this process's own figures only (tasks, fds, memory, CPU);
    call it from a trio task so ``tooti_tasks`` is present."""
    registry = CollectorRegistry()
    add_process_collectors(registry)
    return generate_latest(registry)


class GatewayMetrics:
    """Counters and histograms of finished requests, plus live gauges."""

    def __init__(self, registry: Registry, bus: EventBus, queued: Callable[[], int]
                 ) -> None:
        """``queued`` counts the requests waiting for a node (0 on a relay)."""
        self.prometheus = CollectorRegistry()
        self.requests = Counter("tooti_requests", "Finished requests",
                                ["model", "node", "status"], registry=self.prometheus)
        self.tokens = Counter("tooti_tokens", "Tokens processed", ["model", "node", "kind"],
                              registry=self.prometheus)
        self.ttft = Histogram("tooti_ttft_seconds", "Time to first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.prometheus)
        self.latency = Histogram("tooti_request_seconds", "Whole request latency",
                                 ["model", "status"], buckets=LATENCY_BUCKETS,
                                 registry=self.prometheus)
        self.settle_late = Counter(
            "tooti_usage_settle_late", "Settles (or refunds) cut off by the billing "
            "timeout: a completed answer then left before its usage record was durable",
            registry=self.prometheus)
        self._series: dict[tuple[str, str, str], _Series] = {}
        """(model, node, status) → its labelled children, looked up once (a finished
        request then updates them without prometheus_client's label lookups)."""
        self.prometheus.register(_LiveState(registry, queued))
        add_process_collectors(self.prometheus)
        bus.listeners.append(self.on_event)

    def on_event(self, event: BusEvent) -> None:
        """Update counters from ``request.finished`` and ``billing.settle_late`` events. A
        figure that is not a finite non-negative number (counters cannot go down) counts
        as 0."""
        if event.kind == "billing.settle_late":
            self.settle_late.inc()
        if event.kind != "request.finished":
            return
        data = event.data
        model = str(data.get("model") or "-")
        node = str(data.get("node") or "-")
        status = str(data.get("status"))
        key = (model, node, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(
                self.requests.labels(model, node, status),
                self.tokens.labels(model, node, "prompt"),
                self.tokens.labels(model, node, "completion"),
                self.ttft.labels(model), self.latency.labels(model, status))
        series.requests.inc()
        series.prompt.inc(_amount(data.get("prompt_tokens")))
        series.completion.inc(_amount(data.get("completion_tokens")))
        if data.get("ttft_ms") is not None:
            series.ttft.observe(_amount(data["ttft_ms"]) / 1000)
        series.latency.observe(_amount(data.get("latency_ms")) / 1000)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.prometheus)


class _Series(NamedTuple):
    """The labelled children one (model, node, status) of finished requests updates."""

    requests: Any
    prompt: Any
    completion: Any
    ttft: Any
    latency: Any


def _amount(value: object) -> float:
    """``value`` if it is a finite number >= 0, else 0."""
    if not is_number(value):
        return 0.0
    return float(value) if 0 <= value < MAX_AMOUNT else 0.0  # NaN compares False
