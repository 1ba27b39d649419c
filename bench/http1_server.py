"""CPU per request of the gateway's HTTP server alone: the listener serving a trivial app.

Starts ``tooti.mesh.listener.serve`` in a child process with a tiny ASGI app (no
gateway, no tunnel, no node: only the server part of a request's cost), drives it
with ``wrk`` (keep-alive; POST with a small JSON body, as the API gets) and prints,
per cell, req/s and the server process's CPU time per request (user + system, from
``/proc/<pid>/stat``): what the HTTP server costs, measured on a loaded machine as well
as on a quiet one. Cells: a JSON answer in one body message (``plain``) and a 32-part
streamed answer (``stream``), at concurrency 1 and 16.

Compare two versions of the server in the same time window by running this script
from each tree (``PYTHONPATH=<tree> python <tree>/bench/http1_server.py``); the child
imports tooti from the same tree as the script.

    python bench/http1_server.py [--duration 5] [--chunks 32]

The server is a child of :class:`children.Children` (its own process group, killed
with this script even on SIGKILL); its log and wrk's script go in a temporary
directory deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import Child, Children, cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m",'
          b'"choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},'
          b'"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,'
          b'"total_tokens":5}}')
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
LUA = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
"""

SERVER = r"""
import sys, trio
from hypercorn.config import Config
from tooti.mesh.listener import serve, Limits
from tooti.settings import GatewaySettings

ANSWER = %(answer)r
CHUNK = %(chunk)r
CHUNKS = %(chunks)d


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(CHUNKS):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    else:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%%d" %% len(ANSWER))]})
        await send({"type": "http.response.body", "body": ANSWER})


async def never(*_):
    await trio.sleep_forever()


async def main():
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.include_server_header = False
    config.backlog = 1024
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(
            app, config, never, trio.sleep_forever,
            limits=Limits.of(GatewaySettings()), task_status=task_status))
        print(binds[0], flush=True)

trio.run(main)
"""


def run_wrk(url: str, concurrency: int, seconds: float, script: Path) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s", str(script), url],
        capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+) requests in", out)
    if match is None:
        raise RuntimeError(f"wrk printed no request count:\n{out}")
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--chunks", type=int, default=32, help="body parts per stream")
    args = parser.parse_args()
    source = SERVER % {"answer": ANSWER, "chunk": CHUNK, "chunks": args.chunks}
    with tempfile.TemporaryDirectory(prefix="tooti-http1-server-") as tmp:
        children = Children(Path(tmp))
        try:
            child = children.start("server", [sys.executable, "-c", source])
            measure(child, Path(tmp), args.duration)
        finally:
            children.stop_all()
    return 0


def server_url(child: Child, limit: float = 15.0) -> str:
    """The URL the server printed once it listens (it fails if the child exits first)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        match = re.search(r"http://[0-9.]+:\d+", child.log())
        if match:
            return match.group(0)
        if child.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the server did not start:\n{child.tail()}")


def measure(child: Child, tmp: Path, duration: float) -> None:
    """Drive the server with wrk and print every cell."""
    url = server_url(child)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()
    script = tmp / "post.lua"
    script.write_text(LUA % BODY.decode())
    print(f"tooti from {ROOT}; load: {os.getloadavg()[0]:.2f}")
    print(f"{'cell':<16} {'req/s':>9} {'server CPU/request':>20}")
    run_wrk(url + "/", 4, 1.0, script)  # warm up
    for path, mode in (("/", "plain"), ("/stream", "stream")):
        for concurrency in (1, 16):
            before, started = cpu_seconds(child.pid), time.monotonic()
            count = run_wrk(url + path, concurrency, duration, script)
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(child.pid) - before
            print(f"{mode + ' c=' + str(concurrency):<16} {count / elapsed:>9.0f} "
                  f"{cpu / count * 1e6:>17.1f} µs")

if __name__ == "__main__":
    sys.exit(main())
