"""10,000 nodes on one gateway: memory per idle tunnel, heartbeat CPU, routing, admin views.

Starts a tooti gateway (its own process) and ``--diallers`` dialler processes that each
run thousands of real :class:`tooti.node.node.Node` objects in one trio loop: every node
has its own Ed25519 identity, a simulated backend (model ``tooti-sim``) and one real
WebSocket tunnel to the gateway (HELLO, WELCOME, PROOF, MODELS, then a HEARTBEAT every
``tunnel.heartbeat_interval``, 3 s by default). All dial 127.0.0.1; the gateway's per-IP
connection and handshake limits are raised in its config so that one address may bring
10,000 tunnels (the shipped defaults protect a gateway from exactly that).

Once every tunnel is up and the network has settled, it prints:

* **memory per idle session**: the gateway's RSS with N sessions minus its RSS before
  the first one (after a warm-up of every admin view, so lazily built state is in the
  baseline), divided by N, in KiB (target ≤ 30);
* **heartbeat CPU**: the gateway's CPU seconds (``/proc/PID/stat``) over an idle window
  (only heartbeats flow) as a share of one core (target ≤ 10 %), with the diallers'
  CPU and the rest of the machine's for context;
* **a routing decision** with the default policy (``least-loaded``): measured *inside
  the gateway process* over its live registry. The gateway runs through a small wrapper
  (``--as-gateway``, this file) that starts ``tooti run --role gateway`` as usual plus a
  probe task: on SIGUSR1 it reads a command file and times
  :meth:`tooti.gateway.node_picker.NodePicker.pick_now` (what ``NodePicker.pick`` does
  synchronously for each request before reserving a slot), counts the process's trio
  tasks and (``census``) the Python objects by type, and writes the answer as JSON;
* ``GET /v1/models``, ``GET /admin/v1/peers``, ``GET /admin/v1/network``, ``GET
  /metrics`` and the first frame (the snapshot) of ``GET /admin/v1/events``: the client's
  wall time (median of a few), the gateway's CPU per call, and the size in bytes;
* a few real chat completions (non-streamed and streamed) routed to the nodes, with how
  many distinct nodes served them (``x-tooti-node``).

Wall times are noisy on a shared machine; the CPU figures are not. Figures are printed,
never asserted. The file-descriptor soft limit is raised to the hard limit here and in
every child (a tunnel holds a socket in the gateway and one in a dialler). Every child
runs in its own process group and is killed on exit (and if this script dies). Run it
under ``nice -n 15``: it is a load generator on a shared machine.

Run from the repository root with the project's venv::

    nice -n 15 python bench/nodes.py [--quick] [--nodes 10000] [--diallers 4] [--idle 30]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from children import (
    Child,
    Children,
    cpu_seconds,
    free_port,
    load_average,
    machine_busy_seconds,
    proc_status_kib,
    raise_fd_limit,
    report_in_temp_dir,
    toml_table,
    user_system_seconds,
)

from tooti.admin.metrics import count_tasks

REPO_DIR = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(__file__).resolve())
MODEL = "tooti-sim"
TARGET_KIB_PER_SESSION = 30.0
TARGET_HEARTBEAT_SHARE = 0.10
TARGET_ROUTING_US = 50.0
PENDING = 16
"""Tunnels each dialler may have connecting (not yet through the handshake) at once."""


# ------------------------------------------------------------------ /proc helpers


# ------------------------------------------------------------------ gateway side


def time_calls(call: Any, budget: float = 1.0) -> dict[str, float]:
    """µs per call of ``call()``: median and p90 of ~2 ms batches over ``budget`` s."""
    for _ in range(3):
        call()
    started = time.perf_counter()
    call()
    batch = max(1, int(0.002 / max(time.perf_counter() - started, 1e-7)))
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    while len(samples) < 20 or time.perf_counter() < deadline:
        begin = time.perf_counter_ns()
        for _ in range(batch):
            call()
        samples.append((time.perf_counter_ns() - begin) / batch / 1000)
    samples.sort()
    return {"median_us": statistics.median(samples),
            "p90_us": samples[int(0.9 * (len(samples) - 1))], "calls": batch * len(samples)}


def probe_answer(process: Any, command: str) -> dict[str, Any]:
    """What the gateway process reports for ``command`` (``routing``, ``tasks``,
    ``census``)."""
    from tooti.gateway.validation import parse_request
    from tooti.routing.base import RouteRequest

    gateway = process.gateway
    registry = gateway.registry
    answer: dict[str, Any] = {"peers": len(registry.peers), "tasks": count_tasks(),
                              "sessions": len(gateway.station.sessions)
                              if hasattr(gateway.station, "sessions") else None}
    if command == "routing":
        body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % (
            MODEL.encode())
        prefs = parse_request("chat/completions", body).preferences
        route = RouteRequest("req-bench", MODEL, "chat/completions", {}, {})
        picker = gateway.proxy.picker

        def decide() -> object:
            peer = picker.pick_now(route, prefs, set())
            if peer is None:
                raise RuntimeError("no node chosen")
            return peer

        answer["policy"] = type(picker.policy).__name__ if hasattr(picker, "policy") else "?"
        answer["pick_now"] = time_calls(decide)
        answer["free_slots"] = time_calls(lambda: registry.free_slots(MODEL))
    elif command.startswith("tracemalloc"):
        import tracemalloc

        if not tracemalloc.is_tracing():
            answer["tracemalloc"] = "not tracing (run with --tracemalloc)"
        else:
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
            if command == "tracemalloc-base":
                _TRACE_BASE[:] = [snapshot]
            elif _TRACE_BASE:
                diff = snapshot.compare_to(_TRACE_BASE[0], "lineno")
                answer["tracemalloc"] = [
                    (str(stat.traceback), stat.size_diff, stat.count_diff)
                    for stat in diff[:40]]
    elif command == "gc":
        answer["gc"] = dict(_GC_TIME)
    elif command == "census":
        gc.collect()
        objects = gc.get_objects()
        counts = Counter(type(o).__qualname__ for o in objects)
        answer["objects"] = len(objects)
        answer["by_type"] = counts.most_common(40)
    return answer


_GC_TIME: dict[str, float] = {}
"""Seconds the gateway spent in each generation's garbage collections (``gen0``..),
and their counts (``gen0_n``..), summed by a :data:`gc.callbacks` hook."""
_GC_STARTED: list[float] = [0.0]


def _gc_hook(phase: str, info: dict[str, Any]) -> None:
    """Time every collection of the gateway (``gc`` probe command)."""
    if phase == "start":
        _GC_STARTED[0] = time.perf_counter()
        return
    generation = f"gen{info.get('generation', '?')}"
    _GC_TIME[generation] = _GC_TIME.get(generation, 0.0) + time.perf_counter() - _GC_STARTED[0]
    _GC_TIME[generation + "_n"] = _GC_TIME.get(generation + "_n", 0.0) + 1


_TRACE_BASE: list[Any] = []
"""The tracemalloc snapshot of the empty gateway (``tracemalloc-base``)."""


async def probe_loop(process: Any, probe_dir: Path) -> None:
    """On SIGUSR1: read ``probe_dir/command``, answer it into ``probe_dir/answer.json``."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            try:
                command = (probe_dir / "command").read_text().strip()
                answer = probe_answer(process, command)
            except Exception as exc:  # reported to the bench, never ends the gateway
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            tmp = probe_dir / "answer.tmp"
            tmp.write_text(json.dumps(answer))
            tmp.rename(probe_dir / "answer.json")


