"""The API fronts mounted on a real gateway, end to end over real sockets: the official
``openai`` (Responses), ``anthropic`` and ``ollama`` clients, unchanged, against a gateway
with simulated nodes dialled in over WebSocket (:mod:`tooti.gateway.front_routes`)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx
import msgspec
import ollama
import openai
import pytest
import trio

from tests.conftest import Network
from tests.log_capture import LogWatch, watching
from tests.upstream import SlowUpstream, backend_call_cancelled, start_upstream
from tooti.accounts.database import Database
from tooti.backends.base import BackendResponse
from tooti.backends.openai import OpenAIBackend
from tooti.backends.simulated import SimulatedBackend
from tooti.billing.base import BillingSetup, RequestContext, Usage
from tooti.billing.credits import Credits
from tooti.gateway.access_log import AccessRecord
from tooti.gateway.app import Gateway
from tooti.mesh.events import BusEvent
from tooti.settings import BackendSettings, GatewaySettings, TunnelSettings

USUAL = ["chat/completions", "completions", "embeddings"]
"""What a translated-only node serves (no native ``/v1/responses``)."""


def simulated(endpoints: list[str] | None = None, max_concurrency: int = 8,
              **options: Any) -> SimulatedBackend:
    """A simulated backend (model ``tooti-sim``) serving ``endpoints`` (default the
    usual three: its Responses requests are translated)."""
    models = options.pop("models", [])
    return SimulatedBackend(BackendSettings(type="simulated", models=models, options=options,
                                            endpoints=endpoints or USUAL,
                                            max_concurrency=max_concurrency))

MODEL = "tooti-sim"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "the weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "the weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}}}


def openai_client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                              _strict_response_validation=True)


def anthropic_client(url: str, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)


class Events:
    """The gateway's bus events (what the TUI's event stream relays), by kind."""

    def __init__(self, gateway: Gateway) -> None:
        self.seen: list[BusEvent] = []
        self._changed = trio.Event()
        gateway.registry.bus.listeners.append(self._note)

    def _note(self, event: BusEvent) -> None:
        self.seen.append(event)
        self._changed.set()

    def of(self, kind: str, request_id: str) -> list[dict[str, Any]]:
        return [e.data for e in self.seen
                if e.kind == kind and e.data.get("request_id") == request_id]

    async def wait(self, kind: str, request_id: str) -> dict[str, Any]:
        with trio.fail_after(10):
            while not self.of(kind, request_id):
                self._changed = trio.Event()
                await self._changed.wait()
        return self.of(kind, request_id)[0]

    async def first(self, kind: str) -> dict[str, Any]:
        with trio.fail_after(10):
            while not [e for e in self.seen if e.kind == kind]:
                self._changed = trio.Event()
                await self._changed.wait()
        return next(e.data for e in self.seen if e.kind == kind)


# ------------------------------------------------------------ Responses (openai client)


async def test_responses_create_non_stream(network: Network) -> None:
    await network.add_node([simulated(tokens=6)])
    client = openai_client(network.url)
    raw = await client.responses.with_raw_response.create(
        model=MODEL, input="hello there", instructions="be brief")
    response = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["content-type"].startswith("application/json")
    assert response.status == "completed" and response.model == MODEL
    assert response.output_text.count("tok") == 6
    assert response.instructions == "be brief"
    assert response.usage is not None and response.usage.output_tokens == 6
    assert response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 6


async def test_responses_create_stream_events_in_order(network: Network) -> None:
    await network.add_node([simulated(tokens=4)])
    client = openai_client(network.url)
    stream = await client.responses.create(model=MODEL, input="hi", stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 4
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.usage is not None and done.usage.output_tokens == 4
    assert done.output_text.count("tok") == 4


async def test_responses_stream_helper(network: Network) -> None:
    await network.add_node([simulated(tokens=3)])
    client = openai_client(network.url)
    async with client.responses.stream(model=MODEL, input="hi") as stream:
        async for _event in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_text.count("tok") == 3 and final.usage is not None


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_function_tool_round_trip(network: Network, stream: bool) -> None:
    await network.add_node([simulated(tokens=5, tool_calls=True)])
    client = openai_client(network.url)
    tools: Any = [WEATHER_TOOL]
    if stream:
        async with client.responses.stream(model=MODEL, input="weather in Oslo?",
                                           tools=tools) as events:
            first = await events.get_final_response()
    else:
        first = await client.responses.create(model=MODEL, input="weather in Oslo?",
                                              tools=tools)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"simulated": True}
    assert first.usage is not None and first.usage.output_tokens == 3
    second = await client.responses.create(model=MODEL, tools=tools, input=[
        {"role": "user", "content": "weather in Oslo?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
    ])
    assert second.output_text.count("tok") == 5 and second.status == "completed"
    assert second.usage is not None and second.usage.output_tokens == 5


async def test_responses_errors_are_openai_objects(network: Network) -> None:
    await network.add_node([simulated()])
    client = openai_client(network.url)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
    assert bad.value.code == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model="nope", input="x")
    assert missing.value.code == "model_not_found"


# ------------------------------------------------------------ Anthropic


async def test_anthropic_messages_create(network: Network) -> None:
    await network.add_node([simulated(tokens=5)])
    client = anthropic_client(network.url)
    raw = await client.messages.with_raw_response.create(
        model=MODEL, max_tokens=100, system="be brief",
        messages=[{"role": "user", "content": "hello"}])
    message = await raw.parse()
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert message.role == "assistant" and message.model == MODEL
    assert message.stop_reason == "end_turn"
    [block] = message.content
    assert block.type == "text" and block.text.count("tok") == 5
    assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0


async def test_anthropic_messages_create_stream(network: Network) -> None:
    await network.add_node([simulated(tokens=4)])
    client = anthropic_client(network.url)
    stream = await client.messages.create(
        model=MODEL, max_tokens=3, stream=True,
        messages=[{"role": "user", "content": "hello"}])
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_delta") == 3
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1


async def test_anthropic_stream_helper(network: Network) -> None:
    await network.add_node([simulated(tokens=4)])
    client = anthropic_client(network.url)
    async with client.messages.stream(model=MODEL, max_tokens=100,
                                      messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text.count("tok") == 4 and final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.usage.output_tokens == 4 and final.usage.input_tokens > 0
    assert final.stop_reason == "end_turn"


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_tool_use_round_trip(network: Network, stream: bool) -> None:
    await network.add_node([simulated(tokens=2, tool_calls=True)])
    client = anthropic_client(network.url)
    question: Any = {"role": "user", "content": "weather in Oslo?"}
    if stream:
        async with client.messages.stream(model=MODEL, max_tokens=100, messages=[question],
                                          tools=[ANTHROPIC_TOOL]) as events:
            first = await events.get_final_message()
    else:
        first = await client.messages.create(model=MODEL, max_tokens=100,
                                             messages=[question], tools=[ANTHROPIC_TOOL])
    assert first.stop_reason == "tool_use"
    [use] = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"simulated": True}
    assert first.usage.output_tokens == 3
    second = await client.messages.create(model=MODEL, max_tokens=100, tools=[ANTHROPIC_TOOL],
                                          messages=[
        question,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id,
                                           "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "sunny"}]},
    ])
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text" and second.content[0].text.count("tok") == 2


async def test_anthropic_count_tokens(network: Network) -> None:
    await network.add_node([simulated()])
    client = anthropic_client(network.url)
    counted = await client.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "one two three"}])
    reply = await client.messages.create(
        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "one two three"}])
    assert counted.input_tokens == reply.usage.input_tokens > 0


async def test_anthropic_error_types(network: Network) -> None:
    await network.add_node([simulated()])
    client = anthropic_client(network.url)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="nope", max_tokens=5,
                                     messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert missing.value.request_id == missing.value.response.headers["x-request-id"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model=MODEL, max_tokens=0,
                                     messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert bad.value.body["type"] == "error"  # type: ignore[index]
    assert "max_tokens" in bad.value.message


async def test_anthropic_wrong_key_on_a_keys_gateway(nursery: trio.Nursery) -> None:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", auth="keys",
                                      admin_key="sk-admin-secret"), tunnel)
    url = (await nursery.start(gateway.serve))[0]
    network = Network(nursery, gateway, url, tunnel)
    await network.add_node([simulated()])
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await anthropic_client(url, "sk-wrong").messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    reply = await anthropic_client(url, "sk-admin-secret").messages.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert reply.usage.output_tokens == 5
    # Ollama clients on a keys gateway send the key as a bearer token.
    with pytest.raises(ollama.ResponseError) as anonymous:
        await ollama.AsyncClient(host=url).list()
    assert anonymous.value.status_code == 401
    keyed = ollama.AsyncClient(host=url, headers={"Authorization": "Bearer sk-admin-secret"})
    assert [m.model for m in (await keyed.list()).models] == [f"{MODEL}:latest"]
    # The probes need no key.
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/api/version")).status_code == 200
        assert (await http.get("/")).text == "Ollama is running"
    gateway.shutdown()


# ------------------------------------------------------------ Ollama


async def test_ollama_client_listings(network: Network) -> None:
    await network.add_node([simulated(models=["tooti-sim", "llama3.2:1b"])])
    client = ollama.AsyncClient(host=network.url)
    listed = await client.list()
    assert sorted(m.model or "" for m in listed.models) == ["llama3.2:1b", "tooti-sim:latest"]
    running = await client.ps()
    assert sorted(m.model or "" for m in running.models) == ["llama3.2:1b", "tooti-sim:latest"]
    shown = await client.show("tooti-sim")
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.modelinfo is not None and shown.modelinfo["tooti.nodes"] == 1
    with pytest.raises(ollama.ResponseError) as missing:
        await client.show("nope")
    assert missing.value.status_code == 404 and "not found" in missing.value.error


async def test_ollama_chat_generate_embed(network: Network) -> None:
    await network.add_node([simulated(tokens=4)])
    client = ollama.AsyncClient(host=network.url)
    whole = await client.chat(model="tooti-sim", stream=False,
                              messages=[{"role": "user", "content": "hi"}])
    assert whole.message.content and whole.message.content.count("tok") == 4
    assert whole.done and whole.done_reason == "stop" and whole.eval_count == 4
    assert whole.prompt_eval_count and whole.total_duration
    parts = [part async for part in await client.chat(
        model="tooti-sim:latest", stream=True, messages=[{"role": "user", "content": "hi"}])]
    assert parts[-1].done and parts[-1].eval_count == 4 and parts[-1].model == "tooti-sim:latest"
    assert "".join(p.message.content or "" for p in parts).count("tok") == 4
    generated = await client.generate(model="tooti-sim", prompt="say", system="short",
                                      options={"num_predict": 2})
    assert generated.response.count("tok") == 2 and generated.done_reason == "length"
    streamed = [part async for part in await client.generate(
        model="tooti-sim", prompt="say", stream=True)]
    assert streamed[-1].done and "".join(p.response for p in streamed).count("tok") == 4
    embedded = await client.embed(model="tooti-sim", input=["one", "two"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 8
    legacy = await client.embeddings(model="tooti-sim", prompt="one")
    assert list(legacy.embedding) == pytest.approx(embedded.embeddings[0])


async def test_ollama_tools_and_json_format(network: Network) -> None:
    await network.add_node([simulated(tokens=3, tool_calls=True)])
    client = ollama.AsyncClient(host=network.url)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "w",
                                             "parameters": {"type": "object"}}}
    called = await client.chat(model="tooti-sim", stream=False, tools=[tool],
                               messages=[{"role": "user", "content": "weather?"}])
    [call] = called.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"simulated": True}
    answered = await client.chat(model="tooti-sim", stream=False, tools=[tool], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
    assert (answered.message.content or "").count("tok") == 3


async def test_ollama_sync_client_and_refused_actions(network: Network) -> None:
    """``ollama.Client(host=...)``, the blocking client, unchanged (in a thread: the
    gateway runs in this test's event loop)."""
    await network.add_node([simulated(tokens=2)])

    def use() -> tuple[Any, ...]:
        client = ollama.Client(host=network.url)
        reply = client.chat(model="tooti-sim", messages=[{"role": "user", "content": "hi"}])
        try:
            client.pull("tooti-sim")
        except ollama.ResponseError as exc:
            pulled = exc
        try:
            client.delete("tooti-sim")
        except ollama.ResponseError as exc:
            deleted = exc
        return reply, pulled, deleted

    reply, pulled, deleted = await trio.to_thread.run_sync(use)
    assert (reply.message.content or "").count("tok") == 2
    assert pulled.status_code == deleted.status_code == 501
    assert "pull is not supported by a network gateway" in pulled.error
    assert "delete is not supported by a network gateway" in deleted.error


async def test_ollama_probes_and_other_routes_untouched(network: Network) -> None:
    await network.add_node([simulated()])
    async with network.client() as http:
        root = await http.get("/")
        head = await http.head("/")
        version = await http.get("/api/version")
        version_head = await http.head("/api/version")
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
        unknown = await http.get("/api/nothing")
        models = await http.get("/v1/models")
        elsewhere = await http.get("/index.html")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert root.headers["content-type"].startswith("text/plain")
    assert head.status_code == 200 and head.content == b""
    assert version.json()["version"] and version.headers["x-request-id"].startswith("req_")
    assert version_head.status_code == 200 and version_head.content == b""
    assert version_head.headers["content-length"] == str(len(version.content))
    assert health.json()["status"] == "ok" and ready.json()["status"] == "ready"
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
    assert models.json()["data"][0]["id"] == MODEL
    assert elsewhere.status_code == 404 and "error" in elsewhere.json()


# ------------------------------------------------------------ the one proxy path


async def _slow_node(network: Network, nursery: trio.Nursery) -> SlowUpstream:
    upstream = SlowUpstream()
    url = await start_upstream(nursery, upstream)
    await network.add_node([OpenAIBackend(BackendSettings(type="openai", url=url))])
    return upstream


async def test_anthropic_stream_client_leaving_cancels_the_node(
        network: Network, nursery: trio.Nursery) -> None:
    upstream = await _slow_node(network, nursery)
    client = anthropic_client(network.url)
    async with client.messages.stream(model="slow", max_tokens=1000,
                                      messages=[{"role": "user", "content": "x"}]) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                break  # a token arrived: the client walks away
    await backend_call_cancelled(network, upstream)


async def test_ollama_stream_client_leaving_cancels_the_node(
        network: Network, nursery: trio.Nursery) -> None:
    upstream = await _slow_node(network, nursery)
    client = ollama.AsyncClient(host=network.url)
    first = trio.Event()

    async def read() -> None:
        async for _part in await client.chat(model="slow", stream=True,
                                             messages=[{"role": "user", "content": "x"}]):
            first.set()

    async with trio.open_nursery() as inner:
        inner.start_soon(read)
        with trio.fail_after(10):
            await first.wait()
        inner.cancel_scope.cancel()  # the client gives up mid-stream
    await backend_call_cancelled(network, upstream)


async def test_failover_through_a_front(network: Network) -> None:
    await network.add_node([simulated(fail_rate=1.0, fail_status=503)], node_id="node-bad")
    await network.add_node([simulated(tokens=3)], node_id="node-good")
    events = Events(network.gateway)
    client = openai_client(network.url)
    raw = await client.responses.with_raw_response.create(
        model=MODEL, input="hi", extra_body={"provider": {"order": ["node-bad", "node-good"]}})
    assert raw.parse().output_text.count("tok") == 3
    assert raw.headers["x-tooti-node"] == "node-good"
    request_id = raw.headers["x-request-id"]
    routed = [e["node"] for e in events.of("request.routed", request_id)]
    assert routed == ["node-bad", "node-good"]
    finished = await events.wait("request.finished", request_id)
    assert finished["attempts"] == 2 and finished["status"] == "ok"


@pytest.fixture
def records() -> Iterator[LogWatch]:
    """The access records written (``tooti.access`` at INFO)."""
    with watching("tooti.access", logging.INFO) as watch:
        yield watch


async def access_fields(watch: LogWatch, count: int) -> list[dict[str, Any]]:
    """The fields of the first ``count`` access records, once written."""
    await watch.wait_count(count)
    entries = [r.msg for r in watch.records]
    assert all(isinstance(e, AccessRecord) for e in entries)
    return [e.log_fields() for e in entries]  # type: ignore[union-attr]


async def test_access_log_ledger_and_events_record_front_requests(
        nursery: trio.Nursery, tmp_path: Path, records: LogWatch) -> None:
    """Front requests are access-logged under their own path, settled in the usage ledger
    with the node's real usage, and seen by the event stream the TUI reads."""
    db = Database(str(tmp_path / "tooti.sqlite3"))
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    settings = GatewaySettings(listen="127.0.0.1:0", auth="keys", admin_key="sk-admin-k",
                               gateway_id="gw-fronts")
    credits = Credits(BillingSetup(tmp_path, {}, database=db, gateway_id="gw-fronts"))
    gateway = Gateway(settings, tunnel, billing=[credits], database=db,
                      gateway_id="gw-fronts")
    url = (await nursery.start(gateway.serve))[0]
    network = Network(nursery, gateway, url, tunnel)
    events = Events(gateway)
    try:
        await network.add_node([simulated(tokens=5)])
        key = "sk-admin-k"
        async with httpx.AsyncClient(base_url=url) as http:  # probes: not access-logged
            assert (await http.get("/api/version")).status_code == 200
            assert (await http.head("/")).status_code == 200
        message = await anthropic_client(url, key).messages.with_raw_response.create(
            model=MODEL, max_tokens=100, stream=True,
            messages=[{"role": "user", "content": "one two"}])
        kinds = [event.type async for event in await message.parse()]
        assert kinds[-1] == "message_stop"
        response = await openai_client(url, key).responses.with_raw_response.create(
            model=MODEL, input="one two")
        chat = await ollama.AsyncClient(host=url, headers={
            "Authorization": f"Bearer {key}"}).chat(
            model=MODEL, stream=False, messages=[{"role": "user", "content": "one two"}])
        assert chat.eval_count == 5
        fields = await access_fields(records, 3)
        ids = [message.headers["x-request-id"], response.headers["x-request-id"]]
        assert [f["path"] for f in fields] == ["/v1/messages", "/v1/responses", "/api/chat"]
        assert [f["request_id"] for f in fields[:2]] == ids
        for f, stream in zip(fields, (True, False, False), strict=True):
            assert (f["status"], f["outcome"], f["node"]) == (200, "ok", "node-a")
            assert f["completion_tokens"] == 5 and f["tokens_estimated"] is False
            assert f["key_id"] == "admin-key" and f["stream"] is stream
        ledger = {row[0]: row[1:] for row in await db.read(lambda tx: tx.all(
            "SELECT request_id, status, completion_tokens, estimated, endpoint, stream "
            "FROM usage"))}
        for f, stream in zip(fields, (1, 0, 0), strict=True):
            assert ledger[f["request_id"]] == ("ok", 5, 0, "chat/completions", stream)
            received = await events.wait("request.received", f["request_id"])
            assert received["model"] == MODEL and received["key_id"] == "admin-key"
            finished = await events.wait("request.finished", f["request_id"])
            assert finished["completion_tokens"] == 5 and finished["status"] == "ok"
    finally:
        gateway.shutdown()
        for scope in network.scopes.values():
            scope.cancel()


async def test_native_responses_seam(network: Network) -> None:
    """A Responses request is offered to ``native_responses`` once parsed (the refusals
    apply first); when it declines, the request is translated."""
    await network.add_node([simulated(tokens=2)])
    offered: list[bytes] = []
    serve_natively = False

    async def native(scope: Any, receive: Any, send: Any, request_id: str, headers: Any,
                     caller: Any, request: Any, entry: Any) -> bool:
        offered.append(request.context["raw"])
        if not serve_natively:
            return False
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": b'{"native": true}'})
        return True

    network.gateway.fronts.native_responses = native
    async with network.client() as http:
        translated = await http.post("/v1/responses", json={"model": MODEL, "input": "hi"})
        refused = await http.post("/v1/responses", json={
            "model": MODEL, "input": "hi", "previous_response_id": "resp_1"})
        serve_natively = True
        passed = await http.post("/v1/responses", json={"model": MODEL, "input": "yo"})
    assert translated.json()["status"] == "completed"
    assert refused.status_code == 400
    assert passed.json() == {"native": True}
    assert passed.headers["x-request-id"].startswith("req_")
    assert [json.loads(raw)["input"] for raw in offered] == ["hi", "yo"]


async def test_a_stream_broken_after_its_start_ends_in_the_dialects_error(
        network: Network) -> None:
    await network.add_node([simulated(tokens=8, cut_after=2)])
    anthropic_stream = await anthropic_client(network.url).messages.create(
        model=MODEL, max_tokens=100, stream=True,
        messages=[{"role": "user", "content": "hi"}])
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as broken:
        async for event in anthropic_stream:
            seen.append(event.type)
    assert seen[0] == "message_start" and "message_stop" not in seen
    assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    parts: list[Any] = []
    with pytest.raises(ollama.ResponseError) as ollama_broken:
        async for part in await ollama.AsyncClient(host=network.url).chat(
                model=MODEL, stream=True, messages=[{"role": "user", "content": "hi"}]):
            parts.append(part)
    assert parts and not parts[-1].done and ollama_broken.value.error


async def test_an_alias_through_each_front(network: Network) -> None:
    """A configured alias ([gateway.aliases]) is a model name every front takes: routed to
    its node ids, answered under the name the client sent."""
    network.gateway.reload(msgspec.structs.replace(network.gateway.settings,
                                                   aliases={"fast": "tooti-sim"}))
    await network.add_node([simulated(tokens=2)])
    message = await anthropic_client(network.url).messages.create(
        model="fast", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert message.model == "fast" and message.usage.output_tokens == 2
    response = await openai_client(network.url).responses.create(model="fast", input="hi")
    assert response.output_text.count("tok") == 2
    client = ollama.AsyncClient(host=network.url)
    assert "fast:latest" in [m.model for m in (await client.list()).models]
    chat = await client.chat(model="fast", stream=False,
                             messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "fast" and chat.eval_count == 2


async def test_responses_pass_through_to_a_node_serving_them_natively(
        network: Network) -> None:
    """A node whose backend serves /v1/responses itself gets the client's body untouched
    (the simulated backend's native answer says it is simulated); without one, the same
    request is translated."""
    await network.add_node([simulated()], node_id="translated-only")
    client = openai_client(network.url)
    translated = await client.responses.with_raw_response.create(model=MODEL, input="hi")
    assert translated.headers["x-tooti-node"] == "translated-only"
    await network.add_node([simulated(endpoints=["responses"])], node_id="native")
    async with network.client() as http:
        native = await http.post("/v1/responses", json={
            "model": MODEL, "input": "hi", "instructions": "be brief"})
    assert native.headers["x-tooti-node"] == "native"
    body = native.json()  # the node's own answer, passed through as it came
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["usage"]["input_tokens"] > 0
    with pytest.raises(openai.BadRequestError):  # the front's refusals apply first
        await client.responses.create(model=MODEL, input="x", previous_response_id="resp_1")


class Ledger:
    """A billing plugin recording each request's settle or refund."""

    def __init__(self) -> None:
        self.settled: dict[str, Usage] = {}
        self.refunded: dict[str, str] = {}

    async def run(self) -> None:
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        pass

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        self.settled[ctx.request_id] = usage

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        self.refunded[ctx.request_id] = reason

    async def close(self) -> None:
        pass


class NotJSON(SimulatedBackend):
    """Answers every request 200 ``application/json`` with a body that is not JSON."""

    @asynccontextmanager
    async def open(self, endpoint: str, body: bytes, request: dict[str, Any]
                   ) -> AsyncIterator[BackendResponse]:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"<html>not json</html>"

        yield BackendResponse(200, "application/json", chunks())


async def test_an_answer_that_cannot_be_translated_is_refunded_not_billed(
        network: Network) -> None:
    """A node's whole answer the front cannot translate is the client's 502, and billing
    refunds it (it is settled only once translated), where a translatable one settles."""
    ledger = Ledger()
    network.gateway.billing.plugins.append(ledger)
    await network.add_node([NotJSON(BackendSettings(type="simulated", endpoints=USUAL))],
                           node_id="node-bad")
    await network.add_node([simulated(tokens=2, models=["good"])], node_id="node-good")
    events = Events(network.gateway)
    client = anthropic_client(network.url)
    question: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.APIStatusError) as broken:
        await client.messages.create(model=MODEL, max_tokens=10, messages=question)
    assert broken.value.status_code == 502
    bad = broken.value.response.headers["x-request-id"]
    good = await client.messages.with_raw_response.create(model="good", max_tokens=10,
                                                          messages=question)
    ok = good.headers["x-request-id"]
    assert (await good.parse()).usage.output_tokens == 2
    assert (await events.wait("request.finished", bad))["status"] == "failed"
    assert (await events.wait("request.finished", ok))["status"] == "ok"
    assert bad in ledger.refunded and bad not in ledger.settled
    assert ledger.settled[ok].status == "ok" and ledger.settled[ok].completion_tokens == 2


async def test_native_responses_fall_back_to_translation(network: Network) -> None:
    """Nodes serving Responses natively are preferred, never waited for: when the native
    node refuses (503 before any byte) or is busy, a node that can take the request
    translated answers it."""
    await network.add_node([simulated(endpoints=["responses", *USUAL], fail_rate=1.0,
                                      fail_status=503)], node_id="native-refusing")
    await network.add_node([simulated(tokens=2)], node_id="translated-only")
    client = openai_client(network.url)
    with trio.fail_after(10):
        refused = await client.responses.with_raw_response.create(
            model=MODEL, input="hi", extra_body={"provider": {"order": [
                "native-refusing", "translated-only"]}})
    assert refused.headers["x-tooti-node"] == "translated-only"
    assert refused.parse().output_text.count("tok") == 2
    network.kill_node("native-refusing")
    registry = network.gateway.registry
    with trio.fail_after(10):
        await registry.wait_until(lambda: "native-refusing" not in registry.peers)
    await network.add_node([simulated(endpoints=["responses", *USUAL], stall=60,
                                      max_concurrency=1)], node_id="native-busy")
    events = Events(network.gateway)
    body = {"model": MODEL, "input": "hold"}
    async with trio.open_nursery() as holding, network.client() as http:
        holding.start_soon(lambda: http.post("/v1/responses", json=body))
        routed = await events.first("request.routed")  # its one slot is taken
        assert routed["node"] == "native-busy"
        assert registry.peers["native-busy"].total_in_flight() == 1
        with trio.fail_after(10):
            busy = await client.responses.with_raw_response.create(model=MODEL, input="hi")
        holding.cancel_scope.cancel()
    assert busy.headers["x-tooti-node"] == "translated-only"
