"""The Responses API front (tooti.fronts.responses): request translation, answers and
streamed events checked against the official ``openai`` SDK's own types, and the SDK
itself driven end to end over an ``httpx2.MockTransport`` (the SDK's transport package)
whose handler runs the translation over canned chat-completions answers (no gateway)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import msgspec
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.fronts_support import (
    NodeStream,
    check_front,
    many_pieces,
    node_streams,
    run,
    sse_wire,
    through_sse,
)
from tooti.errors import APIError
from tooti.fronts.base import ChatRequest, StreamTranslator
from tooti.fronts.responses import (
    MAX_METADATA_KEYS,
    MAX_TOOLS,
    answer_body,
    build_response,
    error_body,
    parse_request,
)
from tooti.fronts.responses_stream import FRONT, ResponsesStream
from tooti.fronts.tool_calls import MAX_ARGUMENT_BYTES
from tooti.gateway import validation
from tooti.protocol.sse import SSEDecoder

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def parse(body: dict[str, Any]) -> ChatRequest:
    return parse_request(json.dumps(body).encode())


def refusal(body: dict[str, Any]) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body)
    assert info.value.status == 400
    return info.value


def events_of(raw: bytes) -> list[dict[str, Any]]:
    """The stream's events, each checked: SSE framing, ``event:`` equal to the data's
    ``type``, and the SDK's ``ResponseStreamEvent`` union validating it."""
    decoder = SSEDecoder()
    out = []
    for event in decoder.events(raw):
        data = json.loads(event.data)
        assert event.event == data["type"]
        EVENTS.validate_python(data)
        out.append(data)
    assert decoder.close() is None
    return out


def run_stream(request: ChatRequest, chunks: list[Any], *, fail: APIError | None = None
               ) -> list[dict[str, Any]]:
    translator: StreamTranslator = ResponsesStream(request)
    raw = translator.start() + b"".join(translator.feed(c) for c in chunks)
    raw += translator.fail(fail) if fail else translator.finish()
    assert translator.finish() == b"" and translator.feed({"choices": []}) == b""
    events = events_of(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[1]["type"] == "response.in_progress"
    assert [e["type"] in TERMINAL for e in events].count(True) == 1
    assert events[-1]["type"] in TERMINAL
    return events


def passes_the_chat_checks(request: ChatRequest) -> None:
    """The translated body is a chat-completions body the gateway's own checks accept."""
    checked = validation.parse_request("chat/completions", msgspec.json.encode(request.body))
    assert (checked.model, checked.stream) == (request.model, request.stream)


def text_chunk(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "model": "node-model",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def delta_chunk(**delta: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def finish_chunk(reason: str = "stop") -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def usage_chunk(prompt: int = 7, completion: int = 3) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}}


def call_chunk(index: int, *, call_id: str | None = None, name: str | None = None,
               arguments: str = "") -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call["id"] = call_id
        call["type"] = "function"
    if name:
        call["function"]["name"] = name
    return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}, "strict": True}


# -- requests -------------------------------------------------------------------------------


def test_string_input_instructions_and_parameters() -> None:
    request = parse({
        "model": "gemma", "input": "Hi", "instructions": "Be brief.", "temperature": 0.5,
        "top_p": 0.9, "max_output_tokens": 64, "user": "u-1", "store": False,
        "metadata": {"k": "v"}, "service_tier": "auto", "reasoning": {"effort": "low"},
        "truncation": "auto", "include": ["reasoning.encrypted_content"], "unknown": 1,
    })
    assert request.model == "gemma" and request.stream is False
    assert request.body == {
        "model": "gemma", "stream": False, "temperature": 0.5, "top_p": 0.9,
        "max_tokens": 64, "user": "u-1",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}],
    }
    assert request.context["response_id"].startswith("resp_")
    assert request.context["echo"]["metadata"] == {"k": "v"}
    assert request.context["echo"]["store"] is False


def test_stream_asks_the_node_for_usage_and_keeps_the_raw_body() -> None:
    raw = json.dumps({"model": "m", "input": "x", "stream": True}).encode()
    request = parse_request(raw, created_at=1700000000.5, response_id="resp_fixed")
    assert request.stream is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.context["raw"] is raw
    assert request.context["created_at"] == 1700000000
    assert request.context["response_id"] == "resp_fixed"