def run_gateway(config: str, data_dir: str, probe_dir: str) -> int:
    """``tooti run --role gateway`` with the probe task beside its roles."""
    raise_fd_limit(0)
    gc.callbacks.append(_gc_hook)
    import tooti.runner as runner
    from tooti.cli import main

    original = runner.serve

    async def serve(process: Any, *,
                    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe_loop, process, Path(probe_dir))
            await original(process, task_status=task_status)
            nursery.cancel_scope.cancel()

    runner.serve = serve
    return main(["run", "--role", "gateway", "--config", config, "--data-dir", data_dir])


# ------------------------------------------------------------------ dialler side


async def dial_nodes(url: str, count: int, pending: int) -> None:
    """Run ``count`` nodes dialling ``url``, at most ``pending`` of them still handshaking
    at once (so a gateway short of CPU is not flooded into connect timeouts); print
    progress lines the bench waits for."""
    from tooti.backends import create_backend
    from tooti.identity import Identity
    from tooti.node.node import Node
    from tooti.settings import BackendSettings, NodeSettings, TunnelSettings

    backend_settings = BackendSettings(type="simulated", max_concurrency=4,
                                       options={"tokens": 8})
    # Backend health polled once a minute (not every 5 s): the diallers are the load
    # generator, and a simulated backend never falls sick.
    settings = NodeSettings(peers=[url], backends=[backend_settings], health_interval=60.0)
    tunnel = TunnelSettings()
    nodes: list[Node] = []
    window = trio.Semaphore(pending)

    async def report() -> None:
        reported = -1
        while True:
            connected = sum(1 for node in nodes if node.sessions)
            if connected != reported:
                reported = connected
                print(f"connected {connected}/{count}", flush=True)
            await trio.sleep(1.0)

    async def run_node(node: Node) -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(node.run)
            await node.dialer.connected.wait()
            window.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        for _ in range(count):
            await window.acquire()
            node = Node(settings, tunnel, [create_backend(backend_settings)],
                        identity=Identity.generate())
            nodes.append(node)
            nursery.start_soon(run_node, node)


