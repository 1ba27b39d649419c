"""Paced tokens: tokens relayed per CPU-second of the gateway, the node and a relay.

A real model sends its answer one token at a time, each token its own SSE event
in its own write, tens of milliseconds apart; every proxy on the way pays its
per-event cost once per token (a stream of 32 events sent at once is merged into
a few reads and hides that cost). This benchmark measures exactly that cost.

It starts, each as its own process (``python -m tooti run ...``):

* ``bench/fake_upstream.py`` paced (``--tokens-per-second``, ``--ttft``): one
  token per SSE event, one event per write;
* topology ``direct``: a gateway and a node whose ``openai`` backend is the fake
  upstream, dialling the gateway over a WebSocket tunnel;
* topology ``relay``: the same with one relay hop (the node dials a relay, the
  relay dials the gateway).

For each topology it opens ``--streams`` streaming chat completions at once
(one raw HTTP/1.1 connection per stream from this process, ``Connection:
close``), reads every answer to its end, and prints: errors, the tokens the
clients received, TTFT and total-duration percentiles, the CPU seconds of every
process during the run (from ``/proc/<pid>/stat``), and **tokens relayed per
CPU-second** of the gateway, the node and the relay (tokens received by the
clients / that process's CPU-seconds; the role, finish, usage and ``[DONE]``
events are relayed too but not counted as tokens).

It checks that one SSE event per token reaches the client: a stream is an
error unless it got HTTP 200, exactly ``--tokens`` content events each
carrying one token, a final ``data: [DONE]`` and no in-band error; and it
prints how many separate socket reads carried the body per stream (about one
per token when the tokens were relayed as they came, not batched).

The figures to compare are the tokens per CPU-second (CPU time is far less
noisy than wall time on a shared machine); the issue's targets are gateway
>= 20,000, node >= 30,000. They hold only for runs where about one read per token
reached the client: a process that falls behind (a busy machine) gets several
tokens per read and relays them in fewer writes, which is cheaper per token; the
script prints a NOTE then, and the CPU the rest of the machine used meanwhile. For
the tunnel's own per-token cost independent of load, see ``bench/tunnel_micro.py``.
Run from the repository root::

    python bench/paced.py [--quick] [--streams 300] [--tokens 64]
        [--tokens-per-second 20] [--ttft 0.05] [--only direct|relay]

The file-descriptor limit is raised for this process and its children; every
child runs in its own process group and is killed on exit (also on Ctrl-C,
SIGTERM and failures). Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio
from children import (
    Child,
    Children,
    cpu_seconds,
    free_port,
    load_average,
    machine_busy_seconds,
    percentile,
    raise_fd_limit,
    raw_answer,
    run_in_temp_dir,
    sse_problem,
    sse_request,
    toml_table,
    wait_for_log,
)

from tooti.protocol.sse import SSEDecoder

BENCH_DIR = Path(__file__).resolve().parent
MODEL = "fake-model"
TOPOLOGIES = ("direct", "relay")
TOKEN_MARK = '"content":" tok'
"""What every token event of the fake upstream carries (``" tok<i>"``)."""
TARGETS = {"gateway": 20_000, "node": 30_000}


@dataclass
class Result:
    """One stream as the client saw it (seconds from just before connecting)."""

    ttft: float | None = None
    total: float | None = None
    tokens: int = 0
    reads: int = 0
    """Socket reads that carried body bytes."""
    error: str = ""


@dataclass
class Run:
    """One topology's measurements."""

    name: str
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    load: str = ""
    others_cpu: float = 0.0
    """CPU seconds the rest of the machine used during the run (not these processes)."""


def check_events(payload: bytes, tokens: int) -> tuple[int, str]:
    """(tokens received, '' or what is wrong): one token per SSE event, clean end."""
    problem = sse_problem(payload)
    events = SSEDecoder().events(payload)
    carrying = [e.data.count(TOKEN_MARK) for e in events]
    got = sum(carrying)
    if problem:
        return got, problem
    if any(count > 1 for count in carrying):
        return got, "several tokens in one SSE event"
    if got != tokens:
        return got, f"{got} tokens instead of {tokens}"
    return got, ""


async def one_stream(port: int, request: bytes, tokens: int) -> Result:
    """Send one streaming request on a fresh connection and read the whole answer."""
    answer = await raw_answer(port, request)
    result = Result(answer.ttft, answer.total, reads=answer.reads, error=answer.error)
    if not answer.error:
        result.tokens, result.error = check_events(answer.payload, tokens)
    return result


