"""Failover over real sockets: before the first token (invisible to the client), after
it (in-band error), cooldowns with probes, and nodes draining with GOAWAY.

Tests that wait out a timeout or a cooldown run on trio's autojump clock (the
``autojump_clock`` fixture): whenever every task is blocked, virtual time jumps to the
next deadline, so they take no real time waiting."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.conftest import Network
from tests.spy import Spy, is_probe, read_stream
from tooti.backends.base import BackendError, BackendResponse
from tooti.backends.simulated import SimulatedBackend
from tooti.gateway.app import Gateway
from tooti.mesh.health import CooldownPolicy, ModelHealth
from tooti.settings import BackendSettings, GatewaySettings, TunnelSettings

MODEL = "tooti-sim"
CHAT = "/v1/chat/completions"
LIMIT = 10
"""Upper bound, in seconds, on any single wait in these tests."""


def chat(**extra: Any) -> dict[str, Any]:
    """A small chat request body."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **extra}


def prefer(*order: str, **more: Any) -> dict[str, Any]:
    """``provider`` preferences trying ``order`` first."""
    return {"provider": {"order": list(order), **more}}


def backend(**options: Any) -> SimulatedBackend:
    """A simulated backend serving ``tooti-sim``."""
    return SimulatedBackend(BackendSettings(type="simulated", options=options))





async def add(network: Network, node_id: str, target: SimulatedBackend | None = None,
              gate: trio.Event | None = None) -> Spy:
    """Start a node around a spied backend."""
    spy = Spy(target or backend(), gate)
    await network.add_node([spy.backend], node_id=node_id)
    return spy




def assert_complete(lines: list[str]) -> None:
    """A whole stream: content, ``[DONE]`` at the end, no error event."""
    assert lines[-1] == "data: [DONE]", lines
    assert not any('"error"' in line for line in lines), lines
    assert sum('"content":" tok' in line for line in lines) >= 1


def in_band_error(lines: list[str]) -> dict[str, Any]:
    """The error object of a stream that failed after its first token."""
    assert lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[-2][len("data:"):])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error, dict)
    return error


async def settled(network: Network) -> None:
    """Wait until the gateway has finished every HTTP request (after its last byte
    reached the client, the request task still records the outcome)."""
    with trio.fail_after(LIMIT):
        await network.gateway.station.wait_idle()


# ---------------------------------------------------------------- before the first token


@pytest.mark.parametrize("status", [500, 429, 503])
async def test_retryable_status_fails_over(network: Network, status: int) -> None:
    broken = await add(network, "broken", backend(fail_rate=1.0, fail_status=status))
    good = await add(network, "good")
    async with network.client() as http:
        plain = await http.post(CHAT, json=chat(**prefer("broken", "good")))
        streamed, lines = await read_stream(http, chat(**prefer("broken", "good")))
    for response in (plain, streamed):
        assert response.status_code == 200, response.text
        assert response.headers["x-tooti-node"] == "good"
    assert_complete(lines)
    assert len(broken.requests) == 2 and len(good.requests) == 2
    assert network.gateway.registry.peers["broken"].failures == 2
    assert network.gateway.registry.peers["good"].failures == 0


@pytest.mark.parametrize(
    ("options", "stream"),
    [({"stall": 30}, True), ({"ttft": 30}, True), ({"ttft": 30}, False)],
    ids=["stall-stream", "slow-first-token-stream", "slow-answer-non-stream"],
)
async def test_first_token_timeout_fails_over(
    network: Network, options: dict[str, Any], stream: bool,
    autojump_clock: trio.testing.MockClock,
) -> None:
    network.gateway.proxy_settings.first_byte_timeout = 0.3
    started = trio.current_time()
    slow = await add(network, "slow", backend(**options))
    good = await add(network, "good")
    async with network.client() as http:
        if stream:
            response, lines = await read_stream(http, chat(**prefer("slow", "good")))
            assert_complete(lines)
        else:
            response = await http.post(CHAT, json=chat(**prefer("slow", "good")))
            assert response.json()["choices"][0]["message"]["content"]
    assert response.status_code == 200, response.text
    assert response.headers["x-tooti-node"] == "good"
    assert len(good.requests) == 1
    # The slow node was told to stop: its backend call ends long before its 30 s.
    await slow.wait_until(lambda: slow.log == ["open 1", "end 1"])
    assert trio.current_time() - started < 30
    assert network.gateway.registry.peers["slow"].failures == 1


