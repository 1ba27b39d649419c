"""Throughput with 1 and 2 gateway processes behind HAProxy (issue 17, docs/scaling.md).

A trio process uses one core, so a deployment uses more cores by running more gateway
processes behind a load balancer, each node dialling every gateway. This script starts,
as separate processes:

* the fast fake OpenAI-compatible upstream (``bench/fake_upstream.py``, 32-chunk
  streams sent at once, as ``bench/overhead.py``),
* two gateways (``tooti run --role gateway``, each its own data dir),
* ``--nodes`` nodes (default 2), each on the upstream through its ``openai`` backend and
  dialling BOTH gateways (``--peer`` twice), so either gateway can route to every node,
* HAProxy (Debian's ``haproxy``, ``scripts/install-haproxy.sh``), started once per
  layout with a configuration this script writes: round robin, health checks on
  ``/readyz``, ``option redispatch``, retries on connection failures (the shape of
  docs/scaling.md's example),

and drives the same wrk loads as ``bench/overhead.py`` (``bench/post_*.lua``) at three
targets, non-streamed and streamed, at each ``--concurrency``:

* ``1 gw direct``   - wrk -> gateway A (no load balancer: the reference),
* ``1 gw haproxy``  - wrk -> HAProxy -> gateway A (B idle): what the balancer costs,
* ``2 gw haproxy``  - wrk -> HAProxy -> gateways A and B, round robin.

Each cell prints req/s, p50/p99 and the CPU each process used (% of one core over the
cell), and then the CPU milliseconds per request of the gateways together, the nodes
together, HAProxy, the upstream and wrk. The gateways' CPU per request is what sizes a
deployment: one gateway core serves about ``1000 / (gateway CPU ms per request)``
requests per second when nothing else competes for that core (docs/scaling.md).

``--keys`` runs the gateways as a real multi-gateway deployment: ``--auth keys`` with an
admin key, on ONE PostgreSQL database (a throwaway durable cluster from
``tests/postgres.py``; ``--pg-synchronous-commit`` as ``bench/overhead.py``), the nodes
priced, one account topped up and one API key that wrk sends through either gateway;
at the end ``/v1/me`` (the account's usage rows, written by both gateways) must count
every answer wrk got. PostgreSQL's CPU is printed as its own column.

What a 2-core machine can show, and what it cannot: the script prints it after the
tables, from the figures of the run. In short, the machine's two cores are shared by
every process of the benchmark (gateways, nodes, upstream, HAProxy, wrk and, with
``--keys``, PostgreSQL), so when one gateway already leaves no idle core, a second
gateway cannot add throughput: it only moves the same work onto two processes. It does
show how evenly HAProxy splits the work, what HAProxy costs per request, each process's
CPU per request (the per-core figures that size a deployment), how a gateway's CPU per
request changes when it carries half the concurrency, and failover
(``tests/test_scaling.py``). Scaling figures need a
machine with a free core per added gateway; there ``2 gw / 1 gw`` approaches 2 until
the nodes, the upstream or the load generator become the bottleneck.

Run from the repository root with the project's venv (heavy: ``nice -n 15`` on a
shared machine)::

    python bench/scaling.py [--duration 10] [--concurrency 1,16,64] [--repeat 2]
                            [--nodes 2] [--keys] [--quiet-below 0.3] [--quiet-wait 20]
                            [--quick] [--json FILE]

Each cell is measured ``--repeat`` times, the three layouts interleaved (HAProxy is
restarted for each), every run printed (losing runs kept); the 2-vs-1 comparison uses
the medians. Before each cell the script waits up to ``--quiet-wait`` s for processes
outside the benchmark to use at most ``--quiet-below`` CPUs, and prints how busy they
were during the cell ("other"), since a shared machine is noisy.

Every child runs in its own process group and is stopped on exit (Ctrl-C, SIGTERM, and
via ``PR_SET_PDEATHSIG`` on SIGKILL of this script); processes are not pinned to CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from overhead import (
    Admin,
    Child,
    Children,
    ForeignLoad,
    Layout,
    _terminate_on_signals,
    find_wrk,
    free_port,
    open_account,
    postgres,
    run_wrk,
    serves_model,
    start_upstream,
    tree_cpu_seconds,
    wait_quiet,
    wait_until,
)

HAPROXY = "/usr/sbin/haproxy"
MODES = ("non-stream", "stream")
LAYOUTS = ("1 gw direct", "1 gw haproxy", "2 gw haproxy")
PRICE_INPUT, PRICE_OUTPUT = 1.0, 2.0
"""What the nodes advertise with ``--keys``, in credits per million tokens."""
TOP_UP = 10**12
"""Credit of the ``--keys`` account in micro-units (a million credits: never short)."""


def haproxy_config(port: int, backends: dict[str, int], *, nbthread: int | None = None,
                   check_interval_ms: int = 1000, log: bool = False,
                   served_by: bool = False) -> str:
    """HAProxy in front of ``backends`` (server name -> gateway port on 127.0.0.1), as in
    docs/scaling.md: ``bind 127.0.0.1:port``, round robin, ``/readyz`` checks every
    ``check_interval_ms``, retries and redispatch on connection failures, keep-alive to
    the gateways. ``nbthread``: HAProxy's threads (its default: one per CPU); ``log``:
    its log (health checks too) on stdout; ``served_by``: an ``x-served-by`` header
    naming the server that answered (``tests/test_scaling.py`` uses this one too)."""
    servers = "".join(
        f"    server {name} 127.0.0.1:{gateway_port} check inter {check_interval_ms}ms "
        "fall 2 rise 2\n" for name, gateway_port in backends.items())
    return (
        "global\n"
        + (f"    nbthread {nbthread}\n" if nbthread else "")
        + ("    log stdout format raw local0 info\n" if log else "")
        + "    maxconn 8000\n"
        "defaults\n"
        "    mode http\n"
        + ("    log global\n" if log else "")
        + "    option http-keep-alive\n"
        "    timeout connect 2s\n"
        "    timeout client 120s\n"
        "    timeout server 120s\n"
        "    timeout http-keep-alive 10s\n"
        "    timeout check 2s\n"
        "frontend api\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend gws\n"
        "backend gws\n"
        "    balance roundrobin\n"
        "    option httpchk GET /readyz\n"
        "    http-check expect status 200\n"
        + ("    option log-health-checks\n" if log else "")
        + "    retries 3\n"
        "    option redispatch 1\n"
        "    retry-on conn-failure empty-response\n"
        + ("    http-response set-header x-served-by %[srv_name]\n" if served_by else "")
        + servers
    )


@dataclass
class Cell:
    """One wrk load at one layout."""

    layout: str
    mode: str
    concurrency: int
    run: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    other_cpus: float
    """CPUs kept busy by processes outside the benchmark during the cell."""
    cpu_percent: dict[str, float] = field(default_factory=dict)
    """Process -> % of one core over the cell."""

    def ms_per_request(self, prefix: str) -> float:
        """CPU milliseconds per request of the processes whose names start with
        ``prefix``, together."""
        share = sum(v for k, v in self.cpu_percent.items() if k.startswith(prefix))
        return 10 * share / self.rps if self.rps else 0.0


@dataclass
class Deployment:
    """The processes: gateway name -> (child, port), nodes, upstream, PostgreSQL."""

    gateways: dict[str, tuple[Child, int]] = field(default_factory=dict)
    nodes: dict[str, Child] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    """Every process whose CPU is counted, by column name."""
    key: str = "sk-bench-1234"
    admin: Admin | None = None


def start_gateway(children: Children, name: str, root: Path, database: str,
                  admin_key: str) -> tuple[Child, int]:
    port = free_port()
    argv = [sys.executable, "-m", "tooti", "run", "--log-level", "warning",
            "--role", "gateway", "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(root / f"gateway-{name}")]
    env = dict(os.environ)
    if admin_key:
        env["TOOTI_ADMIN_KEY"] = admin_key  # not on the command line
        argv += ["--auth", "keys", "--database", database]
    return children.start(f"gateway-{name}", argv, None, env), port


def start_node(children: Children, name: str, root: Path, upstream_base: str,
               ports: Sequence[int], priced: bool) -> Child:
    config = root / f"{name}.toml"
    lines = ["[[node.backends]]", 'type = "openai"', f'url = "{upstream_base}"']
    if priced:
        lines += [f"price_input = {PRICE_INPUT!r}", f"price_output = {PRICE_OUTPUT!r}"]
    config.write_text("\n".join(lines) + "\n")
    peers = [arg for p in ports for arg in ("--peer", f"ws://127.0.0.1:{p}")]
    return children.start(name, [
        sys.executable, "-m", "tooti", "run", "--log-level", "warning", "--role", "node",
        *peers, "--config", str(config), "--node-id", name,
        "--data-dir", str(root / f"{name}-data")], None)


def start_haproxy(children: Children, root: Path, backends: dict[str, int],
                  nbthread: int, headers: dict[str, str]) -> tuple[Child, str]:
    """HAProxy on a free port in front of ``backends``; its URL once it routes to a
    gateway that lists the model."""
    port = free_port()
    config = root / "haproxy.cfg"
    config.write_text(haproxy_config(port, backends, nbthread=nbthread))
    child = children.start("haproxy", [HAPROXY, "-W", "-db", "-f", str(config)], None)
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: serves_model(f"{base}/v1/models", headers), child, "HAProxy", 30)
    return child, base


def stop(children: Children, child: Child) -> None:
    """SIGTERM ``child`` (HAProxy's master stops its worker) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, signal.SIGTERM)
    children.finish(child, 10)


def measure(wrk: str, children: Children, url: str, key: str, pids: dict[str, int],
            layout: str, mode: str, concurrency: int, duration: float, run: int,
            quiet: tuple[float, float]) -> Cell:
    """One wrk load (once other processes keep at most ``quiet[0]`` CPUs busy, waiting
    up to ``quiet[1]`` s for that); CPU of every process in ``pids`` and of wrk over it."""
    if quiet[1] > 0:
        wait_quiet(children, *quiet)
    load = ForeignLoad(children)
    before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    reaped = os.times()
    started = time.monotonic()
    fields = run_wrk(wrk, children, Layout(), url, mode, concurrency, duration, key)
    elapsed = time.monotonic() - started
    after = os.times()
    cpu = {name: 100 * (tree_cpu_seconds(pid) - before[name]) / elapsed
           for name, pid in pids.items()}
    cpu["wrk"] = 100 * ((after.children_user + after.children_system)
                        - (reaped.children_user + reaped.children_system)) / elapsed
    cell = Cell(layout, mode, concurrency, run, fields["rps"], fields["p50_ms"],
                fields["p99_ms"], int(fields["requests"]),
                int(fields["errors_status"] + fields["errors_socket"]), load.cpus(), cpu)
    print(f"  run {run} {layout:13} {mode:10} c={concurrency:<3} {cell.rps:8.1f} req/s  p50 "
          f"{cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  other {cell.other_cpus:4.2f} "
          "CPU  " + " ".join(f"{k} {v:.0f}%" for k, v in cpu.items() if v >= 0.5)
          + (f"  ERRORS {cell.errors}" if cell.errors else ""), flush=True)
    return cell


def measure_layout(wrk: str, children: Children, root: Path, d: Deployment, layout: str,
                   run: int, headers: dict[str, str], args: argparse.Namespace) -> list[Cell]:
    """Every mode and concurrency at one layout (HAProxy started for it and stopped)."""
    a_port = d.gateways["a"][1]
    haproxy: Child | None = None
    url = f"http://127.0.0.1:{a_port}/v1/chat/completions"
    pids = dict(d.pids)
    if layout != "1 gw direct":
        backends = {"a": a_port}
        if layout.startswith("2"):
            backends["b"] = d.gateways["b"][1]
        haproxy, lb = start_haproxy(children, root, backends, args.haproxy_threads, headers)
        url = f"{lb}/v1/chat/completions"
        pids["haproxy"] = haproxy.proc.pid
    try:
        return [measure(wrk, children, url, d.key, pids, layout, mode, c, args.duration,
                        run, (args.quiet_below, args.quiet_wait))
                for mode in args.mode_list for c in args.concurrencies]
    finally:
        if haproxy is not None:
            stop(children, haproxy)


def report(cells: list[Cell], concurrencies: Sequence[int]) -> str:
    """The per-request CPU table, the 2-vs-1 ratios and what the machine can show."""
    lines = ["", "CPU ms per request (all gateways / all nodes / haproxy / upstream / wrk"
             " / postgres), machine busy (cores):"]
    for cell in cells:
        busy = sum(cell.cpu_percent.values()) / 100
        lines.append(
            f"  run {cell.run} {cell.layout:13} {cell.mode:10} c={cell.concurrency:<3} "
            f"gw {cell.ms_per_request('gateway'):.3f}  node {cell.ms_per_request('node'):.3f}"
            f"  haproxy {cell.ms_per_request('haproxy'):.3f}  upstream "
            f"{cell.ms_per_request('upstream'):.3f}  wrk {cell.ms_per_request('wrk'):.3f}"
            f"  pg {cell.ms_per_request('postgres'):.3f}   busy {busy:.2f} + other "
            f"{cell.other_cpus:.2f}")
    lines.append("")
    lines.append("2 gateways vs 1 (both behind HAProxy, same run; medians over the runs):")
    cores = os.cpu_count() or 1

    def runs(layout: str, mode: str, c: int) -> list[Cell]:
        return [x for x in cells if (x.layout, x.mode, x.concurrency) == (layout, mode, c)]

    def median(values: Sequence[float]) -> float:
        return statistics.median(values) if values else 0.0

    for mode in MODES:
        for c in concurrencies:
            one, two = runs("1 gw haproxy", mode, c), runs("2 gw haproxy", mode, c)
            direct = runs("1 gw direct", mode, c)
            if not one or not two:
                continue
            rps1, rps2 = median([x.rps for x in one]), median([x.rps for x in two])
            gw1 = median([x.ms_per_request("gateway") for x in one])
            gw2 = median([x.ms_per_request("gateway") for x in two])
            node1 = median([x.ms_per_request("node") for x in one])
            split = " / ".join(
                f"{k} {median([x.cpu_percent.get(k, 0.0) for x in two]):.0f}%"
                for k in sorted(two[0].cpu_percent) if k.startswith("gateway"))
            p50_added = (median([x.p50_ms for x in one]) - median([x.p50_ms for x in direct])
                         if direct else None)
            lines.append(
                f"  {mode:10} c={c:<3} {rps2 / rps1 if rps1 else 0:.2f}x req/s "
                f"({rps1:.0f} -> {rps2:.0f}); gateway CPU per request {gw1:.3f} -> "
                f"{gw2:.3f} ms ({100 * (gw2 / gw1 - 1) if gw1 else 0:+.0f} %); split {split}"
                + (f"; p50 behind HAProxy {p50_added:+.2f} ms vs direct"
                   if p50_added is not None else ""))
            own = median([sum(x.cpu_percent.values()) / 100 for x in one])
            other = median([x.other_cpus for x in one])
            idle = cores - own - other
            lines.append(
                f"      with 1 gateway the benchmark's processes kept {own:.2f} cores busy and "
                f"other processes {other:.2f} of {cores} ({idle:.2f} idle): "
                + ("no idle core for a 2nd gateway, so 2 gateways cannot go faster here"
                   + (" (a ratio above 1 while other processes are busy is two processes "
                      "taking a larger share of a contended machine, not scaling)"
                      if other >= 0.5 and rps2 > rps1 else "")
                   if idle < 0.5 else
                   "an idle core remains, so a 2nd gateway can add throughput here"))
            if gw1:
                lines.append(f"      one gateway core at this CPU per request: about "
                             f"{1000 / gw1:.0f} req/s; the nodes need {node1:.3f} ms per "
                             f"request ({1000 / max(node1, 1e-9):.0f} req/s per node core)")
    lines.append("")
    lines.append(
        f"What this {cores}-core machine can show: that HAProxy splits requests evenly over "
        "the gateways (the split above), what HAProxy costs per request (its CPU, and the "
        "p50 it adds at c=1), each process's CPU per request (the per-core figures that "
        "size a deployment: docs/scaling.md), how a gateway's CPU per request changes when "
        "it carries half the concurrency (the % above: its fixed costs per wake-up are "
        "shared by fewer requests at lower concurrency, as c=1 vs c=16 of one gateway "
        "shows), and failover "
        "(tests/test_scaling.py). "
        "What it cannot show: throughput growing with the number of gateways, since every "
        "process of the benchmark (gateways, nodes, upstream, HAProxy, wrk, PostgreSQL) "
        "shares the same cores; that needs a free core per added gateway (and enough "
        "cores for the nodes and the load generator), where 2 gateways approach 2x until "
        "the nodes or the upstream become the bottleneck.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput with 1 and 2 tooti gateways behind HAProxy.")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--concurrency", default="1,16,64",
                        help="comma-separated wrk connection counts")
    parser.add_argument("--nodes", type=int, default=2, help="node processes")
    parser.add_argument("--chunks", type=int, default=32, help="SSE events per stream")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--haproxy-threads", type=int, default=1,
                        help="HAProxy's nbthread (1 leaves the cores to tooti here)")
    parser.add_argument("--keys", action="store_true",
                        help="--auth keys on one shared PostgreSQL database")
    parser.add_argument("--pg-synchronous-commit", choices=("on", "off"), default="off",
                        help="with --keys: synchronous_commit of the database")
    parser.add_argument("--quick", action="store_true",
                        help="3 s cells, c=1 and c=16, one run")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of every cell, the layouts interleaved")
    parser.add_argument("--quiet-below", type=float, default=0.3,
                        help="before each cell, wait for other processes to use at most "
                             "this many CPUs ...")
    parser.add_argument("--quiet-wait", type=float, default=20.0,
                        help="... for up to this many seconds (0: do not wait)")
    parser.add_argument("--json", type=Path, help="also write the cells as JSON")
    args = parser.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.mode_list = [m for m in args.modes.split(",") if m]
    if set(args.mode_list) - set(MODES):
        parser.error(f"--modes: known modes are {', '.join(MODES)}")
    if args.quick:
        args.duration, args.concurrencies, args.repeat = 3.0, [1, 16], 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = find_wrk()
    if not os.access(HAPROXY, os.X_OK):
        sys.exit(f"error: {HAPROXY} is missing: bash scripts/install-haproxy.sh installs it "
                 "(Debian's haproxy package)")
    haproxy_version = "?"
    with contextlib.suppress(OSError, IndexError):
        haproxy_version = os.popen(f"{HAPROXY} -v").read().split()[2]
    import tooti
    print(f"tooti {tooti.__version__}; HAProxy {haproxy_version} (nbthread "
          f"{args.haproxy_threads}); {os.cpu_count()} CPUs; {args.nodes} nodes dialling both "
          f"gateways; {'keys on PostgreSQL' if args.keys else 'open gateways'}; "
          f"{args.duration:g} s per cell, {args.repeat} run(s); load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    cells: list[Cell] = []
    with (tempfile.TemporaryDirectory(prefix="tooti-scaling-") as tmp,
          _terminate_on_signals(), contextlib.ExitStack() as stack):
        root = Path(tmp)
        children = Children(root)
        try:
            d = Deployment()
            upstream = start_upstream(children, Layout(), args.chunks)
            d.pids["upstream"] = upstream.pids["upstream"]
            database, admin_key = "", ""
            if args.keys:
                database, postmaster = stack.enter_context(postgres(
                    children, Layout(), args.pg_synchronous_commit == "on"))
                d.pids["postgres"] = postmaster
                admin_key = "bench-admin-" + secrets.token_hex(16)
            for name in ("a", "b"):
                d.gateways[name] = start_gateway(children, name, root, database, admin_key)
                d.pids[f"gateway-{name}"] = d.gateways[name][0].proc.pid
            ports = [port for _, port in d.gateways.values()]
            base = upstream.url.removesuffix("/chat/completions")
            for i in range(1, args.nodes + 1):
                node = start_node(children, f"node-{i}", root, base, ports, args.keys)
                d.nodes[node.name] = node
                d.pids[node.name] = node.proc.pid
            headers: dict[str, str] = {}
            if args.keys:
                child, port = d.gateways["a"]
                d.admin = Admin(f"http://127.0.0.1:{port}", admin_key)
                admin = d.admin
                wait_until(admin.ready, child, "gateway a's admin API", 30)
                d.key = open_account(admin, TOP_UP)
                headers = {"Authorization": f"Bearer {d.key}"}
            for name, (child, port) in d.gateways.items():
                wait_until(lambda p=port: serves_model(  # type: ignore[misc]
                    f"http://127.0.0.1:{p}/v1/models", headers), child,
                    f"gateway {name} to list the model", 60)
            a_port = d.gateways["a"][1]
            print("warming up...", flush=True)
            warm = 0
            for mode in args.mode_list:
                warm += int(run_wrk(wrk, children, Layout(), f"http://127.0.0.1:{a_port}/v1/"
                                    "chat/completions", mode, 16, 2, d.key)["requests"])
            for run in range(1, args.repeat + 1):
                for layout in LAYOUTS:
                    cells += measure_layout(wrk, children, root, d, layout, run, headers,
                                            args)
            if d.admin is not None:
                me = d.admin.call("GET", "/v1/me", key=d.key)
                answered = warm + sum(c.requests - c.errors for c in cells)
                in_flight = 16 * len(args.mode_list) + sum(
                    c.concurrency for c in cells)
                counted = int(me["usage"]["requests"])
                verdict = ("ok" if answered <= counted <= answered + in_flight
                           else "MISMATCH")
                print(f"\n--keys: /v1/me counts {counted} requests, both gateways' usage "
                      f"rows in one ledger; wrk got {answered} answers (warm-up included) "
                      f"and stopped with at most {in_flight} in flight: {verdict}")
        except KeyboardInterrupt:
            print("\ninterrupted; stopping children", file=sys.stderr)
            return 130
        except (RuntimeError, urllib.error.URLError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                children.stop_all()
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    print(report(cells, args.concurrencies))
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