def test_items_messages_images_and_a_tool_round_trip() -> None:
    request = parse({"model": "m", "input": [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Weather in Paris?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
        ]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xyz"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "get_weather",
         "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather",
         "arguments": "{\"city\":\"Lyon\"}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_b",
         "output": [{"type": "input_text", "text": "20"}, {"type": "input_text", "text": "C"}]},
    ], "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False})
    assert request.body["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather in Paris?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                 "detail": "low"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_b", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "20C"},
    ]
    assert request.body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": WEATHER["parameters"], "strict": True}}]
    assert request.body["tool_choice"] == "auto"
    assert request.body["parallel_tool_calls"] is False


def test_function_call_without_assistant_text_is_its_own_message() -> None:
    request = parse({"model": "m", "input": [
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "r"},
    ]})
    assert request.body["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize(("choice", "chat_choice", "names"), [
    ("none", "none", ["get_weather", "other"]),
    ("required", "required", ["get_weather", "other"]),
    ({"type": "function", "name": "other"}, {"type": "function", "function": {"name": "other"}},
     ["get_weather", "other"]),
    ({"type": "allowed_tools", "mode": "required",
      "tools": [{"type": "function", "name": "other"}]}, "required", ["other"]),
])
def test_tool_choice(choice: Any, chat_choice: Any, names: list[str]) -> None:
    other = {"type": "function", "name": "other", "parameters": {"type": "object"}}
    request = parse({"model": "m", "input": "x", "tools": [WEATHER, other],
                     "tool_choice": choice})
    assert request.body["tool_choice"] == chat_choice
    assert [t["function"]["name"] for t in request.body["tools"]] == names
    echoed = Response.model_validate(build_response(request, {})).tool_choice
    assert echoed == choice or echoed.model_dump(exclude_none=True) == choice