async def test_backend_400_is_returned_not_retried(network: Network) -> None:
    picky = await add(network, "picky", backend(fail_rate=1.0, fail_status=400))
    good = await add(network, "good")
    async with network.client() as http:
        response = await http.post(CHAT, json=chat(**prefer("picky", "good")))
        streamed = await http.post(CHAT, json=chat(stream=True, **prefer("picky", "good")))
    for answer in (response, streamed):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "simulated_failure"
    assert len(picky.requests) == 2 and not good.requests
    assert network.gateway.registry.peers["picky"].failures == 0


async def test_allow_fallbacks_false_tries_one_node(network: Network) -> None:
    broken = await add(network, "broken", backend(fail_rate=1.0))
    good = await add(network, "good")
    async with network.client() as http:
        response = await http.post(CHAT, json=chat(**prefer("broken", allow_fallbacks=False)))
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "simulated_failure"
    assert len(broken.requests) == 1 and not good.requests


async def test_max_attempts_bounds_the_failover(network: Network) -> None:
    network.gateway.proxy_settings.max_attempts = 2
    spies = {name: await add(network, name, backend(fail_rate=1.0))
             for name in ("b1", "b2", "b3")}
    good = await add(network, "good")
    async with network.client() as http:
        response = await http.post(CHAT, json=chat(**prefer("b1", "b2", "b3", "good")))
    assert response.status_code == 500, response.text
    assert {name: len(spy.requests) for name, spy in spies.items()} == {
        "b1": 1, "b2": 1, "b3": 0}
    assert not good.requests


async def test_stream_cut_before_first_token_fails_over(network: Network) -> None:
    cut = await add(network, "cut", backend(cut_after=0))
    good = await add(network, "good")
    async with network.client() as http:
        response, lines = await read_stream(http, chat(**prefer("cut", "good")))
    assert response.status_code == 200
    assert response.headers["x-tooti-node"] == "good"
    assert_complete(lines)
    assert len(cut.requests) == 1 and len(good.requests) == 1
    assert network.gateway.registry.peers["cut"].failures == 1


async def test_node_lost_before_first_token_fails_over(network: Network) -> None:
    doomed = await add(network, "doomed", backend(stall=30))
    good = await add(network, "good")
    async with network.client() as http, trio.open_nursery() as nursery:
        results: list[tuple[httpx.Response, list[str]]] = []

        async def request() -> None:
            results.append(await read_stream(http, chat(**prefer("doomed", "good"))))

        nursery.start_soon(request)
        await doomed.wait_until(lambda: doomed.log == ["open 1"])
        network.kill_node("doomed")
    response, lines = results[0]
    assert response.status_code == 200
    assert response.headers["x-tooti-node"] == "good"
    assert_complete(lines)
    assert len(good.requests) == 1


ROLE_ONLY = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,'
             b'"model":"tooti-sim","choices":[{"index":0,"delta":{"role":"assistant",'
             b'"content":""},"logprobs":null,"finish_reason":null}]}\n\n')


def breaks_after_role_chunk(target: SimulatedBackend) -> SimulatedBackend:
    """Make ``target`` stream like OpenAI-style servers do (a role-only chunk with empty
    content first) and then break before any content."""

    @asynccontextmanager
    async def open_(endpoint: str, body: bytes, request: dict[str, Any]
                    ) -> AsyncIterator[BackendResponse]:
        async def chunks() -> AsyncGenerator[bytes, None]:
            yield ROLE_ONLY
            raise BackendError("upstream broke", status=502, code="upstream_broke")

        yield BackendResponse(200, "text/event-stream", chunks())

    target.open = open_  # type: ignore[method-assign]
    return target


