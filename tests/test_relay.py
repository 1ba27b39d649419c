"""Relays over real sockets, in the test's trio run.

A real gateway (the ``network`` fixture), relays built the way ``tooti run --role
relay`` builds one (a :class:`~tooti.relay.role.RelayRole`: its own station on port 0,
without the API, plus the :class:`~tooti.relay.upstream.Upstream` dialling upstream), and
nodes dialling the relays over WebSocket. Raw-protocol tests drive
:class:`~tooti.protocol.connection.Connection` by hand over a real WebSocket.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.conftest import Network, simulated
from tests.spy import LIMIT, Spy, read_stream
from tests.upstream import SlowUpstream, start_upstream
from tooti.backends.base import Backend
from tooti.backends.openai import OpenAIBackend
from tooti.gateway.app import Gateway
from tooti.identity import Identity, b64, proof_message, unb64
from tooti.mesh.registry import Registry
from tooti.mesh.station import Station
from tooti.node.node import Node
from tooti.protocol.connection import (
    Connection,
    Limits,
    Side,
    StreamOpened,
    WelcomeReceived,
)
from tooti.relay import forwarding
from tooti.relay.role import RelayRole
from tooti.relay.upstream import Upstream
from tooti.runner import Process, serve
from tooti.settings import (
    BackendSettings,
    GatewaySettings,
    RelaySettings,
    Settings,
)
from tooti.transport.memory import memory_pair
from tooti.transport.websocket import SUBPROTOCOL, TUNNEL_PATH
from tooti.tunnel import OutboundStream, TunnelLost, TunnelSession

MODEL = "tooti-sim"


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    """A short chat completion request body."""
    return {"model": MODEL, "stream": stream, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello there"}], **extra}


def only(*node_ids: str) -> dict[str, Any]:
    """Routing preferences: these nodes, in this order, and no others."""
    return {"provider": {"order": list(node_ids), "only": list(node_ids)}}


# ---------------------------------------------------------------- relays and nodes


@dataclass
class RunningRelay:
    """A relay (listener + upstream dialer) running in the test's nursery."""

    relay: Upstream
    """The relay's upstream side (advertising, forwarding)."""
    listener: Station
    url: str
    """The listener's ``http://127.0.0.1:PORT``."""
    scope: trio.CancelScope
    stopped: trio.Event

    @property
    def id(self) -> str:
        """The relay's peer id."""
        return self.relay.id

    @property
    def registry(self) -> Registry:
        """The relay's own registry (the nodes and relays dialled into it)."""
        return self.listener.registry

    @property
    def tunnel_url(self) -> str:
        """The tunnel URL nodes (or other relays) dial."""
        return self.url.replace("http://", "ws://") + TUNNEL_PATH

    @property
    def listen(self) -> str:
        """``HOST:PORT`` it listens on (to restart a relay on the same port)."""
        return self.url.removeprefix("http://")

    async def kill(self) -> None:
        """Cancel the listener and the dialer at once (as if the process died)."""
        self.scope.cancel()
        with trio.fail_after(LIMIT):
            await self.stopped.wait()

    async def idle(self) -> None:
        """Wait until the relay forwards no stream."""
        with trio.fail_after(LIMIT):
            await self.relay.wait_idle()


async def start_relay(network: Network, relay_id: str, upstream: str | None = None,
                      listen: str = "127.0.0.1:0", **options: Any) -> RunningRelay:
    """Start a relay dialling ``upstream`` (the network's gateway by default), built as
    :func:`tooti.runner.serve` builds one; ``options`` are :class:`RelaySettings` keys."""
    settings = RelaySettings(peers=[upstream or network.tunnel_url], id=relay_id,
                             reconnect_initial=0.05, reconnect_max=0.5, **options)
    role = RelayRole(Settings(gateway=GatewaySettings(listen=listen), tunnel=network.tunnel,
                              relay=settings, drain_grace=0.5),
                     relay_id, Identity.generate())
    scope, stopped = trio.CancelScope(), trio.Event()

    async def run(task_status: trio.TaskStatus[str]) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    urls = await nursery.start(role.serve)
                    task_status.started(urls[0])
        finally:
            stopped.set()

    url = await network.nursery.start(run)
    return RunningRelay(role.upstream, role.station, url, scope, stopped)


async def start_node(network: Network, node_id: str, peers: list[str],
                     backends: list[Backend] | None = None, wait: bool = True,
                     **node_options: Any) -> Node:
    """Start a node dialling ``peers`` (killable with ``network.kill_node``), re-dialling
    quickly; by default wait (bounded) until the network's gateway can route to it."""
    options = {"reconnect_initial": 0.05, "reconnect_max": 0.5, **node_options}
    with trio.fail_after(LIMIT):
        return await network.add_node(backends, node_id, wait=wait, peers=peers, **options)


