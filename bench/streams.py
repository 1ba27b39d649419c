"""1,000 concurrent streaming requests through one gateway.

Starts a tooti gateway and ``--nodes`` simulated nodes, each as its own
process (``python -m tooti run --role ... --config <tmp toml>``; the nodes
dial the gateway over WebSocket tunnels on 127.0.0.1), then opens
``--streams`` streaming chat completions all at once from this process and
waits for every one to finish. Each node's simulated backend advertises
``max_concurrency = 500`` and generates ``--tokens`` tokens at
``--tokens-per-second`` after ``--ttft``, so the streams overlap for their
whole length.

A stream counts as an error unless it got HTTP 200, every token, a final
``data: [DONE]`` and no in-band ``data: {"error": ...}`` event. Printed: total
wall time, streams/s, connect / time-to-first-token / total-duration
percentiles (measured by the client from just before it connects), the
gateway's resident memory (before, peak, after), the CPU seconds each process
used, and how busy the rest of the machine was meanwhile.

Two clients are available: ``raw`` (default: HTTP/1.1 written and parsed by
hand on trio sockets, one connection per stream, so the client costs little
CPU) and ``httpx`` (``httpx.AsyncClient`` on trio with its connection limits
raised to 2,000). On a 2-core machine the client shares the CPUs with the
gateway and nodes, so a cheap client matters.

The file-descriptor limit is raised to the hard limit for this process and
its children (a stream holds one socket in the client and one in the
gateway). Every child runs in its own process group and is killed on exit,
also on Ctrl-C, SIGTERM and failures (and, on Linux, if this script is
SIGKILLed, through ``PR_SET_PDEATHSIG``). Only 127.0.0.1 is contacted.

Run from the repository root with the project's venv::

    python bench/streams.py [--quick] [--streams 1000] [--nodes 4] [--client raw|httpx]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import msgspec
import trio
from children import (
    Child,
    Children,
    cpu_seconds,
    exit_on_signals,
    interrupted,
    load_average,
    machine_busy_seconds,
    percentile,
    proc_status_kib,
    raise_fd_limit,
    raw_answer,
    sigint_raises,
    sse_problem,
    sse_request,
    toml_table,
    wait_for_log,
)

REPO_DIR = Path(__file__).resolve().parent.parent
T = TypeVar("T")
MODEL = "tooti-sim"
MAX_CONCURRENCY = 500
TUNNEL_MAX_STREAMS = 512
"""Per-tunnel stream limit written into every config: the default (256) is below the
advertised ``max_concurrency`` (500), so one tunnel could not carry all its slots."""
TARGET_STREAMS = 1000
BACKLOG_BOOTSTRAP = (
    "import sys, hypercorn.config; hypercorn.config.Config.backlog = int(sys.argv[1]); "
    "from tooti.cli import main; raise SystemExit(main(sys.argv[2:]))"
)
"""``python -c`` program for ``--backlog``: the tooti CLI with another listen backlog."""


# --------------------------------------------------------------------- /proc


def listen_overflows() -> int:
    """The machine's TcpExt ListenOverflows counter (accept queue full), 0 if unknown."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def own_cpu_seconds() -> float:
    """CPU seconds used by this script so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fd_limit_of(pid: int) -> str:
    """The soft 'Max open files' limit of ``pid``."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    except OSError:
        pass
    return "?"


# --------------------------------------------------------------------- client


@dataclass
class Result:
    """One stream, as the client saw it (times in seconds from just before connecting)."""

    connect: float | None = None
    ttft: float | None = None
    total: float | None = None
    error: str = ""


def check_body(payload: bytes, tokens: int) -> str:
    """'' if an SSE body is complete and clean, else what is wrong with it."""
    problem = sse_problem(payload)
    if problem:
        return problem
    got = payload.count(b'"content":" tok')
    if got != tokens:
        return f"{got} tokens instead of {tokens}"
    return ""


class RawClient:
    """HTTP/1.1 by hand: one connection per stream, ``Connection: close``."""

    def __init__(self, port: int, body: bytes) -> None:
        """Requests go to ``127.0.0.1:port``."""
        self.port = port
        self.request = sse_request(port, body)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def stream(self, tokens: int) -> Result:
        """Send one streaming request and read the whole answer."""
        answer = await raw_answer(self.port, self.request)
        return Result(answer.connect, answer.ttft, answer.total,
                      answer.error or check_body(answer.payload, tokens))