async def test_stream_broken_after_role_only_chunk_fails_over(network: Network) -> None:
    await network.add_node([breaks_after_role_chunk(backend())], node_id="preamble")
    good = await add(network, "good")
    async with network.client() as http:
        response, lines = await read_stream(http, chat(**prefer("preamble", "good")))
    assert response.headers["x-tooti-node"] == "good", lines
    assert_complete(lines)
    assert len(good.requests) == 1


# ---------------------------------------------------------------- after the first token


async def test_stream_cut_after_first_token_is_in_band(network: Network) -> None:
    await add(network, "cut", backend(cut_after=2, tokens=10))
    good = await add(network, "good")
    async with network.client() as http:
        response, lines = await read_stream(http, chat(max_tokens=10, **prefer("cut", "good")))
    assert response.status_code == 200
    assert response.headers["x-tooti-node"] == "cut"
    assert in_band_error(lines)["code"] == "simulated_stream_cut"
    assert sum('"content":" tok' in line for line in lines) == 2
    assert not good.requests  # no failover once the client has tokens
    await settled(network)
    assert network.gateway.registry.peers["cut"].failures == 1


async def test_node_killed_mid_stream_is_in_band(network: Network) -> None:
    gate = trio.Event()  # never set: the stream stays open until the node dies
    victim = await add(network, "victim", gate=gate)
    async with network.client() as http, http.stream(
        "POST", CHAT, json=chat(stream=True, **prefer("victim"))
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-tooti-node"] == "victim"
        lines: list[str] = []
        with trio.fail_after(LIMIT):
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                lines.append(line)
                if len(lines) == 1:
                    assert '"content":" tok0"' in line
                    network.kill_node("victim")
    assert len(lines) == 3, lines
    assert in_band_error(lines)["code"] == "node_lost"
    await victim.wait_until(lambda: victim.log == ["open 1", "end 1"])


# ---------------------------------------------------------------- cooldown and probes


async def test_cooldown_probe_and_recovery(
    network: Network, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    policy = CooldownPolicy(failures=2, window=60, base=0.3, maximum=5)
    network.gateway.proxy_settings.cooldown = policy
    registry = network.gateway.registry
    flaky = await add(network, "flaky", backend(fail_rate=1.0))
    good = await add(network, "good")
    record = registry.peers["flaky"].health_of(MODEL)
    durations: list[float] = []
    start_cooldown = record.start_cooldown

    def counting(reason: str, policy: CooldownPolicy, now: float | None = None) -> float:
        durations.append(start_cooldown(reason, policy, now))
        return durations[-1]

    monkeypatch.setattr(record, "start_cooldown", counting)
    body = chat(**prefer("flaky", "good"))
    async with network.client() as http:
        # One failure is not enough; the second starts the cooldown.
        first = await http.post(CHAT, json=body)
        assert not record.in_cooldown
        second = await http.post(CHAT, json=body)
        assert record.in_cooldown and durations == [pytest.approx(0.3)]
        assert [r.headers["x-tooti-node"] for r in (first, second)] == ["good", "good"]
        assert len(flaky.user_requests) == 2

        peers = (await http.get("/admin/v1/peers")).json()["data"]
        view = next(p for p in peers if p["id"] == "flaky")
        assert view["state"] == "cooldown"
        state = view["per_model"][MODEL]
        assert state["state"] == "cooldown"
        cooldown = state["cooldown"]
        assert "simulated failure" in cooldown["reason"]
        assert 0 <= cooldown["seconds_left"] <= 0.3 * 2 ** (cooldown["count"] - 1)
        assert next(p for p in peers if p["id"] == "good")["state"] == "live"

        # In cooldown: no user traffic, even when asked for by name.
        for _ in range(3):
            response = await http.post(CHAT, json=body)
            assert response.headers["x-tooti-node"] == "good"
        assert len(flaky.user_requests) == 2
        assert registry.peers["flaky"].failures == 2

        # The probe after the cooldown fails (still broken): a second, twice as long one.
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: record.cooldowns >= 2)
        assert record.in_cooldown and durations == [pytest.approx(0.3), pytest.approx(0.6)]
        assert "probe failed" in record.cooldown_reason
        probes = [r for r in flaky.requests if is_probe(r)]
        assert len(probes) == 1 and probes[0]["max_tokens"] == 1
        assert not probes[0].get("stream")

        # Repaired: the next probe succeeds and the node is back in service.
        flaky.backend.fail_rate = 0.0
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: not record.in_cooldown)
        assert len([r for r in flaky.requests if is_probe(r)]) == 2
        assert record.cooldowns == 2  # the doubling is only forgiven after a long healthy spell
        response = await http.post(CHAT, json=body)
        assert response.status_code == 200
        assert response.headers["x-tooti-node"] == "flaky"
        view = next(p for p in (await http.get("/admin/v1/peers")).json()["data"]
                    if p["id"] == "flaky")
    assert view["state"] == "live" and view["per_model"][MODEL]["state"] == "ok"
    assert "cooldown" not in view["per_model"][MODEL]
    assert len(good.user_requests) == 5


