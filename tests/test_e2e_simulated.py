"""End to end over real sockets: openai client → gateway → WebSocket tunnel → node → simulated."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import Network, simulated


def client_for(network: Network) -> openai.AsyncOpenAI:
    """The official client with strict response validation."""
    return openai.AsyncOpenAI(
        base_url=network.url + "/v1", api_key="unused", _strict_response_validation=True,
        max_retries=0,
    )


async def test_models_and_chat(network: Network) -> None:
    await network.add_node()
    client = client_for(network)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tooti-sim"]
    reply = await client.chat.completions.create(
        model="tooti-sim", messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


async def test_chat_stream_with_usage(network: Network) -> None:
    await network.add_node()
    client = client_for(network)
    stream = await client.chat.completions.create(
        model="tooti-sim", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, max_tokens=7,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.count("tok") == 7


async def test_stream_without_usage_strips_usage_chunk(network: Network) -> None:
    await network.add_node()
    client = client_for(network)
    stream = await client.chat.completions.create(
        model="tooti-sim", messages=[{"role": "user", "content": "hi"}], stream=True,
        max_tokens=3,
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


@pytest.mark.parametrize("bad", [b"{not json", b"[1,2]", b'{"model": 5, "messages": []}'])
async def test_bad_bodies_are_400(network: Network, bad: bytes) -> None:
    await network.add_node()
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", content=bad,
                                   headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"].startswith("req_")


async def test_unknown_model_404(network: Network) -> None:
    await network.add_node()
    client = client_for(network)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


async def test_completions_and_embeddings(network: Network) -> None:
    await network.add_node()
    client = client_for(network)
    completion = await client.completions.create(model="tooti-sim", prompt="say", max_tokens=4)
    assert completion.choices[0].text.count("tok") == 4
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    # Strict validation checks the raw body, where a base64 vector is a string: ask for floats.
    embedding = await client.embeddings.create(
        model="tooti-sim", input=["a", "b c"], encoding_format="float")
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8
    assert embedding.usage.prompt_tokens >= 2


async def test_body_passes_through_intact(network: Network) -> None:
    """Tools, response_format, n, stop and array content reach the backend as sent."""
    seen: list[bytes] = []
    backend = simulated()
    original = backend.open

    def spy(endpoint: str, body: bytes, request: dict[str, Any]) -> Any:
        seen.append(body)
        return original(endpoint, body, request)

    backend.open = spy  # type: ignore[method-assign]
    await network.add_node([backend])
    raw = (
        b'{"model":"tooti-sim","messages":[{"role":"user","content":[{"type":"text",'
        b'"text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AA=="}}]}],'
        b'"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],'
        b'"tool_choice":"auto","response_format":{"type":"json_object"},"n":2,'
        b'"stop":["x","y"],"max_completion_tokens":3,"logprobs":false,"x_custom":{"k":[1,2]}}'
    )
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", content=raw)
    assert response.status_code == 200, response.text
    assert seen == [raw]
    assert len(response.json()["choices"]) == 2


async def test_oversized_body_413(network: Network) -> None:
    await network.add_node()
    limit = network.gateway.settings.max_body_bytes
    big = b'{"model":"tooti-sim","messages":[{"role":"user","content":"' + b"a" * limit + b'"}]}'
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", content=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tooti-sim"}, "messages"),
        ({"model": "tooti-sim", "messages": "hi"}, "messages"),
        ({"model": "tooti-sim", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        ({"model": "tooti-sim", "messages": [{"role": "user"}], "max_tokens": "5"}, "max_tokens"),
        ({"model": "tooti-sim", "messages": [{"role": "user"}], "temperature": True},
         "temperature"),
        ({"messages": [{"role": "user"}]}, "model"),
    ],
)
async def test_wrong_types_name_the_param(
    network: Network, body: dict[str, Any], param: str
) -> None:
    await network.add_node()
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


async def test_routes_and_methods(network: Network) -> None:
    async with network.client() as http:
        missing = await http.get("/v1/nothing")
        wrong = await http.get("/v1/chat/completions")
        health = await http.get("/healthz")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert all(r.headers["x-request-id"] for r in (missing, wrong, health))


async def test_known_model_without_live_node_is_503(network: Network) -> None:
    await network.add_node()
    network.kill_node("node-a")
    registry = network.gateway.registry
    await registry.wait_until(lambda: not registry.peers)
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json={
            "model": "tooti-sim", "messages": [{"role": "user", "content": "x"}]})
        models = await http.get("/v1/models")
    assert response.status_code == 503
    assert models.json() == {"object": "list", "data": []}


async def test_failover_before_first_byte(network: Network) -> None:
    await network.add_node([simulated(fail_rate=1.0, fail_status=500)], node_id="broken")
    await network.add_node([simulated()], node_id="healthy")
    async with network.client() as http:
        for _ in range(4):
            response = await http.post("/v1/chat/completions", json={
                "model": "tooti-sim", "messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 200
            assert response.headers["x-tooti-node"] == "healthy"


async def test_backend_4xx_is_returned_not_retried(network: Network) -> None:
    await network.add_node([simulated(fail_rate=1.0, fail_status=400)], node_id="picky")
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json={
            "model": "tooti-sim", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400
    assert network.gateway.registry.peers["picky"].failures == 0


async def test_mid_stream_failure_is_in_band(network: Network) -> None:
    await network.add_node([simulated(cut_after=3, tokens=10)])
    async with network.client() as http:
        async with http.stream("POST", "/v1/chat/completions", json={
            "model": "tooti-sim", "stream": True,
            "messages": [{"role": "user", "content": "x"}]}) as response:
            assert response.status_code == 200
            events = [line async for line in response.aiter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2]
    assert sum('"content"' in e for e in events[:-2]) >= 3


async def test_request_timeout_mid_stream_is_in_band(network: Network) -> None:
    network.gateway.proxy_settings.request_timeout = 0.5
    await network.add_node([simulated(tokens=1000, tokens_per_second=20)])
    async with network.client() as http:
        async with http.stream("POST", "/v1/chat/completions", json={
            "model": "tooti-sim", "stream": True,
            "messages": [{"role": "user", "content": "x"}]}) as response:
            events = [line async for line in response.aiter_lines() if line.startswith("data:")]
        slow = await http.post("/v1/chat/completions", json={
            "model": "tooti-sim", "messages": [{"role": "user", "content": "x"}]})
    assert events[-1] == "data: [DONE]"
    assert '"code":"timeout"' in events[-2]
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
