"""The Anthropic Messages front without a gateway: requests translated to chat
completions, node answers and streams translated back, every output checked against the
official ``anthropic`` SDK's own types, and the SDK itself driven end to end through an
``httpx2.MockTransport`` whose handler runs the translation over canned node answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import msgspec
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from tests.fronts_support import (
    NodeStream,
    check_front,
    chunk,
    many_pieces,
    node_streams,
    run,
    sse_wire,
    through_sse,
    tool_entry,
    usage_chunk,
)
from tooti.backends.simulated_answers import StreamShape, completion_body, prepare_job
from tooti.errors import APIError
from tooti.fronts.anthropic_messages import (
    api_key,
    error_body,
    error_type,
    message_dict,
    parse_count_tokens,
    parse_request,
    render_count_tokens,
    render_message,
    tool_input,
)
from tooti.fronts.anthropic_stream import FRONT, AnthropicStream
from tooti.fronts.base import ChatRequest
from tooti.fronts.tool_calls import MAX_CALLS
from tooti.gateway import validation
from tooti.protocol.sse import SSEDecoder

EVENT = TypeAdapter(RawMessageStreamEvent)
PIXEL = base64.b64encode(b"\x89PNG fake").decode()
encode = msgspec.json.encode


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"model": "claude-x", "max_tokens": 64,
                            "messages": [{"role": "user", "content": "hi"}]}
    base.update(fields)
    return encode(base)


def chat(raw: bytes) -> dict[str, Any]:
    return parse_request(raw).body


def refusal(raw: bytes) -> APIError:
    with pytest.raises(APIError) as caught:
        parse_request(raw)
    err = caught.value
    shaped = ErrorResponse.model_validate_json(error_body(err, "req-1"))
    assert shaped.error.type == "invalid_request_error" and shaped.request_id == "req-1"
    return err


# -- requests ------------------------------------------------------------------------


def test_a_plain_request_becomes_chat_completions() -> None:
    request = parse_request(body(system="be brief", stream=True, temperature=0.5, top_p=0.9,
                                 top_k=40, stop_sequences=["END", "STOP"],
                                 metadata={"user_id": "u-1"}))
    assert request.model == "claude-x" and request.stream
    assert request.body == {
        "model": "claude-x", "max_tokens": 64, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hi"}],
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": ["END", "STOP"],
        "user": "u-1"}
    assert request.context == {"model": "claude-x", "stop_sequences": ("END", "STOP"),
                               "thinking": False, "request_id": None}
    assert "stream_options" not in chat(body(stream=False))


def test_system_blocks_content_blocks_and_images() -> None:
    messages = chat(body(
        system=[{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "two"}],
        messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PIXEL}},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm",
                                               "signature": "s"},
                                              {"type": "text", "text": "a cat"}]},
            {"role": "system", "content": "later system"},
            {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
        ]))["messages"]
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": "one"},
                                       {"type": "text", "text": "two"}]},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "system", "content": "later system"},
        {"role": "user", "content": "thanks"},
    ]


def test_tools_tool_use_and_tool_results() -> None:
    tools: list[Any] = [{"name": "get_weather", "description": "weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}},
             {"name": "clock", "input_schema": {"type": "object"}, "type": "custom",
              "strict": True}]
    request = chat(body(tools=tools, tool_choice={"type": "tool", "name": "clock",
                                                  "disable_parallel_tool_use": True},
                        messages=[
        {"role": "user", "content": "weather in Paris and time?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "clock", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "no clock"}]},
            {"type": "text", "text": "and tomorrow?"}]}]))
    assert request["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                          "parameters": tools[0]["input_schema"]}},
        {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"},
                                          "strict": True}}]
    assert request["tool_choice"] == {"type": "function", "function": {"name": "clock"}}
    assert request["parallel_tool_calls"] is False
    assert request["messages"][1:] == [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function",
             "function": {"name": "clock", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no clock"},
        {"role": "user", "content": "and tomorrow?"},
    ]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")])
def test_tool_choice(choice: dict[str, Any], expected: str) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    request = chat(body(tools=tools, tool_choice=choice))
    assert request["tool_choice"] == expected and "parallel_tool_calls" not in request


def test_ignored_and_translated_extras() -> None:
    request = chat(body(thinking={"type": "enabled", "budget_tokens": 2048},
                        service_tier="auto", cache_control={"type": "ephemeral"},
                        container=None, inference_geo="us", speed="fast", mcp_servers=[],
                        output_config={"effort": "high", "format": {
                            "type": "json_schema", "schema": {"type": "object"}}},
                        tool_choice={"type": "auto"}))
    assert request == {"model": "claude-x", "max_tokens": 64, "stream": False,
                       "messages": [{"role": "user", "content": "hi"}],
                       "response_format": {"type": "json_schema", "json_schema": {
                           "name": "output", "schema": {"type": "object"}}}}


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"max_tokens": None}, "max_tokens", "Expected `int`"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"messages": []}, "messages", "length >= 1"),
    ({"temperature": 1.5}, "temperature", "<= 1"),
    ({"model": ""}, "model", "length >= 1"),
    ({"stop_sequences": [""]}, "stop_sequences[0]", "length >= 1"),
    ({"stop_sequences": ["x"] * 65}, "stop_sequences", "length <= 64"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "Field required"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "Invalid enum value"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type", "content block type 'document' is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source.type", "image source type 'file'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/tiff", "data": "x"}}]}]},
     "messages[0].content[0].source.media_type", "Invalid enum value"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t",
                                                      "name": "f", "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "image", "source": {
                                                     "type": "url", "url": "u"}}]}]}]},
     "messages[1].content[0].content[0]", "images in a tool_result"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": "18C"}]}]},
     "messages[0].content[0].tool_use_id", "answers no tool_use block"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "file:///etc/passwd"}}]}]},
     "messages[0].content[0].source.url", "http(s)"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "not base64!"}}]}]},
     "messages[0].content[0].source.data", "not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                 "input": {}}]}]},
     "messages[0].content[0].type", "assistant turns"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result",
                                                      "tool_use_id": "t"}]}]},
     "messages[0].content[0].type", "user turns"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type",
     "server tool"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema", "Field required"),
    ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools[0].name", "matching regex"),
    ({"tools": [{"name": "f", "input_schema": {}}] * 2}, "tools[1].name", "used twice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "tool", "name": "g"},
      "tools": [{"name": "f", "input_schema": {}}]}, "tool_choice.name", "no tool named"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type", "tool_choice type"),
    ({"mcp_servers": [{"type": "url", "url": "https://m", "name": "m"}]}, "mcp_servers",
     "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "t"}]}]},
     "messages", "no user or assistant turn"),
    ({"thinking": "yes"}, "thinking", "Expected `object | null`, got `str`"),
])
def test_refusals_name_the_param(fields: dict[str, Any], param: str, words: str) -> None:
    err = refusal(body(**fields))
    assert err.status == 400 and err.param == param and words in err.message, err.message
    assert json.loads(error_body(err))["error"]["message"].startswith(param + ": ")


def test_refusals_of_bodies_that_are_not_requests() -> None:
    assert refusal(b"{not json").code == "invalid_json"
    assert "Field required" in refusal(b"{}").message
    deep = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],' \
           b'"tools":[{"name":"f","input_schema":' + b'{"a":' * 200 + b"1" + b"}" * 200 + b"}]}"
    assert "deeper than 128" in refusal(deep).message
    assert parse_request(deep, max_depth=500).body["tools"][0]["function"]["name"] == "f"


_KEYS = ["model", "max_tokens", "messages", "role", "content", "type", "text", "system",
         "tools", "name", "input_schema", "tool_choice", "source", "data", "media_type", "url",
         "tool_use_id", "id", "input", "is_error", "stream", "stop_sequences", "metadata",
         "user_id", "temperature", "top_k", "thinking", "output_config", "format", "schema"]
_TAGS = ["user", "assistant", "system", "text", "image", "tool_use", "tool_result",
         "thinking", "base64", "url", "auto", "any", "tool", "none", "json_schema",
         "image/png", "claude-x"]
_SCALARS = (st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=True)
            | st.sampled_from(_TAGS) | st.text(max_size=8))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner,
                                       max_size=6), max_leaves=40)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(value=_JSON, top=st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["m", "", 3]), "max_tokens": st.sampled_from([1, 0, "1"]),
    "messages": _JSON, "tools": _JSON, "tool_choice": _JSON, "system": _JSON}))
def test_any_json_is_a_request_or_an_error(value: Any, top: dict[str, Any]) -> None:
    for candidate in (value, {**top, "x": value}, {**top, "messages": [value]}):
        try:
            raw = json.dumps(candidate).encode()
        except ValueError:
            continue
        try:
            request = parse_request(raw)
        except APIError as err:
            ErrorResponse.model_validate_json(error_body(err))
            assert 400 <= err.status < 500
        else:
            assert isinstance(request, ChatRequest)
            validation.parse_request("chat/completions", encode(request.body))


# -- round trip: random valid requests reach the node intact -------------------------

_text = st.text(min_size=1, max_size=12)
_tool_names = st.sampled_from(["get_weather", "clock", "search_docs"])
_user_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.builds(lambda u: {"type": "image", "source": {"type": "url", "url": u}},
              st.sampled_from(["https://a/b.png", "https://c/d.jpg"])))


@st.composite
def _conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    pending: list[str] = []
    for n in range(draw(st.integers(1, 5))):
        results = [{"type": "tool_result", "tool_use_id": i, "content": draw(_text),
                    "is_error": draw(st.booleans())} for i in pending]
        content: Any = draw(_text) if not results and draw(st.booleans()) else \
            results + draw(st.lists(_user_block, min_size=0 if results else 1, max_size=3))
        turns.append({"role": "user", "content": content})
        calls: list[Any] = [{"type": "tool_use", "id": f"toolu_{n}_{k}", "name": draw(_tool_names),
                  "input": draw(st.dictionaries(st.sampled_from(["a", "b"]),
                                                st.integers() | _text, max_size=2))}
                 for k in range(draw(st.integers(0, 2)))]
        texts = [{"type": "text", "text": t} for t in draw(st.lists(_text, max_size=2))]
        if texts or calls:
            turns.append({"role": "assistant", "content": texts + calls})
        pending = [c["id"] for c in calls]
    return turns


@settings(max_examples=60, deadline=None)
@given(messages=_conversation(), system=st.none() | _text,
       params=st.fixed_dictionaries({}, optional={
           "temperature": st.floats(0, 1), "top_p": st.floats(0, 1),
           "top_k": st.integers(0, 100), "stop_sequences": st.lists(_text, max_size=3),
           "stream": st.booleans()}))
def test_random_requests_reach_the_node_intact(messages: list[dict[str, Any]],
                                               system: str | None,
                                               params: dict[str, Any]) -> None:
    tools = [{"name": n, "input_schema": {"type": "object"}}
             for n in ("get_weather", "clock", "search_docs")]
    fields: dict[str, Any] = {"messages": messages, "tools": tools, **params}
    if system is not None:
        fields["system"] = system
    out = chat(body(**fields))
    checked = validation.parse_request("chat/completions", encode(out))
    assert checked.model == "claude-x" and checked.stream == bool(params.get("stream"))
    for name in ("temperature", "top_p", "top_k"):
        assert out.get(name) == params.get(name)
    assert out.get("stop") == (params.get("stop_sequences") or None)
    assert [t["function"]["name"] for t in out["tools"]] == [t["name"] for t in tools]
    sent = out["messages"]
    if system is not None:
        assert sent.pop(0) == {"role": "system", "content": system}

    def flat(content: Any) -> list[Any]:
        if isinstance(content, str):
            return [("text", content)]
        if content is None:
            return []
        return [("text", p["text"]) if p["type"] == "text" else ("image", p["image_url"]["url"])
                for p in content]

    expected: list[Any] = []
    for turn in messages:
        blocks = turn["content"]
        if isinstance(blocks, str):
            expected.append((turn["role"], [("text", blocks)], []))
            continue
        for b in blocks:
            if b["type"] == "tool_result":
                expected.append(("tool", b["tool_use_id"],
                                 ("Error: " if b["is_error"] else "") + b["content"]))
        rest = [("text", b["text"]) if b["type"] == "text" else ("image", b["source"]["url"])
                for b in blocks if b["type"] in ("text", "image")]
        calls = [(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"]
        if rest or turn["role"] == "assistant":
            expected.append((turn["role"], rest, calls))
    got: list[Any] = []
    for m in sent:
        if m["role"] == "tool":
            got.append(("tool", m["tool_call_id"], m["content"]))
        else:
            got.append((m["role"], flat(m["content"]),
                        [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                         for c in m.get("tool_calls", [])]))
    assert got == expected


# -- answers ---------------------------------------------------------------------------


def completion(content: str | None = "Hello!", *, finish: str | None = "stop",
               calls: list[dict[str, Any]] | None = None, usage: dict[str, Any] | None = None,
               reasoning: str | None = None, **choice: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "node-m",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice}],
            "usage": usage or {"prompt_tokens": 12, "completion_tokens": 3,
                               "total_tokens": 15}}


def call(name: str, arguments: Any, call_id: str | None = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name,
                                                            "arguments": arguments}}


REQUEST = parse_request(body(stop_sequences=["END"]))


def test_a_completion_becomes_a_message() -> None:
    message = Message.model_validate_json(render_message(completion(), REQUEST,
                                                         message_id="msg_1"))
    assert message.id == "msg_1" and message.model == "claude-x"
    assert [b.model_dump(exclude_none=True) for b in message.content] == \
        [{"type": "text", "text": "Hello!"}]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 3)
    assert message_dict(completion(), REQUEST)["id"].startswith("msg_")


@pytest.mark.parametrize(("finish", "extra", "reason", "sequence"), [
    ("stop", {}, "end_turn", None),
    ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),
    ("stop", {"stop_reason": "OTHER"}, "end_turn", None),
    ("stop", {"stop_reason": 2}, "end_turn", None),
    ("length", {}, "max_tokens", None),
    ("content_filter", {}, "refusal", None),
    (None, {}, "end_turn", None),
])
def test_stop_reasons(finish: str | None, extra: dict[str, Any], reason: str,
                      sequence: str | None) -> None:
    message = Message.model_validate(message_dict(completion(finish=finish, **extra), REQUEST))
    assert (message.stop_reason, message.stop_sequence) == (reason, sequence)


def test_tool_calls_become_tool_use_blocks() -> None:
    answer = completion(None, finish="stop", calls=[
        call("get_weather", '{"city": "Paris"}'), call("clock", "", None),
        call("search_docs", "{not json"), call("x", "[1]", "c4")],
        usage={"prompt_tokens": 20, "completion_tokens": 9,
               "prompt_tokens_details": {"cached_tokens": 8}})
    message = Message.model_validate_json(render_message(answer, REQUEST))
    assert message.stop_reason == "tool_use"
    blocks = [b.model_dump(exclude_none=True) for b in message.content]
    assert blocks[0] == {"type": "tool_use", "id": "call_1", "name": "get_weather",
                         "input": {"city": "Paris"}}
    assert blocks[1]["id"].startswith("toolu_") and blocks[1]["input"] == {}
    assert blocks[2]["input"] == {"_raw_arguments": "{not json"}
    assert blocks[3]["input"] == {"_raw_arguments": "[1]"}
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.output_tokens) == (12, 8, 9)
    assert tool_input({"a": 1}) == {"a": 1} and tool_input(None) == {}


@pytest.mark.parametrize(("thinking", "blocks"), [
    ({"type": "enabled", "budget_tokens": 2048}, ["thinking", "text"]),
    ({"type": "adaptive"}, ["thinking", "text"]),
    ({"type": "disabled"}, ["text"]), (None, ["text"])])
def test_reasoning_is_thinking_only_when_asked(thinking: dict[str, Any] | None,
                                               blocks: list[str]) -> None:
    request = parse_request(body(thinking=thinking) if thinking else body())
    assert request.context["thinking"] == (blocks[0] == "thinking")
    answer = completion("42", reasoning="6 times 7")
    message = Message.model_validate(message_dict(answer, request))
    assert [b.type for b in message.content] == blocks
    if thinking and blocks[0] == "thinking":
        first: Any = message.content[0]
        assert (first.thinking, first.signature) == ("6 times 7", "")
    chunks = [chunk({"reasoning": "6 times"}), chunk({"reasoning": " 7"}),
              chunk({"content": "42"}), chunk({}, "stop"), usage_chunk()]
    seq = events(translate(chunks, request))
    check_order(seq)
    streamed = final_message(seq)
    assert [b.type for b in streamed.content] == blocks
    assert streamed.model_dump()["content"] == message.model_dump()["content"]


@pytest.mark.parametrize("answer", [
    {}, {"choices": []}, {"choices": [None]}, {"choices": [{"message": {"content": 3}}]},
    {"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"text": "b"}],
                              "tool_calls": [None, {"function": {"name": 1}}]}}],
     "usage": {"prompt_tokens": -1, "completion_tokens": True}},
])
def test_odd_node_answers_still_make_valid_messages(answer: dict[str, Any]) -> None:
    Message.model_validate(message_dict(answer, REQUEST))
    with pytest.raises(APIError) as caught:
        message_dict([], REQUEST)
    assert caught.value.status == 502


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (413, "invalid_request_error"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
    (503, "overloaded_error"), (529, "overloaded_error"), (504, "timeout_error")])
def test_error_shapes(status: int, kind: str) -> None:
    shaped = ErrorResponse.model_validate_json(error_body(APIError(status, "boom")))
    assert error_type(status) == kind and shaped.error.type == kind
    assert shaped.error.message == "boom"


def test_the_api_key_headers() -> None:
    assert api_key({"x-api-key": " sk-1 ", "authorization": "Bearer other"}) == "sk-1"
    assert api_key({"authorization": "Bearer sk-2"}) == "sk-2"
    assert api_key({"authorization": "Basic abc", "anthropic-version": "2023-06-01"}) is None


def test_count_tokens_is_the_nodes_own_count() -> None:
    request = parse_count_tokens(encode({
        "model": "claude-x", "system": "s", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}]}))
    assert request.body["max_tokens"] == 1 and request.body["stream"] is False
    assert request.body["tools"][0]["function"]["name"] == "f"
    assert MessageTokensCount.model_validate_json(
        render_count_tokens(completion())).input_tokens == 12
    with pytest.raises(APIError) as caught:
        render_count_tokens({"choices": []})
    assert caught.value.status == 502


# -- streams ---------------------------------------------------------------------------


def tool_delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"tool_calls": [tool_entry(index, **fields)]}


def translate(chunks: list[Any], request: ChatRequest = REQUEST,
              error: APIError | None = None) -> bytes:
    return run(AnthropicStream(request, message_id="msg_s"), chunks, error)


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The events of ``raw``, each checked against the SDK's event types."""
    out = []
    for event in SSEDecoder().events(raw):
        data = json.loads(event.data)
        assert data["type"] == event.event
        if event.event == "error":
            ErrorResponse.model_validate(data)
        else:
            EVENT.validate_python(data)
        out.append((event.event, data))
    return out