def test_cooldown_durations_double_up_to_the_cap() -> None:
    policy = CooldownPolicy(failures=2, window=10, base=1, maximum=5, forgive_after=100)
    record = ModelHealth()
    assert not record.record_failure("x", policy, now=0)
    assert not record.record_failure("x", policy, now=11)  # the first one left the window
    assert record.record_failure("x", policy, now=12)
    assert record.cooldown_until == 13 and record.cooldowns == 1
    assert not record.record_failure("x", policy, now=12.5)  # no stacking while in cooldown
    assert [record.start_cooldown("probe", policy, now=t) for t in (13, 15, 19, 24)] == [
        2, 4, 5, 5]
    record.end_cooldown(now=30)
    assert record.start_cooldown("again", policy, now=100) == 5  # not yet forgiven
    record.end_cooldown(now=105)
    assert record.start_cooldown("later", policy, now=300) == 1  # a long healthy spell


# ---------------------------------------------------------------- GOAWAY


async def test_draining_node_gets_no_new_streams_and_finishes_its_own(network: Network) -> None:
    gate = trio.Event()
    registry = network.gateway.registry
    leaving = await add(network, "leaving", gate=gate)
    other = await add(network, "other")
    node = next(n for n in network.nodes if n.id == "leaving")
    results: list[list[str]] = []
    async with network.client() as http, trio.open_nursery() as nursery:

        async def in_flight() -> None:
            response, lines = await read_stream(http, chat(**prefer("leaving")))
            assert response.headers["x-tooti-node"] == "leaving"
            results.append(lines)

        nursery.start_soon(in_flight)
        await leaving.wait_until(lambda: leaving.log == ["open 1"])
        nursery.start_soon(node.drain, 30.0)
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: registry.peers["leaving"].draining)
        assert registry.peers["leaving"].state() == "draining"

        response = await http.post(CHAT, json=chat(**prefer("leaving", "other")))
        assert response.status_code == 200
        assert response.headers["x-tooti-node"] == "other"
        only = await http.post(CHAT, json=chat(**prefer("leaving", allow_fallbacks=False)))
        assert only.status_code == 503, only.text
        assert leaving.log == ["open 1"] and len(other.requests) == 1

        gate.set()  # the in-flight stream may now finish
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: "leaving" not in registry.peers)
    assert_complete(results[0])
    assert leaving.log == ["open 1", "end 1"]


# ---------------------------------------------------------------- probes vs. node changes


async def test_probe_of_a_draining_node_keeps_the_gateway_up(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    # Its own gateway, so that a crash is recorded and reported as a plain failure.
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), tunnel)
    crashed: list[BaseException] = []
    results: list[list[str]] = []

    async def serve(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        try:
            await gateway.serve(task_status=task_status)
        except Exception as exc:
            crashed.append(exc)

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve)
        network = Network(nursery, gateway, urls[0], tunnel)
        await _drain_while_probed(network, monkeypatch, crashed, results)
        gateway.shutdown()
        nursery.cancel_scope.cancel()
    assert not crashed, f"the gateway crashed: {crashed!r}"
    assert_complete(results[0])


