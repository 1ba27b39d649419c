"""The Ollama translation without a server: OpenAI requests as native bodies,
native answers and NDJSON streams as OpenAI objects and SSE events, and the
errors of each (no HTTP, no trio)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import msgspec
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.backend_fixtures import parse_sse
from tooti.backends.base import BackendError
from tooti.backends.ollama_answers import (
    ChatStream,
    CompletionStream,
    NdjsonLines,
    answer_base,
    chat_completion,
    check_first_item,
    decode_answer,
    embedding_list,
    stream_ended_early,
    stream_for,
    text_completion,
)
from tooti.backends.ollama_requests import (
    Defaults,
    chat_payload,
    embed_payload,
    generate_payload,
    stream_flags,
)

BASE = {"id": "chatcmpl-x", "created": 1, "model": "public"}
PIXEL = base64.b64encode(b"\x89PNG fake").decode()
FINAL = {"done": True, "done_reason": "stop", "prompt_eval_count": 12, "eval_count": 3,
         "total_duration": 5_000_000, "load_duration": 1_000, "prompt_eval_duration": 2_000,
         "eval_duration": 3_000}
"""Ollama's last stream item: counts and durations (in ns)."""
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "public", "messages": [{"role": "user", "content": "Hi"}], **fields}


def refused(message: str) -> Any:
    """pytest.raises for a 400 BackendError whose message contains ``message``."""
    return pytest.raises(BackendError, match=message)


# -- requests -----------------------------------------------------------------------


def test_chat_with_options_format_and_defaults() -> None:
    body = chat_payload(chat(
        max_tokens=64, stop="END", temperature=0.2, top_p=0.9, seed=7, top_k=40,
        presence_penalty=0.5, frequency_penalty=0.1, min_p=0.05, repeat_penalty=1.1,
        response_format={"type": "json_object"}, stream=True, logit_bias={"1": 2}),
        "llama3.2:latest", Defaults(num_ctx=8192, keep_alive="30m"))
    assert body == {
        "model": "llama3.2:latest", "stream": True, "keep_alive": "30m", "format": "json",
        "messages": [{"role": "user", "content": "Hi"}],
        "options": {"num_predict": 64, "stop": ["END"], "temperature": 0.2, "top_p": 0.9,
                    "presence_penalty": 0.5, "frequency_penalty": 0.1, "min_p": 0.05,
                    "repeat_penalty": 1.1, "seed": 7, "top_k": 40, "num_ctx": 8192},
    }


def test_plain_chat_sends_no_options() -> None:
    assert chat_payload(chat(), "m", Defaults()) == {
        "model": "m", "stream": False, "messages": [{"role": "user", "content": "Hi"}]}


def test_max_completion_tokens_wins_and_empty_stop_is_dropped() -> None:
    body = chat_payload(chat(max_completion_tokens=5, max_tokens=9, stop=[]), "m", Defaults())
    assert body["options"] == {"num_predict": 5}


@pytest.mark.parametrize(("response_format", "expected"), [
    ({"type": "text"}, None),
    ({"type": "json_object"}, "json"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
     {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "s"}}, "json"),
])
def test_response_format(response_format: dict[str, Any], expected: Any) -> None:
    body = chat_payload(chat(response_format=response_format), "m", Defaults())
    assert body.get("format") == expected


def test_messages_with_images_tools_and_roles() -> None:
    request = chat(tools=[WEATHER], messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
            {"type": "text", "text": "And the weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Cold."},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    ])
    body = chat_payload(request, "m", Defaults())
    assert body["tools"] == [WEATHER]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?\nAnd the weather?", "images": [PIXEL]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "Cold.", "tool_name": "get_weather"},
        {"role": "assistant", "content": "No."},
    ]


def test_tool_choice_none_drops_the_tools() -> None:
    assert "tools" not in chat_payload(chat(tools=[WEATHER], tool_choice="none"), "m", Defaults())


def test_completion_and_embedding_bodies() -> None:
    body = generate_payload({"model": "p", "prompt": ["Once"], "suffix": "end", "max_tokens": 3,
                             "stream": True, "stream_options": {"include_usage": True}},
                            "m", Defaults(num_ctx=2048))
    assert body == {"model": "m", "stream": True, "prompt": "Once", "suffix": "end",
                    "options": {"num_predict": 3, "num_ctx": 2048}}
    assert embed_payload({"input": ["a", "b"], "dimensions": 8}, "m", Defaults(keep_alive=-1)) == {
        "model": "m", "input": ["a", "b"], "dimensions": 8, "keep_alive": -1}


@pytest.mark.parametrize(("request_", "flags"), [
    ({}, (False, False)),
    ({"stream": None}, (False, False)),
    ({"stream": True}, (True, False)),
    ({"stream": True, "stream_options": {"include_usage": True}}, (True, True)),
    ({"stream": False, "stream_options": {"include_usage": True}}, (False, False)),
])
def test_stream_flags(request_: dict[str, Any], flags: tuple[bool, bool]) -> None:
    assert stream_flags(request_) == flags


