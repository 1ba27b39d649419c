"""The ollama backend, against the protocol-faithful fake in :mod:`tests.ollama_fake`."""

from __future__ import annotations

import base64
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import openai
import pytest
import trio
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.backend_fixtures import call, openai_client, parse_sse, serve_asgi
from tests.ollama_fake import COMPLETION, CUT_AFTER, REPLY, FakeOllama, tokens, unit_vector
from tooti.backends import create_backend
from tooti.backends.base import BackendError
from tooti.backends.ollama import (
    ChatStream,
    OllamaBackend,
    canonical_name,
    chat_completion,
    embedding_list,
    ollama_error,
    root_url,
)
from tooti.settings import BackendSettings

CHAT = "llama3.2"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}, "precise": {"type": "boolean"}}}}}
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n fake pixel").decode()


def backend_for(url: str, **kwargs: Any) -> OllamaBackend:
    """An ollama backend aimed at ``url`` with the given options and settings."""
    options = kwargs.pop("options", {})
    return OllamaBackend(BackendSettings(type="ollama", url=url, options=options, **kwargs))


@pytest.fixture
async def fake(nursery: trio.Nursery) -> AsyncIterator[tuple[FakeOllama, str]]:
    """A :class:`FakeOllama` on a loopback port; yields (app, root URL)."""
    app = FakeOllama()
    url = await serve_asgi(nursery, app)
    yield app, url
    nursery.cancel_scope.cancel()


@pytest.fixture
async def ollama(fake: tuple[FakeOllama, str]) -> AsyncIterator[tuple[FakeOllama, OllamaBackend]]:
    """A started backend aimed at the fake; yields (fake app, backend)."""
    app, url = fake
    backend = backend_for(url)
    await backend.start()
    yield app, backend
    await backend.close()


def closed_port() -> int:
    """A loopback port with (almost certainly) no listener."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def chat(content: Any = "Hi there", **fields: Any) -> dict[str, Any]:
    """A chat request for the fake's chat model."""
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **fields}


def sse_chunks(body: bytes) -> list[ChatCompletionChunk]:
    """Parse and strictly validate a chat SSE body (which must end with [DONE])."""
    events, done = parse_sse(body)
    assert done
    return [ChatCompletionChunk.model_validate(e, strict=True) for e in events]


# -- configuration, discovery, health -----------------------------------------------


@pytest.mark.parametrize(
    ("configured", "root"),
    [("http://h:11434", "http://h:11434"), ("http://h:11434/", "http://h:11434"),
     ("http://h:11434/api", "http://h:11434"), ("http://h:11434/api/", "http://h:11434"),
     ("http://h:11434/v1", "http://h:11434"), ("", "http://127.0.0.1:11434")],
)
def test_root_url(configured: str, root: str) -> None:
    assert root_url(configured) == root
    assert backend_for(configured).url == root


def test_names_and_bad_options() -> None:
    assert canonical_name("llama3.2") == "llama3.2:latest"
    assert canonical_name("qwen2.5:0.5b") == "qwen2.5:0.5b"
    assert canonical_name("registry:5000/me/model") == "registry:5000/me/model:latest"
    with pytest.raises(ValueError, match="num_ctx"):
        backend_for("", options={"num_ctx": "big"})
    with pytest.raises(ValueError, match="rename"):
        backend_for("", options={"rename": ["x"]})


def test_registered_as_ollama() -> None:
    backend = create_backend(BackendSettings(type="ollama", url="http://127.0.0.1:9"))
    assert isinstance(backend, OllamaBackend)
    assert backend.type_name == "ollama"


