"""Fault tests with real processes: a gateway and nodes as separate `tooti run` children.

Each test starts a gateway process (port 0) and node processes with simulated
backends (see :mod:`tests.processes`), breaks something the way production
breaks — SIGKILL, SIGSTOP, a failing or stalling backend, a gateway restart —
and checks what the client and the usage ledger see. Waits are on log lines
(events); ``trio.fail_after`` bounds are hang guards only, never the thing
being measured, so the tests hold on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.processes import Cluster, Tooti, open_cluster
from tooti.billing.ledger import FILENAME

MODEL = "tooti-sim"
TOKENS = 6
FAST: dict[str, Any] = {"tokens": TOKENS}
"""A healthy node: answers at once."""
STALLED: dict[str, Any] = {"stall": 120.0}
"""A node whose backend hangs before its head for far longer than any test runs."""
SLOW_FIRST_TOKEN: dict[str, Any] = {"tokens": TOKENS, "ttft": 120.0}
"""A node that sends a stream's head at once but its first token only after 120 s
(a plain answer's head comes with the whole answer, so after 120 s too)."""
HEARTBEAT = 0.5
REQUEST_GUARD = 30.0
"""Hang guard for one request (each should take well under a second)."""


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A process cluster; children are killed (and their logs printed for pytest's
    failure report) when the test ends, however it ends."""
    async with open_cluster(tmp_path / "cluster", heartbeat_interval=HEARTBEAT,
                            reconnect_initial=0.1, reconnect_max=1.0) as processes:
        try:
            yield processes
        finally:
            print(processes.logs())


def chat(stream: bool, **extra: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"model": MODEL, "stream": stream,
            "messages": [{"role": "user", "content": "hello there"}], **extra}


def prefer(first: str, fallback: str) -> dict[str, Any]:
    """Routing preferences: try ``first``, and only ``fallback`` after it."""
    return {"provider": {"order": [first, fallback], "only": [first, fallback]}}


@dataclass
class Answer:
    """What a client saw for one request."""

    status: int
    headers: httpx.Headers
    body: bytes = b""
    events: list[str] = field(default_factory=list)
    """SSE ``data:`` payloads (streams)."""

    @property
    def node(self) -> str | None:
        """The node that served it (``x-tooti-node``)."""
        return self.headers.get("x-tooti-node")

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    def tokens(self) -> list[str]:
        """The content pieces of a stream, or the one message of a plain answer."""
        if not self.events:
            return [self.json()["choices"][0]["message"]["content"]]
        out = []
        for event in self.events:
            if event == "[DONE]":
                continue
            data = json.loads(event)
            for choice in data.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    out.append(choice["delta"]["content"])
        return out


async def send(http: httpx.AsyncClient, body: dict[str, Any],
               on_event: Callable[[Answer], None] | None = None) -> Answer:
    """POST a chat completion; read the whole answer (SSE events for a 200 stream,
    calling ``on_event`` after each)."""
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        answer = Answer(response.status_code, response.headers)
        if body.get("stream") and response.status_code == 200:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    answer.events.append(line[len("data: "):])
                    if on_event is not None:
                        on_event(answer)
        else:
            answer.body = await response.aread()
    return answer


def is_error_object(value: Any) -> bool:
    """True for an OpenAI error object ``{"error": {"message", "type", "code", ...}}``."""
    if not isinstance(value, dict) or not isinstance(value.get("error"), dict):
        return False
    error = value["error"]
    return (isinstance(error.get("message"), str) and bool(error["message"])
            and isinstance(error.get("type"), str) and "code" in error)


def assert_complete(answer: Answer, node: str) -> None:
    """A 200 from ``node`` with every token and, for a stream, a clean end."""
    assert answer.status == 200, answer.body
    assert answer.node == node
    if answer.events:
        assert answer.events[-1] == "[DONE]"
        assert not any('"error"' in event for event in answer.events)
        assert len(answer.tokens()) == TOKENS
    else:
        assert answer.json()["choices"][0]["message"]["content"].count("tok") == TOKENS


async def expect_log(tooti: Tooti, text: str, times: int = 1) -> None:
    """Wait until ``text`` has appeared ``times`` times in a child's log (the log
    travels through a pipe, so it may trail the HTTP answer a little)."""
    since = 0
    with trio.fail_after(REQUEST_GUARD):
        for _ in range(times):
            since = (await tooti.wait_for(re.escape(text), since)).end()


def client(cluster: Cluster) -> httpx.AsyncClient:
    """An HTTP client for the cluster's gateway (timeouts left to the hang guards)."""
    return httpx.AsyncClient(base_url=cluster.url, timeout=120,
                             limits=httpx.Limits(max_connections=64))