@pytest.mark.parametrize(("fmt", "response_format"), [
    ({"type": "json_object"}, {"type": "json_object"}),
    ({"type": "json_schema", "name": "answer", "strict": True,
      "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
     {"type": "json_schema", "json_schema": {
         "name": "answer", "strict": True,
         "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}),
    ({"type": "text"}, None),
])
def test_text_format(fmt: dict[str, Any], response_format: Any) -> None:
    request = parse({"model": "m", "input": "x", "text": {"format": fmt, "verbosity": "low"}})
    assert request.body.get("response_format") == response_format
    text = Response.model_validate(build_response(request, {})).text
    assert text is not None and text.format is not None
    assert text.format.model_dump(by_alias=True, exclude_none=True) == fmt


def test_routing_preferences_reach_the_chat_body() -> None:
    request = parse({"model": "m", "input": "x", "models": ["n"],
                     "provider": {"sort": "price"}})
    assert request.body["models"] == ["n"] and request.body["provider"] == {"sort": "price"}


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": "x"}, "model", "missing_required_parameter"),
    ({"model": "m"}, "input", "missing_required_parameter"),
    ({"model": "", "input": "x"}, "model", "invalid_value"),
    ({"model": "m", "input": 3}, "input", "invalid_value"),
    ({"model": "m", "input": []}, "input", "invalid_value"),
    ({"model": "m", "input": "x", "temperature": 3}, "temperature", "invalid_value"),
    ({"model": "m", "input": "x", "top_p": "high"}, "top_p", "invalid_value"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"model": "m", "input": "x", "metadata": {str(i): "v" for i in range(MAX_METADATA_KEYS + 1)}},
     "metadata", "invalid_value"),
    ({"model": "m", "input": "x", "metadata": {"k": "v" * 513}}, "metadata", "invalid_value"),
    ({"model": "m", "input": "x", "tools": [WEATHER] * (MAX_TOOLS + 1)}, "tools",
     "invalid_value"),
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type",
     "unsupported_value"),
    ({"model": "m", "input": "x", "tools": [WEATHER, {"type": "file_search",
                                                       "vector_store_ids": ["vs"]}]},
     "tools[1].type", "unsupported_value"),
    ({"model": "m", "input": "x", "tools": [{"type": "computer_use_preview"}]},
     "tools[0].type", "unsupported_value"),
    ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "bad name"}]},
     "tools[0].name", "invalid_value"),
    ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name",
     "missing_required_parameter"),
    ({"model": "m", "input": "x", "tools": [WEATHER, WEATHER]}, "tools[1].name",
     "invalid_value"),
    ({"model": "m", "input": "x", "tools": [WEATHER], "tool_choice": {"type": "web_search"}},
     "tool_choice.type", "unsupported_value"),
    ({"model": "m", "input": "x", "tools": [WEATHER],
      "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name", "invalid_value"),
    ({"model": "m", "input": "x", "tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"model": "m", "input": "x", "previous_response_id": "resp_1"}, "previous_response_id",
     "unsupported_parameter"),
    ({"model": "m", "input": "x", "background": True}, "background", "unsupported_parameter"),
    ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation",
     "unsupported_parameter"),
    ({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}, "prompt",
     "unsupported_parameter"),
    ({"model": "m", "input": "x", "include": ["message.output_text.logprobs"]}, "include",
     "unsupported_value"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type",
     "unsupported_value"),
    ({"model": "m", "input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type",
     "unsupported_value"),
    ({"model": "m", "input": [{"content": "x"}]}, "input[0].type",
     "missing_required_parameter"),
    ({"model": "m", "input": ["x"]}, "input[0]", "invalid_type"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text",
                                                             "text": 1}]}]},
     "input[0].content[0].text", "invalid_value"),
    ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role",
     "invalid_value"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file",
                                                             "file_id": "file-1"}]}]},
     "input[0].content[0]", "unsupported_value"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image",
                                                             "file_id": "file-1"}]}]},
     "input[0].content[0].image_url", "unsupported_value"),
    ({"model": "m", "input": [{"role": "system", "content": [{"type": "input_image",
                                                               "image_url": "https://x/i.png"}]}]},
     "input[0].content[0]", "unsupported_value"),
    ({"model": "m", "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_image", "image_url": "https://x/i.png"}]}]}, "input[1].output[0]",
     "unsupported_value"),
    ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c",
                               "output": "18C"}]}, "input[0].call_id", "invalid_value"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "file:///etc/passwd"}]}]},
     "input[0].content[0].image_url", "invalid_value"),
    ({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,not base64!"}]}]},
     "input[0].content[0].image_url", "invalid_value"),
    ({"model": "m", "input": "x", "max_output_tokens": 10**30}, "max_output_tokens",
     "invalid_value"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id", "missing_required_parameter"),
    ({"model": "m", "input": [{"type": "reasoning", "summary": []}], "instructions": "i"},
     "input", "invalid_value"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}},
     "text.format.schema", "missing_required_parameter"),
])
def test_refusals_name_the_param(body: dict[str, Any], param: str, code: str) -> None:
    error = refusal(body)
    assert (error.param, error.code) == (param, code), error.message
    shape = json.loads(error_body(error))
    assert shape == {"error": {"message": error.message, "type": "invalid_request_error",
                               "param": param, "code": code}}


def test_nesting_is_bounded() -> None:
    deep = (b'{"model": "m", "input": "x", "metadata": {"a": "b"}, "tools": [{"type": '
            b'"function", "name": "f", "parameters": ' + b'{"a":' * 300 + b"1"
            + b"}" * 300 + b"}]}")
    assert "deeper than 128" in refusal_raw(deep).message
    assert parse_request(deep, max_depth=400).body["tools"][0]["function"]["name"] == "f"


def refusal_raw(raw: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(raw)
    assert info.value.status == 400
    return info.value


def test_previous_response_refusal_says_what_to_do() -> None:
    assert "whole conversation in 'input'" in refusal(
        {"model": "m", "input": "x", "previous_response_id": "resp_1"}).message


@pytest.mark.parametrize("raw", [b"", b"[1]", b"{", b"null", b"\xff", b"[" * 100_000])
def test_bodies_that_are_no_object(raw: bytes) -> None:
    with pytest.raises(APIError) as info:
        parse_request(raw)
    assert info.value.status == 400 and info.value.param is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=20)
_keys = st.sampled_from(["type", "role", "content", "text", "call_id", "name", "arguments",
                         "output", "image_url", "file_id", "detail", "id", "parameters",
                         "strict", "mode", "tools", "format", "schema"])
