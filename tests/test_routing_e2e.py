"""Routing over real sockets: response headers, per-request preferences, gateway-only
fields, model fallback and the bounded queue in front of full nodes."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Network
from tests.spy import Spy, read_stream
from tooti.backends.simulated import SimulatedBackend
from tooti.mesh.candidates import SlotWaiter
from tooti.settings import BackendSettings

MODEL = "tooti-sim"
CHAT = "/v1/chat/completions"
LIMIT = 10
"""Upper bound, in seconds, on any single wait in these tests."""


def chat(**extra: Any) -> dict[str, Any]:
    """A small chat request body."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            **extra}


def backend(price: tuple[float, float] = (0.0, 0.0), max_concurrency: int = 8,
            models: list[str] | None = None, **options: Any) -> SimulatedBackend:
    """A simulated backend with advertised prices and concurrency."""
    return SimulatedBackend(BackendSettings(
        type="simulated", models=models or [], max_concurrency=max_concurrency,
        price_input=price[0], price_output=price[1], options=options))




async def add(network: Network, node_id: str, target: SimulatedBackend | None = None,
              gate: trio.Event | None = None) -> Spy:
    """Start a node around a spied backend."""
    spy = Spy(target or backend(), gate)
    await network.add_node([spy.backend], node_id=node_id)
    return spy




async def settled(network: Network) -> None:
    """Wait until the gateway has finished every HTTP request (slots released)."""
    with trio.fail_after(LIMIT):
        await network.gateway.station.wait_idle()


# ---------------------------------------------------------------- headers


async def test_node_and_model_headers(network: Network) -> None:
    await add(network, "solo")
    async with network.client() as http:
        plain = await http.post(CHAT, json=chat())
        streamed, lines = await read_stream(http, chat())
    for response in (plain, streamed):
        assert response.status_code == 200
        assert response.headers["x-tooti-node"] == "solo"
        assert response.headers["x-tooti-model"] == MODEL
        assert response.headers["x-request-id"].startswith("req_")
    assert lines[-1] == "data: [DONE]"
    assert plain.headers["x-request-id"] != streamed.headers["x-request-id"]


# ---------------------------------------------------------------- preferences


PRICES = {"cheap": (1.0, 2.0), "mid": (3.0, 4.0), "dear": (10.0, 20.0)}


@pytest.fixture
async def three(network: Network) -> dict[str, Spy]:
    """Three nodes serving the same model at different prices."""
    return {name: await add(network, name, backend(price)) for name, price in PRICES.items()}


PREFERENCE_CASES: list[tuple[dict[str, Any], str]] = [
    ({"provider": {"order": ["dear"]}}, "dear"),
    ({"provider": {"order": ["gone", "mid", "cheap"]}}, "mid"),
    ({"provider": {"only": ["mid"]}}, "mid"),
    ({"provider": {"ignore": ["cheap", "mid"]}}, "dear"),
    ({"provider": {"sort": "price"}}, "cheap"),
    ({"provider": {"max_price": {"prompt": 2}}}, "cheap"),
    ({"provider": {"max_price": {"completion": 5}, "ignore": ["cheap"]}}, "mid"),
    ({"tooti": {"sort": "price", "ignore": ["cheap"]}}, "mid"),
    ({"provider": {"order": ["dear"], "only": ["cheap"]}}, "cheap"),
]


async def test_preferences_choose_the_node(network: Network, three: dict[str, Spy]) -> None:
    async with network.client() as http:
        for extra, expected in PREFERENCE_CASES:
            before = {name: len(spy.requests) for name, spy in three.items()}
            for _ in range(3):  # a random pick among 3 would miss at least once in 26/27 runs
                response = await http.post(CHAT, json=chat(**extra))
                assert response.status_code == 200, (extra, response.text)
                assert response.headers["x-tooti-node"] == expected, extra
            after = {name: len(spy.requests) - before[name] for name, spy in three.items()}
            assert after == {name: 3 if name == expected else 0 for name in PRICES}, extra


async def test_no_node_within_max_price(network: Network, three: dict[str, Spy]) -> None:
    async with network.client() as http:
        response = await http.post(CHAT, json=chat(provider={"max_price": {"prompt": 0.5}}))
    assert response.status_code in (404, 503), response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert all(not spy.requests for spy in three.values())


