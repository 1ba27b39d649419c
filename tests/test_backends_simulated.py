"""The simulated backend: OpenAI wire shapes, every option, failure injection."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import openai
import pytest
import trio
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.backend_fixtures import call, openai_client, parse_sse, read_all
from tooti.backends import BACKEND_TYPES, create_backend
from tooti.backends.base import BackendError
from tooti.backends.openai import OpenAIBackend
from tooti.backends.simulated import SimulatedBackend
from tooti.backends.simulated_answers import (
    DONE_EVENT,
    SYSTEM_FINGERPRINT,
    StreamShape,
    count_message_tokens,
    embeddings_body,
    plan_tokens,
    prepare_embeddings,
    prepare_job,
)
from tooti.settings import BackendSettings

MODEL = "tooti-sim"


def sim(models: list[str] | None = None, **options: Any) -> SimulatedBackend:
    """A simulated backend with ``options``."""
    return SimulatedBackend(BackendSettings(type="simulated", models=models or [],
                                            options=options))


def chat(content: Any = "hello there world", **fields: Any) -> dict[str, Any]:
    """A chat request for the default model."""
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def expected_text(n: int) -> str:
    """The simulated completion of ``n`` tokens."""
    return "".join(f" tok{i}" for i in range(n))


# -- registry and models ----------------------------------------------------------


def test_create_backend_by_type() -> None:
    assert set(BACKEND_TYPES) == {"simulated", "openai", "llamacpp", "ollama"}
    assert isinstance(create_backend(BackendSettings(type="simulated")), SimulatedBackend)
    backend = create_backend(BackendSettings(type="openai", url="http://127.0.0.1:9/v1"))
    assert isinstance(backend, OpenAIBackend)
    with pytest.raises(ValueError, match="available: llamacpp, ollama, openai, simulated"):
        create_backend(BackendSettings(type="nope"))
    with pytest.raises(ValueError, match="url"):
        create_backend(BackendSettings(type="openai"))


async def test_models_are_labelled_simulated() -> None:
    default = await sim().models()
    assert [m.id for m in default] == ["tooti-sim"]
    settings = BackendSettings(type="simulated", models=["a", "b"], max_concurrency=3,
                               price_input=1.5, price_output=2.0)
    backend = SimulatedBackend(settings)
    await backend.start()
    infos = await backend.models()
    assert [m.id for m in infos] == ["a", "b"]
    for info in infos:
        assert info.owned_by == "tooti-simulated"
        assert info.meta == {"simulated": True}
        assert (info.max_concurrency, info.price_input, info.price_output) == (3, 1.5, 2.0)
        assert info.to_wire()["meta"] == {"simulated": True}
    assert await backend.health()
    backend.healthy = False
    assert not await backend.health()
    await backend.close()


async def test_run_sleeps_until_cancelled() -> None:
    with trio.move_on_after(0.01) as scope:
        await sim().run()
    assert scope.cancelled_caught


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="fail_rate"):
        sim(fail_rate=2)
    with pytest.raises(ValueError, match="embedding_dim"):
        sim(embedding_dim=0)


# -- chat -----------------------------------------------------------------------------


async def test_chat_non_stream_shape() -> None:
    response, body = await call(sim(), "chat/completions", chat())
    assert (response.status, response.content_type) == (200, "application/json")
    completion = ChatCompletion.model_validate(msgspec.json.decode(body), strict=True)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.choices[0].message.content == expected_text(16)
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 16)
    assert completion.usage.total_tokens == 19


@pytest.mark.parametrize(
    ("fields", "n_tokens", "finish"),
    [
        ({"max_tokens": 4}, 4, "length"),
        ({"max_completion_tokens": 5}, 5, "length"),
        ({"max_tokens": 9, "max_completion_tokens": 3}, 3, "length"),
        ({"max_tokens": 100}, 16, "stop"),
        ({"max_tokens": 0}, 0, "length"),
        ({"stop": "tok3"}, 3, "stop"),
        ({"stop": [" tok9", "tok2"]}, 2, "stop"),
        ({"stop": "tok5", "max_tokens": 3}, 3, "length"),
        ({"stop": None, "max_tokens": None}, 16, "stop"),
    ],
)
async def test_chat_length_caps_and_stop(
    fields: dict[str, Any], n_tokens: int, finish: str
) -> None:
    _, body = await call(sim(), "chat/completions", chat(**fields))
    completion = ChatCompletion.model_validate(msgspec.json.decode(body), strict=True)
    assert completion.choices[0].message.content == expected_text(n_tokens)
    assert completion.choices[0].finish_reason == finish
    assert completion.usage is not None
    assert completion.usage.completion_tokens == n_tokens


async def test_chat_n_choices_and_token_option() -> None:
    _, body = await call(sim(tokens=2), "chat/completions", chat(n=3))
    completion = ChatCompletion.model_validate(msgspec.json.decode(body), strict=True)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.message.content for c in completion.choices} == {" tok0 tok1"}
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6


def test_prompt_tokens_count_words_of_text_content() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "one two three"},
            {"type": "image_url", "image_url": {"url": "data:,x"}},
        ]},
        {"role": "assistant", "content": None},
    ]
    assert count_message_tokens(messages) == 5
    assert count_message_tokens([{"role": "user", "content": ""}]) == 1


async def test_chat_stream_shape_and_usage() -> None:
    request = chat(stream=True, max_tokens=3, n=2, stream_options={"include_usage": True})
    response, body = await call(sim(), "chat/completions", request)
    assert response.content_type == "text/event-stream"
    assert body.endswith(b"data: [DONE]\n\n")
    events, done = parse_sse(body)
    assert done
    chunks = [ChatCompletionChunk.model_validate(e, strict=True) for e in events]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    *body_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 6
    assert usage_chunk.usage.prompt_tokens == 3
    assert all(c.usage is None for c in body_chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in body_chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert all(choice.delta.role is None for choice in mine[1:])
        assert "".join(ch.delta.content or "" for ch in mine) == expected_text(3)
        assert [ch.finish_reason for ch in mine][-1] == "length"
        assert all(ch.finish_reason is None for ch in mine[:-1])


async def test_chat_stream_without_usage_has_no_usage_field() -> None:
    _, body = await call(sim(tokens=2), "chat/completions", chat(stream=True))
    events, done = parse_sse(body)
    assert done
    assert all("usage" not in e for e in events)
    assert all(len(e["choices"]) == 1 for e in events)


async def test_chat_stream_with_no_tokens_still_sends_role() -> None:
    _, body = await call(sim(), "chat/completions", chat(stream=True, max_tokens=0))
    events, _ = parse_sse(body)
    chunks = [ChatCompletionChunk.model_validate(e, strict=True) for e in events]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices[0].finish_reason == "length"


# -- completions and embeddings ---------------------------------------------------


async def test_completions_non_stream_and_stream() -> None:
    request = {"model": MODEL, "prompt": ["a b c", "d"], "max_tokens": 2}
    _, body = await call(sim(), "completions", request)
    completion = Completion.model_validate(msgspec.json.decode(body), strict=True)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert [c.text for c in completion.choices] == [" tok0 tok1"] * 2
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 4)

    request = {"model": MODEL, "prompt": [1, 2, 3], "stream": True,
               "stream_options": {"include_usage": True}, "stop": ["tok4"]}
    response, body = await call(sim(), "completions", request)
    assert response.content_type == "text/event-stream"
    events, done = parse_sse(body)
    assert done
    # OpenAI itself streams finish_reason null, which the Completion type (made
    # for whole answers) rejects; validate those chunks with a placeholder.
    for event in events:
        for choice in event["choices"]:
            assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    chunks = [
        Completion.model_validate(
            {**e, "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"}
                              for c in e["choices"]]},
            strict=True,
        )
        for e in events
    ]
    assert [e["choices"][0]["finish_reason"] for e in events[:4]] == [None] * 4
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(4)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("value", "count", "tokens"),
    [("one two", 1, 2), (["a", "b c", "d"], 3, 4), ([5, 6, 7], 1, 3), ([[1, 2], [3]], 2, 3)],
)
async def test_embeddings_are_deterministic_unit_vectors(
    value: Any, count: int, tokens: int
) -> None:
    request = {"model": MODEL, "input": value}
    _, body = await call(sim(embedding_dim=16), "embeddings", request)
    result = CreateEmbeddingResponse.model_validate(msgspec.json.decode(body), strict=True)
    assert [d.index for d in result.data] == list(range(count))
    for item in result.data:
        assert len(item.embedding) == 16
        assert math.isclose(math.fsum(x * x for x in item.embedding), 1.0, rel_tol=1e-9)
    assert result.usage.prompt_tokens == result.usage.total_tokens == tokens
    _, again = await call(sim(embedding_dim=16), "embeddings", request)
    assert again == body


async def test_embeddings_dimensions_and_distinct_inputs() -> None:
    _, body = await call(sim(), "embeddings", {"model": MODEL, "input": ["x", "y"],
                                                "dimensions": 5})
    data = msgspec.json.decode(body)["data"]
    assert [len(d["embedding"]) for d in data] == [5, 5]
    assert data[0]["embedding"] != data[1]["embedding"]


# -- the official openai client ----------------------------------------------------


async def test_official_client_accepts_everything() -> None:
    client = openai_client(sim(tokens=4))
    completion = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2
    )
    assert completion.choices[1].message.content == expected_text(4)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == expected_text(4)
    assert usage is not None and usage.completion_tokens == 4
    legacy = await client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert legacy.choices[0].finish_reason == "length"
    embedded = await client.embeddings.create(model=MODEL, input=["a", "b"])  # base64 wire
    assert [len(d.embedding) for d in embedded.data] == [8, 8]
    floats = await client.embeddings.create(model=MODEL, input="a", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(embedded.data[0].embedding, rel=1e-6)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "model_not_found"
    await client.close()


# -- bad requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "request_body"),
    [
        ("chat/completions", {"model": MODEL}),
        ("chat/completions", {"model": MODEL, "messages": []}),
        ("chat/completions", {"model": MODEL, "messages": ["hi"]}),
        ("chat/completions", chat(n=0)),
        ("chat/completions", chat(n=True)),
        ("chat/completions", chat(max_tokens=-1)),
        ("chat/completions", chat(max_tokens="5")),
        ("chat/completions", chat(stop=3)),
        ("chat/completions", chat(stream="yes")),
        ("chat/completions", chat(stream=True, stream_options=[])),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("completions", {"model": MODEL}),
        ("completions", {"model": MODEL, "prompt": [{"x": 1}]}),
        ("embeddings", {"model": MODEL}),
        ("embeddings", {"model": MODEL, "input": []}),
        ("embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"}),
        ("embeddings", {"model": MODEL, "input": "x", "dimensions": 0}),
    ],
)
async def test_bad_requests_are_400(endpoint: str, request_body: dict[str, Any]) -> None:
    with pytest.raises(BackendError) as info:
        await call(sim(), endpoint, request_body)
    assert (info.value.status, info.value.code) == (400, "invalid_request_error")
    assert not info.value.retryable


async def test_unknown_model_and_endpoint() -> None:
    with pytest.raises(BackendError) as info:
        await call(sim(), "chat/completions", {**chat(), "model": "nope"})
    assert (info.value.status, info.value.code, info.value.retryable) == (
        404, "model_not_found", False)
    with pytest.raises(BackendError) as info:
        await call(sim(), "video/generations", chat())  # not an endpoint at all
    assert info.value.status == 404


# -- timing, failure injection ---------------------------------------------------


async def test_stream_timing_follows_ttft_and_rate(autojump_clock: trio.abc.Clock) -> None:
    backend = sim(ttft=2.0, tokens_per_second=10.0, tokens=4)
    request = chat(stream=True)
    start = trio.current_time()
    stamps = []
    async with backend.open("chat/completions", msgspec.json.encode(request), request) as r:
        assert trio.current_time() == start  # the head comes at once
        async for chunk in r.chunks:
            if b'"content"' in chunk:
                stamps.append(round(trio.current_time() - start, 6))
    assert stamps == [2.0, 2.1, 2.2, 2.3]


async def test_non_stream_head_waits_for_generation(autojump_clock: trio.abc.Clock) -> None:
    backend = sim(ttft=1.0, tokens_per_second=4.0, tokens=5)
    start = trio.current_time()
    await call(backend, "chat/completions", chat())
    assert trio.current_time() - start == pytest.approx(2.0)
    start = trio.current_time()
    await call(backend, "embeddings", {"model": MODEL, "input": "x"})
    assert trio.current_time() - start == pytest.approx(1.0)


async def test_stall_holds_the_head_and_is_cancellable(autojump_clock: trio.abc.Clock) -> None:
    backend = sim(stall=30.0)
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(10):
            await call(backend, "chat/completions", chat(stream=True))
    start = trio.current_time()
    await call(backend, "chat/completions", chat(stream=True))
    assert trio.current_time() - start == pytest.approx(30.0)


async def test_fail_rate_is_deterministic_per_seed() -> None:
    async def outcomes(backend: SimulatedBackend) -> list[bool]:
        results = []
        for _ in range(40):
            try:
                await call(backend, "chat/completions", chat(max_tokens=1))
                results.append(True)
            except BackendError as exc:
                assert (exc.status, exc.code, exc.retryable) == (500, "simulated_failure", True)
                results.append(False)
        return results

    first = await outcomes(sim(fail_rate=0.5, seed=7))
    assert first == await outcomes(sim(fail_rate=0.5, seed=7))
    assert True in first and False in first
    assert first != await outcomes(sim(fail_rate=0.5, seed=8))
    assert not any(await outcomes(sim(fail_rate=1.0)))
    assert all(await outcomes(sim(fail_rate=0.0)))


async def test_fail_status_sets_status_and_retryability() -> None:
    for status, retryable in ((429, True), (503, True), (400, False)):
        with pytest.raises(BackendError) as info:
            await call(sim(fail_rate=1, fail_status=status), "embeddings",
                       {"model": MODEL, "input": "x"})
        assert (info.value.status, info.value.retryable) == (status, retryable)


async def test_cut_after_breaks_the_stream() -> None:
    backend = sim(cut_after=3)
    request = chat(stream=True)
    received = []
    with pytest.raises(BackendError) as info:
        async with backend.open("chat/completions", msgspec.json.encode(request), request) as r:
            async for chunk in r.chunks:
                received.append(chunk)
    assert info.value.code == "simulated_stream_cut"
    assert len(received) == 3
    assert not any(b"[DONE]" in chunk for chunk in received)


async def test_leaving_mid_stream_closes_the_generator() -> None:
    backend = sim(tokens_per_second=1000.0, tokens=1000)
    request = chat(stream=True)
    async with backend.open("chat/completions", msgspec.json.encode(request), request) as r:
        first = await r.chunks.__anext__()
        assert first.startswith(b"data: ")
    with pytest.raises(StopAsyncIteration):
        await r.chunks.__anext__()


async def test_body_for_non_stream_is_one_json_document() -> None:
    backend = sim()
    request = chat()
    async with backend.open("chat/completions", msgspec.json.encode(request), request) as r:
        body = await read_all(r)
    assert msgspec.json.decode(body)["object"] == "chat.completion"


# -- the answers without I/O ------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_stream_shape_events_are_the_encoded_chunk_objects(
    endpoint: str, include_usage: bool
) -> None:
    request: dict[str, Any] = {"n": 2, "max_tokens": 2,
                               "stream_options": {"include_usage": include_usage}}
    if endpoint == "chat/completions":
        request["messages"] = [{"role": "user", "content": "a b"}]
    else:
        request["prompt"] = "a b"
    job = prepare_job(endpoint, MODEL, request, 16)
    shape = StreamShape(job, "abc", 7)
    chat_stream = endpoint == "chat/completions"
    base: dict[str, Any] = {
        "id": ("chatcmpl-abc" if chat_stream else "cmpl-abc"),
        "object": "chat.completion.chunk" if chat_stream else "text_completion",
        "created": 7, "model": MODEL, "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if include_usage:
        base["usage"] = None

    def sse(value: dict[str, Any]) -> bytes:
        return b"data: " + msgspec.json.encode(value) + b"\n\n"

    first = shape.content(1, " tok0", True)
    if chat_stream:
        choice = {"index": 1, "delta": {"role": "assistant", "content": " tok0"},
                  "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": 1, "text": " tok0", "logprobs": None, "finish_reason": None}
    assert first == sse({**base, "choices": [choice]})
    closing = shape.closing()
    assert closing[-1] == DONE_EVENT
    assert len(closing) == 2 + include_usage + 1
    if include_usage:
        usage = {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
        assert closing[-2] == sse({**base, "choices": [], "usage": usage})
    assert shape.opening() == []


def test_stream_shape_opens_an_empty_chat_answer_with_the_role() -> None:
    request = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0, "n": 3}
    job = prepare_job("chat/completions", MODEL, request, 16)
    assert (job.tokens, job.finish_reason, job.n_choices) == ([], "length", 3)
    opening = StreamShape(job, "id", 0).opening()
    assert [msgspec.json.decode(e[len(b"data: "):])["choices"][0]["delta"]
            for e in opening] == [{"role": "assistant", "content": ""}] * 3


@pytest.mark.parametrize(("request_fields", "tokens", "reason"), [
    ({}, [" tok0", " tok1", " tok2"], "stop"),
    ({"max_tokens": 2}, [" tok0", " tok1"], "length"),
    ({"max_tokens": 5, "max_completion_tokens": 1}, [" tok0"], "length"),
    ({"max_tokens": 3}, [" tok0", " tok1", " tok2"], "stop"),
    ({"stop": "tok1"}, [" tok0"], "stop"),
    ({"stop": [" tok2", ""]}, [" tok0", " tok1"], "stop"),
])
def test_plan_tokens(request_fields: dict[str, Any], tokens: list[str], reason: str) -> None:
    assert plan_tokens(request_fields, 3) == (tokens, reason)


def test_embeddings_body_without_io() -> None:
    job = prepare_embeddings(MODEL, {"input": ["a b", [1, 2, 3]], "dimensions": 4}, 8)
    assert (job.dim, job.prompt_tokens, job.encoding_format) == (4, 5, "float")
    body = msgspec.json.decode(embeddings_body(job))
    assert [len(d["embedding"]) for d in body["data"]] == [4, 4]
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    with pytest.raises(BackendError) as info:
        prepare_embeddings(MODEL, {"input": "x", "encoding_format": "hex"}, 8)
    assert info.value.status == 400