def check_order(seq: list[tuple[str, dict[str, Any]]]) -> None:
    """The order Anthropic streams in: start, blocks opened 0, 1, ... each closed before
    the next, then message_delta and message_stop."""
    names = [name for name, _ in seq]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    open_block, next_block = None, 0
    for name, data in seq[1:-2]:
        if name == "content_block_start":
            assert open_block is None and data["index"] == next_block
            open_block, next_block = next_block, next_block + 1
        elif name == "content_block_delta":
            assert data["index"] == open_block
        else:
            assert name == "content_block_stop" and data["index"] == open_block
            open_block = None
    assert open_block is None


def final_message(seq: list[tuple[str, dict[str, Any]]]) -> Message:
    snapshot: Any = None
    bufs: dict[int, bytes] = {}
    for _, data in seq:
        snapshot = accumulate_event(event=EVENT.validate_python(data),
                                    current_snapshot=snapshot, json_bufs=bufs)
    return Message.model_validate(snapshot.to_dict())


def test_a_text_stream() -> None:
    seq = events(translate([chunk({"role": "assistant", "content": ""}),
                            chunk({"content": "Hel"}), chunk({"content": "lo"}),
                            chunk({}, "stop", stop_reason="END"), usage_chunk()]))
    check_order(seq)
    assert [n for n, _ in seq] == ["message_start", "content_block_start",
                                   "content_block_delta", "content_block_delta",
                                   "content_block_stop", "message_delta", "message_stop"]
    assert seq[0][1]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert seq[-2][1]["usage"] == {"input_tokens": 12, "output_tokens": 5}
    assert seq[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    message = final_message(seq)
    assert message.content[0].type == "text" and message.content[0].text == "Hello"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 5)