# ---------------------------------------------------------------- gateway-only fields


async def test_gateway_fields_do_not_reach_the_backend(network: Network) -> None:
    spy = await add(network, "solo")
    rest: dict[str, Any] = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "héllo ✓"}]}],
        "temperature": 0.7, "max_tokens": 3, "n": 2, "stop": ["x"],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "x_custom": {"nested": [1, 2.5, None, True]}, "user": "u-1",
    }
    variants: list[dict[str, Any]] = [
        {"provider": {"sort": "price", "order": ["solo"]}},
        {"tooti": {"only": ["solo"]}},
        {"models": [MODEL, "other-model"]},
        {"provider": {"ignore": []}, "tooti": {"sort": "load"}, "models": []},
    ]
    async with network.client() as http:
        for extra in variants:
            body = {"model": MODEL, **extra, **rest}
            response = await http.post(CHAT, json=body)
            assert response.status_code == 200, response.text
            received = json.loads(spy.bodies[-1])
            assert received == {"model": MODEL, **rest}
            assert list(received) == ["model", *rest]  # field order kept
            assert spy.requests[-1] == received
    assert len(spy.bodies) == len(variants)


async def test_body_without_gateway_fields_passes_byte_for_byte(network: Network) -> None:
    spy = await add(network, "solo")
    raw = ('{ "model" : "tooti-sim",\n "messages":[{"role":"user","content":"h\\u00e9 ✓"}],'
           ' "temperature": 1.0e0, "max_tokens":2, "provider_hint": {"a": 1} }').encode()
    async with network.client() as http:
        response = await http.post(CHAT, content=raw)
    assert response.status_code == 200, response.text
    assert spy.bodies == [raw]


# ---------------------------------------------------------------- model fallback


async def test_model_fallback_when_primary_has_no_live_node(network: Network) -> None:
    await network.add_node([backend(models=["retired-model"])], node_id="old")
    network.kill_node("old")
    registry = network.gateway.registry
    with trio.fail_after(LIMIT):
        await registry.wait_until(lambda: "old" not in registry.peers)
    assert "retired-model" in registry.known_models
    spy = await add(network, "live")
    async with network.client() as http:
        alone = await http.post(CHAT, json=chat(model="retired-model"))
        plain = await http.post(CHAT, json=chat(model="retired-model", models=[MODEL]))
        streamed, lines = await read_stream(http, chat(
            model="missing-model", models=["missing-model", MODEL]))
    assert alone.status_code == 503
    for response in (plain, streamed):
        assert response.status_code == 200, response.text
        assert response.headers["x-tooti-model"] == MODEL
        assert response.headers["x-tooti-node"] == "live"
    assert plain.json()["model"] == MODEL
    assert json.loads(lines[0][len("data:"):])["model"] == MODEL
    assert [r["model"] for r in spy.requests] == [MODEL, MODEL]
    assert all("models" not in r for r in spy.requests)


async def test_model_fallback_when_primary_nodes_fail(network: Network) -> None:
    broken = await add(network, "broken", backend(models=["big-model"], fail_rate=1.0))
    live = await add(network, "live")
    async with network.client() as http:
        response = await http.post(CHAT, json=chat(model="big-model", models=[MODEL]))
    assert response.status_code == 200, response.text
    assert response.headers["x-tooti-model"] == MODEL
    assert response.headers["x-tooti-node"] == "live"
    assert len(broken.requests) == 1 and broken.requests[0]["model"] == "big-model"
    assert [r["model"] for r in live.requests] == [MODEL]


async def test_unknown_models_only_is_404(network: Network) -> None:
    await add(network, "solo")
    async with network.client() as http:
        response = await http.post(CHAT, json=chat(model="nope", models=["nada"]))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- concurrency caps