class HttpxClient:
    """``httpx.AsyncClient`` on trio, connection limits raised to 2,000."""

    def __init__(self, port: int, body: bytes) -> None:
        """Requests go to ``127.0.0.1:port``."""
        self.body = body
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=None,
            limits=httpx.Limits(max_connections=2000, max_keepalive_connections=2000))

    async def __aenter__(self) -> HttpxClient:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def stream(self, tokens: int) -> Result:
        """Send one streaming request and read the whole answer."""
        result = Result()
        began = time.perf_counter()
        async with self.client.stream(
            "POST", "/v1/chat/completions", content=self.body,
            headers={"content-type": "application/json"},
        ) as response:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if result.ttft is None and b"data: " in body:
                    result.ttft = time.perf_counter() - began
            result.total = time.perf_counter() - began
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {bytes(body[:160])!r}"
        else:
            result.error = check_body(bytes(body), tokens)
        return result


# --------------------------------------------------------------------- benchmark


@dataclass
class Options:
    """What to run."""

    streams: int
    nodes: int
    tokens: int
    tokens_per_second: float
    ttft: float
    client: str
    timeout: float
    warmup: int
    backlog: int | None = None
    """Listen backlog forced on the gateway (experiment); None = as shipped (100)."""
    tunnel_max_streams: int = TUNNEL_MAX_STREAMS


@dataclass
class Report:
    """Everything measured in one run."""

    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    others_cpu: float = 0.0
    load_before: str = ""
    listen_overflows: int = 0
    """TcpExt ListenOverflows during the run (machine-wide): connections that found a
    listening socket's accept queue full, and were retried by the client's kernel."""


def peak_overlap(results: Sequence[Result]) -> int:
    """Most streams between their first token and their end at the same moment (all
    requests are sent at once, so this is how many the gateway relayed together)."""
    events = sorted([(r.ttft, 1) for r in results if r.ttft is not None and r.total]
                    + [(r.total, -1) for r in results if r.ttft is not None and r.total])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def start_gateway(children: Children, root: Path, opts: Options) -> Child:
    """Write the gateway's config and start it (the nodes are started once it listens)."""
    tunnel = {"max_streams": opts.tunnel_max_streams}
    gateway_toml = root / "gateway.toml"
    gateway_toml.write_text(
        'log_level = "info"\ndrain_grace = 0.0\n'
        # every client connection comes from 127.0.0.1: lift the per-IP limits
        + toml_table("gateway", {"listen": "127.0.0.1:0", "max_queue": 4096,
                                 "max_connections_per_ip": 2 * opts.streams + 64,
                                 "connection_burst": 2 * opts.streams + 64,
                                 "connection_rate": 100_000.0})
        + toml_table("tunnel", tunnel))
    run = ["run", "--role", "gateway", "--config", str(gateway_toml),
           "--data-dir", str(root / "gateway-data")]
    if opts.backlog is None:
        argv = [sys.executable, "-m", "tooti", *run]
    else:
        # Experiment only: the shipped gateway keeps hypercorn's default listen backlog
        # (100); this starts the same CLI with that class default changed first.
        argv = [sys.executable, "-c", BACKLOG_BOOTSTRAP, str(opts.backlog), *run]
    return children.start("gateway", argv)


def start_nodes(children: Children, root: Path, opts: Options, port: int) -> list[Child]:
    """One process per node, each with a simulated backend, dialling the gateway."""
    nodes = []
    for index in range(opts.nodes):
        node_id = f"sim-{index}"
        path = root / f"{node_id}.toml"
        path.write_text(
            'log_level = "warning"\ndrain_grace = 0.0\n'
            + toml_table("node", {"id": node_id})
            + toml_table("[[node.backends]]", {"type": "simulated",
                                               "max_concurrency": MAX_CONCURRENCY})
            + toml_table("node.backends.options", {
                "tokens": opts.tokens, "tokens_per_second": opts.tokens_per_second,
                "ttft": opts.ttft})
            + toml_table("tunnel", {"max_streams": opts.tunnel_max_streams}))
        nodes.append(children.start(node_id, [
            sys.executable, "-m", "tooti", "run", "--role", "node",
            "--peer", f"ws://127.0.0.1:{port}", "--config", str(path),
            "--data-dir", str(root / f"{node_id}-data")]))
    return nodes


async def run_streams(client: RawClient | HttpxClient, count: int, tokens: int,
                      limit: float) -> tuple[list[Result], float]:
    """Open ``count`` streams at once; returns their results and the wall time."""
    results = [Result() for _ in range(count)]
    gate = trio.Event()

    async def one(index: int) -> None:
        await gate.wait()
        try:
            results[index] = await client.stream(tokens)
        except (OSError, httpx.HTTPError, ValueError, IndexError) as exc:
            results[index].error = f"{type(exc).__name__}: {exc}"

    began = time.perf_counter()
    with trio.move_on_after(limit) as scope:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
            await trio.sleep(0.2)  # let every task reach the gate
            began = time.perf_counter()
            gate.set()
    wall = time.perf_counter() - began
    if scope.cancelled_caught:
        for result in results:
            if result.total is None and not result.error:
                result.error = f"not finished within {limit:g}s"
    return results, wall