_values = _json | st.sampled_from(["message", "function_call", "function_call_output",
                                   "reasoning", "input_text", "input_image", "output_text",
                                   "user", "assistant", "developer", "function", "allowed_tools",
                                   "json_schema", "json_object", "auto", "f"])
_objects = st.dictionaries(_keys, _values, max_size=6)
_fields = st.sampled_from(["model", "input", "instructions", "stream", "temperature", "top_p",
                           "max_output_tokens", "tools", "tool_choice", "parallel_tool_calls",
                           "text", "metadata", "store", "user", "previous_response_id",
                           "include", "background", "reasoning", "truncation"])
_bodies = st.dictionaries(_fields, _json | _objects | st.lists(
    _objects | st.dictionaries(_keys, _values | st.lists(_objects, max_size=3), max_size=5),
    max_size=4), max_size=8)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_json | _bodies)
def test_any_json_is_a_request_or_a_400(body: Any) -> None:
    try:
        request = parse_request(json.dumps(body).encode())
    except APIError as error:
        assert error.status == 400
        assert json.loads(error_body(error))["error"]["message"]
    else:
        assert isinstance(request, ChatRequest)
        assert request.body["messages"]
        passes_the_chat_checks(request)


_text = st.text(max_size=20)
_name = st.from_regex(r"[a-zA-Z0-9_-]{1,20}", fullmatch=True)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A random valid ``input`` and the chat messages it must become."""
    items: list[dict[str, Any]] = []
    expected: list[dict[str, Any]] = []
    for turn in range(draw(st.integers(1, 4))):
        text = draw(_text)
        if draw(st.booleans()):
            items.append({"role": "user", "content": text})
            expected.append({"role": "user", "content": text})
        else:
            parts = draw(st.lists(_text, min_size=1, max_size=3))
            items.append({"type": "message", "role": "user",
                          "content": [{"type": "input_text", "text": p} for p in parts]})
            expected.append({"role": "user", "content": [{"type": "text", "text": p}
                                                         for p in parts]})
        calls = [(f"call_{turn}_{i}", draw(_name), draw(_text))
                 for i in range(draw(st.integers(0, 3)))]
        if calls:
            items.extend({"type": "function_call", "call_id": c, "name": n, "arguments": a}
                         for c, n, a in calls)
            expected.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": c, "type": "function", "function": {"name": n, "arguments": a}}
                for c, n, a in calls]})
            for c, _, _ in calls:
                out = draw(_text)
                items.append({"type": "function_call_output", "call_id": c, "output": out})
                expected.append({"role": "tool", "tool_call_id": c, "content": out})
        answer = draw(_text)
        items.append({"role": "assistant", "content": [{"type": "output_text", "text": answer,
                                                        "annotations": []}]})
        expected.append({"role": "assistant", "content": answer})
    return items, expected


@settings(max_examples=200, deadline=None)
@given(conversation=conversations(), instructions=st.none() | st.text(min_size=1, max_size=20),
       tools=st.lists(_name, max_size=4, unique=True), temperature=st.none() | st.floats(0, 2),
       max_output_tokens=st.none() | st.integers(1, 100_000), stream=st.booleans())
def test_valid_requests_reach_the_backend_unchanged(
        conversation: tuple[list[dict[str, Any]], list[dict[str, Any]]],
        instructions: str | None, tools: list[str], temperature: float | None,
        max_output_tokens: int | None, stream: bool) -> None:
    items, expected = conversation
    body: dict[str, Any] = {"model": "m", "input": items, "stream": stream,
                            "tools": [{"type": "function", "name": n, "parameters": {}}
                                      for n in tools]}
    if instructions is not None:
        body["instructions"] = instructions
    if temperature is not None:
        body["temperature"] = temperature
    if max_output_tokens is not None:
        body["max_output_tokens"] = max_output_tokens
    chat = parse(body).body
    assert chat["messages"] == ([{"role": "system", "content": instructions}]
                                if instructions else []) + expected
    assert [t["function"]["name"] for t in chat.get("tools", [])] == tools
    assert chat.get("temperature") == temperature
    assert chat.get("max_tokens") == max_output_tokens
    assert chat["stream"] is stream
    passes_the_chat_checks(parse(body))


# -- non-streamed answers ---------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "node-model",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15,
                      "prompt_tokens_details": {"cached_tokens": 2},
                      "completion_tokens_details": {"reasoning_tokens": 1}}}


def test_text_answer_is_a_response() -> None:
    request = parse({"model": "m", "input": "x", "instructions": "i", "tools": [WEATHER],
                     "metadata": {"a": "b"}, "temperature": 0.2})
    response = Response.model_validate_json(answer_body(request, completion(
        {"content": "Hello there"})))
    assert response.id == request.context["response_id"]
    assert response.status == "completed" and response.completed_at is not None
    assert response.output_text == "Hello there"
    assert response.model == "m"  # the model asked for, never the name the node gives
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens,
            response.usage.total_tokens) == (11, 4, 15)
    assert response.usage.input_tokens_details.cached_tokens == 2
    assert response.usage.output_tokens_details.reasoning_tokens == 1
    assert response.instructions == "i" and response.metadata == {"a": "b"}
    assert response.temperature == 0.2 and response.tools[0].name == "get_weather"


def test_tool_call_answer() -> None:
    request = parse({"model": "m", "input": "x", "tools": [WEATHER]})
    response = Response.model_validate(build_response(request, completion({
        "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
            {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        "tool_calls")))
    assert [item.type for item in response.output] == ["function_call", "function_call"]
    first, second = response.output
    assert first.type == "function_call" and second.type == "function_call"
    assert (first.call_id, first.name, first.arguments) == ("call_1", "get_weather",
                                                            "{\"city\":\"Oslo\"}")
    assert second.call_id.startswith("call_") and first.id != second.id


def test_length_is_incomplete() -> None:
    request = parse({"model": "m", "input": "x", "max_output_tokens": 4})
    response = Response.model_validate(build_response(request, completion(
        {"content": "cut"}, "length")))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 4


def test_refusal_answer() -> None:
    response = Response.model_validate(build_response(parse({"model": "m", "input": "x"}),
                                                      completion({"refusal": "No."})))
    message = response.output[0]
    assert message.type == "message" and message.content[-1].type == "refusal"


@settings(max_examples=60, deadline=None)
@given(answer=_json | st.fixed_dictionaries({"choices": st.lists(
    st.dictionaries(st.sampled_from(["index", "message", "finish_reason"]), _json | _objects),
    max_size=2), "usage": _json | _objects}))
def test_any_node_answer_is_a_valid_response_or_a_bad_gateway(answer: Any) -> None:
    request = parse({"model": "m", "input": "x"})
    if not isinstance(answer, dict):
        with pytest.raises(APIError) as caught:
            build_response(request, answer)
        assert caught.value.status == 502
        return
    Response.model_validate(build_response(request, answer))


# -- streamed answers -------------------------------------------------------------------------


def test_text_stream_events_in_order() -> None:
    request = parse({"model": "m", "input": "x", "stream": True})
    events = run_stream(request, [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        text_chunk("Hel"), text_chunk("lo"), finish_chunk(), usage_chunk(),
    ])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    item_id = events[2]["item"]["id"]
    assert [(d["delta"], d["item_id"], d["output_index"], d["content_index"])
            for d in deltas] == [("Hel", item_id, 0, 0), ("lo", item_id, 0, 0)]
    assert events[6]["text"] == "Hello"
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Hello" and final.status == "completed"
    assert final.usage is not None and final.usage.total_tokens == 10
    assert final.id == events[0]["response"]["id"] == request.context["response_id"]


def test_parallel_tool_calls_interleaved() -> None:
    request = parse({"model": "m", "input": "x", "stream": True, "tools": [WEATHER]})
    events = run_stream(request, [
        text_chunk("Let me check."),
        call_chunk(0, call_id="call_a", name="get_weather"),
        call_chunk(1, call_id="call_b", name="get_weather"),
        call_chunk(0, arguments="{\"city\":"), call_chunk(1, arguments="{\"city\":\"Rome\"}"),
        call_chunk(0, arguments="\"Oslo\"}"), finish_chunk("tool_calls"), usage_chunk(),
    ])
    final = Response.model_validate(events[-1]["response"])
    assert [item.type for item in final.output] == ["message", "function_call",
                                                    "function_call"]
    calls = [(i.call_id, i.arguments) for i in final.output if i.type == "function_call"]
    assert calls == [("call_a", "{\"city\":\"Oslo\"}"), ("call_b", "{\"city\":\"Rome\"}")]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["output_index"], e["arguments"]) for e in done] == [
        (1, "{\"city\":\"Oslo\"}"), (2, "{\"city\":\"Rome\"}")]
    # the message closes before the first call opens
    types = [e["type"] for e in events]
    assert types.index("response.output_item.done") < types.index(
        "response.function_call_arguments.delta")


def test_length_stream_is_incomplete_and_failure_is_failed() -> None:
    request = parse({"model": "m", "input": "x", "stream": True})
    events = run_stream(request, [text_chunk("cut"), finish_chunk("length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    events = run_stream(request, [text_chunk("half")], fail=APIError(502, "node went away"))
    failed = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.failed" and failed.status == "failed"
    assert failed.error is not None and failed.error.message == "node went away"
    assert failed.output[0].type == "message" and failed.output[0].status == "incomplete"


def test_reasoning_then_text_then_refusal() -> None:
    request = parse({"model": "m", "input": "x", "stream": True})
    events = run_stream(request, [
        delta_chunk(reasoning_content="Think"), delta_chunk(reasoning="ing."),
        text_chunk("Answer"), delta_chunk(refusal="No more."), finish_chunk(), usage_chunk()])
    assert [e["type"] for e in events][2:] == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.content_part.added", "response.refusal.delta",
        "response.refusal.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    final = Response.model_validate(events[-1]["response"])
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "Thinking."
    assert message.type == "message" and final.output_text == "Answer"
    assert [p.type for p in message.content] == ["output_text", "refusal"]
    refusal_done = next(e for e in events if e["type"] == "response.refusal.done")
    assert (refusal_done["refusal"], refusal_done["content_index"]) == ("No more.", 1)


def test_reasoning_answer() -> None:
    response = Response.model_validate(build_response(parse({"model": "m", "input": "x"}),
                                                      completion({"content": "4",
                                                                  "reasoning_content": "2+2"})))
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == "4"


def test_an_error_chunk_fails_the_stream() -> None:
    events = run_stream(parse({"model": "m", "input": "x", "stream": True}),
                        [text_chunk("a"), {"error": {"message": "out of memory"}},
                         text_chunk("ignored")])
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == "out of memory"


def test_chunks_split_at_every_byte_come_back_the_same() -> None:
    """The node's SSE bytes, decoded by the gateway's decoder from any split, give the same
    events (ids aside) as the whole."""
    chunks = [text_chunk("Hi"), text_chunk(" there"), call_chunk(0, call_id="c", name="f"),
              call_chunk(0, arguments="{}"), finish_chunk("tool_calls"), usage_chunk()]
    raw = sse_wire(chunks)
    request = parse({"model": "m", "input": "x", "stream": True})

    def translate(pieces: list[bytes]) -> list[Any]:
        return [(e["type"], e.get("delta"), e.get("output_index"), e.get("arguments"))
                for e in events_of(through_sse(ResponsesStream(request), pieces))]

    whole = translate([raw])
    assert whole[-1][0] == "response.completed"
    for cut in range(1, len(raw), 3):
        assert translate([raw[:cut], raw[cut:]]) == whole


_chunk = st.one_of(
    _text.map(text_chunk),
    st.builds(call_chunk, st.integers(0, 2), call_id=st.none() | st.just("call_x"),
              name=st.none() | _name, arguments=_text),
    _text.map(lambda t: delta_chunk(reasoning_content=t)),
    _text.map(lambda t: delta_chunk(refusal=t)),
    st.sampled_from(["stop", "length", "tool_calls", "content_filter"]).map(finish_chunk),
    st.builds(usage_chunk, st.integers(0, 100), st.integers(0, 100)),
    _json, _objects,
    st.fixed_dictionaries({"choices": st.lists(st.dictionaries(
        st.sampled_from(["index", "delta", "finish_reason"]), _json | _objects), max_size=2)}),
)


def _content(chunk: Any) -> str:
    """The text a chunk adds: its first choice's (``index`` 0 or none) ``delta.content``."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            return content if isinstance(content, str) else ""
    return ""


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_chunk, max_size=12), fails=st.booleans())
def test_any_chunks_give_a_valid_event_sequence(chunks: list[Any], fails: bool) -> None:
    request = parse({"model": "m", "input": "x", "stream": True})
    events = run_stream(request, chunks, fail=APIError(500, "boom") if fails else None)
    final = Response.model_validate(events[-1]["response"])
    texts = "".join(_content(c) for c in chunks)
    if not any(isinstance(c, dict) and isinstance(c.get("error"), dict) for c in chunks):
        assert final.output_text == texts
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert added == list(range(len(added)))
    closed = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    if events[-1]["type"] != "response.failed":
        assert sorted(closed) == added


