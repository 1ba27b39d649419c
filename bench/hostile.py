"""Hostile nodes and clients against one gateway, one attack after another.

For each attack the script starts a fresh gateway (with a join token) and one honest
node (the labelled simulated backend, model ``tooti-sim``) as separate processes on
127.0.0.1, then starts the attack in a process of its own (this script again, with
``--attacker NAME``), so the attack's own CPU never delays the measuring client. While
the attack runs, this process sends normal chat completions to the honest node, one at
a time (non-streamed and streamed in turn), samples the gateway's resident memory
every 50 ms, and asks ``GET /admin/v1/peers`` every 2 s whether the honest node is still
registered and live. Every attack is bounded in count and time and stops by itself;
every byte goes to the gateway on 127.0.0.1.

The gateway limits what one client address may do (``gateway.max_connections_per_ip``,
``connection_rate``/``connection_burst``, ``tunnel_handshake_rate``/``burst``,
``tunnel_handshakes_per_ip``). An attacker with many addresses is the harder case, so
every attack but one spreads its connections over many loopback source addresses
(127.0.1.1, 127.0.1.2, ...: at least 24, and at most 100 connections from each, well
within those limits; each hostile node dials from the next one), while the measuring
client and the honest node stay on 127.0.0.1, an address no attacker uses, so they are
never refused for the attacker's sake. ``handshake-flood`` alone comes from one address
(127.0.0.2): it shows the per-address limits doing their job. The ``cut by`` column
says what stopped each attacker (a timeout, a session closed with a reason, a refusal
and its status); a 429 there means a per-address limit, counted wherever it appears.

Attacks (``--only`` picks some, comma-separated; ``baseline`` always runs first since
every row is compared to it):

``baseline``
    Normal requests only (``--requests``, sequential).
``no-ledger``
    Two gateways side by side, one with ``[billing] plugins = []``, the other as
    shipped (each with its own honest node); normal requests alternate between them in
    random order. The difference is the cost of recording usage durably.
``heartbeat-flood``
    A node advertising as many models as the gateway accepts (3,200 tried first, then
    fewer) sends HEARTBEAT every 1-10 ms; when its session is cut it dials again with a
    fresh identity, as an attacker would.
``models-flood``
    The same, re-sending its whole MODELS list every 1-10 ms.
``models-amplification``
    25 nodes, each with as many distinct models as allowed, stay connected; meanwhile
    the time and size of ``GET /v1/models``, ``GET /metrics`` and ``GET
    /admin/v1/peers`` are measured.
``big-answers``
    10 nodes answer every non-streamed request with a 100 MB JSON body; 10 such requests
    at once, for a few rounds.
``idle-and-slowloris``
    2,000 TCP connections that send nothing and 200 that trickle header lines (one every
    0.5 s), from 22+ addresses; how many the gateway closed, after how long, with what
    status.
``handshake-flood``
    Tunnel upgrades from one address (127.0.0.2: the point is the per-address handshake
    and connection limits) as fast as 16 workers go: half with a wrong token, half with
    the right token and then no HELLO (held open until the gateway closes them); the
    statuses seen, 429 being those limits.
``json-bombs``
    Requests whose body nests arrays 100,000 deep, and requests with a bad
    ``Content-Length`` (not a number, negative, two values, 25 digits, more than sent),
    in a loop; the statuses seen and whether each answer was an OpenAI error object.
``usage-lies``
    One node per lie: ``prompt_tokens = 10**20``, negative tokens, negative prices
    (with negative tokens), completion tokens far above ``max_tokens``, and float
    tokens; three requests each. Then the ledger rows of those requests (the gateway's
    ``usage.sqlite3``, opened read-only) and ``tooti usage --by node``.
``kill-9``
    8 clients send requests at once; the gateway is SIGKILLed under load; how many of
    the requests the clients saw complete are missing from the ledger.

Printed: one line per attack as it ends, then a table (attack | normal p50 | normal
p99 | x baseline p50 / p99 | gateway RSS peak MB | cut by | notes), and with ``--json``
one JSON document
(stdout; progress goes to stderr). MB here is 2^20 bytes. The script asserts nothing:
an attack that kills the gateway is reported as "gateway died" and the next attack
starts a new one.

Run from the repository root with the project's venv::

    python bench/hostile.py                      # every attack, a few minutes
    python bench/hostile.py --quick              # smoke run, about 40 s
    python bench/hostile.py --only heartbeat-flood,json-bombs --seconds 30
    python bench/hostile.py --only models-amplification --set amplification_nodes=100
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx
import trio
from children import (
    Child,
    Children,
    cpu_seconds,
    dechunk,
    exit_on_signals,
    free_port,
    interrupted,
    load_average,
    loopback_sources,
    percentile,
    proc_status_kib,
    raise_fd_limit,
    sigint_raises,
    toml_table,
    wait_for_log,
)

from tooti.dialer import Dialer, TunnelRefused
from tooti.identity import Identity
from tooti.settings import TunnelSettings
from tooti.transport.websocket import SUBPROTOCOL, TUNNEL_PATH, HandshakeFailed, WebSocketTransport
from tooti.tunnel import InboundStream, StreamHandler, StreamOpener, TunnelLost, TunnelSession

MODEL = "tooti-sim"
HONEST = "honest"
TOKEN = "hostile-bench-join-token"
"""The join token of every gateway started here (a throwaway: they live in a temp dir)."""
HOSTILE_SOURCE = "127.0.0.2"
"""Source address of the handshake flood, the one attack from a single address: it tests
the per-address limits (and leaves the honest node's 127.0.0.1 alone)."""
MIN_SOURCES = 24
"""Loopback addresses every spread attack has, at the least (see
:func:`children.loopback_sources`)."""
MODEL_COUNTS = (3200, 1600, 800, 400, 200, 100, 50, 20)
"""Model counts a hostile node tries, most first, until the gateway keeps one (after
3,200 it tries the default ``tunnel.max_models_per_peer``, when there is one)."""
ATTACKS = ("baseline", "no-ledger", "heartbeat-flood", "models-flood",
           "models-amplification", "big-answers", "idle-and-slowloris", "handshake-flood",
           "json-bombs", "usage-lies", "kill-9")
MIB = 1 << 20


@dataclass
class Scale:
    """How big and how long each attack is."""

    seconds: float = 20.0
    """Duration of each attack once it is set up."""
    requests: int = 200
    """Normal requests of the baseline rows."""
    request_timeout: float = 30.0
    amplification_nodes: int = 25
    big_nodes: int = 10
    big_bytes: int = 100_000_000
    big_parallel: int = 10
    big_rounds: int = 3
    idle: int = 2000
    slowloris: int = 200
    handshake_workers: int = 16
    lies_repeat: int = 3
    kill_clients: int = 8
    settle: float = 2.0
    """Seconds after an attack before the gateway's RSS is read again."""


QUICK = Scale(seconds=1.5, requests=30, request_timeout=10.0, amplification_nodes=4,
              big_nodes=2, big_bytes=8_000_000, big_parallel=2, big_rounds=1, idle=200,
              slowloris=20, handshake_workers=4, lies_repeat=1, kill_clients=4, settle=0.5)


# ===================================================================== the attacks
# Each runs in its own process (``--attacker NAME``): it prints ``READY`` once its
# pressure is on, and at the end ``RESULT {json}``.


@dataclass
class Target:
    """The gateway under attack, and the addresses to attack it from."""

    port: int
    scale: Scale
    sources: list[str] = field(init=False)
    """Loopback addresses the attack spreads its connections over."""
    _turn: Iterator[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sources = loopback_sources(self.scale.idle + self.scale.slowloris, MIN_SOURCES)
        self._turn = itertools.cycle(self.sources)

    def source(self) -> str:
        """The next address to dial from (round robin)."""
        return next(self._turn)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client of the API dialling from the next address."""
        return httpx.AsyncClient(base_url=self.base, transport=httpx.AsyncHTTPTransport(
            local_address=self.source(), limits=kwargs.pop("limits", httpx.Limits())),
            **kwargs)

    @property
    def tunnel_url(self) -> str:
        """Where nodes dial."""
        return f"ws://127.0.0.1:{self.port}{TUNNEL_PATH}"

    @property
    def base(self) -> str:
        """The HTTP API."""
        return f"http://127.0.0.1:{self.port}"


Answer = Callable[[InboundStream], Awaitable[None]]
Flood = Callable[[TunnelSession], Awaitable[None]]


class GoAways(logging.Handler):
    """The GOAWAY the gateway sent each hostile session, by session name, from the
    line tooti's tunnel logs for each one it receives (a session's own close reason
    only says the WebSocket closed)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "GOAWAY" in str(record.msg) and isinstance(record.args, tuple) \
                and len(record.args) == 3:
            name, code, reason = record.args
            self.seen[str(name)] = f"GOAWAY {code}: {reason}"[:160]

    def install(self) -> GoAways:
        """Listen to tooti's tunnel log (INFO and up, kept out of the attacker's output)."""
        tunnel_log = logging.getLogger("tooti.tunnel")
        tunnel_log.setLevel(logging.INFO)
        tunnel_log.addHandler(self)
        tunnel_log.propagate = False
        return self


GOAWAYS = GoAways()
"""Installed in the attacker process (:func:`run_attacker`)."""


class HostileNode:
    """A node with a fresh identity that proves it like any node (tooti's own dialer
    does the HELLO / WELCOME / PROOF handshake), advertises ``models``, then floods
    (``flood``) or answers streams its own way (``answer``). Each dials from the next of
    the target's addresses."""

    def __init__(self, target: Target, models: list[dict[str, Any]], *,
                 answer: Answer | None = None, flood: Flood | None = None) -> None:
        self.target = target
        self.models = models
        self.identity = Identity.generate()
        self.id = self.identity.id
        self.source = target.source()
        self.name = f"{target.tunnel_url}#{self.id[:16]}"
        """The session's name (unique, so its GOAWAY can be told apart)."""
        self.handler: StreamHandler | None = self._serve if answer is not None else None
        self.opener: StreamOpener | None = None
        self._answer = answer
        self._flood = flood
        self.session: TunnelSession | None = None
        self.connected = trio.Event()
        self.opened_at = 0.0
        self.closed_at = 0.0
        self.outcome = ""
        """Why the session ended (or was refused), from our side."""
        self.finished = trio.Event()

    def stats(self) -> dict[str, Any]:
        """The HEARTBEAT figures."""
        return {"in_flight": 0, "queued": 0, "healthy": True}

    async def on_session(self, session: TunnelSession) -> None:
        """Advertise, then flood if told to."""
        self.session = session
        await session.send_control(lambda conn: conn.send_models(self.models))
        self.opened_at = time.monotonic()
        self.connected.set()
        if self._flood is not None:
            await self._flood(session)

    async def _serve(self, stream: InboundStream) -> None:
        assert self._answer is not None
        with contextlib.suppress(TunnelLost):
            await self._answer(stream)

    async def run(self) -> str:
        """One session, until it ends; returns (and keeps in ``outcome``) why."""
        dialer = Dialer(self, peer_id=self.id, role="node", identity=self.identity,
                        tunnel=TunnelSettings(), join_token=TOKEN)
        try:
            await self._dial(dialer)
        except (TunnelRefused, HandshakeFailed, OSError, trio.TooSlowError) as exc:
            self.outcome = f"refused: {exc}"[:160]
        else:
            self.outcome = GOAWAYS.seen.get(self.name) or (
                self.session.close_reason if self.session else "no session")
        finally:
            self.closed_at = time.monotonic()
            self.finished.set()
        return self.outcome

    async def _dial(self, dialer: Dialer) -> None:
        with trio.fail_after(10):
            transport = await tunnel_from(self.target, self.source, self.name)
        try:
            await dialer.serve_transport(transport)
        finally:
            with trio.move_on_after(2):
                await transport.aclose()

    async def stay(self) -> None:
        """Dial until a session opens (a per-address handshake limit may refuse some
        tries), then keep it until it ends."""
        while True:
            await self.run()
            if self.connected.is_set():
                return
            await trio.sleep(0.25)

    def abort(self) -> None:
        """End the session now (our choice, not the gateway's)."""
        if self.session is not None:
            self.session.abort("attacker done")


async def tunnel_from(target: Target, source: str, name: str) -> WebSocketTransport:
    """A WebSocket named ``name`` to the gateway's tunnel path from ``source`` (tooti's
    ``connect`` picks no source address): a node's upgrade request with the join token;
    a refusal is :class:`HandshakeFailed` with its status."""
    stream = await trio.open_tcp_stream("127.0.0.1", target.port, local_address=source)
    try:
        await stream.send_all(upgrade_request(target.port, TOKEN))
        status, _, rest = await read_head(stream, 10)
        if status != 101:
            raise HandshakeFailed(status or 0, rest[:120].decode(errors="replace").strip()
                                  or "no answer")
        return WebSocketTransport(stream, name, client=True, buffered=rest,
                                  max_message=TunnelSettings().max_frame_bytes)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def model_list(count: int, prefix: str) -> list[dict[str, Any]]:
    """``count`` distinct model entries, as small as an entry can be (so 3,200 of them
    fit in a 64 KiB MODELS frame)."""
    return [{"id": f"{prefix}{i:04d}"} for i in range(count)]


async def admin_peers(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """The gateway's ``/admin/v1/peers`` list."""
    reply = await client.get("/admin/v1/peers")
    reply.raise_for_status()
    peers: list[dict[str, Any]] = reply.json()["data"]
    return peers


async def accepted_models(target: Target, prefix: str) -> tuple[int, list[str]]:
    """The most models (of :data:`MODEL_COUNTS`) the gateway keeps for one node, and
    what happened to the larger counts."""
    tried: list[str] = []
    cap = getattr(TunnelSettings(), "max_models_per_peer", None)  # the default, if any
    if isinstance(cap, int) and 0 < cap < MODEL_COUNTS[0]:
        counts = [MODEL_COUNTS[0], cap, *(c for c in MODEL_COUNTS if c < cap)]
    else:
        counts = list(MODEL_COUNTS)
    # (asked from 127.0.0.1: the admin API answers loopback, and this is measuring)
    async with httpx.AsyncClient(base_url=target.base, timeout=30) as client:
        for count in counts:
            node = HostileNode(target, model_list(count, prefix))
            kept = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.stay)
                with trio.move_on_after(10):
                    await node.connected.wait()
                    while node.session is not None and not node.session.closed.is_set():
                        try:
                            mine = [p for p in await admin_peers(client) if p["id"] == node.id]
                        except (httpx.HTTPError, KeyError, ValueError):
                            mine = []
                        if mine and mine[0]["models"]:
                            kept = len(mine[0]["models"])
                            break
                        await trio.sleep(0.2)
                node.abort()
                with trio.move_on_after(3):
                    await node.finished.wait()
                nursery.cancel_scope.cancel()
            if kept:
                if kept < count:
                    tried.append(f"{count} sent, {kept} kept")
                return kept, tried
            tried.append(f"{count}: {node.outcome or 'not registered'}")
    return 0, tried


def ready() -> None:
    """Tell the parent the attack's pressure is on."""
    print("READY", flush=True)


async def flood_attack(target: Target, resend_models: bool) -> dict[str, Any]:
    """One node at a time floods HEARTBEAT (or MODELS) every 1-10 ms; a node the
    gateway cuts is replaced by a new one with a fresh identity."""
    count, tried = await accepted_models(target, "f")
    models = model_list(count, "f")
    sent = Counter[str]()

    async def flood(session: TunnelSession) -> None:
        while True:
            if resend_models:
                await session.send_control(lambda conn: conn.send_models(models))
                sent["models"] += 1
            else:
                await session.send_control(lambda conn: conn.send_heartbeat(
                    {"in_flight": 0, "queued": 0, "healthy": True, "t": time.monotonic()}))
                sent["heartbeats"] += 1
            await trio.sleep(random.uniform(0.001, 0.01))

    sessions: list[dict[str, Any]] = []
    ready()
    with trio.move_on_after(target.scale.seconds):
        while True:
            node = HostileNode(target, models, flood=flood)
            began = time.monotonic()
            try:
                await node.run()
            finally:
                sessions.append({
                    "lasted_s": round((node.closed_at or time.monotonic())
                                      - (node.opened_at or began), 3),
                    "opened": node.connected.is_set(), "outcome": node.outcome})
            if not node.connected.is_set():
                await trio.sleep(0.2)  # refused: dial again a little later
    cut = [s for s in sessions if s["opened"] and s["outcome"]]
    return {"models_per_node": count, "larger_counts": tried, "sent": dict(sent),
            "sources": len(target.sources), "sessions": len(sessions),
            "cut_by_gateway": len(cut),
            "refused": sum(1 for s in sessions if not s["opened"]),
            "refused_429": sum(1 for s in sessions
                               if not s["opened"] and "HTTP 429" in s["outcome"]),
            "cut_reasons": dict(Counter(s["outcome"] for s in cut).most_common(2)),
            "first_cut_after_s": cut[0]["lasted_s"] if cut else None,
            "outcomes": dict(Counter(s["outcome"] for s in sessions).most_common(4))}


async def attack_heartbeat_flood(target: Target) -> dict[str, Any]:
    """HEARTBEAT every 1-10 ms from a node with as many models as allowed."""
    return await flood_attack(target, resend_models=False)


async def attack_models_flood(target: Target) -> dict[str, Any]:
    """MODELS re-sent every 1-10 ms."""
    return await flood_attack(target, resend_models=True)


async def attack_models_amplification(target: Target) -> dict[str, Any]:
    """Many nodes, each with as many distinct models as allowed, stay connected."""
    count, tried = await accepted_models(target, "a")
    nodes = [HostileNode(target, model_list(count, f"n{i:03d}"))
             for i in range(target.scale.amplification_nodes)]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(node.stay)
        with trio.move_on_after(60):
            for node in nodes:
                await node.connected.wait()
        await trio.sleep(1)  # let the gateway file the last MODELS
        ready()
        await trio.sleep(target.scale.seconds)
        live = sum(1 for n in nodes if n.session and not n.session.closed.is_set())
        for node in nodes:
            node.abort()
        nursery.cancel_scope.cancel()
    return {"nodes": len(nodes), "models_per_node": count, "larger_counts": tried,
            "sources": min(len(nodes), len(target.sources)),
            "connected": sum(1 for n in nodes if n.connected.is_set()),
            "live_at_end": live}


def big_body(size: int) -> tuple[bytes, bytes, bytes, int]:
    """A chat.completion JSON of ``size`` bytes: head, a 256 KiB filler piece repeated
    ``n`` times, tail."""
    head = b'{"id":"chatcmpl-big","object":"chat.completion","model":"hostile-big",' \
        b'"choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant",' \
        b'"content":"'
    tail = b'"}}],"usage":{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}}'
    piece = b"a" * (256 * 1024)
    return head, piece, tail, max(1, (size - len(head) - len(tail)) // len(piece))


async def attack_big_answers(target: Target) -> dict[str, Any]:
    """Nodes answering every non-streamed request with a huge body, many at once."""
    scale = target.scale
    head, piece, tail, pieces = big_body(scale.big_bytes)
    sent = Counter[str]()

    async def answer(stream: InboundStream) -> None:
        await stream.read_body(1 << 20)
        await stream.respond(200, {"content-type": "application/json"})
        await stream.send(head)
        try:
            for _ in range(pieces):
                await stream.send(piece)
                sent["bytes"] += len(piece)
            await stream.send(tail)
        except TunnelLost:
            sent["cut"] += 1
            raise
        await stream.end({"usage": {"prompt_tokens": 10, "completion_tokens": 10,
                                    "total_tokens": 20}, "finish_reason": "stop"})
        sent["complete"] += 1

    models = [{"id": "hostile-big", "max_concurrency": 8}]
    nodes = [HostileNode(target, models, answer=answer) for _ in range(scale.big_nodes)]
    statuses = Counter[str]()
    received: list[int] = []
    async with target.client(timeout=120, limits=httpx.Limits(max_connections=64)) as client:

        async def ask() -> None:
            size = 0
            try:
                async with client.stream("POST", "/v1/chat/completions", json={
                        "model": "hostile-big", "stream": False,
                        "messages": [{"role": "user", "content": "a big one"}]}) as reply:
                    async for chunk in reply.aiter_raw():
                        size += len(chunk)
                statuses[str(reply.status_code)] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            received.append(size)

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.stay)
            with trio.move_on_after(30):
                for node in nodes:
                    await node.connected.wait()
            await trio.sleep(0.5)
            ready()
            with trio.move_on_after(max(scale.seconds, 60)):
                for _ in range(scale.big_rounds):
                    async with trio.open_nursery() as round_:
                        for _ in range(scale.big_parallel):
                            round_.start_soon(ask)
            for node in nodes:
                node.abort()
            nursery.cancel_scope.cancel()
    return {"nodes": len(nodes), "sources": min(len(nodes) + 1, len(target.sources)),
            "answer_mb": round(scale.big_bytes / MIB, 1),
            "requests": sum(statuses.values()), "statuses": dict(statuses),
            "client_received_mb": round(sum(received) / MIB, 1),
            "node_sent_mb": round(sent["bytes"] / MIB, 1),
            "answers_completed_by_nodes": sent["complete"], "answers_cut": sent["cut"]}


async def read_head(stream: trio.SocketStream, limit: float
                    ) -> tuple[int | None, bytes, bytes]:
    """The status of the response on ``stream``, its head and what came after the head
    (status None if the connection closed, or ``limit`` passed, before a whole head)."""
    data = bytearray()
    with trio.move_on_after(limit):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    try:
        return int(head.split(b"\r\n", 1)[0].split(b" ", 2)[1]), head, rest
    except (IndexError, ValueError):
        return None, head, rest


async def attack_idle_and_slowloris(target: Target) -> dict[str, Any]:
    """Idle connections and slowloris connections, held until the gateway closes them."""
    scale = target.scale
    closed: dict[str, list[float]] = {"idle": [], "slowloris": []}
    statuses = Counter[str]()
    opened = Counter[str]()
    failed = Counter[str]()
    all_tried = trio.Event()
    began = time.monotonic()

    limiter = trio.CapacityLimiter(200)  # connects in flight at once

    async def hold(kind: str, source: str) -> None:
        try:
            async with limiter:
                stream = await trio.open_tcp_stream("127.0.0.1", target.port,
                                                    local_address=source)
        except OSError as exc:
            failed[type(exc).__name__] += 1
            if sum(opened.values()) + sum(failed.values()) == scale.idle + scale.slowloris:
                all_tried.set()
            return
        opened[kind] += 1
        if sum(opened.values()) + sum(failed.values()) == scale.idle + scale.slowloris:
            all_tried.set()
        start = time.monotonic()
        async with stream:
            async with trio.open_nursery() as nursery:
                if kind == "slowloris":
                    nursery.start_soon(trickle, stream)
                try:
                    status, _, _ = await read_head(stream, 3600)
                    # read the rest until the close
                    while await stream.receive_some(65536):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    status = None
                closed[kind].append(time.monotonic() - start)
                statuses[f"{kind} {status or 'no answer'}"] += 1
                nursery.cancel_scope.cancel()

    async def trickle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\n"
                                  b"host: 127.0.0.1\r\n")
            for i in range(1_000_000):
                await trio.sleep(0.5)
                await stream.send_all(b"x-slow-%d: y\r\n" % i)

    async with trio.open_nursery() as nursery:
        for kind, count in (("slowloris", scale.slowloris), ("idle", scale.idle)):
            for _ in range(count):
                nursery.start_soon(hold, kind, target.source())
        with trio.move_on_after(60):
            await all_tried.wait()
        opened_in = time.monotonic() - began
        ready()
        await trio.sleep(scale.seconds)
        nursery.cancel_scope.cancel()

    def times(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"min_s": round(min(values), 2), "p50_s": round(percentile(values, 0.5), 2),
                "max_s": round(max(values), 2)}

    return {"sources": len(target.sources), "opened": dict(opened),
            "connect_failed": dict(failed),
            "opening_took_s": round(opened_in, 2), "held_s": scale.seconds,
            "closed_by_gateway": {k: len(v) for k, v in closed.items()},
            "time_to_close": {k: times(v) for k, v in closed.items()},
            "answers": dict(statuses)}