async def benchmark(opts: Options, children: Children, root: Path) -> Report:
    """Start the processes, warm up, run the streams, measure."""
    report = Report()
    gateway = start_gateway(children, root, opts)
    match = await wait_for_log(gateway, r"gateway listening on http://127\.0\.0\.1:(\d+)")
    port = int(match.group(1))
    nodes = start_nodes(children, root, opts, port)
    for node in nodes:
        await wait_for_log(gateway, rf"peer {re.escape(node.name)} serves \S")
    print(f"gateway pid {gateway.pid} on 127.0.0.1:{port} (fd limit "
          f"{fd_limit_of(gateway.pid)}); {len(nodes)} node processes registered", flush=True)

    body = msgspec.json.encode({"model": MODEL, "stream": True, "messages": [
        {"role": "user", "content": "benchmark"}]})
    client: RawClient | HttpxClient = (RawClient(port, body) if opts.client == "raw"
                                       else HttpxClient(port, body))
    async with client:
        warm, _ = await run_streams(client, opts.warmup, opts.tokens, 60)
        bad = [r.error for r in warm if r.error]
        if bad:
            raise RuntimeError(f"warm-up failed ({len(bad)}/{len(warm)}): {bad[0]}")
        await trio.sleep(0.5)

        pids = {"gateway": gateway.pid, **{n.name: n.pid for n in nodes}}
        report.rss_before_kib = proc_status_kib(gateway.pid, "VmRSS")
        report.load_before = load_average()
        overflows_before = listen_overflows()
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own_before, busy_before = own_cpu_seconds(), machine_busy_seconds()
        peak = 0

        async def sample_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, proc_status_kib(gateway.pid, "VmRSS"))
                await trio.sleep(0.05)

        async with trio.open_nursery() as sampler:
            sampler.start_soon(sample_rss)
            report.results, report.wall = await run_streams(
                client, opts.streams, opts.tokens, opts.timeout)
            sampler.cancel_scope.cancel()
        report.rss_peak_kib = peak
        report.cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        report.cpu["client (this script)"] = own_cpu_seconds() - own_before
        mine = sum(report.cpu.values())
        report.others_cpu = max(0.0, machine_busy_seconds() - busy_before - mine)
        report.listen_overflows = listen_overflows() - overflows_before
        await trio.sleep(1.0)
        report.rss_after_kib = proc_status_kib(gateway.pid, "VmRSS")
    return report