async def run_streams(port: int, count: int, tokens: int, limit: float
                      ) -> tuple[list[Result], float]:
    """Open ``count`` streams at once; their results and the wall time."""
    body = msgspec.json.encode({"model": MODEL, "stream": True, "messages": [
        {"role": "user", "content": "benchmark"}]})
    request = sse_request(port, body)
    results = [Result() for _ in range(count)]

    async def one(index: int) -> None:
        try:
            results[index] = await one_stream(port, request, tokens)
        except (OSError, ValueError, IndexError) as exc:
            results[index].error = f"{type(exc).__name__}: {exc}"

    began = time.perf_counter()
    with trio.move_on_after(limit) as scope:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    wall = time.perf_counter() - began
    if scope.cancelled_caught:
        for result in results:
            if result.total is None and not result.error:
                result.error = f"not finished within {limit:g}s"
    return results, wall


def start_topology(children: Children, root: Path, name: str, upstream: str,
                   streams: int) -> tuple[int, dict[str, Child]]:
    """Start the gateway (and relay) and the node of topology ``name``; the gateway's
    port and the started processes by role."""
    limits = max(512, streams + 64)
    common = ('log_level = "warning"\ndrain_grace = 0.0\n'
              + toml_table("tunnel", {"max_streams": limits}))
    started: dict[str, Child] = {}
    gateway_port = free_port()
    peer = gateway_port
    roles: list[tuple[str, int, list[str]]] = [("gateway", gateway_port, [])]
    if name == "relay":
        relay_port = free_port()
        roles.append(("relay", relay_port, ["--peer", f"ws://127.0.0.1:{gateway_port}"]))
        peer = relay_port
    for role, port, extra in roles:
        config = root / f"{name}-{role}.toml"
        # every client connection comes from 127.0.0.1: lift the per-IP limits
        text = common + toml_table("gateway", {
            "listen": f"127.0.0.1:{port}", "max_queue": limits,
            "max_connections_per_ip": 2 * limits, "connection_burst": 2 * limits,
            "connection_rate": 100_000.0})
        if role == "relay":
            text += toml_table("relay", {"max_streams": limits,
                                         "max_streams_per_node": limits})
        config.write_text(text)
        started[role] = children.start(f"{name}-{role}", [
            sys.executable, "-m", "tooti", "run", "--role", role, "--config", str(config),
            "--data-dir", str(root / f"{name}-{role}-data"), *extra])
    config = root / f"{name}-node.toml"
    config.write_text(
        common + toml_table("node", {"id": f"{name}-node"})
        + toml_table("[[node.backends]]", {"type": "openai", "url": upstream,
                                           "max_concurrency": limits}))
    started["node"] = children.start(f"{name}-node", [
        sys.executable, "-m", "tooti", "run", "--role", "node", "--config", str(config),
        "--peer", f"ws://127.0.0.1:{peer}", "--data-dir", str(root / f"{name}-node-data")])
    return gateway_port, started


async def wait_serving(port: int, started: dict[str, Child], tokens: int,
                       limit: float = 60.0) -> None:
    """Poll until one stream through the gateway on ``port`` succeeds (the node has
    registered its model)."""
    with trio.fail_after(limit):
        while True:
            for child in started.values():
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            try:
                results, _ = await run_streams(port, 1, tokens, 30)
                if not results[0].error:
                    return
            except OSError:
                pass
            await trio.sleep(0.2)


async def measure(name: str, opts: argparse.Namespace, upstream: str,
                  children: Children, root: Path) -> Run:
    """Start topology ``name``, warm it up, run the paced streams, measure CPU."""
    port, started = start_topology(children, root, name, upstream, opts.streams)
    await wait_serving(port, started, opts.tokens)
    warm, _ = await run_streams(port, min(20, opts.streams), opts.tokens, 60)
    bad = [r.error for r in warm if r.error]
    if bad:
        raise RuntimeError(f"{name}: warm-up failed ({len(bad)}/{len(warm)}): {bad[0]}")
    await trio.sleep(0.3)
    pids = {role: child.pid for role, child in started.items()}
    pids["upstream"] = children.children[0].pid
    run = Run(name, load=load_average())
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    busy_before, own_before = machine_busy_seconds(), time.process_time()
    run.results, run.wall = await run_streams(port, opts.streams, opts.tokens, opts.timeout)
    run.cpu = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
    mine = sum(run.cpu.values()) + time.process_time() - own_before
    run.others_cpu = max(0.0, machine_busy_seconds() - busy_before - mine)
    return run