def upgrade_request(port: int, token: str) -> bytes:
    """A tunnel upgrade request, as a node sends it."""
    key = base64.b64encode(os.urandom(16))
    return (f"GET {TUNNEL_PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            "upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n"
            f"sec-websocket-protocol: {SUBPROTOCOL}\r\nauthorization: Bearer {token}\r\n"
            ).encode() + b"sec-websocket-key: " + key + b"\r\n\r\n"


async def attack_handshake_flood(target: Target) -> dict[str, Any]:
    """Tunnel upgrades from one address as fast as possible: wrong token, or the right
    one and then silence."""
    scale = target.scale
    statuses: dict[str, Counter[str]] = {"wrong token": Counter(), "no HELLO": Counter()}
    held_closed: list[float] = []
    held_told: list[float] = []
    """When each held upgrade got the gateway's GOAWAY (a close may follow or not)."""
    held = 0
    max_held = 500

    async def keep(stream: trio.SocketStream) -> None:
        nonlocal held
        held += 1
        start, told = time.monotonic(), False
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                while chunk := await stream.receive_some(65536):
                    if not told and b'"code"' in chunk:  # the GOAWAY (never answered)
                        told = True
                        held_told.append(time.monotonic() - start)
        held_closed.append(time.monotonic() - start)  # closed (or reset) by the gateway
        held -= 1

    async def worker(kind: str, nursery: trio.Nursery) -> None:
        token = "wrong-token" if kind == "wrong token" else TOKEN
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", target.port,
                                                    local_address=HOSTILE_SOURCE)
            except OSError as exc:
                statuses[kind][type(exc).__name__] += 1
                await trio.sleep(0.01)
                continue
            try:
                await stream.send_all(upgrade_request(target.port, token))
                status, _, _ = await read_head(stream, 5)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                status = None
            statuses[kind][str(status or "no answer")] += 1
            if status == 101 and held < max_held:
                nursery.start_soon(keep, stream)
            else:
                await stream.aclose()

    ready()
    began = time.monotonic()
    async with trio.open_nursery() as nursery:
        for i in range(scale.handshake_workers):
            nursery.start_soon(worker, "wrong token" if i % 2 else "no HELLO", nursery)
        await trio.sleep(scale.seconds)
        nursery.cancel_scope.cancel()
    wall = time.monotonic() - began
    attempts = sum(sum(c.values()) for c in statuses.values())
    return {"sources": 1, "attempts": attempts, "per_second": round(attempts / wall, 1),
            "statuses": {k: dict(v) for k, v in statuses.items()},
            "held_got_goaway": len(held_told),
            "held_goaway_after_s": (round(percentile(held_told, 0.5), 2)
                                    if held_told else None),
            "held_then_closed_by_gateway": len(held_closed),
            "held_closed_after_s": (round(percentile(held_closed, 0.5), 2)
                                    if held_closed else None)}