async def test_models_with_warm_flags_and_details(
    ollama: tuple[FakeOllama, OllamaBackend],
) -> None:
    app, backend = ollama
    models = {m.id: m for m in await backend.models()}
    assert set(models) == {m.name for m in app.models}
    assert models["llama3.2:latest"].warm and models["nomic-embed-text:latest"].warm
    assert not models["qwen2.5:0.5b"].warm
    qwen = models["qwen2.5:0.5b"]
    assert (qwen.owned_by, qwen.context_length) == ("ollama", None)
    assert qwen.meta == {"family": "qwen2", "parameter_size": "494M",
                         "quantization_level": "Q4_K_M", "format": "gguf"}
    assert [r.path for r in app.requests] == ["/api/tags", "/api/ps"]


async def test_models_restricted_renamed_and_num_ctx(fake: tuple[FakeOllama, str]) -> None:
    _, url = fake
    backend = backend_for(url, models=["llama3.2", "small", "not-pulled"], max_concurrency=3,
                          price_output=2.0,
                          options={"num_ctx": 8192, "rename": {"small": "qwen2.5:0.5b"}})
    models = await backend.models()
    assert [(m.id, m.warm, m.context_length, m.max_concurrency, m.price_output)
            for m in models] == [("llama3.2", True, 8192, 3, 2.0),
                                 ("small", False, 8192, 3, 2.0)]
    discovered = backend_for(url, options={"rename": {"small": "qwen2.5:0.5b"}})
    ids = {m.id for m in await discovered.models()}
    assert "small" in ids and "qwen2.5:0.5b" not in ids
    await backend.close()
    await discovered.close()