async def _drain_while_probed(network: Network, monkeypatch: pytest.MonkeyPatch,
                              crashed: list[BaseException], results: list[list[str]]
                              ) -> None:
    """A node in cooldown drains (GOAWAY) with a stream still in flight, so its session
    stays up; its cooldown ends meanwhile and the gateway probes it."""
    network.gateway.proxy_settings.cooldown = CooldownPolicy(
        failures=1, window=60, base=0.2, maximum=5)
    registry = network.gateway.registry
    gate = trio.Event()
    leaving = await add(network, "leaving", gate=gate)
    await add(network, "good")
    node = next(n for n in network.nodes if n.id == "leaving")
    peer = registry.peers["leaving"]
    probed = trio.Event()
    open_stream = peer.session.open_stream

    async def watched(meta: dict[str, Any], body: bytes, *, fin: bool = True) -> Any:
        if meta.get("probe"):
            probed.set()
        return await open_stream(meta, body, fin=fin)

    monkeypatch.setattr(peer.session, "open_stream", watched)
    async with network.client() as http, trio.open_nursery() as nursery:

        async def in_flight() -> None:
            try:
                results.append((await read_stream(http, chat(**prefer("leaving"))))[1])
            except httpx.HTTPError as exc:
                results.append([f"client error: {exc!r}"])

        nursery.start_soon(in_flight)
        await leaving.wait_until(lambda: leaving.log == ["open 1"])
        leaving.backend.fail_rate = 1.0
        failed_over = await http.post(CHAT, json=chat(**prefer("leaving", "good")))
        assert failed_over.headers["x-tooti-node"] == "good"
        assert peer.health_of(MODEL).in_cooldown
        nursery.start_soon(node.drain, 30.0)
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: peer.draining)
            # The cooldown ran out while draining: the probe is skipped (counted as a
            # failed probe, a longer cooldown) rather than sent to a node that refuses it.
            await registry.wait_until(lambda: peer.health_of(MODEL).cooldowns >= 2)
        assert not probed.is_set()
        assert "draining" in peer.health_of(MODEL).cooldown_reason
        await trio.testing.wait_all_tasks_blocked()
        if crashed:
            nursery.cancel_scope.cancel()
            return
        response = await http.post(CHAT, json=chat())
        assert response.status_code == 200 and response.headers["x-tooti-node"] == "good"
        gate.set()
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: "leaving" not in registry.peers)


async def test_cooldown_ends_after_the_node_withdrew_and_restored_the_model(
    network: Network, autojump_clock: trio.testing.MockClock,
) -> None:
    network.gateway.proxy_settings.cooldown = CooldownPolicy(
        failures=2, window=60, base=0.3, maximum=5)
    registry = network.gateway.registry
    spy = Spy(backend(fail_rate=1.0))
    await network.add_node([spy.backend], node_id="flaky", health_interval=0.05)
    await add(network, "good")
    peer = registry.peers["flaky"]
    record = peer.health_of(MODEL)
    async with network.client() as http:
        for _ in range(2):
            response = await http.post(CHAT, json=chat(**prefer("flaky", "good")))
            assert response.headers["x-tooti-node"] == "good"
        assert record.in_cooldown
        # The backend's health check fails too: the node withdraws the model, and the
        # cooldown runs out meanwhile.
        spy.backend.healthy = False
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: not peer.models)
        # Let the cooldown run out (a deadline on the virtual clock, not a condition),
        # and let the prober that wakes then run to its next blocking point.
        await trio.sleep_until(record.cooldown_until + 0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert record.in_cooldown and not peer.models
        # Repaired: the node announces the model again.
        spy.backend.healthy = True
        spy.backend.fail_rate = 0.0
        with trio.fail_after(LIMIT):
            await registry.wait_until(lambda: MODEL in peer.models)
        # Any fix probes (or forgives) within about one cooldown; allow five.
        with trio.move_on_after(1.5):
            await registry.wait_until(lambda: not record.in_cooldown)
        view = next(p for p in (await http.get("/admin/v1/peers")).json()["data"]
                    if p["id"] == "flaky")
    assert not record.in_cooldown, view["per_model"][MODEL]