def bad_requests(port: int, depth: int) -> dict[str, bytes]:
    """Raw requests a hostile client sends, by kind."""
    def post(headers: bytes, body: bytes) -> bytes:
        return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n"
                b"content-type: application/json\r\nconnection: close\r\n" % port
                + headers + b"\r\n" + body)

    nested = (b'{"model":"' + MODEL.encode() + b'","messages":' + b"[" * depth
              + b"]" * depth + b"}")
    small = b'{"model":"' + MODEL.encode() + b'","messages":[]}'
    return {
        "nested JSON": post(b"content-length: %d\r\n" % len(nested), nested),
        "content-length abc": post(b"content-length: abc\r\n", small),
        "content-length -1": post(b"content-length: -1\r\n", small),
        "content-length 1, 2": post(b"content-length: 1\r\ncontent-length: 2\r\n", small),
        "content-length 25 digits": post(b"content-length: " + b"9" * 25 + b"\r\n", small),
        "content-length > body": post(b"content-length: %d\r\n" % (len(small) + 10), small),
    }


def error_object(body: bytes) -> bool:
    """True if ``body`` is an OpenAI error object."""
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    return (isinstance(obj, dict) and isinstance(obj.get("error"), dict)
            and isinstance(obj["error"].get("message"), str))


async def exchange(port: int, request: bytes, limit: float, *, half_close: bool = False,
                   source: str | None = None) -> tuple[int | None, bytes]:
    """Send ``request`` on a new connection (from ``source``); the status and the whole
    body."""
    async with await trio.open_tcp_stream("127.0.0.1", port,
                                          local_address=source) as stream:
        await stream.send_all(request)
        if half_close:
            await stream.send_eof()
        status, head, rest = await read_head(stream, limit)
        if status is None:
            return None, rest
        body = bytearray(rest)
        with trio.move_on_after(limit):
            while chunk := await stream.receive_some(65536):
                body += chunk
    if b"transfer-encoding: chunked" in head.lower():
        with contextlib.suppress(ValueError, IndexError):
            return status, dechunk(bytes(body))
    return status, bytes(body)


