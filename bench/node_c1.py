"""The node's fixed cost per request at concurrency 1, tunnel included: CPU and trio
scheduler work (task steps, task spawns, I/O waits) per request.

``bench/node_micro.py`` calls ``Node._serve_stream`` directly (no tunnel);
``bench/overhead.py`` measures whole processes under wrk. This script sits between:

* this process runs a real :class:`tooti.node.node.Node` (one ``openai`` backend on
  ``bench/fake_upstream.py``, a separate process) and the node's side of a real
  :class:`~tooti.tunnel.TunnelSession` (WebSocket client over loopback TCP, after
  HELLO / WELCOME / PROOF), exactly what ``tooti run --role node`` runs per request;
* a driver process (this script with ``--driver``) plays the gateway: it opens one
  stream at a time (concurrency 1), waits for its head, body and END, then opens the
  next. Its CPU is not counted;
* a :class:`trio.abc.Instrument` counts, in this process, task steps, tasks spawned
  and scheduler I/O waits (each one an ``epoll_wait`` and a run-loop pass) over the
  measured requests; CPU is this process's ``time.process_time``.

Printed per mode (``non-stream``: a ``chat.completion``; ``stream``: ``--chunks`` SSE
events sent by the upstream at once): CPU µs, task steps, spawns and I/O waits per
request; ``paced``: ``--paced-streams`` streams at once, the upstream sending one
token per write at ``--pace`` tokens per second: CPU µs, task steps and I/O waits per
token (the node's per-token cost, tunnel included). The counts do not depend on the
machine's load; CPU does a little (compare
commits in the same window: ``PYTHONPATH=<worktree> python bench/node_c1.py``).

Run from the repository root::

    python bench/node_c1.py [--requests 2000] [--warmup 300] [--modes non-stream,stream]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from node_micro import MODEL, request_body, start_upstream  # noqa: E402

from tooti.protocol.connection import Connection, Limits, Side  # noqa: E402
from tooti.transport.websocket import WebSocketTransport  # noqa: E402

LIMITS = Limits(max_streams=64)


class Counter(trio.abc.Instrument):
    """Counts trio's scheduler work while :attr:`on` is set."""

    def __init__(self) -> None:
        self.on = False
        self.steps = 0
        self.spawns = 0
        self.io_waits = 0
        self.trace: list[str] | None = None
        """With ``--trace``: the first task steps' task names (which tasks run per
        request), and ``|`` for each I/O wait."""

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.steps += 1
            if self.trace is not None and len(self.trace) < 40:
                self.trace.append(task.name.rpartition(".")[2])

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.spawns += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.on:
            self.io_waits += 1
            if self.trace is not None and len(self.trace) < 40:
                self.trace.append("|" if timeout else "|0")


async def driver(port: int, stream: bool, requests: int, concurrency: int) -> None:
    """The gateway's side: HELLO / WELCOME / PROOF, then ``requests`` streams,
    ``concurrency`` at a time."""
    from tooti.tunnel import TunnelSession

    listener = (await trio.open_tcp_listeners(port, host="127.0.0.1"))[0]
    sock = await listener.accept()
    await listener.aclose()
    end = WebSocketTransport(sock, "node", client=False, max_message=1 << 21)
    conn = Connection(Side.ACCEPTOR, LIMITS)
    hello = conn.receive_message(await end.receive())
    version = conn.choose_version(hello.versions)  # type: ignore[union-attr]
    await end.send(conn.send_welcome(version, "s", 30.0, extra={"challenge": "Y2g="},
                                     require_proof=True))
    conn.receive_message(await end.receive())
    conn.proof_verified()
    session = TunnelSession(end, conn, heartbeat_interval=30.0)
    body = request_body(stream)
    left = [requests]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            out = await session.open_stream({"endpoint": "chat/completions", "model": MODEL},
                                            body)
            head = await out.head()
            assert head is not None and head.status == 200, out.end_info
            while await out.next_chunk() is not None:
                pass
            assert out.end_info is not None and "error" not in out.end_info, out.end_info

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        async with trio.open_nursery() as workers:
            for _ in range(concurrency):
                workers.start_soon(worker)
        session.abort("done")