# ---------------------------------------------------------------- 1


async def test_node_killed_before_first_token_fails_over(cluster: Cluster) -> None:
    """SIGKILL the node holding two requests before any token (a stream whose head
    it has sent, a plain request still generating): both are served, whole, by
    the survivor."""
    gateway = await cluster.start_gateway()
    await cluster.start_nodes([("victim", SLOW_FIRST_TOKEN), ("survivor", FAST)])
    answers: dict[bool, Answer] = {}
    async with client(cluster) as http, trio.open_nursery() as nursery:
        async def ask(stream: bool) -> None:
            with trio.fail_after(REQUEST_GUARD):
                answers[stream] = await send(http, chat(stream, **prefer("victim", "survivor")))

        nursery.start_soon(ask, True)
        nursery.start_soon(ask, False)
        await cluster.wait_routed("victim", count=2)  # both are on the victim now
        assert await cluster.kill_node("victim") == -signal.SIGKILL
    for answer in answers.values():
        assert_complete(answer, "survivor")
    await expect_log(gateway, "node victim failed before the first token", times=2)


# ---------------------------------------------------------------- 2


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "freeze"])
async def test_node_lost_mid_stream_errors_in_band_and_bills_delivered_tokens(
    cluster: Cluster, fault: signal.Signals,
) -> None:
    """SIGKILL (or SIGSTOP: half-open, found by heartbeats) the node after a few
    tokens: the client gets an in-band error then [DONE], and the ledger bills
    exactly the tokens delivered, as failed_midstream."""
    await cluster.start_gateway()
    await cluster.start_node("streamer", {"tokens": 200, "tokens_per_second": 20.0})
    events: list[str] = []
    async with client(cluster) as http:
        with trio.fail_after(REQUEST_GUARD):
            async with http.stream("POST", "/v1/chat/completions", json=chat(True)) as response:
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[len("data: "):])
                    if len(events) == 3:
                        cluster.nodes["streamer"].signal(fault)
    assert events[-1] == "[DONE]"
    assert is_error_object(json.loads(events[-2])), events[-2]
    delivered = events[:-2]
    assert not any('"error"' in event for event in delivered)
    tokens = Answer(200, httpx.Headers(), events=delivered).tokens()
    assert 3 <= len(tokens) == len(delivered) < 200

    assert await cluster.stop_gateway() == 0
    row = read_ledger(cluster.gateway_data)[request_id]
    assert row["status"] == "failed_midstream"
    assert row["node_id"] == "streamer"
    assert row["completion_tokens"] == len(tokens)
    assert row["estimated"] == 1  # the node died before reporting usage

    usage = await trio.run_process(
        [sys.executable, "-m", "tooti", "usage", "--data-dir", str(cluster.gateway_data),
         "--by", "status"], capture_stdout=True)
    line = next(x for x in usage.stdout.decode().splitlines() if "failed_midstream" in x)
    assert line.split()[1:4] == ["1", str(row["prompt_tokens"]), str(len(tokens))]


# ---------------------------------------------------------------- 3