def calls_of(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The function calls of the terminal event's response, checked against the
    arguments each call's ``.delta`` events streamed and its ``.done`` event."""
    final = Response.model_validate(events[-1]["response"])
    streamed: dict[str, str] = {}
    for event in events:
        if event["type"] == "response.function_call_arguments.delta":
            streamed[event["item_id"]] = streamed.get(event["item_id"], "") + event["delta"]
        elif event["type"] == "response.function_call_arguments.done":
            assert event["arguments"] == streamed.get(event["item_id"], "")
    out = []
    for item in final.output:
        if item.type == "function_call":
            assert item.arguments == streamed.get(item.id or "", "")
            out.append((item.call_id, item.name, item.arguments))
    return out


@settings(max_examples=40, deadline=None)
@given(node=node_streams())
def test_random_node_streams_give_their_text_and_tool_calls(node: NodeStream) -> None:
    request = parse({"model": "m", "input": "x", "stream": True})
    events = run_stream(request, node.chunks)
    final = Response.model_validate(events[-1]["response"])
    assert events[-1]["type"] == "response.completed"
    assert final.output_text == node.text
    assert calls_of(events) == node.calls
    wire = sse_wire(node.chunks)
    whole = through_sse(ResponsesStream(request), [wire])
    assert calls_of(events_of(through_sse(ResponsesStream(request), [
        wire[i:i + 1] for i in range(len(wire))]))) == calls_of(events_of(whole)) == node.calls


def test_a_long_stream_of_small_argument_pieces() -> None:
    chunks, arguments = many_pieces()
    raw = run(ResponsesStream(parse({"model": "m", "input": "x", "stream": True})), chunks)
    events = [msgspec.json.decode(e.data) for e in SSEDecoder().events(raw)]
    assert len(events) > 50_000 and events[-1]["type"] == "response.completed"
    assert calls_of(events) == [("call_long", "echo", arguments)]


def test_a_name_repeated_in_every_chunk_is_said_once() -> None:
    events = run_stream(parse({"model": "m", "input": "x", "stream": True}), [
        call_chunk(0, call_id="c", name="get_weather", arguments='{"city":'),
        call_chunk(0, name="get_weather", arguments='"Paris"}'), finish_chunk("tool_calls")])
    assert calls_of(events) == [("c", "get_weather", '{"city":"Paris"}')]


def test_too_much_argument_text_fails_the_stream_as_a_node_error() -> None:
    piece = "x" * (MAX_ARGUMENT_BYTES // 4)
    events = run_stream(parse({"model": "m", "input": "x", "stream": True}), [
        call_chunk(0, call_id="c", name="f"),
        *[call_chunk(0, arguments=piece) for _ in range(5)], finish_chunk("tool_calls")])
    assert events[-1]["type"] == "response.failed"
    assert "tool call arguments" in events[-1]["response"]["error"]["message"]


def test_an_unnamed_call_is_no_item() -> None:
    events = run_stream(parse({"model": "m", "input": "x", "stream": True}), [
        text_chunk("ok"), call_chunk(0, arguments="{}"), finish_chunk("tool_calls")])
    assert calls_of(events) == [] and events[-1]["type"] == "response.completed"


# -- the official SDK end to end, over a mock transport ---------------------------------------


class FakeGatewayFront:
    """An ``httpx2`` handler playing the mounting step: parse, a canned node answer (a tool
    call while the conversation has no tool result yet, else text), translate back."""

    def __init__(self) -> None:
        self.chat_bodies: list[dict[str, Any]] = []

    def __call__(self, http: httpx2.Request) -> httpx2.Response:
        assert http.url.path == "/v1/responses"
        try:
            request = parse_request(http.content)
        except APIError as error:
            return httpx2.Response(error.status, content=error_body(error),
                                  headers={"content-type": "application/json"})
        self.chat_bodies.append(request.body)
        messages = request.body["messages"]
        wants_call = "tools" in request.body and messages[-1]["role"] != "tool"
        if request.stream:
            translator = ResponsesStream(request)
            chunks = ([call_chunk(0, call_id="call_w", name="get_weather"),
                       call_chunk(0, arguments="{\"city\":"),
                       call_chunk(0, arguments="\"Paris\"}"), finish_chunk("tool_calls")]
                      if wants_call else
                      [delta_chunk(reasoning_content="Look it up."), text_chunk("It is "),
                       text_chunk(messages[-1]["content"]),
                       finish_chunk()]) + [usage_chunk()]
            raw = translator.start() + b"".join(map(translator.feed, chunks))
            return httpx2.Response(200, content=raw + translator.finish(),
                                  headers={"content-type": translator.content_type})
        message: dict[str, Any] = ({"content": None, "tool_calls": [
            {"id": "call_w", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}
            if wants_call else {"content": "It is " + str(messages[-1]["content"])})
        return httpx2.Response(200, content=answer_body(request, completion(message)),
                              headers={"content-type": "application/json"})


@pytest.fixture
def front() -> FakeGatewayFront:
    return FakeGatewayFront()


@pytest.fixture
def client(front: FakeGatewayFront) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://gateway.test/v1", api_key="k", max_retries=0,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(front)))


def test_sdk_create_with_a_function_tool_round_trip(client: openai.OpenAI,
                                                    front: FakeGatewayFront) -> None:
    first = client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])
    call = first.output[0]
    assert call.type == "function_call" and call.call_id == "call_w"
    assert json.loads(call.arguments) == {"city": "Paris"}
    second = client.responses.create(model="m", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ])
    assert second.output_text == "It is sunny"
    assert front.chat_bodies[1]["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_w", "content": "sunny"}]
    assert second.usage is not None and second.usage.total_tokens == 15