async def node_side(port: int, url: str, warmup: int, requests: int, counter: Counter,
                    profiler: cProfile.Profile | None = None) -> tuple[float, int, int, int]:
    """Serve the driver's streams with a real Node; (CPU s, steps, spawns, I/O waits)
    over the measured ``requests``."""
    from tooti.backends.openai import OpenAIBackend
    from tooti.node.node import Node
    from tooti.settings import BackendSettings, NodeSettings, TunnelSettings
    from tooti.tunnel import InboundStream, TunnelSession

    backend = OpenAIBackend(BackendSettings(type="openai", url=url, max_concurrency=8))
    node = Node(NodeSettings(), TunnelSettings(), [backend], node_id="bench", dial=False)
    done = [0]
    marks: dict[str, float] = {}
    finished = trio.Event()

    async def handler(stream: InboundStream) -> None:
        await node._serve_stream(stream)
        done[0] += 1
        if done[0] == warmup:
            counter.on = True
            if profiler is not None:
                profiler.enable()
            marks["start"] = time.process_time()
        elif done[0] == warmup + requests:
            marks["end"] = time.process_time()
            counter.on = False
            if profiler is not None:
                profiler.disable()
            finished.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        for _ in range(200):
            try:
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                break
            except OSError:
                await trio.sleep(0.05)
        end = WebSocketTransport(tcp, "gateway", client=True, max_message=1 << 21)
        conn = Connection(Side.DIALER, LIMITS)
        await end.send(conn.send_hello("bench", "node", "bench", {}))
        conn.receive_message(await end.receive())
        await end.send(conn.send_proof("c2ln"))
        session = TunnelSession(end, conn, heartbeat_interval=30.0, handler=handler)
        nursery.start_soon(session.run)
        await finished.wait()
        nursery.cancel_scope.cancel()
    return marks["end"] - marks["start"], counter.steps, counter.spawns, counter.io_waits


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--modes", default="non-stream,stream",
                        help="non-stream, stream, paced (comma-separated)")
    parser.add_argument("--pace", type=float, default=100.0,
                        help="the paced mode's tokens per second per stream")
    parser.add_argument("--paced-streams", type=int, default=20,
                        help="the paced mode's streams in flight at once")
    parser.add_argument("--profile", action="store_true",
                        help="print the node's top functions (cProfile, by own time)")
    parser.add_argument("--trace", action="store_true",
                        help="print the first task steps' task names and I/O waits")
    parser.add_argument("--driver", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        trio.run(driver, args.driver, args.stream, args.requests, args.concurrency)
        return 0
    import tooti

    print(f"tooti from {Path(tooti.__file__).parent}; {args.requests} requests per mode "
          f"at concurrency 1; this process: the node (tunnel + backend client)")
    modes = args.modes.split(",")
    upstream, url = start_upstream(args.chunks)
    paced, paced_url = start_upstream(args.chunks, args.pace) if "paced" in modes else (None, "")
    try:
        for mode in modes:
            stream = mode != "non-stream"
            concurrency = args.paced_streams if mode == "paced" else 1
            port = free_port()
            total = args.warmup + args.requests
            drv = subprocess.Popen([sys.executable, __file__, "--driver", str(port),
                                    "--requests", str(total), "--concurrency", str(concurrency),
                                    *(["--stream"] if stream else [])])
            counter = Counter()
            if args.trace:
                counter.trace = []
            profiler = cProfile.Profile(time.process_time) if args.profile else None
            try:
                cpu, steps, spawns, waits = trio.run(
                    node_side, port, paced_url if mode == "paced" else url, args.warmup,
                    args.requests, counter, profiler,
                    instruments=[counter])
            finally:
                drv.wait(timeout=30)
            if counter.trace is not None:
                print("  trace:", " ".join(counter.trace))
            if profiler is not None:
                stats = pstats.Stats(profiler)
                stats.sort_stats("tottime").print_stats(35)
                stats.print_callers(r"__contains__|current_time|is_int|_close")
            n = args.requests
            if mode == "paced":
                tokens = n * (args.chunks - 2)
                print(f"node paced       {cpu / tokens * 1e6:7.1f} µs CPU per token "
                      f"({tokens / cpu:,.0f} tokens per CPU-second; {args.paced_streams} "
                      f"streams at {args.pace:g} tok/s);  per token: {steps / tokens:4.2f} "
                      f"task steps, {waits / tokens:4.2f} I/O waits", flush=True)
                continue
            print(f"node {mode:10}  {cpu / n * 1e6:7.1f} µs CPU per request;  per request: "
                  f"{steps / n:5.1f} task steps, {spawns / n:4.2f} spawns, "
                  f"{waits / n:4.2f} I/O waits", flush=True)
    finally:
        for child in (upstream, paced):
            if child is not None:
                child.kill()
                child.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
