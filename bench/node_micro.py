"""In-process microbenchmark of a node's per-request path, and of its HTTP client.

Two measurements, both in CPU time of this one process (``time.process_time``), so
they are repeatable on a busy machine where wall-clock latency is not:

``node``
    A :class:`tooti.node.node.Node` with one ``openai`` backend aimed at
    ``bench/fake_upstream.py`` (a separate process: its CPU is not counted) serves
    N requests one after another through ``Node._serve_stream`` with a stand-in for
    the tunnel's inbound stream (its ``respond``/``send``/``end`` only count), so the
    figure is the node's own work per request: reading the OPEN's meta and body,
    the slot, the backend's HTTP request and answer, usage metering (the SSE
    events split and checked, the usage chunk read), the END's usage report. The
    tunnel's framing (WebSocket, frames) is not included (``bench/overhead.py``
    measures the whole path, ``bench/paced.py`` the per-token one).
``client``
    The backend HTTP client alone: one POST and its whole answer, with
    :class:`tooti.backends.http_client.HttpClient` and with ``httpx`` as the
    ``openai`` backend used it before (``AsyncClient.send(stream=True)``,
    ``aiter_raw``), and the parsing of one answer by httptools (llhttp, C) and by
    h11 (pure Python), the two parsers the design considered.

Modes: ``non-stream`` (a ``chat.completion``), ``stream`` (``--chunks`` SSE
events, 32 by default, sent by the upstream in one write; a request without
``stream_options`` so the node asks for usage and strips the usage chunk) and
``paced`` (the same streams paced by the upstream at ``--pace`` tokens per second,
one event per write, ``--paced-streams`` at once: the node's cost per event as a
model streams; ``--modes non-stream,stream,paced``).

Run from the repository root (``PYTHONPATH=<worktree>`` measures another checkout;
the ``client`` comparison needs a checkout with ``tooti/backends/http_client.py``)::

    python bench/node_micro.py [--requests 3000] [--only node,client] [--profile]
                               [--modes non-stream,stream] [--warmup 300]

Under a loaded machine CPU time still varies (caches, frequency); instruction counts
do not: run it twice under ``valgrind --tool=callgrind`` with different
``--requests`` and divide the difference of the "Collected" totals by the difference
of the request counts (the start-up cancels out).

``--profile`` prints the top functions of the node's path (cProfile, by own time).

The fake upstreams are children of :class:`children.Children` (their own process
groups, killed with this script even on SIGKILL; their logs in a temporary directory
deleted at the end).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import trio
from children import Children, free_port

BENCH_DIR = Path(__file__).resolve().parent
MODEL = "fake-model"
WARMUP = 300
SENDS = [0]
"""Body pieces the node forwarded (in the measured requests): how merged reads were."""
MESSAGES = [{"role": "user", "content": "Say hello in one short sentence, please."}]


def start_upstream(children: Children, name: str, chunks: int, pace: float = 0.0) -> str:
    """Start ``bench/fake_upstream.py`` as ``name`` (``pace``: tokens per second, one SSE
    event per write); its base URL (``.../v1``) once it answers."""
    port = free_port()
    paced = ["--tokens-per-second", str(pace)] if pace else []
    child = children.start(name, [
        sys.executable, str(BENCH_DIR / "fake_upstream.py"), "--port", str(port),
        "--chunks", str(chunks), "--model", MODEL, *paced])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and child.proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the fake upstream did not start:\n{child.tail()}")


class Stream:
    """Stands in for :class:`tooti.tunnel.InboundStream`: the OPEN's meta and body;
    the answer's bytes are counted, the END kept."""

    def __init__(self, body: bytes) -> None:
        self.meta = {"endpoint": "chat/completions", "model": MODEL}
        self.body = body
        self.sent = 0
        self.end_info: dict[str, Any] | None = None
        self.status = 0
        self.started = False

    async def read_body(self, limit: int) -> bytes:
        return self.body

    async def respond(self, status: int, headers: dict[str, Any]) -> None:
        self.status = status
        self.started = True

    async def send(self, data: bytes) -> None:
        self.sent += len(data)
        SENDS[0] += 1

    async def end(self, info: dict[str, Any]) -> None:
        self.end_info = info


def request_body(stream: bool) -> bytes:
    request: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64}
    if stream:
        request["stream"] = True
    return msgspec.json.encode(request)


