"""The tunnel's per-token cost, in one process: CPU microseconds per relayed token.

``bench/paced.py`` measures whole processes (the HTTP server, the backend client and
the tunnel together) and its figures move with the machine's load: a busy process
reads several tokens at once and pays less per token. This script isolates the part
between the node's backend and the gateway's HTTP server, and keeps one token per
frame per stream however busy the machine is:

* a node-side :class:`~tooti.tunnel.TunnelSession` (WebSocket client: masked frames)
  and a gateway-side one (WebSocket server), joined by a real loopback TCP
  connection, both in this process;
* ``--streams`` streams opened by the gateway side; each node-side handler answers
  (``respond``) and then sends ``--tokens`` SSE events, one per round, with
  :meth:`~tooti.tunnel.InboundStream.send` (what ``tooti.node`` does per backend
  chunk);
* on the gateway side each stream is relayed by the real
  :func:`tooti.gateway.streamed_answer.stream_answer` into an ASGI ``send`` that
  only counts (the HTTP server's write is not measured here);
* a round starts once every stream has relayed its previous token, so each token
  crosses the tunnel in its own DATA frame and wakes its stream's task once; the
  node's writer still puts the round's frames of all streams in one socket write
  (as it does when tokens of many streams are ready together);
* ``--staggered``: one stream's token per round instead (each token its own socket
  write and read, as when the streams' tokens come at different moments: paced
  streams on a machine that keeps up).

Printed: CPU microseconds per token (this process's user+system time over the
measured rounds, both tunnel ends together) and wall time. Compare commits in the
same time window (a git worktree of the base, run with ``PYTHONPATH`` pointing at
it). Run from the repository root::

    python bench/tunnel_micro.py [--streams 200] [--tokens 200] [--repeat 3] [--staggered]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from tooti.billing.base import Outcome
from tooti.gateway.streamed_answer import stream_answer
from tooti.protocol.connection import Connection, Limits, Side
from tooti.transport.websocket import WebSocketTransport
from tooti.tunnel import InboundStream, TunnelSession

EVENT = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
         b'"model":"m","choices":[{"index":0,"delta":{"content":" tok"},'
         b'"logprobs":null,"finish_reason":null}]}\n\n')
LIMITS = Limits(max_streams=4096)


def cpu() -> float:
    """This process's CPU seconds so far (user + system, CLOCK_PROCESS_CPUTIME_ID)."""
    return time.process_time()


class Rounds:
    """The pace: every stream sends one token per round; the next round starts once
    the gateway side relayed all of them."""

    def __init__(self, streams: int, per_round: int) -> None:
        self.per_round = per_round
        self.go = [trio.Event() for _ in range(streams)]
        self.relayed = 0
        self.all_relayed = trio.Event()

    def relay_one(self) -> None:
        self.relayed += 1
        if self.relayed == self.per_round:
            self.all_relayed.set()

    def start(self, streams: range) -> None:
        """Let ``streams`` send their next token."""
        self.relayed = 0
        self.all_relayed = trio.Event()
        for index in streams:
            go, self.go[index] = self.go[index], trio.Event()
            go.set()


async def pair() -> tuple[WebSocketTransport, WebSocketTransport, Connection, Connection]:
    """Two connected WebSocket ends and their connections (gateway side first), after
    HELLO / WELCOME / PROOF."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await listener.aclose()
    node_end = WebSocketTransport(client, "gateway", client=True, max_message=1 << 21)
    gateway_end = WebSocketTransport(server, "node", client=False, max_message=1 << 21)
    node_conn, gateway_conn = Connection(Side.DIALER, LIMITS), Connection(Side.ACCEPTOR, LIMITS)
    await node_end.send(node_conn.send_hello("node-1", "node", "bench", {}))
    hello = gateway_conn.receive_message(await gateway_end.receive())
    version = gateway_conn.choose_version(hello.versions)  # type: ignore[union-attr]
    await gateway_end.send(gateway_conn.send_welcome(version, "s", 30.0,
                                                     extra={"challenge": "Y2g="},
                                                     require_proof=True))
    node_conn.receive_message(await node_end.receive())
    await node_end.send(node_conn.send_proof("c2ln"))
    gateway_conn.receive_message(await gateway_end.receive())
    gateway_conn.proof_verified()
    return gateway_end, node_end, gateway_conn, node_conn


async def run(streams: int, tokens: int, staggered: bool) -> tuple[float, float]:
    """One measurement: (CPU seconds, wall seconds) for ``streams`` x ``tokens``."""
    gateway_end, node_end, gateway_conn, node_conn = await pair()
    rounds = Rounds(streams, 1 if staggered else streams)

    async def handler(stream: InboundStream) -> None:
        index = int((await stream.read_body(1 << 20)).decode())
        await stream.respond(200, {"content-type": "text/event-stream"})
        for _ in range(tokens):
            await rounds.go[index].wait()
            await stream.send(EVENT)
        await stream.send(b"data: [DONE]\n\n")
        await stream.end({"finish_reason": "stop"})

    gateway = TunnelSession(gateway_end, gateway_conn, heartbeat_interval=30.0)
    node = TunnelSession(node_end, node_conn, heartbeat_interval=30.0, handler=handler)

    async def client(index: int) -> None:
        out = await gateway.open_stream({"path": "/v1/chat/completions"}, b"%d" % index)
        head = await out.head()
        assert head is not None and head.status == 200
        relayed = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal relayed
            body = message.get("body", b"")
            if body and relayed < tokens:
                relayed += body.count(b"\n\n")
                rounds.relay_one()

        async def settle() -> None:
            return None

        # stream_answer's first part: the first chunk (the real proxy holds it until a
        # token arrives; here the first round's token)
        first = await out.next_chunk()
        assert first is not None
        await send({"body": first})
        await stream_answer(out, b"", 200, b"text/event-stream", send, [], "req",
                            Outcome(), settle)
        assert relayed == tokens, relayed

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.run)
        nursery.start_soon(node.run)
        async with trio.open_nursery() as clients:
            for index in range(streams):
                clients.start_soon(client, index)
            await trio.testing.wait_all_tasks_blocked(0.01)
            began_cpu, began = cpu(), time.perf_counter()
            for _ in range(tokens):
                if staggered:
                    for index in range(streams):
                        rounds.start(range(index, index + 1))
                        await rounds.all_relayed.wait()
                else:
                    rounds.start(range(streams))
                    await rounds.all_relayed.wait()
            used_cpu, wall = cpu() - began_cpu, time.perf_counter() - began
        gateway.abort("done")
        node.abort("done")
    return used_cpu, wall


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, measure ``--repeat`` times, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--staggered", action="store_true",
                        help="one stream's token per round (one frame per socket write)")
    args = parser.parse_args(argv)
    total = args.streams * args.tokens
    best = float("inf")
    for _ in range(args.repeat):
        used, wall = trio.run(run, args.streams, args.tokens, args.staggered)
        best = min(best, used)
        print(f"{args.streams} streams x {args.tokens} tokens"
              f"{' staggered' if args.staggered else ''}: {used * 1e6 / total:6.2f} us CPU "
              f"per token ({total / used:,.0f} tokens per CPU-second, node and gateway "
              f"tunnel ends together), wall {wall:.2f} s", flush=True)
    print(f"best: {best * 1e6 / total:.2f} us CPU per token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
