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

    python bench/scaling.py [--duration 10] [--concurrency 1,16,64] [--nodes 2] [--keys]
                            [--quick] [--json FILE]

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
    wait_until,
)

HAPROXY = "/usr/sbin/haproxy"
MODES = ("non-stream", "stream")
LAYOUTS = ("1 gw direct", "1 gw haproxy", "2 gw haproxy")
PRICE_INPUT, PRICE_OUTPUT = 1.0, 2.0
"""What the nodes advertise with ``--keys``, in credits per million tokens."""
TOP_UP = 10**12
"""Credit of the ``--keys`` account in micro-units (a million credits: never short)."""


def haproxy_config(port: int, backends: dict[str, int], nbthread: int) -> str:
    """HAProxy in front of ``backends`` (name -> gateway port on 127.0.0.1), as in
    docs/scaling.md: round robin, ``/readyz`` checks every second, retries and
    redispatch on connection failures, keep-alive to the gateways."""
    servers = "".join(f"    server {name} 127.0.0.1:{p} check inter 1s fall 2 rise 2\n"
                      for name, p in backends.items())
    return (
        "global\n"
        f"    nbthread {nbthread}\n"
        "    maxconn 8000\n"
        "defaults\n"
        "    mode http\n"
        "    option http-keep-alive\n"
        "    timeout connect 2s\n"
        "    timeout client 120s\n"
        "    timeout server 120s\n"
        "    timeout http-keep-alive 10s\n"
        "frontend api\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend gws\n"
        "backend gws\n"
        "    balance roundrobin\n"
        "    option httpchk GET /readyz\n"
        "    http-check expect status 200\n"
        "    retries 3\n"
        "    option redispatch 1\n"
        "    retry-on conn-failure empty-response\n"
        + servers
    )


@dataclass
class Cell:
    """One wrk load at one layout."""

    layout: str
    mode: str
    concurrency: int
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
    config.write_text(haproxy_config(port, backends, nbthread))
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
            layout: str, mode: str, concurrency: int, duration: float) -> Cell:
    """One wrk load; CPU of every process in ``pids`` and of wrk over it."""
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
    cell = Cell(layout, mode, concurrency, fields["rps"], fields["p50_ms"],
                fields["p99_ms"], int(fields["requests"]),
                int(fields["errors_status"] + fields["errors_socket"]), load.cpus(), cpu)
    print(f"  {layout:13} {mode:10} c={concurrency:<3} {cell.rps:8.1f} req/s  p50 "
          f"{cell.p50_ms:7.2f} ms  p99 {cell.p99_ms:7.2f} ms  other {cell.other_cpus:4.2f} "
          "CPU  " + " ".join(f"{k} {v:.0f}%" for k, v in cpu.items() if v >= 0.5)
          + (f"  ERRORS {cell.errors}" if cell.errors else ""), flush=True)
    return cell