def test_sdk_stream_helper_accumulates_the_final_response(client: openai.OpenAI) -> None:
    deltas = []
    with client.responses.stream(model="m", input="sunny") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "It is sunny"
    assert final.status == "completed" and final.usage is not None
    assert [item.type for item in final.output] == ["reasoning", "message"]


def test_sdk_stream_of_a_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model="m", input="Weather?", tools=[WEATHER]) as stream:
        final = stream.get_final_response()
    call = final.output[0]
    assert call.type == "function_call" and call.arguments == "{\"city\":\"Paris\"}"
    events = list(client.responses.create(model="m", input="x", stream=True))
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_sdk_sees_refusals_as_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="x", tools=[{"type": "web_search"}])
    assert info.value.param == "tools[0].type" and info.value.code == "unsupported_value"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="m", input="x", previous_response_id="resp_1")
    assert info.value.param == "previous_response_id"


def test_sdk_json_schema_format(client: openai.OpenAI, front: FakeGatewayFront) -> None:
    client.responses.create(model="m", input="x", text={"format": {
        "type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}})
    assert front.chat_bodies[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True}}


def test_the_front_interface() -> None:
    request, out = check_front(FRONT, json.dumps({"model": "m", "input": "x", "stream": True})
                               .encode(), media_type="application/json",
                               stream_media_type="text/event-stream")
    assert request.model == request.context["model"] == "m"
    events = events_of(out)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == "oom"
    Response.model_validate_json(FRONT.answer(request, completion({"content": "hi"})))


def test_a_stream_names_the_model_asked_for_never_the_nodes() -> None:
    """Every chunk says ``model: node-model``: the Response in every event names the
    model the request asked for (a node cannot rename it)."""
    events = run_stream(parse({"model": "m", "input": "hi", "stream": True}),
                        [text_chunk("a"), text_chunk("b"), finish_chunk(), usage_chunk()])
    models = {e["response"]["model"] for e in events if "response" in e}
    assert models == {"m"}