async def test_backend_errors_and_stall_fail_over(cluster: Cluster) -> None:
    """A backend answering 500, one answering 429 and one stalling past the gateway's
    first-token timeout: each request (plain and streamed) tried there first is
    served, whole, by the good node."""
    gateway = await cluster.start_gateway(first_byte_timeout=2.0)
    await cluster.start_nodes([
        ("good", FAST),
        ("http500", {"fail_rate": 1.0, "fail_status": 500}),
        ("http429", {"fail_rate": 1.0, "fail_status": 429}),
        ("stall", STALLED),
    ])
    answers: dict[tuple[str, bool], Answer] = {}
    async with client(cluster) as http, trio.open_nursery() as nursery:
        async def ask(bad: str, stream: bool) -> None:
            with trio.fail_after(REQUEST_GUARD):
                answers[bad, stream] = await send(http, chat(stream, **prefer(bad, "good")))

        for bad in ("http500", "http429", "stall"):
            for stream in (False, True):
                nursery.start_soon(ask, bad, stream)
    assert len(answers) == 6
    for answer in answers.values():
        assert_complete(answer, "good")
    await expect_log(gateway, "node http500 failed before the first token "
                     "(simulated failure (status 500))", times=2)
    await expect_log(gateway, "node http429 failed before the first token "
                     "(simulated failure (status 429))", times=2)
    await expect_log(gateway, "node stall failed before the first token "
                     "(node stall sent no token within 2s)", times=2)


# ---------------------------------------------------------------- 4


async def test_half_open_node_is_dropped_by_heartbeat_and_its_requests_fail_over(
    cluster: Cluster,
) -> None:
    """SIGSTOP a node holding two requests: its TCP connection stays up, but the
    gateway drops it after three silent heartbeat intervals and both requests
    fail over at once; after SIGCONT the node reconnects."""
    gateway = await cluster.start_gateway()
    await cluster.start_nodes([("frozen", STALLED), ("survivor", FAST)])
    frozen = cluster.nodes["frozen"]
    answers: dict[bool, Answer] = {}
    done = trio.Event()
    async with client(cluster) as http, trio.open_nursery() as nursery:
        async def ask(stream: bool) -> None:
            with trio.fail_after(REQUEST_GUARD):
                answers[stream] = await send(http, chat(stream, **prefer("frozen", "survivor")))
            if len(answers) == 2:
                done.set()

        nursery.start_soon(ask, True)
        nursery.start_soon(ask, False)
        await cluster.wait_routed("frozen", count=2)
        since = gateway.mark()
        frozen.signal(signal.SIGSTOP)
        stopped_at = trio.current_time()
        try:
            reason = (await cluster.wait_left("frozen", since)).group(1)
            dropped_after = trio.current_time() - stopped_at
            with trio.fail_after(10):  # "at once": nowhere near the 120 s stall
                await done.wait()
            answered_after = trio.current_time() - stopped_at
        finally:
            frozen.signal(signal.SIGCONT)
    print(f"half-open node dropped after {dropped_after:.2f}s, requests answered after "
          f"{answered_after:.2f}s (heartbeat {HEARTBEAT}s)")
    assert reason == "heartbeat timeout"
    assert gateway.search(rf"tunnel frozen: peer silent for {3 * HEARTBEAT:.1f}s", since)
    # Three intervals after its last heartbeat; the slack only absorbs a busy machine.
    assert dropped_after < 3 * HEARTBEAT + 3.0
    for answer in answers.values():
        assert_complete(answer, "survivor")
    await cluster.wait_registered("frozen", since=since)  # back after SIGCONT
    assert frozen.alive


# ---------------------------------------------------------------- 5