def run_dialler(url: str, count: int, pending: int) -> int:
    """A dialler process: ``count`` nodes until killed (at nice 15 or more: it is the
    load generator, the gateway is what is measured)."""
    raise_fd_limit(0)
    os.nice(max(0, 15 - os.nice(0)))
    import logging

    logging.basicConfig(level=os.environ.get("NODES_DIALLER_LOG", "WARNING"))
    trio.run(dial_nodes, url, count, pending)
    return 0


# ------------------------------------------------------------------ the bench


@dataclass
class Options:
    """What to run."""

    nodes: int
    diallers: int
    idle: float
    settle: float
    keep: bool = False
    tracemalloc: bool = False
    stall: float = 60.0


@dataclass
class Timing:
    """One HTTP view timed a few times."""

    name: str
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    size: int = 0
    status: int = 0


@dataclass
class Report:
    """What the bench measured."""

    nodes: int = 0
    connected: int = 0
    connect_seconds: float = 0.0
    rss_empty_kib: int = 0
    rss_full_kib: int = 0
    rss_end_kib: int = 0
    tasks_empty: int = 0
    tasks_full: int = 0
    idle_seconds: float = 0.0
    gateway_idle_cpu: float = 0.0
    gateway_idle_user: float = 0.0
    gateway_idle_system: float = 0.0
    diallers_idle_cpu: float = 0.0
    machine_idle_cpu: float = 0.0
    gc_idle: dict[str, float] = field(default_factory=dict)
    """The gateway's garbage collections over the idle window: seconds and counts per
    generation."""
    routing: dict[str, Any] = field(default_factory=dict)
    census: list[tuple[str, int]] = field(default_factory=list)
    census_empty: list[tuple[str, int]] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    requests_ok: int = 0
    requests_total: int = 0
    served_by: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