def report(cells: list[Cell], concurrencies: Sequence[int]) -> str:
    """The per-request CPU table, the 2-vs-1 ratios and what the machine can show."""
    lines = ["", "CPU ms per request (all gateways / all nodes / haproxy / upstream / wrk"
             " / postgres), machine busy (cores):"]
    for cell in cells:
        busy = sum(cell.cpu_percent.values()) / 100
        lines.append(
            f"  {cell.layout:13} {cell.mode:10} c={cell.concurrency:<3} "
            f"gw {cell.ms_per_request('gateway'):.3f}  node {cell.ms_per_request('node'):.3f}"
            f"  haproxy {cell.ms_per_request('haproxy'):.3f}  upstream "
            f"{cell.ms_per_request('upstream'):.3f}  wrk {cell.ms_per_request('wrk'):.3f}"
            f"  pg {cell.ms_per_request('postgres'):.3f}   busy {busy:.2f} + other "
            f"{cell.other_cpus:.2f}")
    lines.append("")
    lines.append("2 gateways vs 1 (both behind HAProxy, same run):")
    by = {(c.layout, c.mode, c.concurrency): c for c in cells}
    cores = os.cpu_count() or 1
    for mode in MODES:
        for c in concurrencies:
            one, two = by.get(("1 gw haproxy", mode, c)), by.get(("2 gw haproxy", mode, c))
            direct = by.get(("1 gw direct", mode, c))
            if one is None or two is None:
                continue
            split = {k: v for k, v in two.cpu_percent.items() if k.startswith("gateway")}
            gw1, gw2 = one.ms_per_request("gateway"), two.ms_per_request("gateway")
            lines.append(
                f"  {mode:10} c={c:<3} {two.rps / one.rps:.2f}x req/s "
                f"({one.rps:.0f} -> {two.rps:.0f}); gateway CPU per request "
                f"{gw1:.3f} -> {gw2:.3f} ms ({100 * (gw2 / gw1 - 1) if gw1 else 0:+.0f} %); "
                "split " + " / ".join(f"{k} {v:.0f}%" for k, v in split.items())
                + (f"; p50 behind HAProxy {one.p50_ms - direct.p50_ms:+.2f} ms vs direct"
                   if direct else ""))
            busy = sum(one.cpu_percent.values()) / 100 + one.other_cpus
            headroom = cores - busy
            lines.append(
                f"      with 1 gateway the machine was {busy:.2f} of {cores} cores busy "
                f"({headroom:.2f} idle): "
                + ("no idle core for a 2nd gateway to use, so 2 gateways cannot go faster "
                   "here" if headroom < 0.5 else
                   "an idle core remains, so a 2nd gateway can add throughput here"))
            gw = one.ms_per_request("gateway")
            if gw:
                lines.append(f"      one gateway core at this CPU per request: about "
                             f"{1000 / gw:.0f} req/s; the nodes need "
                             f"{one.ms_per_request('node'):.3f} ms per request "
                             f"({1000 / max(one.ms_per_request('node'), 1e-9):.0f} req/s "
                             "per node core)")
    lines.append("")
    lines.append(
        f"What this {cores}-core machine can show: that HAProxy splits requests evenly over "
        "the gateways (the split above), what HAProxy costs per request (its CPU, and the "
        "p50 it adds at c=1), each process's CPU per request (the per-core figures that "
        "size a deployment: docs/scaling.md), how a gateway's CPU per request changes when "
        "it carries half the concurrency (the % above: its fixed costs per wake-up are "
        "shared by fewer requests at lower concurrency, as c=16 vs c=64 of one gateway "
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
                        help="3 s cells, c=1 and c=16")
    parser.add_argument("--json", type=Path, help="also write the cells as JSON")
    args = parser.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.mode_list = [m for m in args.modes.split(",") if m]
    if set(args.mode_list) - set(MODES):
        parser.error(f"--modes: known modes are {', '.join(MODES)}")
    if args.quick:
        args.duration, args.concurrencies = 3.0, [1, 16]
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
          f"{args.duration:g} s per cell; load {os.getloadavg()[0]:.2f}", flush=True)
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
            for layout in LAYOUTS:
                haproxy: Child | None = None
                if layout == "1 gw direct":
                    url = f"http://127.0.0.1:{a_port}/v1/chat/completions"
                else:
                    backends = {"a": a_port}
                    if layout.startswith("2"):
                        backends["b"] = d.gateways["b"][1]
                    haproxy, lb = start_haproxy(children, root, backends,
                                                args.haproxy_threads, headers)
                    url = f"{lb}/v1/chat/completions"
                pids = dict(d.pids)
                if haproxy is not None:
                    pids["haproxy"] = haproxy.proc.pid
                try:
                    for mode in args.mode_list:
                        for c in args.concurrencies:
                            cells.append(measure(wrk, children, url, d.key, pids, layout,
                                                 mode, c, args.duration))
                finally:
                    if haproxy is not None:
                        stop(children, haproxy)
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
