"""Routing decision time versus the number of registered nodes.

Builds a real :class:`~tooti.mesh.registry.Registry` holding N fake peers
(no tunnels: each has a dummy session with ``closed = trio.Event()`` and
``rtt = None``) that all serve one model, with varied capacities, loads,
measured TTFTs, decode speeds and prices; a few are full, draining or in
cooldown, as on a real network. It then times what
:meth:`tooti.gateway.node_picker.NodePicker.pick` does synchronously for every request
before reserving a slot, i.e. :meth:`NodePicker.pick_now`: the registry's indexed view of
the nodes with a free slot narrowed by the request's preferences, then
:meth:`NodePicker.pick_among` (the preferences or the routing policy) and the check that
the picked node's tunnel can take a stream:

* every built-in policy (``least-loaded`` is the default),
* per-request preferences with the default policy: ``sort`` (price, latency,
  throughput, load), ``only`` / ``ignore`` lists, ``order``, ``max_price``,
  and a failover retry (one node excluded),
* the real ``await NodePicker.pick()`` + ``Registry.release()`` round trip in a
  trio run (default policy and one preference case).

Each figure is the median (and 90th percentile) of many batches, reported in
microseconds per decision, at 10, 100, 1,000 and 10,000 nodes. The target is
"well under 1 ms at 1,000 nodes". Pure CPU, one process, nothing on the network.

Run from the repository root with the project's venv::

    python bench/routing.py [--quick] [--sizes 10,100,1000,10000] [--budget 0.4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import trio
from children import machine_busy_seconds

from tooti.backends.base import ModelInfo
from tooti.gateway.proxy import Proxy
from tooti.gateway.proxy_settings import ProxySettings
from tooti.gateway.validation import Preferences, parse_request
from tooti.mesh.health import ModelHealth
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.protocol.connection import Connection, Limits, Side, State
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.routing.policies import (
    Cheapest,
    Latency,
    LeastLoaded,
    RoundRobin,
    Weighted,
)
from tooti.tunnel import TunnelSession

MODEL = "bench-model"
TARGET_US_AT_1000 = 1000.0
"""The target: a decision at 1,000 nodes well under 1 ms."""
WELL_UNDER_US = 250.0
"""What "well under" is taken to mean here: 4x headroom."""


class FakeSession:
    """Just what :class:`Peer` reads from a tunnel session."""

    def __init__(self) -> None:
        self.closed = trio.Event()
        self.rtt: float | None = None
        self.close_reason = ""
        self.conn = Connection(Side.ACCEPTOR, Limits())
        self.conn.state = State.OPEN


def build_registry(size: int, seed: int = 1) -> Registry:
    """A registry of ``size`` peers serving :data:`MODEL` with varied state.

    About 10 % of the peers are full, 1 % draining and 2 % in cooldown; 5 % have
    no measurement yet. Prices, capacities, TTFTs and decode speeds vary.
    """
    rng = random.Random(seed)
    registry = Registry()
    for index in range(size):
        capacity = rng.choice((1, 2, 4, 8, 16, 32, 64))
        info = ModelInfo(id=MODEL, max_concurrency=capacity,
                         price_input=round(rng.uniform(0.0, 2.0), 3),
                         price_output=round(rng.uniform(0.0, 6.0), 3))
        peer = Peer(id=f"node-{index:05d}", role="node",
                    session=cast(TunnelSession, FakeSession()),
                    address=f"127.0.0.{index % 250 + 1}:{10000 + index}",
                    models={MODEL: info})
        roll = rng.random()
        peer.in_flight[MODEL] = capacity if roll < 0.10 else rng.randrange(capacity)
        health = ModelHealth()
        if rng.random() >= 0.05:
            health.ttft_ms = rng.lognormvariate(5.0, 0.6)  # ~150 ms median
            health.tokens_per_s = rng.uniform(10.0, 120.0)
            health.samples = rng.randrange(1, 500)
        if 0.10 <= roll < 0.12:
            health.cooldown_until = time.monotonic() + 3600.0
        peer.health[MODEL] = health
        peer.draining = 0.12 <= roll < 0.13
        registry.peers[peer.id] = peer
    # One reindex for the whole population (Registry.add reindexes on every call,
    # which is quadratic when registering 10,000 peers in a loop).
    registry.known_models.update([MODEL])
    registry._reindex()
    return registry


def own_cpu_seconds() -> float:
    """CPU seconds used by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def preferences(provider: dict[str, Any] | None) -> Preferences:
    """The :class:`Preferences` the gateway parses from a body's ``provider`` object."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if provider is not None:
        body["provider"] = provider
    return parse_request("chat/completions", json.dumps(body).encode()).preferences


@dataclass
class Scenario:
    """One routing configuration to time."""

    name: str
    policy: Callable[[list[str]], RoutingPolicy]
    """Builds the gateway's policy, given the registered node ids."""
    provider: Callable[[list[str]], dict[str, Any] | None]
    """Builds the request's ``provider`` object, given the registered node ids."""
    exclude_one: bool = False
    """Exclude one node, as on a failover retry."""