async def node_cpu(url: str, stream: bool, requests: int, profile: bool,
                   concurrency: int = 1) -> float:
    """CPU µs per request of ``Node._serve_stream`` (see the module docstring), with
    ``concurrency`` requests in flight at once."""
    from tooti.backends.openai import OpenAIBackend
    from tooti.node.node import Node
    from tooti.settings import BackendSettings, NodeSettings, TunnelSettings

    backend = OpenAIBackend(BackendSettings(type="openai", url=url,
                                            max_concurrency=max(8, concurrency)))
    node = Node(NodeSettings(), TunnelSettings(), [backend], node_id="bench", dial=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        body = request_body(stream)

        async def one() -> None:
            s = Stream(body)
            await node._serve_stream(s)  # type: ignore[arg-type]
            assert s.status == 200 and s.sent and s.end_info and "error" not in s.end_info, \
                s.end_info

        for _ in range(WARMUP):
            await one()
        profiler = cProfile.Profile(time.process_time) if profile else None
        if profiler:
            profiler.enable()
        start = time.process_time()
        SENDS[0] = 0
        left = [requests]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                await one()

        async with trio.open_nursery() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        spent = time.process_time() - start
        if profiler:
            profiler.disable()
            print(f"  profile, node {'stream' if stream else 'non-stream'}:")
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(25)
        nursery.cancel_scope.cancel()
    return spent / requests * 1e6


async def lean_cpu(url: str, stream: bool, requests: int) -> float:
    from tooti.backends.http_client import HttpClient

    client = HttpClient(headers={"Accept-Encoding": "identity"})
    body = request_body(stream)
    target = f"{url}/chat/completions"

    async def one() -> None:
        response = await client.send("POST", target, body, "application/json")
        async for _ in response:
            pass
        response.close()

    for _ in range(WARMUP):
        await one()
    start = time.process_time()
    for _ in range(requests):
        await one()
    spent = time.process_time() - start
    await client.aclose()
    return spent / requests * 1e6


async def httpx_cpu(url: str, stream: bool, requests: int) -> float:
    import httpx

    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                               headers={"Accept-Encoding": "identity"})
    body = request_body(stream)
    target = f"{url}/chat/completions"

    async def one() -> None:
        request = client.build_request("POST", target, content=body,
                                       headers={"Content-Type": "application/json"})
        response = await client.send(request, stream=True)
        async for _ in response.aiter_raw():
            pass
        await response.aclose()

    for _ in range(WARMUP):
        await one()
    start = time.process_time()
    for _ in range(requests):
        await one()
    spent = time.process_time() - start
    await client.aclose()
    return spent / requests * 1e6


def answer_bytes(url: str, stream: bool) -> bytes:
    """One raw answer of the upstream (head and body), for the parser comparison."""
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    body = request_body(stream)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                     % (len(body), body))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.replace(b"connection: close\r\n", b"")


def parse_cpu(raw: bytes, rounds: int) -> tuple[float, float]:
    """µs to parse ``raw`` once: (httptools, h11)."""
    import h11
    import httptools

    class Sink:
        def on_body(self, body: bytes) -> None:
            pass

    start = time.process_time()
    for _ in range(rounds):
        httptools.HttpResponseParser(Sink()).feed_data(raw)
    fast = (time.process_time() - start) / rounds * 1e6
    start = time.process_time()
    for _ in range(rounds):
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"),
                                                                  ("content-length", "0")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(raw)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                break
    slow = (time.process_time() - start) / rounds * 1e6
    return fast, slow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per cell")
    parser.add_argument("--chunks", type=int, default=32, help="SSE events per stream")
    parser.add_argument("--only", default="node,client", help="node, client, or both")
    parser.add_argument("--modes", default="non-stream,stream",
                        help="non-stream, stream, or both (default)")
    parser.add_argument("--warmup", type=int, default=300, help="requests before measuring")
    parser.add_argument("--pace", type=float, default=200.0,
                        help="the paced mode's tokens per second per stream (default 200)")
    parser.add_argument("--paced-streams", type=int, default=50,
                        help="the paced mode's streams in flight at once (default 50)")
    parser.add_argument("--profile", action="store_true",
                        help="print the node path's top functions (cProfile)")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    global WARMUP
    WARMUP = args.warmup
    import tooti

    print(f"tooti from {Path(tooti.__file__).parent}; {args.requests} requests per cell; "
          f"{args.chunks}-event streams; CPU time of this process only")
    with tempfile.TemporaryDirectory(prefix="tooti-node-micro-") as tmp:
        children = Children(Path(tmp))
        try:
            measure(args, parts, children)
        finally:
            children.stop_all()
    return 0


def measure(args: argparse.Namespace, parts: set[str], children: Children) -> None:
    """Start the fake upstreams and print every cell asked for."""
    url = start_upstream(children, "upstream", args.chunks)
    paced_url = start_upstream(children, "upstream-paced", args.chunks, args.pace)
    for mode in args.modes.split(","):
        if mode == "paced":
            cpu = trio.run(node_cpu, paced_url, True, args.requests, args.profile,
                           args.paced_streams)
            events = args.chunks + 2  # the usage chunk and [DONE] too
            print(f"node   paced       {cpu:8.1f} µs CPU per request, "
                  f"{cpu / events:6.2f} µs per upstream event ({args.paced_streams} "
                  f"streams at {args.pace:g} tok/s, one event per write), "
                  f"{1e6 / (cpu / args.chunks):,.0f} tokens per CPU-second; "
                  f"{SENDS[0] / args.requests:.1f} pieces forwarded per stream "
                  f"(fewer than {args.chunks + 1}: events merged in reads)")
            continue
        stream = mode == "stream"
        if "node" in parts:
            cpu = trio.run(node_cpu, url, stream, args.requests, args.profile)
            print(f"node   {mode:10}  {cpu:8.1f} µs CPU per request (Node._serve_stream)")
        if "client" in parts:
            try:
                lean = trio.run(lean_cpu, url, stream, args.requests)
            except ImportError:
                lean = float("nan")
            slow = trio.run(httpx_cpu, url, stream, args.requests)
            fast_parse, slow_parse = parse_cpu(answer_bytes(url, stream), 2000)
            print(f"client {mode:10}  lean {lean:8.1f} µs  httpx {slow:8.1f} µs per "
                  f"request; parse one answer: httptools {fast_parse:6.1f} µs, "
                  f"h11 {slow_parse:6.1f} µs")


if __name__ == "__main__":
    sys.exit(main())