@pytest.mark.parametrize("fault", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "crash"])
async def test_gateway_restart_on_same_port_nodes_come_back(
    cluster: Cluster, fault: signal.Signals,
) -> None:
    """Stop (SIGTERM: drain) or crash (SIGKILL) the gateway, let the nodes back off
    to ``reconnect_max``, then start a new gateway on the same port: the same node
    processes reconnect within the backoff bound and serve the next requests."""
    await cluster.start_gateway()
    await cluster.start_nodes([("node-a", FAST), ("node-b", FAST)])
    port = cluster.port
    async with client(cluster) as http:
        with trio.fail_after(REQUEST_GUARD):
            assert (await send(http, chat(False))).status == 200
    marks = {node: cluster.nodes[node].mark() for node in ("node-a", "node-b")}
    assert cluster.gateway is not None
    cluster.gateway.signal(fault)
    assert await cluster.gateway.wait() == (0 if fault == signal.SIGTERM else -fault)

    # Wait until both nodes have doubled their re-dial delay up to the cap
    # (0.1, 0.2, 0.4, 0.8, then 1.0 s, each with jitter): the bound is what is tested.
    pauses: list[float] = []
    for node, since in marks.items():
        tooti = cluster.nodes[node]
        with trio.fail_after(REQUEST_GUARD):
            for _ in range(5):
                match = await tooti.wait_for(r"re-dialling ws://\S+ in ([\d.]+)s", since)
                pauses.append(float(match.group(1)))
                since = match.end()
    assert max(pauses) <= cluster.reconnect_max, pauses

    await cluster.start_gateway(port=port)
    assert cluster.port == port
    listening_at = trio.current_time()
    await cluster.wait_registered("node-a", "node-b")
    back_after = trio.current_time() - listening_at
    print(f"nodes back {back_after:.2f}s after the new gateway listened "
          f"(reconnect_max {cluster.reconnect_max}s; pauses {sorted(pauses)})")
    # The re-dial pause is at most reconnect_max; the slack absorbs a busy machine.
    assert back_after < cluster.reconnect_max + 4.0
    for node, since in marks.items():  # the same processes, on a new session
        tooti = cluster.nodes[node]
        with trio.fail_after(REQUEST_GUARD):
            await tooti.wait_for(rf"tunnel to ws://127\.0\.0\.1:{port}\S* closed", since)
            await tooti.wait_for(rf"connected to ws://127\.0\.0\.1:{port}/", since)
        assert tooti.alive
    async with client(cluster) as http:
        for stream in (False, True):
            with trio.fail_after(REQUEST_GUARD):
                answer = await send(http, chat(stream))
            assert answer.node in ("node-a", "node-b")
            assert_complete(answer, answer.node or "")


# ---------------------------------------------------------------- 6

STORM_REQUESTS = 200
STORM_CONCURRENCY = 16
KILL_AFTER = 40
"""Completed requests before the node is killed (as soon as a stream on it has begun)."""
AFTER_RESTART = 120
"""Requests from this index on start only once the killed node is back."""
SHARED: dict[str, Any] = {"tokens": TOKENS, "ttft": 0.02, "tokens_per_second": 15.0}
"""The one simulated config of every storm node (an answer takes ~0.35 s)."""
VICTIM = "n3"


@dataclass
class Tally:
    """Outcomes of the storm, as the clients saw them."""

    ok: int = 0
    http_errors: int = 0
    """Proper errors before any token: an OpenAI error object with an HTTP status."""
    in_band: int = 0
    """Proper errors after the first token: in-band ``data: {"error": ...}`` then [DONE]."""
    hangs: int = 0
    malformed: list[str] = field(default_factory=list)
    by_node: dict[str, int] = field(default_factory=dict)
    after_restart: dict[str, int] = field(default_factory=dict)
    """Successes, by node, of requests started once the killed node was back."""
    expected: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Request id → the ledger status and completion tokens the client's view implies."""

    @property
    def failed(self) -> int:
        """Every well-formed failure."""
        return self.http_errors + self.in_band


def judge(answer: Answer, stream: bool) -> str:
    """``ok``, ``http_error`` or ``in_band`` (well-formed errors), or what is malformed."""
    if answer.status != 200:
        try:
            body = answer.json()
        except ValueError:
            return f"HTTP {answer.status} with a non-JSON body {answer.body[:200]!r}"
        return "http_error" if answer.status >= 400 and is_error_object(body) else (
            f"HTTP {answer.status} {body!r}")
    if not stream:
        content = answer.json()["choices"][0]["message"]["content"]
        return "ok" if content.count("tok") == TOKENS else f"short answer {content!r}"
    if not answer.events or answer.events[-1] != "[DONE]":
        return f"stream not ended by [DONE]: {answer.events[-3:]}"
    errors = [i for i, event in enumerate(answer.events) if '"error"' in event]
    if not errors:
        return "ok" if len(answer.tokens()) == TOKENS else f"short stream {answer.events}"
    if errors != [len(answer.events) - 2] or not is_error_object(json.loads(answer.events[-2])):
        return f"bad in-band error: {answer.events[-3:]}"
    return "in_band"


