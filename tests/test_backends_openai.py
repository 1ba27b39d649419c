"""The openai backend: against a real llama.cpp server and a small fake upstream."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import trio
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests import backend_fixtures
from tests.backend_fixtures import FakeUpstream, call, parse_sse, serve_asgi
from tooti.backends.base import BackendError
from tooti.backends.openai import OpenAIBackend, upstream_error
from tooti.settings import BackendSettings

LLAMA = "gemma-3-270m"

# Shared fixtures (the session's one llama.cpp child and a backend aimed at it).
llamacpp_server = backend_fixtures.llamacpp_server
llamacpp_backend = backend_fixtures.llamacpp_backend


def backend_for(url: str, **kwargs: Any) -> OpenAIBackend:
    """An openai backend aimed at ``{url}/v1``."""
    options = kwargs.pop("options", {})
    return OpenAIBackend(BackendSettings(type="openai", url=f"{url}/v1", options=options,
                                         **kwargs))


@pytest.fixture
async def fake(nursery: trio.Nursery) -> AsyncIterator[tuple[FakeUpstream, str]]:
    """A :class:`FakeUpstream` served on a loopback port; yields (app, root URL)."""
    app = FakeUpstream()
    url = await serve_asgi(nursery, app)
    yield app, url
    nursery.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port with (almost certainly) no listener."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- against the real llama.cpp server ----------------------------------------


@pytest.mark.llamacpp
async def test_real_models_and_health(llamacpp_backend: OpenAIBackend) -> None:
    assert await llamacpp_backend.health()
    models = await llamacpp_backend.models()
    assert [m.id for m in models] == [LLAMA]
    assert models[0].context_length == 1024


@pytest.mark.llamacpp
async def test_real_chat_non_stream(llamacpp_backend: OpenAIBackend) -> None:
    request = {"model": LLAMA, "messages": [{"role": "user", "content": "Say hi"}],
               "max_tokens": 4, "temperature": 0}
    response, body = await call(llamacpp_backend, "chat/completions", request)
    assert response.status == 200
    assert response.content_type.startswith("application/json")
    completion = ChatCompletion.model_validate(msgspec.json.decode(body))
    assert completion.model == LLAMA
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 4


@pytest.mark.llamacpp
async def test_real_chat_stream_with_usage(llamacpp_backend: OpenAIBackend) -> None:
    request = {"model": LLAMA, "messages": [{"role": "user", "content": "Count"}],
               "max_tokens": 3, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    response, body = await call(llamacpp_backend, "chat/completions", request)
    assert response.content_type.startswith("text/event-stream")
    events, done = parse_sse(body)
    assert done
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"


@pytest.mark.llamacpp
async def test_real_completions_and_embeddings(llamacpp_backend: OpenAIBackend) -> None:
    request = {"model": LLAMA, "prompt": "Once upon a", "max_tokens": 2, "temperature": 0}
    _, body = await call(llamacpp_backend, "completions", request)
    completion = Completion.model_validate(msgspec.json.decode(body))
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    request = {"model": LLAMA, "input": ["hello world", "a longer second input"]}
    _, body = await call(llamacpp_backend, "embeddings", request)
    result = CreateEmbeddingResponse.model_validate(msgspec.json.decode(body))
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == len(result.data[1].embedding) == 640
    assert result.usage.prompt_tokens > 0


@pytest.mark.llamacpp
async def test_real_bad_request_is_400(llamacpp_backend: OpenAIBackend) -> None:
    with pytest.raises(BackendError) as info:
        await call(llamacpp_backend, "chat/completions", {"model": LLAMA})
    assert (info.value.status, info.value.retryable) == (400, False)
    assert info.value.code == "invalid_request_error"
    assert "messages" in info.value.message


# -- against the fake upstream ------------------------------------------------------


async def test_forwards_exact_bytes_and_headers(fake: tuple[FakeUpstream, str]) -> None:
    app, url = fake
    backend = backend_for(url, api_key="sekret", options={"headers": {"X-Extra": "1"}})
    body = b'{ "model" : "m",  "messages": [], "tools": [{"type": "function"}] }'
    async with backend.open("chat/completions", body, msgspec.json.decode(body)) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        data = b"".join([c async for c in response.chunks])
    assert msgspec.json.decode(data)["model"] == "m"
    seen = app.received[-1]
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions", body)
    assert seen.headers["authorization"] == "Bearer sekret"
    assert seen.headers["x-extra"] == "1"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept-encoding"] == "identity"
    await backend.close()


async def test_rename_rewrites_only_the_model(fake: tuple[FakeUpstream, str]) -> None:
    app, url = fake
    backend = backend_for(url, options={"rename": {"public": "upstream-x"}})
    request = {"model": "public", "messages": [{"role": "user", "content": "é"}],
               "response_format": {"type": "json_object"}}
    await call(backend, "chat/completions", request)
    assert msgspec.json.decode(app.received[-1].body) == {**request, "model": "upstream-x"}
    other = b'{"model":"not-renamed" , "messages":[]}'
    async with backend.open("chat/completions", other, msgspec.json.decode(other)):
        pass
    assert app.received[-1].body == other
    await backend.close()


async def test_model_discovery_and_static_models(fake: tuple[FakeUpstream, str]) -> None:
    app, url = fake
    backend = backend_for(url, options={"rename": {"pub-a": "up-a"}}, max_concurrency=2)
    models = await backend.models()
    assert [(m.id, m.context_length, m.max_concurrency) for m in models] == [
        ("pub-a", None, 2), ("up-b", 4096, 2)]
    static = backend_for(url, models=["x", "y"], price_input=3.0)
    count = len(app.received)
    assert [(m.id, m.price_input) for m in await static.models()] == [("x", 3.0), ("y", 3.0)]
    assert len(app.received) == count  # no discovery request
    app.models_status = 500
    with pytest.raises(BackendError) as info:
        await backend.models()
    assert info.value.status == 500
    await backend.close()
    await static.close()


async def test_health_prefers_root_health_then_models(fake: tuple[FakeUpstream, str]) -> None:
    app, url = fake
    backend = backend_for(url)
    assert await backend.health()
    assert [r.path for r in app.received] == ["/health"]
    app.health_status = 404
    assert await backend.health()
    assert [r.path for r in app.received][-2:] == ["/health", "/v1/models"]
    app.models_status = 503
    assert not await backend.health()
    await backend.close()
    unreachable = backend_for(f"http://127.0.0.1:{closed_port()}")
    assert not await unreachable.health()
    with pytest.raises(BackendError) as info:
        await unreachable.models()
    assert info.value.code == "backend_unavailable"
    await unreachable.close()


@pytest.mark.parametrize(
    ("model", "status", "code", "retryable", "message"),
    [
        ("error-400", 400, "fake_code", False, "fake error 400"),
        ("error-404", 404, "fake_code", False, "fake error 404"),
        ("error-429", 429, "fake_code", True, "fake error 429"),
        ("error-408", 408, "fake_code", True, "fake error 408"),
        ("error-500", 500, "fake_code", True, "fake error 500"),
        ("error-503-text", 503, "upstream_error", True, "upstream exploded"),
    ],
)
async def test_upstream_errors_keep_status(
    fake: tuple[FakeUpstream, str], model: str, status: int, code: str, retryable: bool,
    message: str,
) -> None:
    _, url = fake
    backend = backend_for(url)
    with pytest.raises(BackendError) as info:
        await call(backend, "chat/completions", {"model": model, "messages": []})
    assert (info.value.status, info.value.code, info.value.retryable) == (
        status, code, retryable)
    assert message in info.value.message
    await backend.close()


def test_upstream_error_body_shapes() -> None:
    assert upstream_error(422, b'{"detail": "bad field"}').message == "bad field"
    assert upstream_error(400, b'{"error": "plain"}').message == "plain"
    typed = upstream_error(401, b'{"error": {"message": "no", "type": "auth", "code": 401}}')
    assert (typed.message, typed.code, typed.retryable) == ("no", "auth", False)
    assert upstream_error(502, b"").message == "upstream answered 502"
    assert upstream_error(500, b"x" * 100_000).message.endswith("x" * 10)


async def test_connect_error_is_backend_unavailable() -> None:
    backend = backend_for(f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(BackendError) as info:
        await call(backend, "chat/completions", {"model": "m", "messages": []})
    assert (info.value.status, info.value.code, info.value.retryable) == (
        502, "backend_unavailable", True)
    await backend.close()


async def test_unknown_endpoint_is_refused(fake: tuple[FakeUpstream, str]) -> None:
    _, url = fake
    with pytest.raises(BackendError) as info:
        await call(backend_for(url), "files", {"model": "m"})
    assert info.value.status == 404


async def test_requests_reuse_one_pooled_connection(fake: tuple[FakeUpstream, str]) -> None:
    """Requests one after the other ride one kept-alive connection; requests in flight
    together each get their own (the pool replaced httpx's round-robin shards)."""
    app, url = fake
    backend = backend_for(url, options={"clients": 2})
    for _ in range(4):
        await call(backend, "chat/completions", {"model": "m", "messages": []})
    ports = [r.client_port for r in app.received]
    assert len(ports) == 4 and len(set(ports)) == 1
    request = {"model": "m", "messages": []}
    body = msgspec.json.encode(request)
    async with backend.open("chat/completions", body, request) as first, \
            backend.open("chat/completions", body, request) as second:
        assert b"".join([c async for c in first.chunks])
        assert b"".join([c async for c in second.chunks])
    assert app.received[-1].client_port != app.received[-2].client_port
    assert ports[0] in {app.received[-1].client_port, app.received[-2].client_port}
    await backend.close()


async def test_cancelling_mid_stream_disconnects_upstream(
    fake: tuple[FakeUpstream, str],
) -> None:
    app, url = fake
    backend = backend_for(url)
    request = {"model": "endless", "messages": [], "stream": True}
    with trio.CancelScope() as scope:
        async with backend.open("chat/completions", msgspec.json.encode(request),
                                request) as response:
            assert response.content_type == "text/event-stream"
            assert await response.chunks.__anext__() == b'data: {"n": 1}\n\n'
            scope.cancel()
            await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    with trio.fail_after(5):
        await app.disconnected.wait()
    await backend.close()


async def test_leaving_the_context_early_disconnects_upstream(
    fake: tuple[FakeUpstream, str],
) -> None:
    app, url = fake
    backend = backend_for(url)
    request = {"model": "endless", "messages": [], "stream": True}
    async with backend.open("chat/completions", msgspec.json.encode(request),
                            request) as response:
        await response.chunks.__anext__()
    with trio.fail_after(5):
        await app.disconnected.wait()
    await backend.close()


async def test_broken_stream_raises_backend_error(fake: tuple[FakeUpstream, str]) -> None:
    _, url = fake
    backend = backend_for(url)
    request = {"model": "break", "messages": [], "stream": True}
    chunks = []
    with pytest.raises(BackendError) as info:
        async with backend.open("chat/completions", msgspec.json.encode(request),
                                request) as response:
            async for chunk in response.chunks:
                chunks.append(chunk)
    assert info.value.code == "backend_stream_error"
    assert chunks == [b'data: {"n": 1}\n\n']
    await backend.close()


async def test_environment_proxy_is_honoured(nursery: trio.Nursery,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, requests go through the proxy (httpx honours it; the lean
    client would not), answered as usual."""
    seen: list[bytes] = []

    async def proxy(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        seen.append(data.split(b"\r\n", 1)[0])
        body = b'{"id": "via-proxy"}'
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                              b"content-length: %d\r\n\r\n%b" % (len(body), body))

    listeners = await nursery.start(trio.serve_tcp, proxy, 0)
    port = listeners[0].socket.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    backend = backend_for("http://upstream.invalid:8000")
    response, body = await call(backend, "chat/completions", {"model": "m", "messages": []})
    assert (response.status, body) == (200, b'{"id": "via-proxy"}')
    assert seen == [b"POST http://upstream.invalid:8000/v1/chat/completions HTTP/1.1"]
    await backend.close()