class Queue:
    """A one-slot node holding a gated stream, and a hook on the gateway's queue wait."""

    def __init__(self, network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
        self.network = network
        self.gate = trio.Event()
        self.queued = trio.Event()
        """Set when a request starts waiting for a slot."""
        registry = network.gateway.registry
        original = registry.wait_for_slot

        async def hooked(waiter: SlotWaiter) -> None:
            self.queued.set()
            await original(waiter)

        monkeypatch.setattr(registry, "wait_for_slot", hooked)
        self.spy: Spy | None = None
        self.first: list[str] = []

    async def start(self, nursery: trio.Nursery, http: httpx.AsyncClient) -> Spy:
        """Start the node and a first, slow stream that holds its only slot."""
        spy = self.spy = await add(self.network, "single", backend(max_concurrency=1),
                                   gate=self.gate)
        registry = self.network.gateway.registry
        assert registry.peers["single"].capacity(MODEL) == 1

        async def first() -> None:
            response, lines = await read_stream(http, chat(max_tokens=5))
            assert response.status_code == 200
            self.first.extend(lines)

        nursery.start_soon(first)
        await spy.wait_until(lambda: spy.log == ["open 1"])
        return spy


async def test_full_node_queues_the_next_request(
    network: Network, monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = Queue(network, monkeypatch)
    second: list[httpx.Response] = []
    async with network.client() as http, trio.open_nursery() as nursery:
        spy = await queue.start(nursery, http)

        async def later() -> None:
            second.append(await http.post(CHAT, json=chat()))

        nursery.start_soon(later)
        with trio.fail_after(LIMIT):
            await queue.queued.wait()
        assert network.gateway.proxy.queued == 1
        assert spy.log == ["open 1"] and not second  # waiting, not sent to the node
        queue.gate.set()
    assert second[0].status_code == 200, second[0].text
    assert second[0].headers["x-tooti-node"] == "single"
    assert queue.first[-1] == "data: [DONE]" and not any('"error"' in e for e in queue.first)
    assert spy.log == ["open 1", "end 1", "open 2", "end 2"]
    await settled(network)
    assert network.gateway.proxy.queued == 0
    assert network.gateway.registry.peers["single"].in_flight[MODEL] == 0


async def test_queue_timeout_is_429_with_retry_after(
    network: Network, monkeypatch: pytest.MonkeyPatch,
) -> None:
    network.gateway.proxy_settings.queue_timeout = 0.2
    queue = Queue(network, monkeypatch)
    async with network.client() as http, trio.open_nursery() as nursery:
        spy = await queue.start(nursery, http)
        with trio.fail_after(LIMIT):
            response = await http.post(CHAT, json=chat())
        assert queue.queued.is_set()
        queue.gate.set()
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "rate_limit_error" and error["code"] == "capacity_exhausted"
    assert spy.log == ["open 1", "end 1"]
    assert queue.first[-1] == "data: [DONE]"
    assert network.gateway.proxy.queued == 0


async def test_max_queue_zero_is_immediate_429(
    network: Network, monkeypatch: pytest.MonkeyPatch,
) -> None:
    network.gateway.proxy_settings.max_queue = 0
    queue = Queue(network, monkeypatch)
    async with network.client() as http, trio.open_nursery() as nursery:
        spy = await queue.start(nursery, http)
        with trio.fail_after(LIMIT):
            response = await http.post(CHAT, json=chat())
        assert not queue.queued.is_set()  # refused without waiting
        queue.gate.set()
    assert response.status_code == 429
    assert response.headers["retry-after"]
    assert response.json()["error"]["code"] == "capacity_exhausted"
    assert spy.log == ["open 1", "end 1"]


# ---------------------------------------------------------------- measured speeds


async def test_gateway_measures_ttft_and_decode_speed_of_streams(network: Network) -> None:
    await add(network, "timed", backend(ttft=0.1, tokens_per_second=50, tokens=10))
    async with network.client() as http:
        response, lines = await read_stream(http, chat(max_tokens=10))
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    await settled(network)
    record = network.gateway.registry.peers["timed"].health[MODEL]
    assert record.samples == 1
    assert record.ttft_ms is not None and 100 <= record.ttft_ms < 2000
    # 10 tokens, the last nine at 50/s after the first.
    assert record.tokens_per_s is not None and 20 < record.tokens_per_s <= 60


async def test_non_stream_answer_does_not_inflate_decode_speed(network: Network) -> None:
    await add(network, "timed", backend(tokens_per_second=50, tokens=10))
    async with network.client() as http:
        response = await http.post(CHAT, json=chat(max_tokens=10))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 10
    await settled(network)
    record = network.gateway.registry.peers["timed"].health[MODEL]
    assert record.samples == 1
    # The answer took 9/50 s to generate: anything measured must be about 50 tok/s.
    assert record.tokens_per_s is None or record.tokens_per_s <= 100, record.tokens_per_s