def test_tool_calls_come_whole_after_the_text() -> None:
    seq = events(translate([
        chunk({"content": "Let me check."}),
        chunk(tool_delta(0, call_id="call_a", name="get_weather", arguments="")),
        chunk(tool_delta(0, arguments='{"ci')),
        chunk(tool_delta(1, call_id="call_b")), chunk(tool_delta(1, arguments="{}")),
        chunk(tool_delta(0, arguments='ty": "Paris"}')),  # interleaved with call 1
        chunk(tool_delta(1, name="clock")), chunk({"content": " Done."}),
        chunk({}, "tool_calls"), usage_chunk(30, 17)]))
    check_order(seq)
    starts = [d["content_block"] for n, d in seq if n == "content_block_start"]
    assert starts == [{"type": "text", "text": ""},
                      {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}},
                      {"type": "tool_use", "id": "call_b", "name": "clock", "input": {}}]
    partial = [(d["index"], d["delta"]["partial_json"]) for n, d in seq
               if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"]
    assert partial == [(1, '{"city": "Paris"}'), (2, "{}")]
    message = final_message(seq)
    assert message.stop_reason == "tool_use"
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "text", "text": "Let me check. Done."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "clock", "input": {}}]


def test_tool_calls_finish_without_a_named_call_is_end_turn() -> None:
    seq = events(translate([chunk({"content": "hm"}), chunk(tool_delta(0, arguments="{}")),
                            chunk({}, "tool_calls"), usage_chunk()]))
    check_order(seq)
    message = final_message(seq)
    assert message.stop_reason == "end_turn" and [b.type for b in message.content] == ["text"]
    answer = message_dict(completion(None, finish="tool_calls"), REQUEST)
    assert answer["stop_reason"] == "end_turn" and answer["content"] == []