class Probe:
    """Asks the gateway process's probe task (SIGUSR1 + a command file)."""

    def __init__(self, child: Child, directory: Path) -> None:
        self.child = child
        self.directory = directory

    async def ask(self, command: str, limit: float = 60.0) -> dict[str, Any]:
        """Send ``command``, wait for the answer."""
        answer = self.directory / "answer.json"
        answer.unlink(missing_ok=True)
        (self.directory / "command").write_text(command)
        os.kill(self.child.pid, signal.SIGUSR1)
        with trio.fail_after(limit):
            while True:  # a file written by another process: polled
                if answer.exists():
                    break
                await trio.sleep(0.05)
        result: dict[str, Any] = json.loads(answer.read_text())
        if "error" in result:
            raise RuntimeError(f"gateway probe {command}: {result['error']}")
        return result


def write_gateway_config(root: Path, port: int, nodes: int) -> Path:
    """The gateway's config: per-IP limits raised so 127.0.0.1 may bring every tunnel."""
    path = root / "gateway.toml"
    big = max(1000, 2 * nodes)
    path.write_text(
        'log_level = "warning"\ndrain_grace = 0.0\n'
        + toml_table("gateway", {
            "listen": f"127.0.0.1:{port}", "max_connections": nodes + 1000,
            "max_connections_per_ip": big, "connection_rate": float(big),
            "connection_burst": big, "tunnel_handshake_rate": float(big),
            "tunnel_handshake_burst": big, "tunnel_handshakes_per_ip": big,
            "access_log": False,
        }))
    return path


async def wait_listening(client: httpx.AsyncClient, base: str, child: Child) -> None:
    """Poll ``/healthz`` until the gateway answers."""
    with trio.fail_after(60):
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{child.tail()}")
            try:
                if (await client.get(f"{base}/healthz")).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.1)


def connected_of(child: Child) -> int:
    """The last ``connected N/M`` a dialler printed."""
    found = re.findall(r"connected (\d+)/", child.log())
    return int(found[-1]) if found else 0


async def time_view(client: httpx.AsyncClient, base: str, path: str, gateway: Child,
                    rounds: int, idle_rate: float) -> Timing:
    """GET ``path`` ``rounds`` times: wall ms, gateway CPU ms per call beyond its idle
    rate (``idle_rate`` CPU-s per second: the heartbeats), bytes."""
    timing = Timing(path)
    for _ in range(rounds):
        cpu0, started = cpu_seconds(gateway.pid), time.perf_counter()
        response = await client.get(base + path)
        wall = time.perf_counter() - started
        timing.wall_ms.append(wall * 1000)
        timing.cpu_ms.append((cpu_seconds(gateway.pid) - cpu0 - idle_rate * wall) * 1000)
        timing.size, timing.status = len(response.content), response.status_code
    return timing


async def time_events(base: str, gateway: Child, rounds: int, idle_rate: float = 0.0
                      ) -> Timing:
    """The first frame of ``/admin/v1/events`` (the snapshot): latency, gateway CPU
    beyond its idle rate, size."""
    timing = Timing("/admin/v1/events (first frame)")
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(rounds):
            cpu0, started = cpu_seconds(gateway.pid), time.perf_counter()
            async with client.stream("GET", base + "/admin/v1/events") as response:
                buffer = b""
                async for chunk in response.aiter_bytes():
                    buffer += chunk
                    if b"\n\n" in buffer:
                        break
            wall = time.perf_counter() - started
            timing.wall_ms.append(wall * 1000)
            timing.cpu_ms.append((cpu_seconds(gateway.pid) - cpu0 - idle_rate * wall) * 1000)
            timing.size, timing.status = buffer.index(b"\n\n") + 2, response.status_code
    return timing


