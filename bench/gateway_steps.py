"""The gateway's scheduler work per request: task steps, spawns and I/O waits, counted.

``bench/overhead.py`` gives the gateway's CPU per request; at concurrency 1 much of it
is fixed per-request work of trio's scheduler (a task spawned, a task woken, one more
run-loop pass with its ``epoll_wait``), which this script counts exactly (the counts do
not move with the machine's load, unlike CPU time).

It starts the fast fake upstream (``bench/fake_upstream.py``) and a tooti node as
separate processes, runs a gateway **in this process** with a :class:`trio.abc.Instrument`
attached, and sends ``--requests`` sequential requests on one keep-alive connection
from a plain blocking socket in a worker thread (so the client adds no trio work).
Printed per request, for non-stream and stream (32 chunks sent at once by the upstream):

* task steps (``before_task_step``), by task name (the top ones);
* tasks spawned (``task_spawned``), by name;
* I/O waits (``before_io_wait``: one per run-loop pass, an ``epoll_wait``), and how
  many of them had a zero timeout (a pass that found work already due);
* the gateway process's CPU per request (this process: the client thread included, so
  only the difference between commits means something).

Compare commits in the same time window (``PYTHONPATH`` at a git worktree of the base).
Run from the repository root::

    python bench/gateway_steps.py [--requests 2000] [--modes nonstream,stream]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

BENCH = Path(__file__).resolve().parent
MODEL = "fake-model"
BODIES = {
    "nonstream": (b'{"model":"fake-model","messages":[{"role":"user","content":'
                  b'"Say hello in one short sentence."}],"max_tokens":32}'),
    "stream": (b'{"model":"fake-model","messages":[{"role":"user","content":'
               b'"Say hello in one short sentence."}],"max_tokens":32,"stream":true}'),
}


class Counts(trio.abc.Instrument):
    """Counts scheduler events while :attr:`on` is set."""

    def __init__(self) -> None:
        self.on = False
        self.steps: Counter[str] = Counter()
        self.spawns: Counter[str] = Counter()
        self.io_waits = 0
        self.zero_waits = 0

    def reset(self) -> None:
        self.steps.clear()
        self.spawns.clear()
        self.io_waits = self.zero_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.steps[task.name] += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self.on:
            self.spawns[task.name] += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.on:
            self.io_waits += 1
            if timeout <= 0:
                self.zero_waits += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_response(sock: socket.socket, buf: bytearray) -> None:
    """Read one HTTP/1.1 response (content-length or chunked) off ``sock``."""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end]).lower()
    del buf[:end]
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError(f"answer {head[:200]!r}")
    if b"transfer-encoding: chunked" in head:
        while b"\r\n0\r\n\r\n" not in buf and not buf.startswith(b"0\r\n\r\n"):
            buf += sock.recv(65536)
        cut = (5 if buf.startswith(b"0\r\n\r\n") else buf.index(b"\r\n0\r\n\r\n") + 7)
        del buf[:cut]
        return
    length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(buf) < length:
        buf += sock.recv(65536)
    del buf[:length]


def client(port: int, body: bytes, n: int) -> None:
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
               % (len(body), body))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        for _ in range(n):
            sock.sendall(request)
            read_response(sock, buf)


async def measure(args: argparse.Namespace, upstream: str) -> None:
    from tooti.gateway.app import Gateway
    from tooti.settings import GatewaySettings, TunnelSettings

    counts = Counts()
    trio.lowlevel.add_instrument(counts)
    port = free_port()
    gateway = Gateway(GatewaySettings(listen=f"127.0.0.1:{port}"), TunnelSettings())
    node: subprocess.Popen[bytes] | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        try:
            node = subprocess.Popen([  # noqa: ASYNC220 (started once, before measuring)
                sys.executable, "-m", "tooti", "run", "--log-level", "warning",
                "--role", "node", "--peer", f"ws://127.0.0.1:{port}",
                "--backend", f"openai={upstream}", "--node-id", "steps-node",
                "--data-dir", str(Path(args.dir) / "node")])
            registry = gateway.registry
            with trio.fail_after(30):
                await registry.wait_until(lambda: any(
                    p.models for p in registry.peers.values()))
            for mode in args.modes.split(","):
                body = BODIES[mode]
                await trio.to_thread.run_sync(client, port, body, 200)  # warm up
                counts.reset()
                counts.on = True
                cpu = time.process_time()
                await trio.to_thread.run_sync(client, port, body, args.requests)
                cpu = time.process_time() - cpu
                counts.on = False
                report(mode, counts, args.requests, cpu)
        finally:
            if node is not None:
                node.terminate()
                node.wait()
            gateway.shutdown()


def report(mode: str, counts: Counts, n: int, cpu: float) -> None:
    steps = sum(counts.steps.values())
    spawns = sum(counts.spawns.values())
    print(f"{mode}: per request: task steps {steps / n:.2f}, spawns {spawns / n:.2f}, "
          f"io waits {counts.io_waits / n:.2f} (zero-timeout {counts.zero_waits / n:.2f}), "
          f"process CPU {cpu / n * 1e6:.0f} us (client thread included)")
    for name, count in counts.steps.most_common(8):
        print(f"    steps {count / n:6.2f}  {name}")
    for name, count in counts.spawns.most_common(5):
        print(f"    spawn {count / n:6.2f}  {name}")


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--modes", default="nonstream,stream")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tooti-steps-") as tmp:
        args.dir = tmp
        os.environ["TOOTI_DATA_DIR"] = str(Path(tmp) / "gateway")
        up_port = free_port()
        upstream = subprocess.Popen([
            sys.executable, str(BENCH / "fake_upstream.py"), "--port", str(up_port),
            "--chunks", "32", "--model", MODEL])
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", up_port)).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            trio.run(measure, args, f"http://127.0.0.1:{up_port}/v1")
        finally:
            upstream.terminate()
            upstream.wait()


if __name__ == "__main__":
    main()