def _default(_ids: list[str]) -> RoutingPolicy:
    return LeastLoaded()


def _none(_ids: list[str]) -> dict[str, Any] | None:
    return None


def _spread(ids: list[str], count: int) -> list[str]:
    """``count`` ids spread over the whole population."""
    step = max(1, len(ids) // count)
    return ids[::step][:count]


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("policy least-loaded (default)", _default, _none),
    Scenario("policy round-robin", lambda ids: RoundRobin(), _none),
    Scenario("policy latency", lambda ids: Latency(), _none),
    Scenario("policy weighted", lambda ids: Weighted(
        {"weights": {i: 3.0 for i in _spread(ids, max(1, len(ids) // 10))}}), _none),
    Scenario("policy price (max_ttft_ms 200)",
             lambda ids: Cheapest({"max_ttft_ms": 200}), _none),
    Scenario("sort: price", _default, lambda ids: {"sort": "price"}),
    Scenario("sort: latency", _default, lambda ids: {"sort": "latency"}),
    Scenario("sort: throughput", _default, lambda ids: {"sort": "throughput"}),
    Scenario("sort: load", _default, lambda ids: {"sort": "load"}),
    Scenario("only: 10 ids", _default, lambda ids: {"only": _spread(ids, 10)}),
    Scenario("ignore: 10 ids (1 at 10 nodes)", _default,
             lambda ids: {"ignore": _spread(ids, min(10, max(1, len(ids) // 10)))}),
    Scenario("order: 3 ids (+fallbacks)", _default, lambda ids: {"order": _spread(ids, 3)}),
    Scenario("max_price prompt 1 / completion 3", _default,
             lambda ids: {"max_price": {"prompt": 1.0, "completion": 3.0}}),
    Scenario("failover retry (1 excluded)", _default, _none, exclude_one=True),
)
ACQUIRE_SCENARIOS = ("policy least-loaded (default)", "only: 10 ids")


@dataclass
class Figure:
    """Microseconds per decision: median and 90th percentile over batches."""

    median_us: float
    p90_us: float
    decisions: int


def time_batches(decide: Callable[[], object], budget: float, min_rounds: int) -> Figure:
    """Time ``decide`` in batches for about ``budget`` seconds; µs per call."""
    for _ in range(3):
        decide()  # warm up
    started = time.perf_counter()
    decide()
    single = max(time.perf_counter() - started, 1e-7)
    batch = max(1, int(0.002 / single))  # batches of ~2 ms
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    gc.collect()
    while len(samples) < min_rounds or time.perf_counter() < deadline:
        begin = time.perf_counter_ns()
        for _ in range(batch):
            decide()
        samples.append((time.perf_counter_ns() - begin) / batch / 1000)
        if len(samples) >= 20 * min_rounds:
            break
    samples.sort()
    return Figure(statistics.median(samples), samples[int(0.9 * (len(samples) - 1))],
                  batch * len(samples))


def selection(registry: Registry, scenario: Scenario) -> Callable[[], object]:
    """One synchronous routing decision, as ``NodePicker.pick`` makes it."""
    ids = sorted(registry.peers)
    proxy = Proxy(registry, scenario.policy(ids), ProxySettings())
    prefs = preferences(scenario.provider(ids))
    excluded = {ids[len(ids) // 2]} if scenario.exclude_one else set()
    route = RouteRequest("req-bench", MODEL, "chat/completions", {}, {})

    def decide() -> object:
        peer = proxy.picker.pick_now(route, prefs, excluded)
        if peer is None:
            raise RuntimeError(f"{scenario.name}: no node chosen")
        return peer

    return decide


def components(registry: Registry) -> dict[str, Callable[[], object]]:
    """The steps of a default decision separately (where the time goes), and for scale
    what a pass over every peer costs."""
    policy = LeastLoaded()
    route = RouteRequest("req-bench", MODEL, "chat/completions", {}, {})
    view = registry.free_slots(MODEL)
    free = list(view)
    peers = list(registry.peers.values())
    chosen = policy.rank(route, view)[0]

    def reserve_release() -> None:
        registry.reserve(chosen, MODEL)
        registry.release(chosen, MODEL)

    return {
        "floor: one attribute read per peer": lambda: [p.draining for p in peers],
        "Registry.free_slots()": lambda: registry.free_slots(MODEL),
        "LeastLoaded.rank(view)": lambda: policy.rank(route, view),
        "Registry.usable() on the choice": lambda: registry.usable(chosen, MODEL),
        "Registry.reserve() + release()": reserve_release,
        "for scale: LeastLoaded.rank(list)": lambda: policy.rank(route, free),
    }


async def time_acquire(registry: Registry, scenario: Scenario, budget: float,
                       min_rounds: int) -> Figure:
    """``await NodePicker.pick()`` + ``Registry.release()`` per decision, in µs."""
    ids = sorted(registry.peers)
    proxy = Proxy(registry, scenario.policy(ids), ProxySettings())
    prefs = preferences(scenario.provider(ids))
    route = RouteRequest("req-bench", MODEL, "chat/completions", {}, {})
    excluded: set[str] = set()
    for _ in range(3):
        peer = await proxy.picker.pick(route, prefs, excluded)
        assert peer is not None
        registry.release(peer, MODEL)
    started = time.perf_counter()
    peer = await proxy.picker.pick(route, prefs, excluded)
    assert peer is not None
    registry.release(peer, MODEL)
    batch = max(1, int(0.002 / max(time.perf_counter() - started, 1e-7)))
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    gc.collect()
    while len(samples) < min_rounds or time.perf_counter() < deadline:
        begin = time.perf_counter_ns()
        for _ in range(batch):
            peer = await proxy.picker.pick(route, prefs, excluded)
            registry.release(peer, MODEL)  # type: ignore[arg-type]
        samples.append((time.perf_counter_ns() - begin) / batch / 1000)
        if len(samples) >= 20 * min_rounds:
            break
    samples.sort()
    return Figure(statistics.median(samples), samples[int(0.9 * (len(samples) - 1))],
                  batch * len(samples))


def _cell(figure: Figure) -> str:
    return f"{figure.median_us:9.1f} ({figure.p90_us:8.1f})"


def print_table(title: str, sizes: Sequence[int], rows: dict[str, dict[int, Figure]]) -> None:
    """One row per scenario, one column per registry size."""
    print(f"\n{title}: µs per decision, median (p90)")
    width = max(len(name) for name in rows) + 2
    print(" " * width + "".join(f"{f'{n:,} nodes':>21}" for n in sizes))
    for name, figures in rows.items():
        print(f"{name:<{width}}" + "".join(f"{_cell(figures[n]):>21}" for n in sizes))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, time every scenario at every size, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="sizes 10,100,1000 and a shorter time budget per figure")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated registry sizes (default 10,100,1000,10000)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per figure (default 0.4; 0.1 with --quick)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("10,100,1000" if args.quick
                                             else "10,100,1000,10000")).split(",")]
    budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.4)
    min_rounds = 15 if args.quick else 40

    print(f"routing decision time: python {platform.python_version()} on "
          f"{platform.machine()}, {len(SCENARIOS)} scenarios, sizes {sizes}, "
          f"{budget:g}s per figure")
    began, busy_before, own_before = time.monotonic(), machine_busy_seconds(), own_cpu_seconds()
    selection_rows: dict[str, dict[int, Figure]] = {s.name: {} for s in SCENARIOS}
    acquire_rows: dict[str, dict[int, Figure]] = {name: {} for name in ACQUIRE_SCENARIOS}
    component_rows: dict[str, dict[int, Figure]] = {}
    for size in sizes:
        registry = build_registry(size)
        eligible = len(registry.candidates(MODEL))
        free = sum(1 for p in registry.candidates(MODEL) if p.has_slot(MODEL))
        print(f"  {size:,} nodes: {eligible:,} live and not in cooldown, {free:,} with a "
              "free slot", flush=True)
        for scenario in SCENARIOS:
            selection_rows[scenario.name][size] = time_batches(
                selection(registry, scenario), budget, min_rounds)
        for name, step in components(registry).items():
            component_rows.setdefault(name, {})[size] = time_batches(step, budget, min_rounds)
        by_name = {s.name: s for s in SCENARIOS}

        async def run_acquire(registry: Registry = registry, size: int = size,
                              by_name: dict[str, Scenario] = by_name) -> None:
            for name in ACQUIRE_SCENARIOS:
                acquire_rows[name][size] = await time_acquire(
                    registry, by_name[name], budget, min_rounds)

        trio.run(run_acquire)

    wall = time.monotonic() - began
    others = machine_busy_seconds() - busy_before - (own_cpu_seconds() - own_before)
    print(f"\nother processes on this machine used {max(0.0, others):.1f} CPU-s during the "
          f"{wall:.1f} s run ({max(0.0, others) / wall:.2f} of {os.cpu_count()} CPUs): "
          "figures are noisy when that is high")
    print_table("selection (NodePicker.pick_now: free-slot view, pick_among, tunnel check)",
                sizes,
                selection_rows)
    print_table("await NodePicker.pick() + Registry.release()", sizes, acquire_rows)
    print_table("where a default decision's time goes", sizes, component_rows)
    if 1000 in sizes:
        worst_name, worst = max(((name, figures[1000]) for name, figures in
                                 {**selection_rows, **{f"acquire: {k}": v for k, v in
                                                       acquire_rows.items()}}.items()),
                                key=lambda item: item[1].median_us)
        default = selection_rows[SCENARIOS[0].name][1000]
        met = worst.median_us < TARGET_US_AT_1000
        well = worst.median_us <= WELL_UNDER_US
        print(f"\ntarget at 1,000 nodes: a decision well under {TARGET_US_AT_1000:.0f} µs "
              f"(taken here as <= {WELL_UNDER_US:.0f} µs, 4x headroom)\n"
              f"  default policy: {default.median_us:.1f} µs (p90 {default.p90_us:.1f}), "
              f"{TARGET_US_AT_1000 / default.median_us:.1f}x under 1 ms\n"
              f"  slowest case '{worst_name}': {worst.median_us:.1f} µs "
              f"(p90 {worst.p90_us:.1f})\n"
              f"  under 1 ms: {'MET' if met else 'NOT MET'}; well under (<= "
              f"{WELL_UNDER_US:.0f} µs): {'MET' if well else 'NOT MET'}")
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