def test_a_long_stream_of_small_argument_pieces() -> None:
    chunks, arguments = many_pieces()
    seq = events(translate(chunks))
    message = final_message(seq)
    assert [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"] == [
        ("call_long", "echo", json.loads(arguments))]


def test_too_many_tool_calls_end_the_stream_as_a_node_error() -> None:
    chunks = [chunk(tool_delta(k, call_id=f"c{k}", name="f")) for k in range(MAX_CALLS + 1)]
    seq = events(translate([chunk({"content": "a"}), *chunks]))
    assert seq[-1][0] == "error" and seq[-1][1]["error"]["type"] == "api_error"
    assert str(MAX_CALLS) in seq[-1][1]["error"]["message"]


def test_an_empty_stream_and_an_error_mid_stream() -> None:
    seq = events(translate([]))
    check_order(seq)
    assert final_message(seq).content == [] and seq[-2][1]["delta"]["stop_reason"] == "end_turn"
    seq = events(translate([chunk({"content": "par"})], error=APIError(503, "node left")))
    assert [n for n, _ in seq][-1] == "error"
    assert seq[-1][1]["error"] == {"type": "overloaded_error", "message": "node left"}
    seq = events(translate([chunk({"content": "a"}), {"error": {"message": "oom"}},
                            chunk({"content": "b"})]))
    assert seq[-1] == ("error", {"type": "error", "error": {"type": "api_error",
                                                            "message": "oom"}})
    stream = AnthropicStream(REQUEST)
    assert stream.content_type == "text/event-stream"
    lazy = events(stream.feed(chunk({"content": "x"})) + stream.finish())
    check_order(lazy)