def read_ledger(data_dir: Path) -> dict[str, sqlite3.Row]:
    """Every usage row of a stopped gateway's ledger, by request id."""
    db = sqlite3.connect(data_dir / FILENAME)
    try:
        db.row_factory = sqlite3.Row
        return {row["request_id"]: row for row in db.execute("SELECT * FROM usage")}
    finally:
        db.close()


async def test_storm_with_a_node_killed_and_restarted(cluster: Cluster) -> None:
    """200 requests (half streamed), 16 at a time, over 3 nodes while one node is
    SIGKILLed and restarted: each succeeds or fails properly, none hangs, the
    restarted node serves again, and the ledger agrees with what clients saw."""
    await cluster.start_gateway()
    await cluster.start_nodes([("n1", SHARED), ("n2", SHARED), (VICTIM, SHARED)])
    tally = Tally()
    next_index = 0
    completed = 0
    killed_enough = trio.Event()
    killed = trio.Event()
    back = trio.Event()

    async def one(http: httpx.AsyncClient, index: int) -> None:
        nonlocal completed
        stream = index % 2 == 1
        after = back.is_set()
        def kill_mid_stream(answer: Answer) -> None:
            # SIGKILL the victim the moment one of its streams has a token, so the
            # kill lands mid-stream (in-band errors) and not only between requests.
            if (len(answer.events) == 1 and answer.node == VICTIM
                    and killed_enough.is_set() and not killed.is_set()):
                killed.set()
                cluster.nodes[VICTIM].signal(signal.SIGKILL)

        try:
            with trio.fail_after(REQUEST_GUARD):
                answer = await send(http, chat(stream), kill_mid_stream)
        except trio.TooSlowError:
            tally.hangs += 1
            return
        except httpx.HTTPError as exc:
            tally.malformed.append(f"#{index}: {type(exc).__name__}: {exc}")
            return
        finally:
            completed += 1
            if completed >= KILL_AFTER:
                killed_enough.set()
        verdict = judge(answer, stream)
        request_id = answer.headers.get("x-request-id", f"missing-{index}")
        if verdict == "ok":
            tally.ok += 1
            node = answer.node or "?"
            tally.by_node[node] = tally.by_node.get(node, 0) + 1
            if after:
                tally.after_restart[node] = tally.after_restart.get(node, 0) + 1
            tally.expected[request_id] = ("ok", TOKENS)
        elif verdict == "http_error":
            tally.http_errors += 1
            tally.expected[request_id] = ("failed", 0)
        elif verdict == "in_band":
            tally.in_band += 1
            tally.expected[request_id] = ("failed_midstream", len(answer.events) - 2)
        else:
            tally.malformed.append(f"#{index} ({'stream' if stream else 'plain'}): {verdict}")

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < STORM_REQUESTS:
            index = next_index
            next_index += 1
            if index >= AFTER_RESTART:
                await back.wait()
            await one(http, index)

    async def chaos() -> None:
        assert cluster.gateway is not None
        since = cluster.gateway.mark()
        await killed.wait()
        assert await cluster.nodes[VICTIM].wait() == -signal.SIGKILL
        await cluster.wait_left(VICTIM, since)
        await cluster.restart_node(VICTIM)
        back.set()

    with trio.fail_after(120):
        async with client(cluster) as http, trio.open_nursery() as nursery:
            nursery.start_soon(chaos)
            for _ in range(STORM_CONCURRENCY):
                nursery.start_soon(worker, http)
    print(f"storm: {tally.ok} ok, {tally.failed} failed properly ({tally.http_errors} HTTP "
          f"errors, {tally.in_band} in-band), {tally.hangs} hung, {len(tally.malformed)} "
          f"malformed; served by {tally.by_node}; after the restart {tally.after_restart}")
    assert tally.malformed == []
    assert tally.hangs == 0
    assert tally.ok > 0
    assert tally.ok + tally.failed == STORM_REQUESTS
    assert tally.after_restart.get(VICTIM, 0) > 0  # the restarted node is back in rotation

    assert await cluster.stop_gateway() == 0
    ledger = read_ledger(cluster.gateway_data)
    assert len(ledger) == STORM_REQUESTS
    seen = {rid: (row["status"], row["completion_tokens"]) for rid, row in ledger.items()}
    assert seen == tally.expected