async def attack_json_bombs(target: Target) -> dict[str, Any]:
    """Nested JSON and bad Content-Length, in a loop."""
    requests = bad_requests(target.port, 100_000)
    seen: dict[str, Counter[str]] = {kind: Counter() for kind in requests}

    async def worker(kinds: list[str]) -> None:
        while True:
            for kind in kinds:
                try:
                    status, body = await exchange(
                        target.port, requests[kind], 10, source=target.source(),
                        half_close=kind == "content-length > body")
                except OSError as exc:
                    seen[kind][type(exc).__name__] += 1
                    await trio.sleep(0.05)
                    continue
                shape = "error object" if error_object(body) else \
                    f"not JSON ({len(body)} bytes)"
                seen[kind][f"{status or 'no answer'} {shape}"] += 1

    ready()
    kinds = list(requests)
    with trio.move_on_after(target.scale.seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, kinds[:1])
            nursery.start_soon(worker, kinds[1:])
    return {"sources": len(target.sources), "answers": {k: dict(v) for k, v in seen.items()},
            "not_error_objects": sum(n for c in seen.values() for k, n in c.items()
                                     if "error object" not in k)}


LIES: dict[str, tuple[dict[str, float], dict[str, Any]]] = {
    "prompt 10**20": ({"input": 1.0, "output": 1.0},
                      {"prompt_tokens": 10**20, "completion_tokens": 8,
                       "total_tokens": 10**20 + 8}),
    "negative tokens": ({"input": 1.0, "output": 1.0},
                        {"prompt_tokens": -1_000_000, "completion_tokens": -1_000_000,
                         "total_tokens": -2_000_000}),
    "negative prices": ({"input": -1e6, "output": -1e6},
                        {"prompt_tokens": -1_000_000, "completion_tokens": -1_000_000,
                         "total_tokens": -2_000_000}),
    "completion >> max_tokens": ({"input": 1.0, "output": 1.0},
                                 {"prompt_tokens": 10, "completion_tokens": 10**9,
                                  "total_tokens": 10**9 + 10}),
    "float tokens": ({"input": 1.0, "output": 1.0},
                     {"prompt_tokens": 1e30, "completion_tokens": 0.5,
                      "total_tokens": 1e30}),
}
"""Lie → (the prices its node advertises, the usage it reports)."""


def lie_model(lie: str) -> str:
    """The model id the node telling ``lie`` serves."""
    return "lie-" + re.sub(r"[^a-z0-9]+", "-", lie).strip("-")