async def until(registry: Registry, condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition()`` holds, re-checked on every registry change."""
    with trio.fail_after(LIMIT):
        await registry.wait_until(condition)


async def finished(gateway: Gateway, request_id: str) -> dict[str, Any]:
    """The gateway's summary of ``request_id`` once its ``request.finished`` event is out."""
    bus = gateway.registry.bus
    done = trio.Event()

    def listener(event: Any) -> None:
        if event.kind == "request.finished" and event.data.get("request_id") == request_id:
            done.set()

    bus.listeners.append(listener)
    try:
        entry = bus.recent.get(request_id)
        if entry is None or entry.get("state") != "finished":
            with trio.fail_after(LIMIT):
                await done.wait()
    finally:
        bus.listeners.remove(listener)
    return bus.recent[request_id]


class LogEvent(logging.Handler):
    """Collects log records of one logger that contain ``text``; ``seen`` is set at the
    first one."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(logger)
        self.text = text
        self.seen = trio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.seen.set()

    def __enter__(self) -> LogEvent:
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


@pytest.fixture
async def relay(network: Network) -> AsyncIterator[RunningRelay]:
    """A relay in front of the network's gateway, connected upstream."""
    running = await start_relay(network, "relay-1")
    await until(network.gateway.registry, lambda: "relay-1" in network.gateway.registry.peers)
    yield running
    running.scope.cancel()


# ---------------------------------------------------------------- serving through a relay


async def test_log_lines_name_the_relay_and_the_route(network: Network) -> None:
    """A relay's own station logs on ``tooti.relay`` (not ``tooti.gateway``), and a node
    reached through it "joined via" the relay (not "joined from via")."""
    with LogEvent("tooti.relay", "relay listening on") as relay_log, \
            LogEvent("tooti.gateway", "listening on") as gateway_log:
        running = await start_relay(network, "relay-1")
    assert relay_log.messages == [f"relay listening on {running.url}"]
    assert gateway_log.messages == []
    await until(network.gateway.registry, lambda: "relay-1" in network.gateway.registry.peers)
    with LogEvent("tooti.gateway", "peer behind joined") as joined:
        await start_node(network, "behind", [running.tunnel_url])
        await until(network.gateway.registry,
                    lambda: "behind" in network.gateway.registry.peers)
    # the gateway's line (the relay's own registry logs it "from" the node's address)
    assert "peer behind joined via relay-1 (node)" in joined.messages
    assert not any("from via" in message for message in joined.messages)
    running.scope.cancel()


async def test_node_behind_a_relay_is_routable_and_served_through_the_hop(
    network: Network, relay: RunningRelay,
) -> None:
    await start_node(network, "behind", [relay.tunnel_url])
    registry = network.gateway.registry
    peer = registry.peers["behind"]
    assert (peer.role, peer.via, peer.hops) == ("node", relay.id, 1)
    assert peer.session is registry.peers[relay.id].session  # reached on the relay's tunnel
    assert peer.public_key == network.nodes[0].identity.public_key
    assert [p.id for p in registry.candidates(MODEL)] == ["behind"]
    assert relay.registry.peers["behind"].hops == 0  # direct at the relay

    async with network.client() as http:
        models = (await http.get("/v1/models")).json()
        plain = await http.post("/v1/chat/completions", json=chat())
        streamed, lines = await read_stream(http, chat(stream_options={"include_usage": True}))
        peers = {p["id"]: p for p in (await http.get("/admin/v1/peers")).json()["data"]}
    async with httpx.AsyncClient(base_url=relay.url) as http:
        on_relay = await http.get("/v1/models")
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-tooti-node"] == "behind"
    assert plain.json()["usage"]["completion_tokens"] == 4
    assert streamed.status_code == 200
    assert streamed.headers["x-tooti-node"] == "behind"
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 4
    assert (peers["behind"]["via"], peers["behind"]["hops"]) == (relay.id, 1)
    assert (peers[relay.id]["role"], peers[relay.id]["via"]) == ("relay", None)
    assert on_relay.status_code == 404  # a relay serves no API

    for response in (plain, streamed):
        summary = await finished(network.gateway, response.headers["x-request-id"])
        assert summary["status"] == "ok" and summary["node"] == "behind"
        assert summary["completion_tokens"] == 4 and summary["prompt_tokens"] == 2
        assert summary["estimated"] is False  # the node's own usage crossed the hop
    async with network.client() as http:
        metrics = (await http.get("/metrics")).text
    assert ('tooti_tokens_total{kind="completion",model="tooti-sim",node="behind"} 8.0'
            in metrics)
    await relay.idle()
    assert relay.relay.forwarder.forwarded_total == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_larger_than_the_window_crosses_the_hop_intact(
    network: Network, relay: RunningRelay, stream: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer of several flow-control windows outruns the upstream credit: the relay
    stops splicing and its forwarding task sends the rest, in order, as credit returns.

    The gateway takes no answer bytes until the splice has stopped (its streams' reads
    wait for that), so it grants no credit back meanwhile and the relay must run out of
    it, however fast the gateway would otherwise consume."""
    splices: list[forwarding._Splice] = []
    deactivated = trio.Event()
    active_slot: Any = vars(forwarding._Splice)["active"]  # the slot's descriptor

    class Recorded(forwarding._Splice):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            splices.append(self)

        @property
        def active(self) -> bool:
            return bool(active_slot.__get__(self))

        @active.setter
        def active(self, value: bool) -> None:
            active_slot.__set__(self, value)
            if not value:
                deactivated.set()

    read_data = OutboundStream.next_data

    async def gated(self: OutboundStream, limit: int) -> bytes | None:
        await deactivated.wait()
        return await read_data(self, limit)

    monkeypatch.setattr(forwarding, "_Splice", Recorded)
    monkeypatch.setattr(OutboundStream, "next_data", gated)
    # About 1 MiB either way (an SSE event per token is ~25 times a token's size): four
    # flow-control windows.
    tokens = 6_000 if stream else 150_000
    await start_node(network, "behind", [relay.tunnel_url],
                     backends=[simulated(tokens=tokens)])
    expected = "".join(f" tok{i}" for i in range(tokens))
    async with network.client() as http:
        if stream:
            response, lines = await read_stream(http, chat(max_tokens=tokens))
            assert lines[-1] == "data: [DONE]"
            content = "".join(
                json.loads(line[len("data: "):])["choices"][0]["delta"].get("content") or ""
                for line in lines[:-1])
        else:
            response = await http.post("/v1/chat/completions", json=chat(max_tokens=tokens))
            content = response.json()["choices"][0]["message"]["content"]
    assert response.status_code == 200 and response.headers["x-tooti-node"] == "behind"
    assert content == expected
    assert splices and not splices[-1].active  # the task took over from the splice
    await relay.idle()


@pytest.mark.parametrize("stream", [False, True])
async def test_request_body_larger_than_the_window_crosses_the_hop_intact(
    network: Network, relay: RunningRelay, stream: bool,
) -> None:
    spy = Spy(simulated())
    await start_node(network, "behind", [relay.tunnel_url], [spy.backend])
    words = (1 << 20) // 8 + 1
    prompt = " ".join(f"w{i:06d}" for i in range(words))  # 1 MiB, every byte placed
    assert len(prompt) > 4 * network.tunnel.initial_window
    async with network.client() as http:
        with trio.fail_after(LIMIT):
            if stream:
                response, lines = await read_stream(http, chat(
                    messages=[{"role": "user", "content": prompt}],
                    stream_options={"include_usage": True}))
                usage = json.loads(lines[-2][len("data: "):])["usage"]
            else:
                response = await http.post("/v1/chat/completions", json=chat(
                    messages=[{"role": "user", "content": prompt}]))
                usage = response.json()["usage"]
    assert response.status_code == 200
    assert response.headers["x-tooti-node"] == "behind"
    assert len(spy.requests) == 1
    assert spy.requests[0]["messages"] == [{"role": "user", "content": prompt}]
    assert len(spy.bodies[0]) > 1 << 20
    assert usage["prompt_tokens"] == words
    await relay.idle()


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_through_the_relay_cancels_the_backend(
    network: Network, relay: RunningRelay, nursery: trio.Nursery, stream: bool,
) -> None:
    upstream = SlowUpstream()
    url = await start_upstream(nursery, upstream)
    node = await start_node(network, "behind", [relay.tunnel_url],
                            [OpenAIBackend(BackendSettings(type="openai", url=url))])
    with trio.fail_after(LIMIT):
        await network.gateway.registry.wait_until(
            lambda: bool(network.gateway.registry.candidates("slow")))
    body = {"model": "slow", "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    async with network.client() as http:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["x-tooti-node"] == "behind"
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        break  # the first token came through the relay: walk away
        else:
            async with trio.open_nursery() as inner:
                inner.start_soon(lambda: http.post("/v1/chat/completions", json=body))
                with trio.fail_after(LIMIT):
                    await upstream.started.wait()
                inner.cancel_scope.cancel()  # the client gives up before any byte
    with trio.fail_after(5):
        await upstream.gone.wait()
    registry = network.gateway.registry
    await until(registry, lambda: registry.peers["behind"].total_in_flight() == 0)
    with trio.fail_after(5):
        await node.wait_idle()
    await relay.idle()


async def test_dead_node_and_dead_relay_leave_the_gateway_and_nodes_come_back(
    network: Network, relay: RunningRelay, autojump_clock: trio.testing.MockClock,
) -> None:
    """The re-dials after the relay comes back wait out their backoff on the autojump
    clock."""
    registry = network.gateway.registry
    await start_node(network, "first", [relay.tunnel_url])
    await start_node(network, "second", [relay.tunnel_url])
    assert {registry.peers[n].via for n in ("first", "second")} == {relay.id}

    network.kill_node("first")  # its tunnel to the relay closes
    await until(registry, lambda: "first" not in registry.peers)
    assert registry.peers["second"].via == relay.id
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json=chat())
    assert response.headers["x-tooti-node"] == "second"

    await relay.kill()  # listener and upstream dialer at once
    await until(registry, lambda: not registry.peers)  # the relay and every node behind it
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 503

    # A new relay on the same address: the node re-dials it and is routable again.
    again = await start_relay(network, "relay-2", listen=relay.listen)
    await until(registry, lambda: "second" in registry.peers
                and registry.peers["second"].via == "relay-2")
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.headers["x-tooti-node"] == "second"
    again.scope.cancel()


async def test_node_lost_behind_the_relay_before_its_head_fails_over(
    network: Network, relay: RunningRelay,
) -> None:
    """The node behind the relay dies holding a request (before any byte of the answer):
    the relay answers with a retryable error naming the loss and the gateway fails over."""
    spy = Spy(simulated(stall=120.0))
    await start_node(network, "doomed", [relay.tunnel_url], [spy.backend])
    await start_node(network, "direct", [network.tunnel_url])
    with LogEvent("tooti.gateway", "failed before the first token") as failover:
        async with network.client() as http, trio.open_nursery() as nursery:
            answers: list[httpx.Response] = []

            async def ask() -> None:
                with trio.fail_after(LIMIT):
                    answers.append(await http.post("/v1/chat/completions", json=chat(
                        **only("doomed", "direct"))))

            nursery.start_soon(ask)
            await spy.wait_until(lambda: len(spy.requests) == 1)
            network.kill_node("doomed")
    assert answers[0].status_code == 200
    assert answers[0].headers["x-tooti-node"] == "direct"
    assert failover.messages and "lost behind relay relay-1" in failover.messages[0], (
        failover.messages)
    await relay.idle()


async def test_node_lost_behind_the_relay_mid_stream_ends_the_stream_in_band(
    network: Network, relay: RunningRelay,
) -> None:
    await start_node(network, "streamer", [relay.tunnel_url],
                     [simulated(tokens=200, tokens_per_second=20.0)])
    events: list[str] = []
    async with network.client() as http:
        with trio.fail_after(LIMIT):
            async with http.stream("POST", "/v1/chat/completions",
                                   json=chat(stream=True, max_tokens=200)) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        if len(events) == 3:
                            network.kill_node("streamer")
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "lost behind relay relay-1" in error["message"], error
    assert 3 <= len(events) - 2 < 200
    summary = await finished(network.gateway, response.headers["x-request-id"])
    assert summary["status"] == "failed_midstream" and summary["node"] == "streamer"
    assert summary["completion_tokens"] == len(events) - 2
    await relay.idle()


async def test_relay_behind_a_relay_is_two_hops(network: Network, relay: RunningRelay) -> None:
    inner = await start_relay(network, "relay-inner", upstream=relay.tunnel_url)
    await start_node(network, "deep", [inner.tunnel_url])
    registry = network.gateway.registry
    assert (registry.peers["deep"].via, registry.peers["deep"].hops) == (relay.id, 2)
    assert "relay-inner" not in registry.peers  # a relay below a relay is not advertised
    middle = relay.registry.peers["deep"]
    assert (middle.via, middle.hops) == ("relay-inner", 1)
    async with network.client() as http:
        plain = await http.post("/v1/chat/completions", json=chat())
        streamed, lines = await read_stream(http, chat())
    assert plain.status_code == 200 and plain.headers["x-tooti-node"] == "deep"
    assert plain.json()["usage"]["completion_tokens"] == 4
    assert streamed.headers["x-tooti-node"] == "deep" and lines[-1] == "data: [DONE]"
    assert sum('"content"' in line for line in lines) == 4
    await relay.idle()
    await inner.idle()
    assert relay.relay.forwarder.forwarded_total == inner.relay.forwarder.forwarded_total == 2

    await inner.kill()  # the removal travels up through the first relay
    await until(registry, lambda: "deep" not in registry.peers)
    assert relay.id in registry.peers


@pytest.mark.parametrize("limit", ["max_streams", "max_streams_per_node"])
async def test_relay_stream_limit_fails_over_or_errors_without_hanging(
    network: Network, limit: str,
) -> None:
    options: dict[str, Any] = {limit: 1}
    relay = await start_relay(network, "narrow", **options)
    gate = trio.Event()
    spy = Spy(simulated(tokens=4), gate)
    await start_node(network, "held", [relay.tunnel_url], [spy.backend])
    await start_node(network, "direct", [network.tunnel_url])
    async with network.client() as http, trio.open_nursery() as nursery:
        first: list[tuple[httpx.Response, list[str]]] = []

        async def hold() -> None:
            with trio.fail_after(LIMIT):
                first.append(await read_stream(http, chat(**only("held"))))

        nursery.start_soon(hold)
        await spy.wait_until(lambda: len(spy.requests) == 1)  # the relay's one stream
        with trio.fail_after(LIMIT):
            second = await http.post("/v1/chat/completions", json=chat(**only("held", "direct")))
            third = await http.post("/v1/chat/completions", json=chat(**only("held")))
        gate.set()
    assert second.status_code == 200 and second.headers["x-tooti-node"] == "direct"
    assert third.status_code == 503
    error = third.json()["error"]
    assert error["code"] == "relay_busy" and "narrow" in error["message"]
    response, lines = first[0]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    assert len(spy.requests) == 1  # the refused ones never reached the node
    await relay.idle()
    relay.scope.cancel()


async def test_direct_tunnel_and_relay_routes_to_one_node(
    network: Network, relay: RunningRelay, nursery: trio.Nursery,
) -> None:
    """A node connected directly and through a relay is registered with its direct
    tunnel, whichever connection came first; the relay's routes for it are refused."""
    registry = network.gateway.registry
    # Direct first, then the relay advertises the same node.
    first = await start_node(network, "both-a", [network.tunnel_url])
    direct = registry.peers["both-a"]
    with LogEvent("tooti.gateway", "node both-a is also advertised via relay-1") as refused:
        nursery.start_soon(first.dialer.dial_forever, relay.tunnel_url)
        with trio.fail_after(LIMIT):
            await refused.seen.wait()
    assert registry.peers["both-a"] is direct and direct.via == ""

    # Through the relay first, then directly: the direct tunnel replaces the relayed peer.
    second = await start_node(network, "both-b", [relay.tunnel_url])
    assert registry.peers["both-b"].via == relay.id
    nursery.start_soon(second.dialer.dial_forever, network.tunnel_url)
    await until(registry, lambda: registry.peers["both-b"].via == "")
    direct_b = registry.peers["both-b"]
    # The relay re-advertises it (a new session, a new proof): still refused.
    with LogEvent("tooti.gateway", "node both-b is also advertised via relay-1") as refused:
        for session in list(second.sessions):
            if session.name.startswith(relay.tunnel_url):
                session.abort("test: re-dial the relay")
        with trio.fail_after(LIMIT):
            await refused.seen.wait()
    assert registry.peers["both-b"] is direct_b

    async with network.client() as http:
        for node_id in ("both-a", "both-b"):
            response = await http.post("/v1/chat/completions", json=chat(**only(node_id)))
            assert response.status_code == 200
            assert response.headers["x-tooti-node"] == node_id
    assert relay.relay.forwarder.forwarded_total == 0  # both went over the direct tunnels


@pytest.mark.parametrize("first", ["direct", "relay"])
async def test_node_is_served_through_the_relay_once_its_direct_tunnel_closes(
    network: Network, relay: RunningRelay, nursery: trio.Nursery, first: str,
) -> None:
    """Whichever connection came first, losing the direct tunnel leaves the node routable
    through the relay at once (in the same step that removes the direct peer)."""
    registry = network.gateway.registry
    # A long re-dial delay: the direct tunnel stays down for the rest of the test.
    urls = {"direct": network.tunnel_url, "relay": relay.tunnel_url}
    node = await start_node(network, "both", [urls[first]], reconnect_initial=60.0,
                            reconnect_max=60.0)
    with LogEvent("tooti.gateway", "node both is also advertised via relay-1") as shadowed:
        nursery.start_soon(node.dialer.dial_forever, urls["relay" if first == "direct"
                                                          else "direct"])
        await until(relay.registry, lambda: "both" in relay.registry.peers)
        await until(registry, lambda: "both" in registry.peers
                    and registry.peers["both"].via == "")
        if first == "direct":  # the gateway has the relay's route to it, set aside
            with trio.fail_after(LIMIT):
                await shadowed.seen.wait()
    direct = registry.peers["both"]
    # The gateway may register the node before the node's dialer has filed the session.
    with trio.fail_after(LIMIT):
        while not (sessions := [s for s in node.sessions
                                if s.name.startswith(network.tunnel_url)]):
            await node.connected.wait()
    for session in sessions:
        session.abort("test: the direct tunnel breaks")
    await until(registry, lambda: registry.peers.get("both") is not direct)
    assert registry.peers["both"].via == relay.id
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200 and response.headers["x-tooti-node"] == "both"
    assert relay.relay.forwarder.forwarded_total == 1


# ---------------------------------------------------------------- raw protocol


async def raw_hello(ws: WebSocketConnection, peer_id: str, role: str,
                    identity: Identity | None = None) -> Connection:
    """A dialer's side of the handshake by hand (HELLO with key, WELCOME, PROOF)."""
    identity = identity or Identity.generate()
    conn = Connection(Side.DIALER, Limits())
    await ws.send_message(conn.send_hello(
        peer_id, role, "test", {}, extra={"public_key": b64(identity.public_key)}))
    welcome = conn.receive_message(await _binary(ws))
    assert isinstance(welcome, WelcomeReceived), welcome
    challenge = unb64(welcome.extra["challenge"])
    assert challenge is not None
    signature = identity.sign(proof_message(challenge, welcome.session_id, peer_id))
    await ws.send_message(conn.send_proof(b64(signature)))
    return conn


def route(node_id: str, key: Identity, signer: Identity | None = None,
          signed_for: str | None = None, relay: str = "shady-relay",
          **extra: Any) -> dict[str, Any]:
    """A ROUTES entry for ``node_id`` claiming ``key``, with a proof made by ``signer``
    (default: ``key`` itself, i.e. genuine) for ``signed_for`` (default: ``node_id``) in a
    handshake with ``relay`` (whose session ids start with its id)."""
    challenge, session_id = os.urandom(32), f"{relay}.{os.urandom(16).hex()}"
    signature = (signer or key).sign(proof_message(challenge, session_id,
                                                   signed_for or node_id))
    return {"id": node_id, "public_key": b64(key.public_key), "hops": 1,
            "proof": {"challenge": b64(challenge), "session_id": session_id,
                      "signature": b64(signature)},
            "models": [{"id": MODEL}], "stats": {}, "labels": {}, **extra}


async def test_a_node_sending_routes_is_disconnected(network: Network) -> None:
    registry = network.gateway.registry
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        conn = await raw_hello(ws, "sneaky", "node")
        await ws.send_message(conn.send_models([{"id": MODEL}]))
        await until(registry, lambda: "sneaky" in registry.peers)
        await ws.send_message(conn.send_routes([route("ghost", Identity.generate())], []))
        with trio.fail_after(LIMIT), pytest.raises(ConnectionClosed):
            while True:
                await ws.get_message()  # heartbeats, then the close
    await until(registry, lambda: "sneaky" not in registry.peers)
    assert "ghost" not in registry.peers


async def test_a_relay_cannot_vouch_for_unproven_or_borrowed_identities(
    network: Network,
) -> None:
    registry = network.gateway.registry
    owner = await start_node(network, "gpu-7", [network.tunnel_url])
    honest, other, victim = Identity.generate(), Identity.generate(), Identity.generate()
    genuine = route("honest", honest)
    refused = [
        # Another node's public key with a made-up signature.
        {**route("forged", honest), "proof": {**genuine["proof"], "signature": b64(
            os.urandom(64))}},
        # A real proof, replayed for another id.
        {**genuine, "id": "replayed"},
        # A signature by a key other than the one claimed.
        route("mismatch", honest, signer=other),
        # A real node's chosen name with a different (self-consistent) key.
        route("gpu-7", other),
        # A derived id with a key that is not its own.
        route(victim.id, other),
        # A genuine proof, but made in a handshake with another relay (replayed here).
        route("elsewhere", Identity.generate(), relay="relay-9"),
        # No proof at all, and a bad hop count.
        {k: v for k, v in route("unproven", other).items() if k != "proof"},
        route("too-far", other, hops=99),
    ]
    with LogEvent("tooti.gateway", "refused") as log:
        async with (open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws,
                    trio.open_nursery() as beating):
            conn = await raw_hello(ws, "shady-relay", "relay")
            beating.start_soon(_heartbeats, ws, conn, network.tunnel.heartbeat_interval)
            await ws.send_message(conn.send_routes(refused, []))
            await ws.send_message(conn.send_routes([genuine], []))
            await until(registry, lambda: "honest" in registry.peers)
            peer = registry.peers["honest"]
            assert (peer.via, peer.hops, peer.public_key) == ("shady-relay", 1,
                                                               honest.public_key)
            for entry in refused:
                if entry["id"] != "gpu-7":
                    assert entry["id"] not in registry.peers, entry["id"]
            kept = registry.peers["gpu-7"]
            assert kept.via == "" and kept.public_key == owner.identity.public_key
            assert registry.identities["gpu-7"] == owner.identity.public_key
            assert "shady-relay" in registry.peers  # only the bad entries were refused

            # A request for the honest node arrives on the relay's tunnel, naming it.
            async with network.client() as http, trio.open_nursery() as nursery:
                answers: list[httpx.Response] = []

                async def ask() -> None:
                    answers.append(await http.post("/v1/chat/completions",
                                                   json=chat(**only("honest"))))

                nursery.start_soon(ask)
                with trio.fail_after(LIMIT):
                    opened = await _next_open(ws, conn)
                assert opened.meta["target"] == "honest" and opened.meta["model"] == MODEL
                body = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}]}).encode()
                await ws.send_message(conn.send_response(
                    opened.stream_id, 200, {"content-type": "application/json"}))
                await ws.send_message(conn.send_data(opened.stream_id, body))
                await ws.send_message(conn.send_end(opened.stream_id, {"usage": {
                    "prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}))
            beating.cancel_scope.cancel()
    assert answers[0].status_code == 200
    assert answers[0].headers["x-tooti-node"] == "honest"
    assert answers[0].json()["choices"][0]["message"]["content"] == "hi"
    assert len(log.messages) == len(refused), log.messages


async def _next_open(ws: WebSocketConnection, conn: Connection) -> StreamOpened:
    """Read frames (answering nothing) until the peer opens a stream."""
    while True:
        event = conn.receive_message(await _binary(ws))
        if isinstance(event, StreamOpened):
            return event


async def _heartbeats(ws: WebSocketConnection, conn: Connection, interval: float) -> None:
    """Keep a hand-driven tunnel alive."""
    while True:
        await ws.send_message(conn.send_heartbeat({"t": 0.0}))
        await trio.sleep(interval)


async def _binary(ws: WebSocketConnection) -> bytes:
    """The next WebSocket message, which must be binary (a tunnel frame)."""
    message = await ws.get_message()
    assert isinstance(message, bytes), message
    return message



async def test_draining_a_relay_process_lets_forwarded_streams_finish(
    network: Network, tmp_path: Any,
) -> None:
    settings = Settings(
        roles=["relay"], data_dir=str(tmp_path), drain_grace=10, tunnel=network.tunnel,
        gateway=GatewaySettings(listen="127.0.0.1:0"),
        relay=RelaySettings(peers=[network.tunnel_url], reconnect_initial=0.05,
                            reconnect_max=0.5))
    process = Process(settings)
    await network.nursery.start(serve, process)
    assert process.relay is not None
    relay_tunnel = process.urls[0].replace("http://", "ws://") + TUNNEL_PATH
    await start_node(network, "slow", [relay_tunnel],
                     backends=[simulated(tokens=8, tokens_per_second=20)])
    async with network.client() as http, http.stream(
            "POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=8)) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        received = [await anext(lines)]  # the stream is under way through the relay
        async with trio.open_nursery() as nursery:
            nursery.start_soon(process.drain)
            received += [line async for line in lines]
    body = "\n".join(received)
    assert " tok7" in body and "data: [DONE]" in body and '"error"' not in body
    with trio.fail_after(LIMIT):
        await network.gateway.registry.wait_until(
            lambda: "slow" not in network.gateway.registry.peers)


async def test_a_relay_and_node_process_shows_both_roles(
    network: Network, tmp_path: Any,
) -> None:
    """``tooti run --role relay --role node``: the relay's own station lists both roles
    in the network view, its node is served through it, and ``/v1`` is a gateway's."""
    settings = Settings(
        roles=["relay", "node"], data_dir=str(tmp_path), drain_grace=0.5,
        tunnel=network.tunnel, gateway=GatewaySettings(listen="127.0.0.1:0"),
        relay=RelaySettings(peers=[network.tunnel_url], reconnect_initial=0.05,
                            reconnect_max=0.5))
    process = Process(settings, backends=[simulated()])
    await network.nursery.start(serve, process)
    assert process.gateway is None and process.relay is not None and process.node is not None
    async with httpx.AsyncClient(base_url=process.urls[0]) as http:
        view = (await http.get("/admin/v1/network")).json()
        api = await http.post("/v1/chat/completions", json=chat())
    assert view["roles"] == ["relay", "node"]
    assert {d["role"] for d in view["dialing"]} == {"relay", "node"}
    assert (api.status_code, api.json()["error"]["code"]) == (404, "not_a_gateway")
    await until(network.gateway.registry,
                lambda: process.node is not None and process.node.id in
                network.gateway.registry.peers)
    await process.drain()


async def test_a_second_relay_cannot_take_over_a_relayed_node(network: Network) -> None:
    registry = network.gateway.registry
    key = Identity.generate()
    async with (open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as first,
                open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as second):
        conn_a = await raw_hello(first, "relay-a", "relay")
        conn_b = await raw_hello(second, "relay-b", "relay")
        await first.send_message(conn_a.send_routes([route("n", key, relay="relay-a")], []))
        await until(registry, lambda: "n" in registry.peers)
        # The node's genuine proof from a handshake with relay-b: still, relay-a keeps it.
        with LogEvent("tooti.gateway", "keeping its route via relay-a") as kept:
            await second.send_message(
                conn_b.send_routes([route("n", key, relay="relay-b")], []))
            with trio.fail_after(LIMIT):
                await kept.seen.wait()
        assert registry.peers["n"].via == "relay-a"
        await first.aclose()  # relay-a goes away: relay-b's proven route takes over at once
        await until(registry, lambda: "relay-a" not in registry.peers)
        assert registry.peers["n"].via == "relay-b"


async def test_routes_on_a_session_that_just_closed_are_a_lost_tunnel() -> None:
    """Between a tunnel's close and its task's end, an advertisement must not raise
    anything but TunnelLost (which ends the advertising task, not the relay)."""
    dialer, _acceptor = memory_pair()
    session = TunnelSession(dialer, Connection(Side.DIALER, Limits()), heartbeat_interval=1)
    session.conn.close()
    with pytest.raises(TunnelLost):
        await session.send_control(lambda conn: conn.send_routes([{"id": "n"}], []))
    session.closed.set()
    with pytest.raises(TunnelLost):
        await session.send_control(lambda conn: conn.send_routes([], ["n"]))


async def test_a_relay_cannot_flood_the_registry_with_nodes(network: Network) -> None:
    network.gateway.station.tunnel_settings.max_relayed_nodes = 3
    registry = network.gateway.registry
    entries = [route(f"n{i}", Identity.generate(), relay="flood") for i in range(5)]
    with LogEvent("tooti.gateway", "tunnel.max_relayed_nodes") as capped:
        async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
            conn = await raw_hello(ws, "flood", "relay")
            await ws.send_message(conn.send_routes(entries, []))
            with trio.fail_after(LIMIT):
                await capped.seen.wait()
            assert sorted(p for p in registry.peers if p.startswith("n")) == ["n0", "n1", "n2"]
            assert len(capped.messages) == 2
            # Room again once the relay withdraws one.
            await ws.send_message(conn.send_routes([entries[4]], ["n0"]))
            await until(registry, lambda: "n4" in registry.peers and "n0" not in registry.peers)


async def test_a_peer_with_an_unknown_role_is_refused(network: Network) -> None:
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        identity = Identity.generate()
        conn = Connection(Side.DIALER, Limits())
        await ws.send_message(conn.send_hello(
            identity.id, "gateway", "test", {}, extra={"public_key": b64(identity.public_key)}))
        goaway = await _binary(ws)
    assert goaway[0] == 0x0B and b"bad_hello" in goaway and b"role" in goaway
    assert identity.id not in network.gateway.registry.peers


async def test_a_full_routes_list_replaces_what_the_relay_advertised(network: Network) -> None:
    registry = network.gateway.registry
    a, b = route("a", Identity.generate(), relay="lister"), route(
        "b", Identity.generate(), relay="lister")
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        conn = await raw_hello(ws, "lister", "relay")
        await ws.send_message(conn.send_routes([a, b], []))
        await until(registry, lambda: {"a", "b"} <= set(registry.peers))
        await ws.send_message(conn.send_routes([b], [], full=True))
        await until(registry, lambda: "a" not in registry.peers)
        assert registry.peers["b"].via == "lister"