def print_report(opts: Options, report: Report) -> bool:
    """Print the figures; True if every stream was clean."""
    results = report.results
    errors = [r for r in results if r.error]
    ok = [r for r in results if not r.error]
    print(f"\n{opts.streams} concurrent streams through one gateway to {opts.nodes} simulated "
          f"node processes ({opts.tokens} tokens at {opts.tokens_per_second:g} tok/s after "
          f"{opts.ttft * 1000:g} ms TTFT; ideal stream length "
          f"{opts.ttft + max(0, opts.tokens - 1) / max(opts.tokens_per_second, 1e-9):.2f} s); "
          f"client {opts.client}; gateway listen backlog "
          f"{opts.backlog or '100 (as shipped)'}; tunnel.max_streams {opts.tunnel_max_streams}; "
          f"load average before: {report.load_before}")
    print(f"  errors: {len(errors)} of {len(results)}")
    for reason, count in _group([r.error for r in errors])[:5]:
        print(f"    {count} x {reason}")
    print(f"  total time: {report.wall:.2f} s   throughput: {len(ok) / report.wall:.1f} "
          f"streams/s ({len(ok) * opts.tokens / report.wall:.0f} tokens/s)")
    print(f"  streams relaying tokens at the same moment: at most {peak_overlap(ok)}")
    for label, values in (
        ("connect", [r.connect for r in ok if r.connect is not None]),
        ("time to first token", [r.ttft for r in ok if r.ttft is not None]),
        ("total duration", [r.total for r in ok if r.total is not None]),
    ):
        if values:
            print(f"  {label:<20} p50 {percentile(values, 0.5) * 1000:8.1f} ms   p90 "
                  f"{percentile(values, 0.9) * 1000:8.1f} ms   p99 "
                  f"{percentile(values, 0.99) * 1000:8.1f} ms   max "
                  f"{max(values) * 1000:8.1f} ms")
    print(f"  gateway RSS: {report.rss_before_kib / 1024:.1f} MiB before, "
          f"{report.rss_peak_kib / 1024:.1f} MiB peak, {report.rss_after_kib / 1024:.1f} MiB "
          "1 s after")
    gateway_cpu = report.cpu.get("gateway", 0.0)
    tokens = len(ok) * opts.tokens
    if ok and gateway_cpu > 0:
        print(f"  gateway CPU: {gateway_cpu / len(ok) * 1000:.2f} ms per stream, "
              f"{tokens / gateway_cpu:,.0f} relayed tokens per CPU-second")
    ttft = [r.ttft for r in ok if r.ttft is not None]
    if ttft:
        bound = opts.ttft + 0.5
        p99 = percentile(ttft, 0.99)
        print(f"target: TTFT p99 <= backend TTFT + 500 ms ({bound * 1000:.0f} ms) -> "
              f"{'MET' if p99 <= bound else 'NOT MET'} ({p99 * 1000:.0f} ms)")
    cpu = ", ".join(f"{name} {seconds:.1f}" for name, seconds in report.cpu.items())
    print(f"  CPU seconds during the run: {cpu}; other processes on the machine "
          f"{report.others_cpu:.1f} (of {2 * report.wall:.1f} available on 2 cores)"
          if os.cpu_count() == 2 else
          f"  CPU seconds during the run: {cpu}; other processes {report.others_cpu:.1f}")
    print(f"  listen-queue overflows during the run (TcpExt ListenOverflows, machine-wide): "
          f"{report.listen_overflows} (such a connection waits for TCP retransmits: 1 s, "
          "then 2, 4, 8 s more)")
    met = not errors and len(results) >= TARGET_STREAMS
    if len(results) < TARGET_STREAMS:
        print(f"target: {TARGET_STREAMS:,} concurrent streams with 0 errors -> not assessed "
              f"(only {len(results)} streams run)")
    else:
        print(f"target: {TARGET_STREAMS:,} concurrent streams with 0 errors -> "
              f"{'MET' if met else 'NOT MET'}")
    return not errors


def _group(reasons: list[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for reason in reasons:
        key = re.sub(r"\d+", "N", reason)[:120]
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, always stop the children."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="200 streams of 16 tokens (a smoke test, not the target)")
    parser.add_argument("--streams", type=int, default=None, help="concurrent streams (1000)")
    parser.add_argument("--nodes", type=int, default=4, help="node processes (4)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per stream (32)")
    parser.add_argument("--tokens-per-second", type=float, default=20.0,
                        help="simulated decode speed per stream (20)")
    parser.add_argument("--ttft", type=float, default=0.05,
                        help="simulated time to first token, seconds (0.05)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds the streams may take in all (120)")
    parser.add_argument("--backlog", type=int, default=None,
                        help="experiment: start the gateway with this listen backlog instead "
                        "of hypercorn's default 100 (the gateway does not set one)")
    parser.add_argument("--tunnel-max-streams", type=int, default=TUNNEL_MAX_STREAMS,
                        help=f"tunnel.max_streams in every config ({TUNNEL_MAX_STREAMS}; "
                        "tooti's default is 256)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    opts = Options(
        streams=args.streams or (200 if args.quick else 1000), nodes=args.nodes,
        tokens=args.tokens or (16 if args.quick else 32),
        tokens_per_second=args.tokens_per_second, ttft=args.ttft, client=args.client,
        timeout=args.timeout, warmup=min(20, args.streams or 20), backlog=args.backlog,
        tunnel_max_streams=args.tunnel_max_streams,
    )
    if opts.streams > opts.nodes * MAX_CONCURRENCY:
        parser.error(f"at most {opts.nodes * MAX_CONCURRENCY} streams fit on {opts.nodes} nodes")
    soft, hard = raise_fd_limit(2 * opts.streams + 256)
    print(f"fd limit: soft {soft}, hard {hard} (inherited by the children)")

    root = Path(tempfile.mkdtemp(prefix="tooti-streams-"))
    children = Children(root)
    clean = False
    try:
        with sigint_raises():
            report = trio.run(exit_on_signals, benchmark, opts, children, root)
            clean = print_report(opts, report)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        code = interrupted(exc)
        if code is None:
            raise
        print(f"interrupted: stopping the children (exit {code})", file=sys.stderr)
        return code
    finally:
        children.stop_all()
        if args.keep:
            print(f"logs kept in {root}")
        else:
            for path in sorted(root.rglob("*"), reverse=True):
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
            with contextlib.suppress(OSError):
                root.rmdir()
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