@pytest.mark.parametrize(("request_", "message"), [
    (chat(n=2), "'n' must be 1"),
    (chat(max_tokens=-1), "'max_tokens' must be a non-negative integer"),
    (chat(max_tokens=True), "'max_tokens' must be a non-negative integer"),
    (chat(stop=[1]), "'stop' must be a string or an array of strings"),
    (chat(temperature="hot"), "'temperature' must be a number"),
    (chat(seed=1.5), "'seed' must be an integer"),
    (chat(response_format="json"), "'response_format' must be an object"),
    (chat(response_format={"type": "grammar"}), "unsupported response_format type 'grammar'"),
    (chat(stream="yes"), "'stream' must be a boolean"),
    (chat(stream=True, stream_options=1), "'stream_options' must be an object"),
    (chat(tools={}), "'tools' must be an array"),
    (chat(messages=[]), "'messages' is required"),
    (chat(messages=[{"content": "x"}]), "each message must be an object with a 'role'"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "unsupported message role 'robot'"),
    (chat(messages=[{"role": "user", "content": 5}]), "message content must be a string"),
    (chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
     "unsupported content part type 'audio'"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     "a text part needs a 'text' string"),
    (chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]),
     "only as base64 data URLs"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "an image_url part needs a 'url'"),
    (chat(messages=[{"role": "assistant", "tool_calls": [{"function": {}}]}]),
     "a tool call needs a 'function' with a 'name'"),
    (chat(messages=[{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}]),
     "tool call arguments must be a JSON object"),
    (chat(messages=[{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}]),
     "tool call arguments must be a JSON object"),
])
def test_chat_requests_refused(request_: dict[str, Any], message: str) -> None:
    with refused(message) as info:
        chat_payload(request_, "m", Defaults())
    assert (info.value.status, info.value.code, info.value.retryable) == (
        400, "invalid_request_error", False)


@pytest.mark.parametrize(("request_", "message"), [
    ({"prompt": [1, 2]}, "no token arrays"),
    ({"prompt": "x", "echo": True}, "'echo' is not supported"),
    ({"prompt": "x", "best_of": 2}, "'best_of' is not supported"),
    ({"prompt": "x", "suffix": 3}, "'suffix' must be a string"),
])
def test_completion_requests_refused(request_: dict[str, Any], message: str) -> None:
    with refused(message):
        generate_payload(request_, "m", Defaults())


@pytest.mark.parametrize(("request_", "message"), [
    ({"input": []}, "non-empty array of strings"),
    ({"input": [[1, 2]]}, "no token arrays"),
    ({"input": "x", "encoding_format": "hex"}, "'encoding_format' must be 'float' or 'base64'"),
    ({"input": "x", "dimensions": 0}, "'dimensions' must be a positive integer"),
])
def test_embedding_requests_refused(request_: dict[str, Any], message: str) -> None:
    with refused(message):
        embed_payload(request_, "m", Defaults())


# -- whole answers ------------------------------------------------------------------