async def real_requests(client: httpx.AsyncClient, base: str, report: Report,
                        count: int) -> None:
    """``count`` chat completions (every other one streamed) routed to the nodes."""
    for index in range(count):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "stream": index % 2 == 1}
        report.requests_total += 1
        try:
            response = await client.post(f"{base}/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            report.errors.append(f"request: {exc!r}")
            continue
        text = response.text
        good = response.status_code == 200 and (
            "data: [DONE]" in text if body["stream"] else '"choices"' in text)
        if good:
            report.requests_ok += 1
            report.served_by.add(response.headers.get("x-tooti-node", "?"))
        else:
            report.errors.append(f"request: {response.status_code} {text[:200]}")


async def benchmark(opts: Options, children: Children, root: Path) -> Report:
    """Bring the gateway and diallers up, measure, return the figures."""
    report = Report(nodes=opts.nodes)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_gateway_config(root, port, opts.nodes)
    probe_dir = root / "probe"
    probe_dir.mkdir()
    script = SCRIPT
    gateway = children.start("gateway", [
        sys.executable, *(["-X", "tracemalloc=1"] if opts.tracemalloc else []), script,
        "--as-gateway", str(config), str(root / "gateway-data"),
        str(probe_dir)])
    probe = Probe(gateway, probe_dir)
    async with httpx.AsyncClient(timeout=120) as client:
        await wait_listening(client, base, gateway)
        # Warm-up: every view once, so lazily made state is in the empty baseline.
        for path in ("/v1/models", "/admin/v1/peers", "/admin/v1/network", "/metrics"):
            await client.get(base + path)
        await time_events(base, gateway, 1)
        await probe.ask("tasks")
        empty = await probe.ask("census")
        report.census_empty = [tuple(x) for x in empty["by_type"]]
        if opts.tracemalloc:
            await probe.ask("tracemalloc-base")
        report.tasks_empty = empty["tasks"]
        await trio.sleep(1.0)
        report.rss_empty_kib = proc_status_kib(gateway.pid, "VmRSS")
        print(f"gateway up (pid {gateway.pid}), RSS {report.rss_empty_kib / 1024:.1f} MiB, "
              f"{report.tasks_empty} tasks; starting {opts.diallers} diallers", flush=True)

        per = [opts.nodes // opts.diallers + (1 if i < opts.nodes % opts.diallers else 0)
               for i in range(opts.diallers)]
        diallers = [children.start(f"dialler{i}", [
            sys.executable, script, "--as-dialler", f"ws://127.0.0.1:{port}/tooti/v1/tunnel",
            str(count), str(PENDING)]) for i, count in enumerate(per)]
        started = time.monotonic()
        last_print = 0.0
        best, best_at = 0, started
        limit = started + max(300.0, opts.nodes / 20)
        while True:
            for child in (gateway, *diallers):
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            connected = sum(connected_of(d) for d in diallers)
            now = time.monotonic()
            if connected > best:
                best, best_at = connected, now
            if now - last_print > 5:
                last_print = now
                print(f"  {connected:,} tunnels up after {now - started:.0f} s, "
                      f"gateway RSS {proc_status_kib(gateway.pid, 'VmRSS') / 1024:.0f} MiB",
                      flush=True)
            if connected >= opts.nodes:
                break
            if now - best_at > opts.stall or now > limit:
                print(f"  only {connected:,} of {opts.nodes:,} tunnels up after "
                      f"{now - started:.0f} s (no progress for {now - best_at:.0f} s: the "
                      "diallers, at nice 15, are short of CPU?); measuring those",
                      flush=True)
                break
            await trio.sleep(0.5)
        report.connect_seconds = time.monotonic() - started
        print(f"{connected:,} tunnels up in {report.connect_seconds:.1f} s; settling "
              f"{opts.settle:.0f} s", flush=True)
        await trio.sleep(opts.settle)
        full = await probe.ask("tasks")
        report.connected, report.tasks_full = full["peers"], full["tasks"]
        report.rss_full_kib = proc_status_kib(gateway.pid, "VmRSS")
        if opts.tracemalloc:
            traced = await probe.ask("tracemalloc-diff", limit=300)
            print("tracemalloc: allocations grown since the empty gateway, per session:")
            for where, size, count in traced.get("tracemalloc") or []:
                print(f"  {size / max(1, report.connected):9.1f} B "
                      f"{count / max(1, report.connected):6.2f} blocks  {where}")

        print(f"idle window {opts.idle:.0f} s (heartbeats only)", flush=True)
        g0 = cpu_seconds(gateway.pid)
        user0, system0 = user_system_seconds(gateway.pid)
        d0 = sum(cpu_seconds(d.pid) for d in diallers)
        gc0 = (await probe.ask("gc"))["gc"]
        m0, own0, t0 = machine_busy_seconds(), _own_cpu(), time.monotonic()
        await trio.sleep(opts.idle)
        gc1 = (await probe.ask("gc"))["gc"]
        report.gc_idle = {k: v - gc0.get(k, 0.0) for k, v in gc1.items()}
        report.idle_seconds = time.monotonic() - t0
        report.gateway_idle_cpu = cpu_seconds(gateway.pid) - g0
        user1, system1 = user_system_seconds(gateway.pid)
        report.gateway_idle_user, report.gateway_idle_system = user1 - user0, system1 - system0
        report.diallers_idle_cpu = sum(cpu_seconds(d.pid) for d in diallers) - d0
        report.machine_idle_cpu = (machine_busy_seconds() - m0 - (_own_cpu() - own0)
                                   - report.gateway_idle_cpu - report.diallers_idle_cpu)

        report.routing = await probe.ask("routing")
        idle_rate = report.gateway_idle_cpu / report.idle_seconds
        for path in ("/v1/models", "/admin/v1/peers", "/admin/v1/network", "/metrics"):
            try:
                report.timings.append(
                    await time_view(client, base, path, gateway, 5, idle_rate))
            except httpx.HTTPError as exc:
                report.errors.append(f"GET {path}: {exc!r}")
        try:
            report.timings.append(await time_events(base, gateway, 3, idle_rate))
        except httpx.HTTPError as exc:
            report.errors.append(f"GET /admin/v1/events: {exc!r} (no first frame)")
        await real_requests(client, base, report, 20)
        census = await probe.ask("census")
        report.census = [tuple(x) for x in census["by_type"]]
        report.rss_end_kib = proc_status_kib(gateway.pid, "VmRSS")
    return report


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def print_report(opts: Options, report: Report) -> bool:
    """Print the figures and the verdicts; True if every target is met."""
    n = max(1, report.connected)
    per_session = (report.rss_full_kib - report.rss_empty_kib) / n
    share = report.gateway_idle_cpu / max(report.idle_seconds, 1e-9)
    pick = report.routing.get("pick_now", {})
    print()
    print(f"== {report.connected:,} idle node tunnels on one gateway "
          f"({opts.diallers} dialler processes; load {load_average()}) ==")
    print(f"  tunnels up in {report.connect_seconds:.1f} s")
    print(f"  gateway RSS: {report.rss_empty_kib / 1024:.1f} MiB empty, "
          f"{report.rss_full_kib / 1024:.1f} MiB with {report.connected:,} sessions, "
          f"{report.rss_end_kib / 1024:.1f} MiB at the end")
    print(f"  memory per idle session: {per_session:.1f} KiB "
          f"(target <= {TARGET_KIB_PER_SESSION:.0f}) -> "
          f"{_verdict(per_session <= TARGET_KIB_PER_SESSION)}")
    print(f"  trio tasks: {report.tasks_empty} empty, {report.tasks_full:,} full "
          f"({(report.tasks_full - report.tasks_empty) / n:.2f} per session)")
    print(f"  heartbeat CPU over {report.idle_seconds:.1f} s idle: gateway "
          f"{report.gateway_idle_cpu:.2f} CPU-s = {share * 100:.1f} % of one core "
          f"(target <= {TARGET_HEARTBEAT_SHARE * 100:.0f} %) -> "
          f"{_verdict(share <= TARGET_HEARTBEAT_SHARE)}; diallers "
          f"{report.diallers_idle_cpu:.2f} CPU-s; other processes "
          f"{report.machine_idle_cpu:.2f} CPU-s")
    print(f"    gateway user {report.gateway_idle_user:.2f} s + system "
          f"{report.gateway_idle_system:.2f} s (system: its socket calls, and on loopback the "
          "peers' TCP receive work too); "
          f"{report.gateway_idle_cpu / max(1, n) / max(report.idle_seconds, 1e-9) * 1e6 * 3:.0f}"
          " µs per session per 3 s heartbeat interval")
    if report.gc_idle:
        gcs = report.gc_idle
        print("    of which garbage collection: " + ", ".join(
            f"gen{g} {int(gcs.get(f'gen{g}_n', 0))}x {gcs.get(f'gen{g}', 0.0):.2f} s"
            for g in range(3)))
    if pick:
        print(f"  routing decision (NodePicker.pick_now, {report.routing.get('policy')}, in "
              f"the gateway over {report.routing.get('peers'):,} live peers): "
              f"median {pick['median_us']:.2f} µs, p90 {pick['p90_us']:.2f} µs "
              f"(target <= {TARGET_ROUTING_US:.0f}) -> "
              f"{_verdict(pick['median_us'] <= TARGET_ROUTING_US)}; Registry.free_slots "
              f"{report.routing['free_slots']['median_us']:.2f} µs")
    print("  views (wall: median of the rounds; gateway CPU: mean per call beyond the idle "
          "rate, /proc ticks):")
    for timing in report.timings:
        print(f"    {timing.name:<34} {statistics.median(timing.wall_ms):8.1f} ms wall "
              f"{sum(timing.cpu_ms) / len(timing.cpu_ms):8.1f} ms CPU {timing.size:>12,} bytes "
              f"(HTTP {timing.status})")
    print(f"  real requests: {report.requests_ok}/{report.requests_total} ok, served by "
          f"{len(report.served_by)} distinct nodes")
    for error in report.errors[:8]:
        print(f"    error: {error}")
    empty = dict(report.census_empty)
    growth = sorted(((name, count - empty.get(name, 0)) for name, count in report.census),
                    key=lambda item: -item[1])[:15]
    print("  Python objects per session by type (census at the end minus empty):")
    print("    " + ", ".join(f"{name} {count / n:.1f}" for name, count in growth if count > 0))
    return (per_session <= TARGET_KIB_PER_SESSION and share <= TARGET_HEARTBEAT_SHARE
            and bool(pick) and pick["median_us"] <= TARGET_ROUTING_US
            and report.requests_ok == report.requests_total and not report.errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, always stop the children."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--as-gateway"]:
        return run_gateway(*args_list[1:4])
    if args_list[:1] == ["--as-dialler"]:
        return run_dialler(args_list[1], int(args_list[2]), int(args_list[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,000 nodes, 2 diallers, 10 s idle window (a smoke test)")
    parser.add_argument("--nodes", type=int, default=None, help="node tunnels (10000)")
    parser.add_argument("--diallers", type=int, default=None, help="dialler processes (4)")
    parser.add_argument("--idle", type=float, default=None,
                        help="seconds of the idle (heartbeats only) window (30)")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait after the last tunnel is up (10)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="measure what is connected once no tunnel came up for this "
                        "many seconds (60)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="diagnosis: trace the gateway's allocations (slower) and print "
                        "what grew per session, by source line")
    args = parser.parse_args(args_list)
    opts = Options(nodes=args.nodes or (1000 if args.quick else 10_000),
                   diallers=args.diallers or (2 if args.quick else 4),
                   idle=args.idle or (10.0 if args.quick else 30.0), settle=args.settle,
                   keep=args.keep, tracemalloc=args.tracemalloc, stall=args.stall)
    soft, hard = raise_fd_limit(opts.nodes + 1024)
    print(f"fd limit: soft {soft}, hard {hard} (inherited by the children)")
    code, report = report_in_temp_dir("tooti-nodes-", benchmark, opts, keep=opts.keep)
    if report is None:
        return code
    clean = print_report(opts, report)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