@settings(max_examples=40, deadline=None)
@given(node=node_streams(), crlf=st.booleans())
def test_random_streams_split_anywhere_are_valid_event_sequences(
        node: NodeStream, crlf: bool) -> None:
    wire = sse_wire(node.chunks, crlf)

    def through(parts: list[bytes]) -> bytes:
        return through_sse(AnthropicStream(REQUEST, message_id="msg_p"), parts)

    whole = through([wire])
    for cut in range(1, len(wire), max(1, len(wire) // 20)):
        assert through([wire[:cut], wire[cut:]]) == whole
    assert through([wire[i:i + 1] for i in range(len(wire))]) == whole
    seq = events(whole)
    check_order(seq)
    message = final_message(seq)
    texts = "".join(b.text for b in message.content if b.type == "text")
    assert texts == node.text
    assert [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"] == [
        (call_id, name, json.loads(arguments)) for call_id, name, arguments in node.calls]
    assert message.stop_reason == ("tool_use" if node.calls else "end_turn")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 4)


# -- the official client, end to end through a mock transport --------------------------

Answer = Callable[[ChatRequest], Any]


class FakeGateway:
    """What the mounting step will do, minus the network: parse, 'route' to a canned
    node answer, translate back."""

    def __init__(self, answer: Answer, chunks: Callable[[ChatRequest], list[Any]]) -> None:
        self.answer, self.chunks = answer, chunks
        self.seen: list[ChatRequest] = []
        self.keys: list[str | None] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.keys.append(api_key({k.lower(): v for k, v in request.headers.items()}))
        try:
            if request.url.path == "/v1/messages/count_tokens":
                parsed = parse_count_tokens(request.content)
                self.seen.append(parsed)
                return httpx2.Response(200, content=render_count_tokens(self.answer(parsed)),
                                       headers={"content-type": "application/json"})
            assert request.url.path == "/v1/messages"
            parsed = parse_request(request.content)
            self.seen.append(parsed)
            if not parsed.stream:
                return httpx2.Response(200, content=render_message(self.answer(parsed), parsed),
                                       headers={"content-type": "application/json"})
            stream = AnthropicStream(parsed)
            out = [stream.start()]
            for item in self.chunks(parsed):
                out.append(stream.fail(item) if isinstance(item, APIError)
                           else stream.feed(item))
            out.append(stream.finish())
            return httpx2.Response(200, content=b"".join(out),
                                   headers={"content-type": stream.content_type})
        except APIError as err:
            return httpx2.Response(err.status, content=error_body(err, "req-9"),
                                   headers={"content-type": "application/json",
                                            "request-id": "req-9"})


def client(gateway: FakeGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-tooti", base_url="http://gateway.test",
                               max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(gateway)))