def report(run: Run, opts: argparse.Namespace) -> bool:
    """Print one topology's figures; True if every stream was clean."""
    results = run.results
    errors = [r for r in results if r.error]
    ok = [r for r in results if not r.error]
    tokens = sum(r.tokens for r in results)
    ideal = opts.ttft + max(0, opts.tokens - 1) / opts.tokens_per_second
    print(f"\n[{run.name}] {opts.streams} concurrent paced streams x {opts.tokens} tokens at "
          f"{opts.tokens_per_second:g} tok/s after {opts.ttft * 1000:g} ms TTFT (ideal "
          f"{ideal:.2f} s each); load average before: {run.load}")
    print(f"  errors: {len(errors)} of {len(results)}")
    reasons: dict[str, int] = {}
    for r in errors:
        reasons[r.error[:120]] = reasons.get(r.error[:120], 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        print(f"    {count} x {reason}")
    print(f"  tokens received: {tokens} in {run.wall:.2f} s; body reads per stream: mean "
          f"{sum(r.reads for r in ok) / max(1, len(ok)):.1f} (one per token when relayed "
          f"as they come; {opts.tokens} tokens + role/finish/[DONE] events)")
    reads = sum(r.reads for r in ok) / max(1, len(ok))
    if reads < 0.8 * opts.tokens:
        print(f"  NOTE: {reads:.0f} reads for {opts.tokens} tokens: tokens were relayed in "
              "batches (a process fell behind), which makes each token cheaper than when "
              "they come one by one; compare runs with about one read per token")
    print(f"  other processes on the machine used {run.others_cpu:.1f} CPU-s during the run "
          f"({run.others_cpu / max(run.wall, 1e-9):.2f} cores)")
    for label, values in (("time to first token", [r.ttft for r in ok if r.ttft is not None]),
                          ("total duration", [r.total for r in ok if r.total is not None])):
        if values:
            print(f"  {label:<20} p50 {percentile(values, 0.5) * 1000:8.1f} ms   p99 "
                  f"{percentile(values, 0.99) * 1000:8.1f} ms   max "
                  f"{max(values) * 1000:8.1f} ms")
    for role in ("gateway", "relay", "node", "upstream"):
        if role not in run.cpu:
            continue
        cpu = run.cpu[role]
        rate = tokens / cpu if cpu > 0 else float("inf")
        target = TARGETS.get(role)
        verdict = (f"  (target >= {target:,}: {'MET' if rate >= target else 'NOT MET'})"
                   if target and role != "upstream" else "")
        print(f"  {role:<8} CPU {cpu:6.2f} s   {rate:9,.0f} tokens per CPU-second   "
              f"{cpu * 1e6 / max(1, tokens):6.1f} us per token{verdict}")
    return not errors


async def benchmark(opts: argparse.Namespace, children: Children, root: Path) -> None:
    """Start the paced upstream, then each topology in turn."""
    port = free_port()
    upstream = children.start("upstream", [
        sys.executable, str(BENCH_DIR / "fake_upstream.py"), "--port", str(port),
        "--chunks", str(opts.tokens + 2), "--model", MODEL,
        "--tokens-per-second", str(opts.tokens_per_second), "--ttft", str(opts.ttft)])
    await wait_for_log(upstream, r"fake upstream on http")
    print(f"python {sys.version.split()[0]}, commit {commit()}, {os.cpu_count()} CPUs",
          flush=True)
    clean = True
    for name in opts.only:
        run = await measure(name, opts, f"http://127.0.0.1:{port}/v1", children, root)
        clean = report(run, opts) and clean
        for child in list(children.children):
            if child.name.startswith(f"{name}-") and child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
    if not clean:
        raise SystemExit(1)


def commit() -> str:
    """The repository's HEAD commit (short), '+dirty' when the work tree has changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short",
                               "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=False).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the benchmark; exit 1 if a stream failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 streams x 32 tokens")
    parser.add_argument("--streams", type=int, default=None, help="concurrent streams (300)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per stream (64)")
    parser.add_argument("--tokens-per-second", type=float, default=20.0,
                        help="decode speed per stream (20)")
    parser.add_argument("--ttft", type=float, default=0.05, help="seconds to first token")
    parser.add_argument("--only", default=",".join(TOPOLOGIES),
                        help="comma-separated topologies: direct, relay (both)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    args.streams = args.streams or (100 if args.quick else 300)
    args.tokens = args.tokens or (32 if args.quick else 64)
    args.only = [name for name in args.only.split(",") if name]
    if any(name not in TOPOLOGIES for name in args.only):
        parser.error(f"--only takes {', '.join(TOPOLOGIES)}")
    if args.tokens_per_second <= 0:
        parser.error("--tokens-per-second must be > 0")
    raise_fd_limit(4 * args.streams + 256)
    try:
        return run_in_temp_dir("tooti-paced-", benchmark, args)
    except SystemExit as exc:
        return int(exc.code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
