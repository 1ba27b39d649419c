"""Added latency of one relay hop, on loopback.

Starts four processes: a gateway, a relay dialing it, a node dialing the gateway
directly ("direct") and a node dialing the relay ("relayed"). Both nodes run the same
simulated backend (labelled, instant: no TTFT, no token pacing), so every difference
between the two paths is the hop: the relay's tunnel in, its forwarding, its tunnel
out. Requests alternate between the two nodes in random order (pinned with the
``provider.only`` preference), one at a time, over one keep-alive connection each, and
the script reports for each path the latency of a non-streamed chat completion and the
time to first token and to the end of a streamed one, and the relay's CPU per
forwarded request. The target: the hop adds at most 1 ms at the median.

Run from the repository root with the project's venv::

    python bench/relay_hop.py [--requests 400] [--tokens 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from children import (
    Children,
    cpu_seconds,
    free_port,
    percentile,
    run_in_temp_dir,
    toml_table,
)

TARGET_MS = 1.0
NODES = ("direct", "relayed")


@dataclass
class Samples:
    """Milliseconds per request for one node, by measure."""

    plain: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    stream: list[float] = field(default_factory=list)


def start(children: Children, root: Path, tokens: int, tokens_per_second: float
          ) -> tuple[int, dict[str, Any]]:
    """Start gateway, relay and both nodes; returns the gateway port and the children."""
    gateway_port, relay_port = free_port(), free_port()
    common = 'log_level = "warning"\ndrain_grace = 0.0\n'
    started: dict[str, Any] = {}
    for name, port, extra in (("gateway", gateway_port, []),
                              ("relay", relay_port,
                               ["--peer", f"ws://127.0.0.1:{gateway_port}"])):
        config = root / f"{name}.toml"
        config.write_text(common + toml_table("gateway", {"listen": f"127.0.0.1:{port}"}))
        started[name] = children.start(name, [
            sys.executable, "-m", "tooti", "run", "--role", name, "--config", str(config),
            "--data-dir", str(root / f"{name}-data"), *extra])
    for name, port in (("direct", gateway_port), ("relayed", relay_port)):
        config = root / f"{name}.toml"
        config.write_text(
            common + toml_table("node", {"id": name, "reconnect_max": 0.5})
            + toml_table("[[node.backends]]", {"type": "simulated", "max_concurrency": 4})
            + toml_table("node.backends.options", {"tokens": tokens,
                                                   "tokens_per_second": tokens_per_second}))
        started[name] = children.start(name, [
            sys.executable, "-m", "tooti", "run", "--role", "node", "--config", str(config),
            "--peer", f"ws://127.0.0.1:{port}", "--data-dir", str(root / f"{name}-data")])
    return gateway_port, started


async def wait_ready(client: httpx.AsyncClient, limit: float = 60.0) -> None:
    """Poll the gateway until both nodes are registered with models."""
    with trio.fail_after(limit):
        while True:
            try:
                peers = (await client.get("/admin/v1/peers")).json()["data"]
                ready = {p["id"] for p in peers if p["models"]}
                if set(NODES) <= ready:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await trio.sleep(0.2)


def body(node: str, stream: bool) -> dict[str, Any]:
    """A chat completion pinned to ``node``."""
    return {"model": "tooti-sim", "messages": [{"role": "user", "content": "hello there"}],
            "stream": stream, "provider": {"only": [node], "allow_fallbacks": False}}


async def one(client: httpx.AsyncClient, node: str, samples: Samples) -> None:
    """One non-streamed and one streamed request to ``node``; records their times."""
    began = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body(node, False))
    ended = time.perf_counter()
    if response.status_code != 200 or response.headers.get("x-tooti-node") != node:
        raise RuntimeError(f"{node}: {response.status_code} {response.text[:200]}")
    samples.plain.append((ended - began) * 1000)
    began = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body(node, True)) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{node} stream: {reply.status_code}")
        async for chunk in reply.aiter_bytes():
            if first is None and b"data: " in chunk:
                first = time.perf_counter()
    ended = time.perf_counter()
    assert first is not None
    samples.ttft.append((first - began) * 1000)
    samples.stream.append((ended - began) * 1000)


async def benchmark(requests: int, tokens: int, tokens_per_second: float,
                    children: Children, root: Path) -> bool:
    """Start everything, measure, print the report; True if the target was met."""
    port, started = start(children, root, tokens, tokens_per_second)
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_keepalive_connections=2)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        await wait_ready(client)
        results = {node: Samples() for node in NODES}
        for _ in range(30):  # warm-up, not recorded
            for node in NODES:
                await one(client, node, Samples())
        relay_cpu = cpu_seconds(started["relay"].pid)
        rng = random.Random(7)
        for _ in range(requests):
            order = list(NODES)
            rng.shuffle(order)
            for node in order:
                await one(client, node, results[node])
        relay_cpu = cpu_seconds(started["relay"].pid) - relay_cpu
    print(f"relay hop latency: python {sys.version.split()[0]}, {requests} rounds "
          f"(each: one non-streamed and one streamed request per node, {tokens} tokens"
          f"{f' at {tokens_per_second:g} tok/s' if tokens_per_second else ', unpaced'}), "
          "sequential, keep-alive client")
    print(f"{'ms':<28}{'direct p50':>12}{'relayed p50':>13}{'added p50':>11}"
          f"{'direct p90':>12}{'relayed p90':>13}")
    added_plain = 0.0
    for label, attr in (("non-stream, whole answer", "plain"), ("stream, first token", "ttft"),
                        ("stream, whole answer", "stream")):
        direct, relayed = getattr(results["direct"], attr), getattr(results["relayed"], attr)
        added = statistics.median(relayed) - statistics.median(direct)
        if attr == "plain":
            added_plain = added
        print(f"{label:<28}{statistics.median(direct):>12.3f}{statistics.median(relayed):>13.3f}"
              f"{added:>11.3f}{percentile(direct, 0.9):>12.3f}{percentile(relayed, 0.9):>13.3f}")
    forwarded = 2 * requests
    print(f"relay CPU: {relay_cpu * 1000 / forwarded:.3f} ms per forwarded request "
          f"({relay_cpu:.2f} s for {forwarded})")
    ttft_added = statistics.median(results["relayed"].ttft) - statistics.median(
        results["direct"].ttft)
    met = max(added_plain, ttft_added) <= TARGET_MS
    print(f"target: one hop adds <= {TARGET_MS:g} ms p50: {'MET' if met else 'NOT MET'} "
          f"(non-stream {added_plain:.3f} ms, first token {ttft_added:.3f} ms)")
    return met


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, stop every child."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="rounds (default 400)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--tokens-per-second", type=float, default=0.0,
                        help="pace the simulated tokens (default 0: all at once)")
    args = parser.parse_args(argv)
    return run_in_temp_dir("tooti-relay-bench-", benchmark, args.requests, args.tokens,
                           args.tokens_per_second)


if __name__ == "__main__":
    raise SystemExit(main())