WEATHER: Any = {"name": "get_weather", "description": "weather",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def weather_answer(request: ChatRequest) -> dict[str, Any]:
    if request.body["messages"][-1]["role"] == "tool":
        return completion(f"It is {request.body['messages'][-1]['content']}.")
    return completion(None, finish="tool_calls",
                      calls=[call("get_weather", '{"city":"Paris"}', "call_w")])


def weather_chunks(request: ChatRequest) -> list[Any]:
    if request.body["messages"][-1]["role"] == "tool":
        return [chunk({"content": "It is "}), chunk({"content": "sunny."}), chunk({}, "stop"),
                usage_chunk(40, 3)]
    return [chunk(tool_delta(0, call_id="call_w", name="get_weather", arguments='{"ci')),
            chunk(tool_delta(0, arguments='ty":"Paris"}')), chunk({}, "tool_calls"),
            usage_chunk(30, 8)]


def test_the_sdk_runs_a_tool_use_round_trip() -> None:
    gateway = FakeGateway(weather_answer, weather_chunks)
    sdk = client(gateway)
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = sdk.messages.create(model="claude-x", max_tokens=100, messages=history,
                                tools=[WEATHER], system="be brief")
    assert first.stop_reason == "tool_use" and first.usage.input_tokens == 12
    use = first.content[0]
    assert use.type == "tool_use" and use.input == {"city": "Paris"} and use.id == "call_w"
    history += [first.to_param(), {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    second = sdk.messages.create(model="claude-x", max_tokens=100, messages=history,
                                 tools=[WEATHER], extra_body={"temperature": 0.2})
    assert second.content[0].type == "text" and second.content[0].text == "It is sunny."
    assert second.stop_reason == "end_turn"
    sent = gateway.seen[1].body
    assert sent["temperature"] == 0.2
    assert sent["messages"][-2:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_w", "content": "sunny"}]
    assert gateway.keys == ["sk-tooti", "sk-tooti"]


def test_the_sdk_streams_with_its_helper_and_raw() -> None:
    gateway = FakeGateway(weather_answer, weather_chunks)
    sdk = client(gateway)
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    with sdk.messages.stream(model="claude-x", max_tokens=100, messages=history,
                             tools=[WEATHER]) as stream:
        first = stream.get_final_message()
    use: Any = first.content[0]
    assert first.stop_reason == "tool_use" and use.input == {"city": "Paris"}
    assert (first.usage.input_tokens, first.usage.output_tokens) == (30, 8)
    history += [first.to_param(), {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_w", "content": "sunny"}]}]
    with sdk.messages.stream(model="claude-x", max_tokens=100, messages=history,
                             tools=[WEATHER]) as stream:
        texts = list(stream.text_stream)
        second = stream.get_final_message()
    assert texts == ["It is ", "sunny."] and second.stop_reason == "end_turn"
    raw = list(sdk.messages.create(model="claude-x", max_tokens=100, messages=history,
                                   stream=True))
    assert raw[0].type == "message_start" and raw[-1].type == "message_stop"
    assert gateway.seen[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("status", "error_class"), [
    (400, anthropic.BadRequestError), (401, anthropic.AuthenticationError),
    (403, anthropic.PermissionDeniedError), (404, anthropic.NotFoundError),
    (429, anthropic.RateLimitError), (500, anthropic.InternalServerError),
    (529, anthropic.OverloadedError)])
def test_the_sdk_raises_its_own_error_types(status: int, error_class: type[Exception]) -> None:
    def fail(_: ChatRequest) -> Any:
        raise APIError(status, "no")
    sdk = client(FakeGateway(fail, fail))
    with pytest.raises(error_class) as caught:
        sdk.messages.create(model="claude-x", max_tokens=5,
                            messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    assert caught.value.body["error"]["type"] == error_type(status)  # type: ignore[attr-defined]
    assert caught.value.request_id == "req-9"  # type: ignore[attr-defined]


def test_the_sdk_sees_a_refused_request_and_a_mid_stream_error() -> None:
    sdk = client(FakeGateway(weather_answer, lambda _: [chunk({"content": "par"}),
                                                         APIError(502, "node cut")]))
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(model="claude-x", max_tokens=5, messages=[
            {"role": "user", "content": "x"}], tools=[{"type": "web_search_20250305",
                                                       "name": "web_search"}])
    assert "tools[0].type: server tool" in str(caught.value)
    with pytest.raises(anthropic.APIStatusError) as failed:
        with sdk.messages.stream(model="claude-x", max_tokens=5,
                                 messages=[{"role": "user", "content": "x"}]) as stream:
            list(stream.text_stream)
    assert failed.value.body["error"] == {"type": "api_error",  # type: ignore[index]
                                          "message": "node cut"}


def test_the_sdk_counts_tokens() -> None:
    gateway = FakeGateway(lambda _: completion(usage={"prompt_tokens": 42,
                                                      "completion_tokens": 1}), weather_chunks)
    count = client(gateway).messages.count_tokens(
        model="claude-x", messages=[{"role": "user", "content": "hello there"}])
    assert count.input_tokens == 42 and gateway.seen[0].body["max_tokens"] == 1


@pytest.mark.parametrize(("max_tokens", "reason"), [(64, "end_turn"), (3, "max_tokens")])
def test_the_simulated_backends_own_answers_translate(max_tokens: int, reason: str) -> None:
    """The simulated node backend takes the translated bodies and its exact wire output
    (``usage: null`` in every chunk, the usage chunk, ``[DONE]``) comes back valid."""
    for stream in (False, True):
        request = parse_request(body(max_tokens=max_tokens, stream=stream,
                                     system="sys", messages=[
            {"role": "user", "content": [{"type": "text", "text": "one two three"}]}]))
        job = prepare_job("chat/completions", "claude-x", request.body, 5)
        if not stream:
            message = Message.model_validate_json(
                render_message(json.loads(completion_body(job, "a", 1)), request))
        else:
            shape = StreamShape(job, "a", 1)
            wire = b"".join([*shape.opening(),
                             *(shape.content(0, t, i == 0) for i, t in enumerate(job.tokens)),
                             *shape.closing()])
            translator = AnthropicStream(request)
            out = [translator.start()]
            for event in SSEDecoder().events(wire):
                out.append(translator.finish() if event.data == "[DONE]"
                           else translator.feed(json.loads(event.data)))
            seq = events(b"".join(out))
            check_order(seq)
            message = final_message(seq)
        text: Any = message.content[0]
        assert text.text == "".join(job.tokens) and message.stop_reason == reason
        assert (message.usage.input_tokens, message.usage.output_tokens) == \
            (job.prompt_tokens, len(job.tokens))


def test_the_front_interface() -> None:
    request, out = check_front(FRONT, body(stream=True), media_type="application/json",
                               stream_media_type="text/event-stream")
    assert request.model == request.context["model"] == "claude-x"
    seq = events(out)
    assert seq[-1] == ("error", {"type": "error", "request_id": "req-7", "error": {
        "type": "api_error", "message": "oom"}})
    Message.model_validate_json(FRONT.answer(request, completion()))