async def test_model_discovery_failures(fake: tuple[FakeOllama, str]) -> None:
    app, url = fake
    backend = backend_for(url)
    app.fail["/api/ps"] = 500
    assert not any(m.warm for m in await backend.models())  # only warmth is lost
    app.fail["/api/tags"] = 500
    with pytest.raises(BackendError) as info:
        await backend.models()
    assert (info.value.status, info.value.message) == (500, "fake failure of /api/tags")
    await backend.close()
    unreachable = backend_for(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(BackendError) as info:
        await unreachable.models()
    assert info.value.code == "backend_unavailable"
    await unreachable.close()


async def test_health(fake: tuple[FakeOllama, str]) -> None:
    app, url = fake
    backend = backend_for(url + "/api/")
    assert await backend.health()
    assert app.requests[-1].path == "/api/version"
    app.fail["/api/version"] = 500
    assert not await backend.health()
    await backend.close()
    unreachable = backend_for(f"http://127.0.0.1:{closed_port()}")
    assert not await unreachable.health()
    await unreachable.close()


# -- chat ---------------------------------------------------------------------------


async def test_chat_non_stream(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    app, backend = ollama
    response, body = await call(backend, "chat/completions", chat())
    assert (response.status, response.content_type) == (200, "application/json")
    completion = ChatCompletion.model_validate(msgspec.json.decode(body), strict=True)
    assert completion.id.startswith("chatcmpl-") and completion.model == CHAT
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", REPLY)
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (2, len(tokens(REPLY)), 2 + len(tokens(REPLY)))
    assert app.last == {"model": CHAT, "stream": False,
                        "messages": [{"role": "user", "content": "Hi there"}]}
    seen = app.requests[-1]
    assert (seen.method, seen.path) == ("POST", "/api/chat")
    assert seen.headers["accept-encoding"] == "identity"
    assert seen.headers["content-type"] == "application/json"


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream(ollama: tuple[FakeOllama, OllamaBackend], include_usage: bool) -> None:
    app, backend = ollama
    request = chat(stream=True, stream_options={"include_usage": include_usage})
    response, body = await call(backend, "chat/completions", request)
    assert (response.status, response.content_type) == (200, "text/event-stream")
    assert app.last is not None and app.last["stream"] is True
    chunks = sse_chunks(body)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.model == CHAT and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(tokens(REPLY))
        assert chunks[-1].usage.prompt_tokens == 2
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert chunks[-1].choices and b'"usage"' not in body


async def test_official_client_chat(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    _, backend = ollama
    client = openai_client(backend)
    completion = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi there"}], max_tokens=3)
    assert completion.choices[0].message.content == "".join(tokens(REPLY)[:3])
    assert completion.choices[0].finish_reason == "length"
    stream = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == REPLY and usage is not None and usage.prompt_tokens == 1
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    await client.close()


async def test_option_mapping(fake: tuple[FakeOllama, str]) -> None:
    app, url = fake
    backend = backend_for(url, api_key="sekret",
                          options={"num_ctx": 8192, "keep_alive": "10m",
                                   "headers": {"X-Team": "gpu-lab"}})
    request = chat(max_tokens=50, max_completion_tokens=4, stop="never", temperature=0.2,
                   top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=-0.5, top_k=20,
                   response_format={"type": "json_object"}, user="ignored", logprobs=False)
    _, body = await call(backend, "chat/completions", request)
    assert app.last is not None
    assert app.last["options"] == {
        "num_predict": 4, "stop": ["never"], "temperature": 0.2, "top_p": 0.9,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 7, "top_k": 20,
        "num_ctx": 8192}
    assert (app.last["format"], app.last["keep_alive"]) == ("json", "10m")
    assert set(app.last) == {"model", "stream", "messages", "options", "format", "keep_alive"}
    assert msgspec.json.decode(msgspec.json.decode(body)["choices"][0]["message"]["content"])
    headers = app.requests[-1].headers
    assert (headers["authorization"], headers["x-team"]) == ("Bearer sekret", "gpu-lab")

    _, body = await call(backend, "chat/completions", chat(stop=["meet", "x"]))
    assert app.last["options"] == {"stop": ["meet", "x"], "num_ctx": 8192}
    choice = msgspec.json.decode(body)["choices"][0]
    assert choice["message"]["content"] == "Hello from the fake Ollama server, nice to"
    assert choice["finish_reason"] == "stop"
    await backend.close()


async def test_json_schema_format(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    app, backend = ollama
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    request = chat(response_format={"type": "json_schema",
                                    "json_schema": {"name": "person", "schema": schema,
                                                    "strict": True}})
    _, body = await call(backend, "chat/completions", request)
    assert app.last is not None and app.last["format"] == schema
    content = msgspec.json.decode(body)["choices"][0]["message"]["content"]
    assert msgspec.json.decode(content) == {"name": "fake", "age": 1}
    await call(backend, "chat/completions", chat(response_format={"type": "text"}))
    assert "format" not in app.last


async def test_array_content_and_image(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    app, backend = ollama
    content = [{"type": "text", "text": "What is"}, {"type": "text", "text": "this?"},
               {"type": "image_url",
                "image_url": {"url": f"data:image/png;base64,{PIXEL}", "detail": "low"}}]
    messages: Any = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": content}]
    client = openai_client(backend)
    completion = await client.chat.completions.create(model=CHAT, messages=messages)
    assert completion.choices[0].message.content == "I see 1 image(s)."
    assert app.last is not None and app.last["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is\nthis?", "images": [PIXEL]}]
    await client.close()


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [("https://example.com/cat.png", 400, "data URLs"),
     ("data:image/png,rawbytes", 400, "data URLs"),
     ("data:image/png;base64,not*base64", 400, "illegal base64")],  # Ollama refuses this one
)
async def test_bad_images_are_400(
    ollama: tuple[FakeOllama, OllamaBackend], url: str, status: int, message: str
) -> None:
    _, backend = ollama
    content = [{"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(BackendError) as info:
        await call(backend, "chat/completions", chat(content))
    assert (info.value.status, info.value.retryable) == (status, False)
    assert message in info.value.message


# -- tools --------------------------------------------------------------------------


async def test_tool_call_non_stream(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    app, backend = ollama
    client = openai_client(backend)
    completion = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Use get_weather for Paris"}],
        tools=[WEATHER_TOOL, TIME_TOOL])  # type: ignore[list-item]
    assert app.last is not None and app.last["tools"] == [WEATHER_TOOL, TIME_TOOL]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call_ = choice.message.tool_calls[0]
    assert call_.type == "function" and call_.id.startswith("call_")
    assert call_.function.name == "get_weather"
    assert msgspec.json.decode(call_.function.arguments) == {"city": "fake"}
    await client.close()


async def test_tool_call_stream_deltas(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    _, backend = ollama
    request = chat("Call get_weather and get_time", tools=[WEATHER_TOOL, TIME_TOOL],
                   stream=True)
    _, body = await call(backend, "chat/completions", request)
    chunks = sse_chunks(body)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.type, tc.function.name if tc.function else None) for tc in calls] == [
        (0, "function", "get_weather"), (1, "function", "get_time")]
    assert all(tc.id and tc.id.startswith("call_") for tc in calls)
    assert len({tc.id for tc in calls}) == 2
    assert [msgspec.json.decode(tc.function.arguments or "") for tc in calls
            if tc.function] == [{"city": "fake"}, {"zone": "fake", "precise": True}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tool_results_are_mapped(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    app, backend = ollama
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    request = {"model": CHAT, "messages": messages, "tools": [WEATHER_TOOL],
               "tool_choice": "none"}
    _, body = await call(backend, "chat/completions", request)
    assert app.last is not None and app.last["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
    ]
    assert "tools" not in app.last  # tool_choice "none"
    assert msgspec.json.decode(body)["choices"][0]["finish_reason"] == "stop"


# -- completions and embeddings -------------------------------------------------------


async def test_completions(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    app, backend = ollama
    client = openai_client(backend)
    completion = await client.completions.create(
        model=CHAT, prompt="Tell me a story", suffix="The end.", max_tokens=100, seed=1)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == COMPLETION
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        4, len(tokens(COMPLETION)))
    assert app.last == {"model": CHAT, "stream": False, "prompt": "Tell me a story",
                        "suffix": "The end.", "options": {"num_predict": 100, "seed": 1}}
    assert app.requests[-1].path == "/api/generate"
    await client.close()

    request = {"model": CHAT, "prompt": ["Once"], "max_tokens": 2, "stream": True,
               "stream_options": {"include_usage": True}}
    response, body = await call(backend, "completions", request)
    assert response.content_type == "text/event-stream"
    events, done = parse_sse(body)
    assert done and len({e["id"] for e in events}) == 1
    chunks = [
        Completion.model_validate(
            {**e, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                              for c in e["choices"]]}, strict=True)
        for e in events
    ]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Once upon"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


async def test_embeddings_float_and_base64(ollama: tuple[FakeOllama, OllamaBackend]) -> None:
    app, backend = ollama
    model = "nomic-embed-text"
    request = {"model": model, "input": ["hello world", "second"], "encoding_format": "float"}
    _, body = await call(backend, "embeddings", request)
    result = CreateEmbeddingResponse.model_validate(msgspec.json.decode(body), strict=True)
    assert (result.object, result.model) == ("list", model)
    assert [d.embedding for d in result.data] == [unit_vector("hello world", 4),
                                                  unit_vector("second", 4)]
    assert result.usage.prompt_tokens == result.usage.total_tokens == 3
    assert app.last == {"model": model, "input": ["hello world", "second"]}
    assert app.requests[-1].path == "/api/embed"

    _, body = await call(backend, "embeddings", {**request, "encoding_format": "base64"})
    packed = base64.b64decode(msgspec.json.decode(body)["data"][0]["embedding"])
    assert list(struct.unpack("<4f", packed)) == unit_vector("hello world", 4)

    client = openai_client(backend)  # asks for base64 and decodes it
    embedded = await client.embeddings.create(model=model, input="hello world", dimensions=6)
    assert app.last is not None and app.last["dimensions"] == 6
    assert embedded.data[0].embedding == pytest.approx(unit_vector("hello world", 6))
    await client.close()


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "status", "code", "retryable", "message"),
    [("missing", 404, "model_not_found", False,
      'model "missing" not found, try pulling it first'),
     ("nomic-embed-text", 400, "invalid_request_error", False,
      '"nomic-embed-text" does not support chat'),
     ("crash", 500, "upstream_error", True, "llama runner process has terminated"),
     ("busy", 503, "upstream_error", True, "server busy")],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors_keep_status(
    ollama: tuple[FakeOllama, OllamaBackend], model: str, status: int, code: str,
    retryable: bool, message: str, stream: bool,
) -> None:
    _, backend = ollama
    with pytest.raises(BackendError) as info:
        await call(backend, "chat/completions", {**chat(stream=stream), "model": model})
    assert (info.value.status, info.value.code, info.value.retryable) == (
        status, code, retryable)
    assert message in info.value.message


def test_bad_embedding_answer() -> None:
    with pytest.raises(BackendError, match="bad embedding"):
        embedding_list({"embeddings": [[0.1, "x"]]}, "m", "base64")
    with pytest.raises(BackendError, match="no embeddings"):
        embedding_list({"error": None}, "m", "float")


def test_error_bodies() -> None:
    assert ollama_error(429, b'{"error": "slow down"}').retryable
    assert ollama_error(408, b"").message == "ollama answered 408"
    assert ollama_error(502, b"<html>bad gateway</html>").message == (
        "ollama answered 502: <html>bad gateway</html>")
    assert not ollama_error(401, b'{"error": "unauthorized"}').retryable


@pytest.mark.parametrize(
    ("endpoint", "request_body", "message"),
    [("chat/completions", chat(n=2), "'n' must be 1"),
     ("chat/completions", chat(stream="yes"), "'stream'"),
     ("chat/completions", chat(max_tokens=-1), "max_tokens"),
     ("chat/completions", chat(stop=[1]), "'stop'"),
     ("chat/completions", chat(temperature="hot"), "temperature"),
     ("chat/completions", {"model": CHAT, "messages": []}, "messages"),
     ("chat/completions", chat([{"type": "input_audio"}]), "input_audio"),
     ("chat/completions", chat(response_format={"type": "yaml"}), "response_format"),
     ("completions", {"model": CHAT, "prompt": [1, 2, 3]}, "prompt"),
     ("completions", {"model": CHAT, "prompt": "x", "echo": True}, "echo"),
     ("embeddings", {"model": CHAT, "input": [[1, 2]]}, "input"),
     ("embeddings", {"model": CHAT, "input": "x", "encoding_format": "int8"}, "encoding"),
     ("chat/completions", {"messages": []}, "model")],
)
async def test_bad_requests_are_refused_locally(
    ollama: tuple[FakeOllama, OllamaBackend], endpoint: str, request_body: dict[str, Any],
    message: str,
) -> None:
    app, backend = ollama
    with pytest.raises(BackendError) as info:
        await call(backend, endpoint, request_body)
    assert (info.value.status, info.value.retryable) == (400, False)
    assert message in info.value.message
    assert app.requests == []


async def test_unknown_endpoint_and_unreachable_server() -> None:
    backend = backend_for(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(BackendError) as info:
        await call(backend, "files", {"model": CHAT})
    assert info.value.status == 404
    with pytest.raises(BackendError) as info:
        await call(backend, "chat/completions", chat())
    assert (info.value.status, info.value.code, info.value.retryable) == (
        502, "backend_unavailable", True)
    await backend.close()


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
async def test_cut_stream_raises_from_the_iterator(
    ollama: tuple[FakeOllama, OllamaBackend], endpoint: str
) -> None:
    _, backend = ollama
    request = {"model": "cut", "stream": True, "messages": [{"role": "user", "content": "x"}],
               "prompt": "x"}
    received: list[bytes] = []
    async with backend.open(endpoint, msgspec.json.encode(request), request) as response:
        assert response.status == 200  # the head came before the cut
        with pytest.raises(BackendError) as info:
            async for chunk in response.chunks:
                received.append(chunk)
    assert info.value.code == "backend_stream_error"
    events, done = parse_sse(b"".join(received))
    assert not done and len(events) == CUT_AFTER


async def test_error_line_mid_stream_raises_from_the_iterator(
    ollama: tuple[FakeOllama, OllamaBackend],
) -> None:
    _, backend = ollama
    request = chat(stream=True, model="broken")
    received: list[bytes] = []
    with pytest.raises(BackendError) as info:
        async with backend.open("chat/completions", msgspec.json.encode(request),
                                request) as response:
            async for chunk in response.chunks:
                received.append(chunk)
    assert (info.value.code, info.value.status) == ("backend_stream_error", 502)
    assert "unexpected EOF" in info.value.message
    events, done = parse_sse(b"".join(received))
    assert not done
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "".join(
        tokens(REPLY)[:CUT_AFTER])


async def test_error_as_first_stream_line_is_reported_before_the_head(
    ollama: tuple[FakeOllama, OllamaBackend],
) -> None:
    _, backend = ollama
    with pytest.raises(BackendError) as info:
        await call(backend, "chat/completions", chat(stream=True, model="doomed"))
    assert (info.value.status, info.value.code, info.value.retryable) == (
        500, "upstream_error", True)
    assert "unexpected EOF" in info.value.message


def test_thinking_and_load_answers() -> None:
    base = {"id": "chatcmpl-x", "created": 1, "model": "m"}
    stream = ChatStream(base, include_usage=False)
    events = stream.feed({"message": {"role": "assistant", "content": "",
                                      "thinking": "Hmm."}, "done": False})
    events += stream.feed({"message": {"role": "assistant", "content": "Hi"},
                           "done": True, "done_reason": "load"})
    chunks = sse_chunks(b"".join(events))
    assert chunks[0].choices[0].delta.model_extra == {"reasoning_content": "Hmm."}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[1].choices[0].delta.content == "Hi"
    assert chunks[-1].choices[0].finish_reason == "stop"
    whole = chat_completion({"message": {"role": "assistant", "content": "",
                                         "thinking": "Hmm."}, "done": True}, base)
    completion = ChatCompletion.model_validate(whole, strict=True)
    assert completion.choices[0].message.content == ""
    assert completion.usage is not None and completion.usage.total_tokens == 0


# -- cancellation ---------------------------------------------------------------------


async def test_cancelling_mid_stream_disconnects_ollama(
    ollama: tuple[FakeOllama, OllamaBackend],
) -> None:
    app, backend = ollama
    request = chat(stream=True, model="endless")
    with trio.CancelScope() as scope:
        async with backend.open("chat/completions", msgspec.json.encode(request),
                                request) as response:
            first = await response.chunks.__anext__()
            assert b'"role":"assistant"' in first
            scope.cancel()
            await trio.lowlevel.checkpoint()  # cancelled outside any httpx read
    assert scope.cancelled_caught
    with trio.fail_after(5):
        await app.disconnected.wait()


async def test_cancelling_before_the_head_disconnects_ollama(
    ollama: tuple[FakeOllama, OllamaBackend],
) -> None:
    app, backend = ollama
    request = chat(model="endless")  # non-streaming: Ollama answers only when done

    async def ask(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await call(backend, "chat/completions", request)

    async with trio.open_nursery() as nursery:
        scope = await nursery.start(ask)
        with trio.fail_after(5):
            await app.started.wait()
        scope.cancel()
    with trio.fail_after(5):
        await app.disconnected.wait()


async def test_leaving_the_context_early_disconnects_ollama(
    ollama: tuple[FakeOllama, OllamaBackend],
) -> None:
    app, backend = ollama
    request = {"model": "endless", "prompt": "x", "stream": True}
    async with backend.open("completions", msgspec.json.encode(request), request) as response:
        await response.chunks.__anext__()
    with trio.fail_after(5):
        await app.disconnected.wait()