async def attack_usage_lies(target: Target) -> dict[str, Any]:
    """One node per lie, a few requests to each; the request ids go to the parent,
    which reads their ledger rows."""
    def answer_with(usage: dict[str, Any]) -> Answer:
        async def answer(stream: InboundStream) -> None:
            await stream.read_body(1 << 20)
            await stream.respond(200, {"content-type": "application/json"})
            await stream.send(json.dumps({
                "id": "chatcmpl-lie", "object": "chat.completion",
                "model": stream.meta.get("model"), "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}]}).encode())
            await stream.end({"usage": usage, "finish_reason": "stop"})
        return answer

    nodes = {lie: HostileNode(target, [{"id": lie_model(lie), "price": price}],
                              answer=answer_with(usage))
             for lie, (price, usage) in LIES.items()}
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for node in nodes.values():
            nursery.start_soon(node.stay)
        with trio.move_on_after(15):
            for node in nodes.values():
                await node.connected.wait()
        await trio.sleep(0.5)
        ready()
        async with target.client(timeout=30) as client:
            for lie in LIES:
                sent: list[dict[str, Any]] = []
                for _ in range(target.scale.lies_repeat):
                    try:
                        reply = await client.post("/v1/chat/completions", json={
                            "model": lie_model(lie), "max_tokens": 16,
                            "messages": [{"role": "user", "content": "how much?"}]})
                        sent.append({"status": reply.status_code,
                                     "request_id": reply.headers.get("x-request-id")})
                    except httpx.HTTPError as exc:
                        sent.append({"status": type(exc).__name__, "request_id": None})
                results[lie] = {"node": nodes[lie].id, "requests": sent}
        await trio.sleep(0.5)
        for lie, node in nodes.items():
            results[lie]["session"] = ("live" if node.session is not None
                                       and not node.session.closed.is_set()
                                       else node.outcome or "not connected")
            node.abort()
        nursery.cancel_scope.cancel()
    return {"sources": min(len(nodes) + 1, len(target.sources)), "lies": results}


ATTACKERS: dict[str, Callable[[Target], Awaitable[dict[str, Any]]]] = {
    "heartbeat-flood": attack_heartbeat_flood,
    "models-flood": attack_models_flood,
    "models-amplification": attack_models_amplification,
    "big-answers": attack_big_answers,
    "idle-and-slowloris": attack_idle_and_slowloris,
    "handshake-flood": attack_handshake_flood,
    "json-bombs": attack_json_bombs,
    "usage-lies": attack_usage_lies,
}


async def run_attacker(name: str, target: Target) -> None:
    """The attacker process: run one attack, print its result."""
    GOAWAYS.install()
    try:
        result = await ATTACKERS[name](target)
    except Exception as exc:  # reported, never a traceback the parent must parse
        result = {"attack_error": f"{type(exc).__name__}: {exc}"[:300]}
    print("RESULT " + json.dumps(result, default=str), flush=True)


# ===================================================================== measuring


@dataclass
class Probe:
    """Normal requests to the honest node, as a client sees them."""

    plain_ms: list[float] = field(default_factory=list)
    stream_ms: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def all_ms(self) -> list[float]:
        """Every successful request's latency."""
        return self.plain_ms + self.stream_ms

    def summary(self) -> dict[str, Any]:
        """Percentiles (ms) and failures."""
        def pct(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            return {"n": len(values), "p50": round(percentile(values, 0.5), 2),
                    "p99": round(percentile(values, 0.99), 2), "max": round(max(values), 2)}

        return {"all": pct(self.all_ms), "non_stream": pct(self.plain_ms),
                "stream": pct(self.stream_ms), "failures": dict(self.failures)}


def normal_body(stream: bool) -> dict[str, Any]:
    """A small chat completion for the honest node."""
    return {"model": MODEL, "stream": stream, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello there"}]}


async def normal_request(client: httpx.AsyncClient, stream: bool, probe: Probe
                         ) -> str | None:
    """One normal request; its latency goes into ``probe``. Returns its request id if
    the whole answer arrived with 200."""
    began = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions",
                                 json=normal_body(stream)) as reply:
            body = b"".join([chunk async for chunk in reply.aiter_raw()])
    except httpx.HTTPError as exc:
        probe.failures[type(exc).__name__] += 1
        await trio.sleep(0.05)  # a dead gateway refuses at once: do not spin
        return None
    elapsed = (time.perf_counter() - began) * 1000
    if reply.status_code != 200:
        probe.failures[f"HTTP {reply.status_code}"] += 1
        return None
    if stream and b"[DONE]" not in body:
        probe.failures["stream without [DONE]"] += 1
        return None
    (probe.stream_ms if stream else probe.plain_ms).append(elapsed)
    return reply.headers.get("x-request-id")


async def probe_until(client: httpx.AsyncClient, probe: Probe, done: trio.Event,
                      limit: int | None = None) -> None:
    """Sequential normal requests, non-streamed and streamed in turn, until ``done`` is
    set (or ``limit`` requests)."""
    sent = 0
    while not done.is_set() and (limit is None or sent < limit):
        await normal_request(client, sent % 2 == 1, probe)
        sent += 1


@dataclass
class Watch:
    """The gateway process during one attack."""

    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_after_kib: int = 0
    hwm_kib: int = 0
    cpu_s: float = 0.0
    cpu_last: float = 0.0
    """The gateway's CPU seconds at the last sample (kept when it dies)."""
    wall_s: float = 0.0
    died_after_s: float | None = None
    exit_code: int | None = None
    honest_checks: int = 0
    honest_missing: int = 0
    """Checks of ``/admin/v1/peers`` that did not show the honest node live."""
    admin_failed: int = 0
    """Checks that got no answer in 10 s."""


async def watch_gateway(gateway: Child, client: httpx.AsyncClient, watch: Watch,
                        done: trio.Event) -> None:
    """Sample RSS every 50 ms and the honest node's registration every 2 s until
    ``done``; note the gateway's death."""
    began = time.monotonic()

    async def memory() -> None:
        while not done.is_set():
            if gateway.proc.poll() is not None:
                if watch.died_after_s is None:
                    watch.died_after_s = round(time.monotonic() - began, 2)
                    watch.exit_code = gateway.proc.returncode
                return
            watch.rss_peak_kib = max(watch.rss_peak_kib, proc_status_kib(gateway.pid, "VmRSS"))
            watch.cpu_last = cpu_seconds(gateway.pid) or watch.cpu_last
            await trio.sleep(0.05)

    async def honest() -> None:
        while not done.is_set() and gateway.proc.poll() is None:
            watch.honest_checks += 1
            try:
                with trio.fail_after(10):
                    peers = await admin_peers(client)
                if not any(p["id"] == HONEST and p["state"] == "live" for p in peers):
                    watch.honest_missing += 1
            except (httpx.HTTPError, KeyError, ValueError, trio.TooSlowError):
                watch.admin_failed += 1
            with trio.move_on_after(2):
                await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory)
        nursery.start_soon(honest)


@dataclass
class Row:
    """One attack's figures."""

    attack: str
    probe: dict[str, Any] = field(default_factory=dict)
    gateway: dict[str, Any] = field(default_factory=dict)
    attacker: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Stack:
    """A gateway and the honest node, started for one attack."""

    port: int
    root: Path
    children: Children
    gateway: Child
    node: Child

    @property
    def data_dir(self) -> Path:
        """The gateway's data directory (its usage ledger is there)."""
        return self.root / "gateway-data"


async def start_stack(root: Path, gateway_extra: str = "") -> Stack:
    """Start a gateway and the honest node; return once a normal request succeeds."""
    await trio.Path(root).mkdir(parents=True)
    children = Children(root)
    port = free_port()
    common = 'log_level = "warning"\ndrain_grace = 0.0\n'
    (root / "gateway.toml").write_text(
        common + toml_table("gateway", {"listen": f"127.0.0.1:{port}", "join_token": TOKEN})
        + gateway_extra)
    (root / "node.toml").write_text(
        common + toml_table("node", {"id": HONEST, "join_token": TOKEN, "reconnect_max": 0.5,
                                     "peers": [f"ws://127.0.0.1:{port}"]})
        + toml_table("[[node.backends]]", {"type": "simulated", "max_concurrency": 64})
        + toml_table("node.backends.options", {"tokens": 8}))
    gateway = children.start("gateway", [
        sys.executable, "-m", "tooti", "run", "--role", "gateway",
        "--config", str(root / "gateway.toml"), "--data-dir", str(root / "gateway-data")])
    node = children.start("node", [
        sys.executable, "-m", "tooti", "run", "--role", "node",
        "--config", str(root / "node.toml"), "--data-dir", str(root / "node-data")])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            with trio.fail_after(60):
                while not await normal_request(client, False, Probe()):
                    for child in (gateway, node):
                        if child.proc.poll() is not None:
                            raise RuntimeError(f"{child.name} exited at start: {child.tail(1)}")
                    await trio.sleep(0.1)
    except BaseException:
        children.stop_all()
        raise
    return Stack(port, root, children, gateway, node)


def log_summary(text: str) -> dict[str, Any]:
    """What the gateway logged during an attack: line count, tracebacks, the commonest
    message shapes (numbers and ids blanked)."""
    lines = text.splitlines()
    shapes = Counter(
        re.sub(r"tooti-[a-z0-9]+|\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "#", line.split(" ", 2)[-1])[:120]
        for line in lines if line.strip() and not line.startswith((" ", "\t")))
    return {"lines": len(lines),
            "tracebacks": text.count("Traceback (most recent call last)"),
            "commonest": [f"{n}x {shape}" for shape, n in shapes.most_common(3)]}


def rss_mb(kib: int) -> float:
    """KiB as MB (2^20 bytes), one decimal."""
    return round(kib / 1024, 1)


async def start_retrying(root: Path, gateway_extra: str = "") -> Stack:
    """:func:`start_stack`, up to three times (a free port may be taken before the
    gateway binds it)."""
    for attempt in range(3):
        try:
            return await start_stack(root.with_name(f"{root.name}-{attempt}"), gateway_extra)
        except (RuntimeError, trio.TooSlowError) as exc:
            problem = exc
    raise RuntimeError(f"could not start the gateway: {problem}"[:200])


async def measure(name: str, scale: Scale, root: Path, self_path: Path,
                  progress: Callable[[str], None]) -> Row:
    """Run one attack against a fresh gateway; never raises for what the attack did."""
    row = Row(name)
    extra = toml_table("billing", {"plugins": []}) if name == "no-ledger" else ""
    stacks: list[Stack] = []
    try:
        stacks.append(await start_retrying(root / name, extra))
        if name == "no-ledger":  # and one as shipped, to compare with
            stacks.append(await start_retrying(root / "with-ledger"))
        await attack_on(stacks[0], name, scale, self_path, row,
                        compare=stacks[1] if len(stacks) > 1 else None)
    except RuntimeError as exc:
        row.notes.append(str(exc))
    finally:
        for stack in stacks:
            stack.children.stop_all()
    progress(f"{name} ({time.strftime('%H:%M:%S')}): {one_line(row)}"
             + (f"; cut by: {cut_by(row)}" if name in ATTACKERS else ""))
    return row


async def interleave(clients: Sequence[httpx.AsyncClient], probes: Sequence[Probe],
                     rounds: int) -> None:
    """``rounds`` normal requests to each client, the clients in random order each
    round (non-streamed and streamed in turn)."""
    rng = random.Random(7)
    order = list(range(len(clients)))
    for sent in range(rounds):
        rng.shuffle(order)
        for index in order:
            await normal_request(clients[index], sent % 2 == 1, probes[index])


async def attack_on(stack: Stack, name: str, scale: Scale, self_path: Path, row: Row,
                    compare: Stack | None = None) -> None:
    """Measure normal requests (and the gateway) while ``name`` runs (with
    ``compare``: alternating between the two gateways)."""
    gateway = stack.gateway
    base = f"http://127.0.0.1:{stack.port}"
    watch = Watch(rss_before_kib=proc_status_kib(gateway.pid, "VmRSS"))
    log_from = len(gateway.log())
    probe = Probe()
    done = trio.Event()
    timeout = httpx.Timeout(scale.request_timeout)
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as client, \
            httpx.AsyncClient(base_url=base, timeout=timeout) as admin:
        for _ in range(10):  # warm-up, not recorded
            await normal_request(client, False, Probe())
        attacker: Child | None = None
        if name in ATTACKERS:
            attacker = stack.children.start("attacker", [
                sys.executable, str(self_path), "--attacker", name, "--port", str(stack.port),
                "--scale", json.dumps(asdict(scale))])
            try:
                await wait_for_log(attacker, r"(?m)^READY$", limit=120)
            except RuntimeError as exc:
                row.notes.append(f"attack never got going: {str(exc).splitlines()[0]}")
        cpu_before, began = cpu_seconds(gateway.pid), time.monotonic()
        attacker_cpu = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_gateway, gateway, admin, watch, done)
            if name == "models-amplification":
                nursery.start_soon(measure_listings, admin, row, done)
            if name == "kill-9":
                await kill_under_load(stack, scale, client, probe, row)
            elif compare is not None:
                other = Probe()
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{compare.port}",
                                             timeout=timeout) as second:
                    for _ in range(10):
                        await normal_request(second, False, Probe())
                    await interleave([client, second], [probe, other], scale.requests)
                row.extra["as_shipped"] = other.summary()
            elif attacker is None:
                await probe_until(client, probe, done, scale.requests)
            else:
                nursery.start_soon(probe_until, client, probe, done)
                with trio.move_on_after(scale.seconds + 180):
                    while attacker.proc.poll() is None:
                        attacker_cpu = cpu_seconds(attacker.pid) or attacker_cpu
                        await trio.sleep(0.1)
            done.set()
        watch.wall_s = time.monotonic() - began
        watch.cpu_s = (cpu_seconds(gateway.pid) or watch.cpu_last) - cpu_before
        if attacker is not None:
            found = re.findall(r"(?m)^RESULT (.*)$", attacker.log())
            row.attacker = json.loads(found[-1]) if found else {
                "attack_error": "no result: " + attacker.tail(3)}
            if attacker_cpu:
                row.attacker["attacker_cpu_s"] = round(attacker_cpu, 2)
        if gateway.proc.poll() is None and name != "kill-9":
            await trio.sleep(scale.settle)  # what is left once the attack is over
            watch.rss_after_kib = proc_status_kib(gateway.pid, "VmRSS")
            watch.hwm_kib = proc_status_kib(gateway.pid, "VmHWM")
        if name == "usage-lies":
            await read_lies(stack, row, scale)
    if watch.died_after_s is None and gateway.proc.poll() is not None and name != "kill-9":
        watch.died_after_s, watch.exit_code = round(watch.wall_s, 2), gateway.proc.returncode
    row.probe = probe.summary()
    row.gateway = {
        "rss_before_mb": rss_mb(watch.rss_before_kib), "rss_peak_mb": rss_mb(watch.rss_peak_kib),
        "rss_after_mb": rss_mb(watch.rss_after_kib), "vm_hwm_mb": rss_mb(watch.hwm_kib),
        "cpu_s": round(watch.cpu_s, 2), "wall_s": round(watch.wall_s, 2),
        "cpu_share": round(watch.cpu_s / watch.wall_s, 2) if watch.wall_s else None,
        "died_after_s": watch.died_after_s, "exit_code": watch.exit_code,
        "honest_checks": watch.honest_checks, "honest_not_live": watch.honest_missing,
        "admin_no_answer": watch.admin_failed}
    row.log = log_summary(gateway.log()[log_from:])


async def measure_listings(client: httpx.AsyncClient, row: Row, done: trio.Event) -> None:
    """Time and size of the listings a crowd of models makes expensive, measured up to
    three times while the attack lasts."""
    timings: dict[str, list[tuple[float, int]]] = {}
    listed = 0
    for _ in range(3):
        for path in ("/v1/models", "/metrics", "/admin/v1/peers"):
            began = time.perf_counter()
            try:
                reply = await client.get(path, timeout=120)
                size = len(reply.content)
                if path == "/v1/models":
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        listed = max(listed, len(reply.json()["data"]))
            except httpx.HTTPError:
                size = -1
            timings.setdefault(path, []).append(
                (round((time.perf_counter() - began) * 1000, 1), size))
        with trio.move_on_after(1):
            await done.wait()
        if done.is_set():
            break
    row.extra["listings"] = {path: {"ms": [t for t, _ in v], "bytes": max(b for _, b in v)}
                             for path, v in timings.items()}
    row.extra["models_listed"] = listed


def ledger_rows(data_dir: Path, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The usage rows of ``request_ids`` (the ledger opened read-only)."""
    path = data_dir / "usage.sqlite3"
    if not path.exists() or not request_ids:
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        found: dict[str, dict[str, Any]] = {}
        ids = list(request_ids)
        for at in range(0, len(ids), 500):
            chunk = ids[at:at + 500]
            marks = ",".join("?" * len(chunk))
            for r in db.execute(f"SELECT * FROM usage WHERE request_id IN ({marks})", chunk):
                found[r["request_id"]] = dict(r)
        return found
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def quarantined(data_dir: Path) -> int | None:
    """Rows in the ledger's quarantine table (None if it has none)."""
    path = data_dir / "usage.sqlite3"
    with contextlib.suppress(sqlite3.Error):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            count: int = db.execute("SELECT COUNT(*) FROM usage_quarantine").fetchone()[0]
            return count
        finally:
            db.close()
    return None


async def read_lies(stack: Stack, row: Row, scale: Scale) -> None:
    """The ledger rows of the lies' requests, once written (or after a wait), and
    whether the gateway survived writing them."""
    lies = row.attacker.get("lies", {})
    ids = [r["request_id"] for lie in lies.values() for r in lie["requests"]
           if r["request_id"] and r["status"] == 200]  # the ones the client saw complete
    rows: dict[str, dict[str, Any]] = {}
    with trio.move_on_after(max(12.0, scale.seconds)):  # the old ledger wrote every ~10 s
        while len(rows) < len(ids) and stack.gateway.proc.poll() is None:
            rows = ledger_rows(stack.data_dir, ids)
            await trio.sleep(0.25)
    await trio.sleep(0.5)
    rows = ledger_rows(stack.data_dir, ids)
    for lie in lies.values():
        lie["ledger"] = [
            {k: rows[r["request_id"]][k] for k in ("prompt_tokens", "completion_tokens",
                                                  "price_input", "price_output", "cost",
                                                  "estimated", "status")}
            if r["request_id"] in rows else "no row"
            for r in lie["requests"]]
    row.extra["gateway_alive_after_ledger_wait"] = stack.gateway.proc.poll() is None
    row.extra["quarantined_rows"] = quarantined(stack.data_dir)
    with trio.move_on_after(60):
        usage = await trio.run_process(
            [sys.executable, "-m", "tooti", "usage", "--data-dir", str(stack.data_dir),
             "--by", "node"], capture_stdout=True, capture_stderr=True, check=False)
        row.extra["tooti_usage"] = (usage.stdout or usage.stderr).decode().strip()


async def kill_under_load(stack: Stack, scale: Scale, client: httpx.AsyncClient,
                          probe: Probe, row: Row) -> None:
    """Clients at once for a while, the gateway SIGKILLed while they run; then how many
    answers the clients received whole are missing from the ledger."""
    completed: list[str] = []
    gateway = stack.gateway

    async def worker(index: int) -> None:
        sent = index
        while gateway.proc.poll() is None:
            request_id = await normal_request(client, sent % 2 == 1, probe)
            if request_id:
                completed.append(request_id)
            sent += 1

    async with trio.open_nursery() as nursery:
        for index in range(scale.kill_clients):
            nursery.start_soon(worker, index)
        await trio.sleep(scale.seconds)
        failures_before = Counter(probe.failures)
        os.kill(gateway.pid, signal.SIGKILL)
        killed_at = len(completed)
    await trio.to_thread.run_sync(gateway.proc.wait)
    cut = probe.failures - failures_before  # the requests in flight at the kill
    probe.failures = failures_before
    rows = ledger_rows(stack.data_dir, completed)
    missing = [rid for rid in completed if rid not in rows]
    row.extra["kill_9"] = {"clients": scale.kill_clients, "completed": len(completed),
                           "completed_before_kill": killed_at, "cut_by_the_kill": cut.total(),
                           "missing_from_ledger": len(missing)}


# ===================================================================== report


def one_line(row: Row) -> str:
    """The notes column: what matters most about one attack."""
    notes = list(row.notes)
    g, a, x = row.gateway, row.attacker, row.extra
    if g.get("cpu_share") is not None:
        notes.append(f"gateway CPU {g['cpu_share']:.0%}")
    if g.get("died_after_s") is not None and row.attack != "kill-9":
        notes.append(f"GATEWAY DIED after {g['died_after_s']} s (exit {g['exit_code']})")
    if row.probe.get("failures"):
        notes.append("normal failed: " + ", ".join(
            f"{n}x {k}" for k, n in row.probe["failures"].items()))
    if g.get("honest_not_live"):
        notes.append(f"honest not live in {g['honest_not_live']}/{g['honest_checks']} checks")
    if g.get("admin_no_answer"):
        notes.append(f"admin silent {g['admin_no_answer']}x")
    if "attack_error" in a:
        notes.append("attack error: " + a["attack_error"][:120])
    if row.attack == "handshake-flood":
        notes.append(f"from one address ({HOSTILE_SOURCE}) on purpose: tests the per-address "
                     "handshake and connection limits")
    elif a.get("sources"):
        notes.append(f"from {a['sources']} addresses")
    if row.attack in ("heartbeat-flood", "models-flood") and "sessions" in a:
        notes.append(f"{a['models_per_node']} models/node; {a['sessions']} hostile sessions, "
                     f"{a['cut_by_gateway']} cut (first after {a['first_cut_after_s']} s), "
                     f"{a['refused']} refused")
    if row.attack == "models-amplification" and "nodes" in a:
        listing = x.get("listings", {}).get("/v1/models", {})
        metrics = x.get("listings", {}).get("/metrics", {})
        notes.append(f"{a['connected']}/{a['nodes']} nodes x {a['models_per_node']} models "
                     f"({x.get('models_listed')} listed); "
                     f"/v1/models {max(listing.get('ms', [0]))} ms "
                     f"{max(0, listing.get('bytes', 0)) / MIB:.2f} MB; "
                     f"/metrics {max(metrics.get('ms', [0]))} ms")
    if row.attack == "big-answers" and "statuses" in a:
        notes.append(f"{a['requests']} x {a['answer_mb']} MB answers: {a['statuses']}; "
                     f"RSS {g['rss_before_mb']} -> peak {g['rss_peak_mb']} -> "
                     f"{g['rss_after_mb']} MB")
    if row.attack == "idle-and-slowloris" and "opened" in a:
        closed, times = a["closed_by_gateway"], a["time_to_close"]
        notes.append(f"opened {a['opened']}; closed idle {closed['idle']} "
                     f"(p50 {(times['idle'] or {}).get('p50_s')} s), slowloris "
                     f"{closed['slowloris']} (p50 {(times['slowloris'] or {}).get('p50_s')} s)")
    if row.attack == "handshake-flood" and "statuses" in a:
        notes.append(f"{a['attempts']} upgrades ({a['per_second']}/s): "
                     + "; ".join(f"{k} {v}" for k, v in a["statuses"].items()))
    if row.attack == "json-bombs" and "answers" in a:
        seen = Counter[str]()
        for counts in a["answers"].values():
            seen.update(counts)
        notes.append(f"{a['not_error_objects']} answers not error objects; "
                     + ", ".join(f"{n}x {k}" for k, n in seen.most_common(4)))
    if row.attack == "usage-lies" and "lies" in a:
        notes.append("alive after ledger write" if x.get("gateway_alive_after_ledger_wait")
                     else "gateway gone after the ledger write")
        for lie, info in a["lies"].items():
            statuses = ", ".join(f"{n}x {k}" for k, n in
                                 Counter(str(r["status"]) for r in info["requests"]).items())
            billed = [f"{e['prompt_tokens']}+{e['completion_tokens']} tokens cost {e['cost']:.3g}"
                      for e in info.get("ledger", []) if isinstance(e, dict)]
            notes.append(f"{lie}: {statuses}; billed {', '.join(billed) or 'nothing'}; "
                         f"node {'kept' if info['session'] == 'live' else 'cut'}")
    if row.attack == "no-ledger" and (x.get("as_shipped") or {}).get("all"):
        shipped, without = x["as_shipped"], row.probe
        parts = []
        for kind in ("non_stream", "stream"):
            if shipped.get(kind) and without.get(kind):
                parts.append(f"{kind.replace('_', '-')} {shipped[kind]['p50']} vs "
                             f"{without[kind]['p50']} ms")
        cost = shipped["all"]["p50"] - (without.get("all") or {}).get("p50", 0)
        notes.append(f"interleaved with a gateway as shipped, p50 with vs without the "
                     f"ledger: {', '.join(parts)}; durable usage costs {cost:+.2f} ms at p50")
    if row.attack == "kill-9" and "kill_9" in x:
        k = x["kill_9"]
        notes.append(f"{k['clients']} clients at once; {k['missing_from_ledger']} of "
                     f"{k['completed']} completed requests missing from the ledger "
                     f"({k['cut_by_the_kill']} cut by the kill)")
    if row.log.get("tracebacks"):
        notes.append(f"{row.log['tracebacks']} tracebacks in the gateway log")
    return "; ".join(notes) or "-"


def statuses_429(counts: dict[str, int]) -> int:
    """How many of ``counts`` (answer kind -> count) were a 429 (a per-address limit)."""
    return sum(n for kind, n in counts.items() if re.search(r"\b429\b", kind))


def cut_by(row: Row) -> str:
    """The cut-by column: what stopped the attacker, and how often a per-address limit
    (429) answered it."""
    a = row.attacker
    if row.attack not in ATTACKERS or not a or "attack_error" in a:
        return "-"
    if row.attack in ("heartbeat-flood", "models-flood"):
        reasons = "; ".join(f"{n}x {k}" for k, n in a.get("cut_reasons", {}).items())
        return (f"session closed by the gateway {a['cut_by_gateway']}/{a['sessions']}"
                f"{': ' + reasons if reasons else ''}; dials refused {a['refused']} "
                f"(429: {a.get('refused_429', 0)})")
    if row.attack == "models-amplification":
        cap = "; ".join(a["larger_counts"]) or "nothing: every model kept"
        return f"model cap: {cap}; {a['live_at_end']}/{a['nodes']} nodes live at the end"
    if row.attack == "big-answers":
        return (f"answers: {', '.join(f'{n}x {k}' for k, n in a['statuses'].items())}; "
                f"{a['answers_cut']} node streams cut; "
                f"{a['client_received_mb']} of {a['node_sent_mb']} MB sent reached clients; "
                f"429: {statuses_429(a['statuses'])}")
    if row.attack == "idle-and-slowloris":
        times = a["time_to_close"]
        answers = ", ".join(f"{n}x {k}" for k, n in sorted(a["answers"].items())) \
            or f"nothing within the attack's {a['held_s']} s"
        return (f"closed by the gateway: {answers} (idle after p50 "
                f"{(times['idle'] or {}).get('p50_s')} s, slowloris after p50 "
                f"{(times['slowloris'] or {}).get('p50_s')} s); "
                f"429: {statuses_429(a['answers'])}")
    if row.attack == "handshake-flood":
        total = sum(statuses_429(v) for v in a["statuses"].values())
        return (f"per-address limits: {total} of {a['attempts']} upgrades 429; "
                f"of the upgrades held without HELLO, {a.get('held_got_goaway')} got a "
                f"GOAWAY (p50 after {a.get('held_goaway_after_s')} s) and "
                f"{a['held_then_closed_by_gateway']} were closed by the gateway "
                f"(p50 after {a['held_closed_after_s']} s)")
    if row.attack == "json-bombs":
        seen = Counter[str]()
        for counts in a["answers"].values():
            seen.update(counts)
        return (f"each request refused: {', '.join(f'{n}x {k}' for k, n in seen.items())}; "
                f"429: {statuses_429(seen)}")
    if row.attack == "usage-lies":
        ends = Counter(str(info["session"])[:80] for info in a["lies"].values())
        refused = Counter(str(r["status"]) for info in a["lies"].values()
                          for r in info["requests"])
        return (f"lying nodes' sessions: {', '.join(f'{n}x {k}' for k, n in ends.items())}; "
                f"429: {statuses_429(refused)}")
    return "-"


def ratio(value: float | None, base: float | None) -> str:
    """``value`` as a multiple of ``base``."""
    return f"{value / base:.2f}" if value and base else "-"


def table(rows: list[Row]) -> str:
    """The Markdown table of every row."""
    base = next((r.probe.get("all") or {} for r in rows if r.attack == "baseline"), {})
    lines = ["| attack | normal p50 ms | normal p99 ms | x baseline p50 / p99 "
             "| gateway RSS peak MB | cut by | notes |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        stats = row.probe.get("all") or {}
        p50, p99 = stats.get("p50"), stats.get("p99")
        times = "-"
        if row.attack != "kill-9":  # its clients run at once: no like for like
            times = f"{ratio(p50, base.get('p50'))} / {ratio(p99, base.get('p99'))}"
        lines.append(f"| {row.attack} | {p50 if p50 is not None else '-'} | "
                     f"{p99 if p99 is not None else '-'} | {times} | "
                     f"{row.gateway.get('rss_peak_mb', '-')} | {cut_by(row)} | "
                     f"{one_line(row)} |")
    return "\n".join(lines)


async def run_all(attacks: list[str], scale: Scale, root: Path, self_path: Path,
                  progress: Callable[[str], None]) -> list[Row]:
    """Every chosen attack in turn, each against a fresh gateway (``self_path``: this
    script, started again for each attack)."""
    rows = []
    for name in attacks:
        began = time.monotonic()
        rows.append(await measure(name, scale, root, self_path, progress))
        rows[-1].extra["took_s"] = round(time.monotonic() - began, 1)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments; run the attacks (or, with ``--attacker``, be one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated attacks: " + ", ".join(ATTACKS))
    parser.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
    parser.add_argument("--seconds", type=float, help="duration of each attack (20; quick 2)")
    parser.add_argument("--requests", type=int, help="normal requests of the baseline (200)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any other size or count, e.g. amplification_nodes=100 or "
                        "big_bytes=20000000 (repeatable): " + ", ".join(
                            f.name for f in fields(Scale) if f.name not in ("seconds",
                                                                            "requests")))
    parser.add_argument("--json", action="store_true", help="print JSON (progress to stderr)")
    parser.add_argument("--keep", action="store_true", help="keep the logs (temp dir)")
    parser.add_argument("--attacker", choices=sorted(ATTACKERS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scale", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.attacker:
        raise_fd_limit(4096)
        target = Target(args.port, Scale(**json.loads(args.scale)))
        trio.run(run_attacker, args.attacker, target)
        return 0

    scale = QUICK if args.quick else Scale()
    for name in ("seconds", "requests"):
        if getattr(args, name) is not None:
            setattr(scale, name, getattr(args, name))
    kinds = {f.name: type(getattr(scale, f.name)) for f in fields(Scale)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in kinds:
            parser.error(f"--set: no size or count named {name!r}")
        try:
            setattr(scale, name, kinds[name](value))
        except ValueError:
            parser.error(f"--set {item}: not a {kinds[name].__name__}")
    attacks = ["baseline"]
    chosen = [a.strip() for a in (args.only or ",".join(ATTACKS)).split(",") if a.strip()]
    unknown = set(chosen) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    attacks += [a for a in ATTACKS if a in chosen and a != "baseline"]
    raise_fd_limit(scale.idle + scale.slowloris + 1024)
    out = sys.stderr if args.json else sys.stdout

    def progress(text: str) -> None:
        print(text, file=out, flush=True)

    root = Path(tempfile.mkdtemp(prefix="tooti-hostile-"))
    progress(f"tooti hostile-peer bench: {', '.join(attacks)}; load before: {load_average()}; "
             f"logs in {root}")
    try:
        with sigint_raises():
            rows = trio.run(exit_on_signals, run_all, attacks, scale, root,
                            Path(__file__).resolve(), progress)
    except BaseException as exc:
        code = interrupted(exc)
        if code is None:
            raise
        print(f"interrupted (exit {code})", file=sys.stderr)
        return code
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    progress(f"load after: {load_average()}")
    if args.json:
        print(json.dumps({"scale": asdict(scale), "rows": [asdict(r) for r in rows]},
                         indent=2, default=str))
    else:
        print()
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
