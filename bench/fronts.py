"""Added latency of each translated API front against plain chat completions, on loopback.

Starts a gateway and one node (separate processes; the node runs the labelled simulated
backend, instant: no TTFT, no token pacing), then sends, one at a time over one
keep-alive connection, the same conversation as a plain chat completion
(``/v1/chat/completions``) and through each front: Anthropic ``/v1/messages``, OpenAI
``/v1/responses`` and Ollama ``/api/chat``, each whole and streamed (the streamed chat
asks for the usage chunk, as the fronts do). Every round sends
all eight in a random order, so the routes share the machine's noise; the report gives
per route the median (p50) and p90 of the whole answer, and the p50 each front adds
over plain chat in the same mode: what the translation (parse, the chat checks, the
answer or every event decoded and re-encoded) costs at c=1, and the gateway's CPU per
request (its CPU time read from ``/proc`` around each request, in clock ticks, summed
per route: a mean, not a per-request figure). The target
(``docs/benchmarks.md``): a front adds at most 0.3 ms p50.

Run from the repository root with the project's venv::

    python bench/fronts.py [--requests 300] [--tokens 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio
from children import Children, cpu_seconds, free_port, percentile, run_in_temp_dir, toml_table

TARGET_MS = 0.3
MESSAGE = "hello there, how are you today?"


def routes(tokens: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """Route name → (path, body) for the whole (non-streamed) request."""
    return {
        "chat": ("/v1/chat/completions", {
            "model": "tooti-sim", "max_tokens": tokens,
            "messages": [{"role": "user", "content": MESSAGE}]}),
        "anthropic": ("/v1/messages", {
            "model": "tooti-sim", "max_tokens": tokens,
            "messages": [{"role": "user", "content": MESSAGE}]}),
        "responses": ("/v1/responses", {
            "model": "tooti-sim", "max_output_tokens": tokens, "input": MESSAGE}),
        "ollama": ("/api/chat", {
            "model": "tooti-sim", "options": {"num_predict": tokens},
            "messages": [{"role": "user", "content": MESSAGE}]}),
    }


def request_body(route: str, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """``body`` asking for a stream or not (Ollama streams unless told otherwise). A
    streamed chat asks for the usage chunk, as every translated stream does (its last
    event carries the usage), so both streams carry the same events from the node."""
    if route == "chat" and stream:
        return {**body, "stream": True, "stream_options": {"include_usage": True}}
    return {**body, "stream": stream}


def start(children: Children, root: Path, tokens: int) -> tuple[int, int]:
    """Start the gateway and the node; returns the gateway's port and pid."""
    port = free_port()
    common = 'log_level = "warning"\ndrain_grace = 0.0\n'
    config = root / "gateway.toml"
    config.write_text(common + toml_table("gateway", {"listen": f"127.0.0.1:{port}",
                                                      "access_log": False}))
    gateway = children.start("gateway", [
        sys.executable, "-m", "tooti", "run", "--role", "gateway", "--config", str(config),
        "--data-dir", str(root / "gateway-data")])
    config = root / "node.toml"
    config.write_text(
        common + toml_table("node", {"id": "node-a", "reconnect_max": 0.5})
        + toml_table("[[node.backends]]", {"type": "simulated", "max_concurrency": 4,
                                           # no native /v1/responses: it is translated
                                           "endpoints": ["chat/completions", "completions",
                                                         "embeddings"]})
        + toml_table("node.backends.options", {"tokens": tokens}))
    children.start("node", [
        sys.executable, "-m", "tooti", "run", "--role", "node", "--config", str(config),
        "--peer", f"ws://127.0.0.1:{port}", "--data-dir", str(root / "node-data")])
    return port, gateway.pid


async def wait_ready(client: httpx.AsyncClient, limit: float = 60.0) -> None:
    """Poll until the node's model is listed."""
    with trio.fail_after(limit):
        while True:
            try:
                if (await client.get("/v1/models")).json()["data"]:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            await trio.sleep(0.2)


async def one(client: httpx.AsyncClient, path: str, body: dict[str, Any], stream: bool
              ) -> float:
    """One request read to its end; its milliseconds."""
    began = time.perf_counter()
    if stream:
        async with client.stream("POST", path, json=body) as reply:
            async for _chunk in reply.aiter_bytes():
                pass
            status = reply.status_code
    else:
        status = (await client.post(path, json=body)).status_code
    ended = time.perf_counter()
    if status != 200:
        raise RuntimeError(f"{path} (stream={stream}): status {status}")
    return (ended - began) * 1000


async def benchmark(requests: int, tokens: int, children: Children, root: Path) -> bool:
    """Start everything, measure, print the report; True if the target was met."""
    port, gateway_pid = start(children, root, tokens)
    table = routes(tokens)
    cells = [(route, stream) for route in table for stream in (False, True)]
    samples: dict[tuple[str, bool], list[float]] = {cell: [] for cell in cells}
    cpu: dict[tuple[str, bool], float] = dict.fromkeys(cells, 0.0)
    limits = httpx.Limits(max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 limits=limits) as client:
        await wait_ready(client)
        rng = random.Random(7)
        for round_ in range(30 + requests):  # the first 30 rounds warm up
            order = list(cells)
            rng.shuffle(order)
            for route, stream in order:
                path, body = table[route]
                before = cpu_seconds(gateway_pid)
                took = await one(client, path, request_body(route, body, stream), stream)
                if round_ >= 30:
                    samples[(route, stream)].append(took)
                    cpu[(route, stream)] += cpu_seconds(gateway_pid) - before
    print(f"front overhead: python {sys.version.split()[0]}, {requests} rounds (each: the "
          f"eight requests in random order), {tokens} simulated tokens, c=1, keep-alive")
    print(f"{'ms':<24}{'p50':>9}{'p90':>9}{'added p50':>11}{'gateway CPU':>13}")
    worst = 0.0
    for stream in (False, True):
        base = statistics.median(samples[("chat", stream)])
        for route in table:
            values = samples[(route, stream)]
            p50 = statistics.median(values)
            added = p50 - base
            if route != "chat":
                worst = max(worst, added)
            label = f"{route} {'stream' if stream else 'whole'}"
            print(f"{label:<24}{p50:>9.3f}{percentile(values, 0.9):>9.3f}"
                  f"{'' if route == 'chat' else f'{added:.3f}':>11}"
                  f"{cpu[(route, stream)] * 1000 / len(values):>13.3f}")
    met = worst <= TARGET_MS
    print(f"target: a front adds <= {TARGET_MS:g} ms p50: {'MET' if met else 'NOT MET'} "
          f"(worst {worst:.3f} ms)")
    return met


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, stop every child."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="rounds (default 300)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    args = parser.parse_args(argv)
    return run_in_temp_dir("tooti-fronts-bench-", benchmark, args.requests, args.tokens)


if __name__ == "__main__":
    raise SystemExit(main())