def test_chat_answer_with_tool_calls_and_usage() -> None:
    whole = chat_completion({
        "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        **FINAL}, BASE)
    completion = ChatCompletion.model_validate(whole, strict=True)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert msgspec.json.decode(call.function.arguments) == {"city": "Oslo"}
    assert whole["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert (whole["id"], whole["created"], whole["model"]) == ("chatcmpl-x", 1, "public")


def test_text_answer_cut_by_length() -> None:
    whole = text_completion({"response": "Once upon", "done": True, "done_reason": "length",
                             "eval_count": 2}, {**BASE, "id": "cmpl-x"})
    completion = Completion.model_validate(whole, strict=True)
    assert completion.choices[0].text == "Once upon"
    assert completion.choices[0].finish_reason == "length"
    assert whole["usage"] == {"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2}


def test_embeddings_as_floats_and_base64() -> None:
    item = {"embeddings": [[0.5, 1], [0.25, -2.0]], "prompt_eval_count": 4}
    floats = embedding_list(item, "public", "float")
    assert [d["embedding"] for d in floats["data"]] == [[0.5, 1], [0.25, -2.0]]
    assert floats["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    packed = embedding_list(item, "public", "base64")["data"][1]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(packed)) == (0.25, -2.0)


def test_answer_base_and_decoding() -> None:
    assert answer_base("chat/completions", "p", 9)["id"].startswith("chatcmpl-")
    assert answer_base("completions", "p", 9)["id"].startswith("cmpl-")
    assert decode_answer(bytearray(b'{"response": "x"}')) == {"response": "x"}
    with pytest.raises(BackendError, match="ollama sent a bad answer"):
        decode_answer(b"[1]")
    with pytest.raises(BackendError, match="ollama sent a bad answer"):
        decode_answer(b"{")
    with pytest.raises(BackendError, match="ollama error: model not found") as info:
        decode_answer(b'{"error": "model not found"}')
    assert (info.value.status, info.value.code) == (502, "upstream_error")


# -- streams ------------------------------------------------------------------------


def test_chat_stream_to_sse_with_usage_last() -> None:
    stream = stream_for("chat/completions", BASE, include_usage=True)
    data = b"".join([
        *stream.feed({"message": {"role": "assistant", "content": "Hel"}, "done": False}),
        *stream.feed({"message": {"role": "assistant", "content": ""}, "done": False}),
        *stream.feed({"message": {"role": "assistant", "content": "lo"}, "done": False}),
        *stream.feed({"message": {"role": "assistant", "content": ""}, **FINAL}),
    ])
    assert stream.done
    events, done = parse_sse(data)
    assert done
    chunks = [ChatCompletionChunk.model_validate(e, strict=True) for e in events]
    assert [c.choices[0].delta.content for c in chunks[:2]] == ["Hel", "lo"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:3]] == [None, None, "stop"]
    assert all(c.usage is None for c in chunks[:3])
    usage = events[-1]
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    # The counts of the last item, and none of its durations.
    assert usage["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert not any("duration" in key for event in events for key in event)


def test_chat_stream_numbers_tool_calls_across_items() -> None:
    stream = ChatStream(BASE, include_usage=False)
    call = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    data = b"".join([
        *stream.feed({"message": {"role": "assistant", "content": "", "tool_calls": [call]}}),
        *stream.feed({"message": {"role": "assistant", "content": "",
                                  "tool_calls": [{**call, "id": "mine"}]}}),
        *stream.feed({"message": {"role": "assistant", "content": ""}, **FINAL}),
    ])
    events, done = parse_sse(data)
    calls = [e["choices"][0]["delta"]["tool_calls"][0] for e in events[:2]]
    assert [c["index"] for c in calls] == [0, 1] and calls[1]["id"] == "mine"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and done
    assert "usage" not in events[-1]


def test_completion_stream_to_sse() -> None:
    stream = CompletionStream({**BASE, "id": "cmpl-x"}, include_usage=True)
    first = stream.feed({"response": "", "done": False})
    assert first == []
    data = b"".join([*stream.feed({"response": "Once", "done": False}),
                     *stream.feed({"response": "", **FINAL, "done_reason": "length"})])
    events, done = parse_sse(data)
    assert done and [e["object"] for e in events] == ["text_completion"] * 3
    assert [e["choices"][0]["text"] for e in events[:2]] == ["Once", ""]
    assert events[1]["choices"][0]["finish_reason"] == "length"
    assert events[2]["usage"]["total_tokens"] == 15


def test_stream_errors() -> None:
    stream = ChatStream(BASE, include_usage=False)
    with pytest.raises(BackendError, match="ollama stream error: out of memory") as info:
        stream.feed({"error": "out of memory"})
    assert (info.value.status, info.value.code) == (502, "backend_stream_error")
    assert not stream.done
    with pytest.raises(BackendError, match="ollama error: no such model") as info:
        check_first_item({"error": "no such model"})
    assert (info.value.status, info.value.code, info.value.retryable) == (
        500, "upstream_error", True)
    check_first_item({"message": {"content": "ok"}})
    ended = stream_ended_early()
    assert (ended.message, ended.code) == ("ollama stream ended before it was done",
                                           "backend_stream_error")


# -- NDJSON -------------------------------------------------------------------------


def test_ndjson_split_at_every_byte() -> None:
    items = [{"response": "a\nb", "done": False}, {"response": "é", "done": False}, FINAL]
    body = b"\n".join(msgspec.json.encode(i) for i in items) + b"\n\n"
    for cut in range(len(body) + 1):
        lines = NdjsonLines()
        got = [*lines.feed(body[:cut]), *lines.feed(body[cut:]), *lines.end()]
        assert got == items, cut


def test_ndjson_last_line_without_newline_and_blank_lines() -> None:
    lines = NdjsonLines()
    assert list(lines.feed(b'\n  \n{"a": 1}\n{"b"')) == [{"a": 1}]
    assert list(lines.feed(b": 2}")) == []
    assert list(lines.end()) == [{"b": 2}]
    assert list(lines.end()) == []


def test_ndjson_items_before_a_bad_line_come_first() -> None:
    items = NdjsonLines().feed(b'{"a": 1}\n[1, 2]\n')
    assert next(items) == {"a": 1}
    with pytest.raises(BackendError, match=r"ollama sent a bad stream line: b'\[1, 2\]'") as info:
        next(items)
    assert (info.value.status, info.value.code) == (502, "backend_stream_error")
    with pytest.raises(BackendError, match="bad stream line"):
        list(NdjsonLines().feed(b"not json\n"))


def test_ndjson_overlong_line() -> None:
    lines = NdjsonLines(max_line=8)
    assert list(lines.feed(b'{"a": 1}\n12345678')) == [{"a": 1}]
    with pytest.raises(BackendError, match="overlong stream line") as info:
        list(lines.feed(b"9"))
    assert info.value.code == "backend_stream_error"
