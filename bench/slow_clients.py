"""What slow and idle clients cost a gateway, on loopback.

Starts a gateway and a node (simulated, instant backend) as child processes with the
default limits, and measures non-streamed chat requests on one kept-alive connection:

* baseline: nothing else connected;
* under attack: ``--idle`` connections that never send a byte and ``--slowloris``
  connections trickling a request head one byte per second, both kept at their number
  (a connection the gateway closes is opened again at once);

and reports the median and 90th percentile latency of each phase, the gateway's RSS
(before, while attacked, after), how long the gateway held a slowloris connection and
an idle one before closing it, how many connections it closed and what it answered.

The attack's connections are spread over loopback source addresses (127.0.1.1,
127.0.1.2, ...; at most 100 from each), so the gateway's per-address limits
(``gateway.max_connections_per_ip`` 256, ``connection_burst`` 200) are not what stops
them; the measuring client dials from 127.0.0.1, which no attacker uses. A 429 in the
answers means a per-address limit was hit all the same.

Run from the repository root with the project's venv::

    python bench/slow_clients.py [--idle 2000] [--slowloris 200] [--requests 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio
from children import (
    Children,
    free_port,
    loopback_sources,
    percentile,
    proc_status_kib,
    run_in_temp_dir,
    toml_table,
    wait_for_models,
)

BODY = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hello there"}]}
SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: "


class Attack:
    """Keeps ``idle`` silent and ``slow`` trickling connections open until cancelled."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.held: dict[str, list[float]] = {"idle": [], "slowloris": []}
        self.answers = Counter[str]()
        """``KIND STATUS`` of each connection the gateway closed."""
        self.open = 0

    async def hold(self, kind: str, source: str, ready: trio.Event | None = None) -> None:
        """Keep one ``kind`` connection from ``source`` open, re-opening it when the
        gateway closes it."""
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", self.port,
                                                local_address=source)
            began = trio.current_time()
            self.open += 1
            if ready is not None:
                ready.set()
                ready = None
            answer = bytearray()
            try:
                async with stream, trio.open_nursery() as nursery:
                    if kind == "slowloris":
                        nursery.start_soon(self.trickle, stream)
                    while chunk := await stream.receive_some(65536):
                        answer += chunk[:64 - len(answer)]  # (a 408, then the close)
                    nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, OSError):
                pass
            finally:
                self.open -= 1
            self.held[kind].append(trio.current_time() - began)
            status = answer.split(b" ", 2)[1:2]
            said = status[0].decode(errors="replace") if status else "no answer"
            self.answers[f"{kind} {said}"] += 1
            if said == "429":
                await trio.sleep(1.0)  # refused by a per-address limit: do not spin

    @staticmethod
    async def trickle(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(SLOW_HEAD)
            while True:
                await trio.sleep(1.0)
                await stream.send_all(b"a")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def latencies(client: httpx.AsyncClient, base: str, requests: int) -> list[float]:
    """Milliseconds of ``requests`` sequential non-streamed chat completions."""
    samples = []
    for _ in range(requests):
        began = time.perf_counter()
        response = await client.post(f"{base}/v1/chat/completions", json=BODY)
        samples.append((time.perf_counter() - began) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {response.text[:200]}")
    return samples


async def benchmark(idle: int, slow: int, requests: int, children: Children,
                    root: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    common = 'log_level = "warning"\ndrain_grace = 0.0\n'
    config = root / "gateway.toml"
    config.write_text(common + toml_table("gateway", {"listen": f"127.0.0.1:{port}"}))
    gateway = children.start("gateway", [
        sys.executable, "-m", "tooti", "run", "--role", "gateway", "--config", str(config),
        "--data-dir", str(root / "gateway-data")])
    config = root / "node.toml"
    config.write_text(common + toml_table("node", {"id": "node-1"})
                      + toml_table("[[node.backends]]", {"type": "simulated"}))
    children.start("node", [
        sys.executable, "-m", "tooti", "run", "--role", "node", "--config", str(config),
        "--peer", f"ws://127.0.0.1:{port}", "--data-dir", str(root / "node-data")])
    async with httpx.AsyncClient(timeout=30) as client:
        await wait_for_models(client, base)
        await latencies(client, base, 50)  # warm-up
        rss_before = proc_status_kib(gateway.pid, "VmRSS") / 1024
        baseline = await latencies(client, base, requests)
        attack = Attack(port)
        sources = loopback_sources(idle + slow)
        async with trio.open_nursery() as nursery:
            kinds = ["idle"] * idle + ["slowloris"] * slow
            for index, kind in enumerate(kinds):
                ready = trio.Event()
                nursery.start_soon(attack.hold, kind, sources[index % len(sources)], ready)
                await ready.wait()
            opened = attack.open
            attacked = await latencies(client, base, requests)
            rss_attacked = proc_status_kib(gateway.pid, "VmRSS") / 1024
            await trio.sleep(16)  # past the keep-alive and header timeouts, still attacked
            more = await latencies(client, base, requests)
            rss_attacked = max(rss_attacked, proc_status_kib(gateway.pid, "VmRSS") / 1024)
            nursery.cancel_scope.cancel()
        await trio.sleep(2)
        rss_after = proc_status_kib(gateway.pid, "VmRSS") / 1024
    print(f"{idle} idle + {slow} slowloris connections held open (re-opened when closed) "
          f"from {len(sources)} addresses; {opened} open at once; sequential non-streamed "
          "chat on loopback from 127.0.0.1")
    print(f"{'ms':<40}{'p50':>8}{'p90':>8}{'max':>8}")
    for label, samples in (("baseline", baseline), ("under attack", attacked),
                           ("under attack, after 16 s", more)):
        print(f"{label:<40}{statistics.median(samples):>8.2f}"
              f"{percentile(samples, 0.9):>8.2f}{max(samples):>8.2f}")
    print(f"gateway RSS: {rss_before:.1f} MiB before, {rss_attacked:.1f} MiB attacked, "
          f"{rss_after:.1f} MiB after")
    for kind, held in attack.held.items():
        if held:
            print(f"{kind}: {len(held)} closed by the gateway, held "
                  f"{statistics.median(held):.1f} s (median), {max(held):.1f} s (max)")
    print("answers before the close: " + ", ".join(
        f"{n}x {k}" for k, n in sorted(attack.answers.items())))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=2000, help="idle connections (2000)")
    parser.add_argument("--slowloris", type=int, default=200,
                        help="connections trickling a head (200)")
    parser.add_argument("--requests", type=int, default=300,
                        help="requests measured per phase (300)")
    args = parser.parse_args(argv)
    return run_in_temp_dir("tooti-slow-bench-", benchmark, args.idle, args.slowloris,
                           args.requests)


if __name__ == "__main__":
    raise SystemExit(main())
