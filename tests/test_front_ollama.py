"""The Ollama front without a gateway: Ollama request bodies as chat-completions and
embeddings bodies, the node's answers and streams back as Ollama's JSON and NDJSON
(each checked against the ``ollama`` client's own pydantic types), the listings, the
errors, and the ``ollama`` client itself driven over an ``httpx.MockTransport`` whose
handler runs the translation over canned chat-completions answers."""

from __future__ import annotations

import base64
import itertools
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import ollama
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ollama import (
    ChatResponse,
    EmbeddingsResponse,
    EmbedResponse,
    GenerateResponse,
    ListResponse,
    ProcessResponse,
    ShowResponse,
)

from tests.fronts_support import (
    NodeStream,
    check_front,
    many_pieces,
    node_streams,
    sse_wire,
    through_sse,
    tool_chunk,
)
from tooti.backends.ollama_requests import Defaults, chat_payload
from tooti.errors import APIError
from tooti.fronts.base import ChatRequest, StreamTranslator
from tooti.fronts.ollama_answers import answer, load_answer, ollama_front, stream_translator
from tooti.fronts.ollama_api import (
    NDJSON_CONTENT_TYPE,
    Clock,
    error_body,
    ollama_name,
    parse_chat,
    parse_embed,
    parse_embeddings,
    parse_generate,
    resolve_model,
    rfc3339,
)
from tooti.fronts.ollama_models import (
    API_VERSION,
    NetworkModel,
    live_ids,
    models_from_list,
    ps_body,
    show_body,
    tags_body,
    unsupported,
    unsupported_action,
    version_body,
)
from tooti.fronts.tool_calls import MAX_CALLS

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 16).decode()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
LIVE = ("gemma-3-270m", "llama3.2:latest", "qwen2.5:0.5b")


class FakeClock:
    """Monotonic time that moves 1 ms per reading; wall time fixed."""

    def __init__(self) -> None:
        self.now = 0

    def monotonic_ns(self) -> int:
        self.now += 1_000_000
        return self.now

    def clock(self) -> Clock:
        return Clock(monotonic_ns=self.monotonic_ns, wall_ns=lambda: 1_764_961_200_123_456_789)


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def chat(**fields: Any) -> ChatRequest:
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat(raw(body), live=LIVE)


def refused(parse: Callable[..., Any], body: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(raw(body) if not isinstance(body, bytes) else body, live=LIVE)
    assert caught.value.status == 400
    return caught.value


# -- requests ------------------------------------------------------------------------


def test_chat_streams_by_default_and_asks_the_node_for_usage() -> None:
    request = chat()
    assert request.stream and request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["messages"] == [{"role": "user", "content": "hi"}]
    assert request.context["endpoint"] == "chat/completions"
    whole = chat(stream=False)
    assert not whole.stream and "stream_options" not in whole.body
    assert chat(stream=None).stream


def test_options_map_to_sampling_fields() -> None:
    request = chat(options={
        "temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "seed": 7,
        "num_predict": 64, "stop": ["\n\n", "END"], "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repeat_penalty": 1.1,
        "num_ctx": 8192, "mirostat": 2, "num_gpu": 1,  # ignored
    }, keep_alive="5m", format="json")
    body = request.body
    for name, value in {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                        "seed": 7, "max_tokens": 64, "stop": ["\n\n", "END"],
                        "presence_penalty": 0.5, "frequency_penalty": -0.5,
                        "repeat_penalty": 1.1}.items():
        assert body[name] == value
    assert body["response_format"] == {"type": "json_object"}
    for ignored in ("num_ctx", "mirostat", "num_gpu", "keep_alive", "options"):
        assert ignored not in body
    assert chat(options={"stop": "x"}).body["stop"] == ["x"]
    assert "max_tokens" not in chat(options={"num_predict": -1}).body


def test_format_schema_and_think() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat(format=schema, think="high").body
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": schema}}
    assert body["reasoning_effort"] == "high"
    assert "response_format" not in chat(format="").body
    assert chat(think=False).context["think"] is False


def test_images_become_data_url_parts() -> None:
    request = chat(messages=[{"role": "user", "content": "what is it?",
                              "images": [PNG, "data:image/jpeg;base64," + JPEG]}])
    assert request.body["messages"][0]["content"] == [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}},
    ]


@pytest.mark.parametrize("image", [
    PNG + "A" * 1_000_000 + "!!!!",  # bad base64 far past the bytes decoded for the type
    PNG[:-1], "", "bm90IGFuIGltYWdl"])  # length not a multiple of 4; empty; not an image
def test_images_are_checked_without_decoding_them_whole(image: str) -> None:
    error = refused(parse_chat, {"model": "m", "messages": [
        {"role": "user", "content": "x", "images": [image]}]})
    assert error.param == "messages[0].images[0]"


def test_tool_round_trip_links_results_to_calls() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_name": "get_time", "content": "noon"},
        {"role": "tool", "content": "sunny"},
    ]
    body = chat(messages=messages, tools=[WEATHER]).body
    assert body["tools"] == [WEATHER]
    assistant = body["messages"][2]
    assert assistant["content"] is None
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in assistant["tool_calls"]] == [
        ("call_2_0", "get_weather", {"city": "Paris"}), ("call_2_1", "get_time", {})]
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "call_2_1",
                                   "content": "noon"}
    assert body["messages"][4] == {"role": "tool", "tool_call_id": "call_2_0",
                                   "content": "sunny"}


def test_generate_is_a_system_and_a_user_message() -> None:
    request = parse_generate(raw({"model": "llama3.2", "prompt": "Why is the sky blue?",
                                  "system": "Answer in one line.", "images": [PNG],
                                  "stream": False, "options": {"num_predict": 5}}),
                             live=LIVE)
    assert request.model == "llama3.2:latest" and request.context["model"] == "llama3.2"
    assert request.body["messages"][0] == {"role": "system", "content": "Answer in one line."}
    assert request.body["messages"][1]["content"][0] == {"type": "text",
                                                         "text": "Why is the sky blue?"}
    assert request.body["max_tokens"] == 5 and request.context["kind"] == "generate"


def test_model_names() -> None:
    assert ollama_name("gemma-3-270m") == "gemma-3-270m:latest"
    assert ollama_name("llama3.2:1b") == "llama3.2:1b"
    assert ollama_name("hf.co/org/model") == "hf.co/org/model:latest"
    assert resolve_model("gemma-3-270m:latest", LIVE) == "gemma-3-270m"
    assert resolve_model("gemma-3-270m", LIVE) == "gemma-3-270m"
    assert resolve_model("llama3.2", LIVE) == "llama3.2:latest"
    assert resolve_model("qwen2.5:0.5b", LIVE) == "qwen2.5:0.5b"
    assert resolve_model("missing:latest", LIVE) == "missing:latest"


@pytest.mark.parametrize(("parse", "body", "param"), [
    (parse_chat, {"messages": []}, "model"),
    (parse_chat, {"model": ""}, "model"),
    (parse_chat, {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role"),
    (parse_chat, {"model": "m", "messages": [{"role": "user", "content": ["x"]}]},
     "messages[0].content"),
    (parse_chat, {"model": "m", "options": {"temperature": "hot"}}, "options.temperature"),
    (parse_chat, {"model": "m", "options": {"top_p": 3}}, "options.top_p"),
    (parse_chat, {"model": "m", "options": {"num_predict": 0}}, "options.num_predict"),
    (parse_chat, {"model": "m", "options": {"seed": True}}, "options.seed"),
    (parse_chat, {"model": "m", "format": "xml"}, "format"),
    (parse_chat, {"model": "m", "logprobs": 1}, "logprobs"),
    (parse_chat, {"model": "m", "top_logprobs": 21}, "top_logprobs"),
    (parse_chat, {"model": "m", "tools": [{"type": "code", "function": {"name": "f"}}]},
     "tools[0].type"),
    (parse_chat, {"model": "m", "messages": [{"role": "user", "images": ["!!"]}]},
     "messages[0].images[0]"),
    (parse_chat, {"model": "m", "messages": [{"role": "user", "images": [
        base64.b64encode(b"plain text").decode()]}]}, "messages[0].images[0]"),
    (parse_chat, {"model": "m", "messages": [{"role": "assistant", "images": [PNG]}]},
     "messages[0].images"),
    (parse_chat, {"model": "m", "messages": [{"role": "tool", "content": "42"}]},
     "messages[0]"),
    (parse_chat, {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    (parse_chat, {"model": "m", "think": "max"}, "think"),
    (parse_generate, {"model": "m", "prompt": "x", "raw": True}, "raw"),
    (parse_generate, {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, "template"),
    (parse_generate, {"model": "m", "prompt": "x", "context": [1, 2]}, "context"),
    (parse_generate, {"model": "m", "prompt": "x", "suffix": "end"}, "suffix"),
    (parse_generate, {"model": "m", "prompt": "x", "width": 512}, "width"),
    (parse_embed, {"model": "m", "input": []}, "input"),
    (parse_embed, {"model": "m", "input": [1, 2]}, "input[0]"),
    (parse_embed, {"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    (parse_embeddings, {"model": "m", "prompt": ""}, "prompt"),
])
def test_refusals_name_the_param(parse: Callable[..., ChatRequest], body: dict[str, Any],
                                 param: str) -> None:
    error = refused(parse, body)
    assert error.param == param, error.message
    assert json.loads(error_body(error)) == {"error": error.message}


def test_refusals_of_bodies_that_are_not_objects() -> None:
    for body in (b"", b"nul", b"[1]", b'"x"', b"{" * 10_000 + b"}" * 10_000):
        assert refused(parse_chat, body).param is None


def test_nesting_is_bounded() -> None:
    schema: Any = {}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}}
    body = raw({"model": "m", "messages": [{"role": "user", "content": "x"}], "format": schema})
    error = refused(parse_chat, body)
    assert "deeper than 128 levels" in error.message
    assert parse_chat(body, max_depth=1000).body["response_format"]["json_schema"]["schema"] \
        == schema


def test_accepted_ignored_fields() -> None:
    request = parse_generate(raw({"model": "m", "prompt": "x", "template": "", "suffix": "",
                                  "raw": False, "context": [], "keep_alive": -1,
                                  "unknown": {"a": 1}}))
    assert request.body["messages"] == [{"role": "user", "content": "x"}]


def test_load_only_requests_answer_without_a_node() -> None:
    clock = FakeClock().clock()
    request = parse_chat(raw({"model": "gemma-3-270m:latest"}), live=LIVE, clock=clock)
    assert request.context["load"]
    line = load_answer(request, clock)
    assert line.endswith(b"\n")
    item = ChatResponse(**json.loads(line))
    assert item.done and item.done_reason == "load" and item.model == "gemma-3-270m:latest"
    generate = parse_generate(raw({"model": "m", "stream": False}), clock=clock)
    assert generate.context["load"]
    assert GenerateResponse(**json.loads(load_answer(generate, clock))).done_reason == "load"


def test_embed_bodies() -> None:
    request = parse_embed(raw({"model": "gemma-3-270m", "input": ["a", "b"], "truncate": True,
                               "dimensions": 8, "keep_alive": "1m"}), live=LIVE)
    assert request.context["endpoint"] == "embeddings"
    assert request.body == {"model": "gemma-3-270m", "input": ["a", "b"],
                            "encoding_format": "float", "dimensions": 8}
    legacy = parse_embeddings(raw({"model": "gemma-3-270m", "prompt": "a"}), live=LIVE)
    assert legacy.body["input"] == "a" and not legacy.stream


# -- answers -------------------------------------------------------------------------

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def completion(content: str | None = "Hello there.", finish: str = "stop",
               **message: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "x",
            "choices": [{"index": 0, "finish_reason": finish, "message": {
                "role": "assistant", "content": content, **message}}], "usage": USAGE}


def test_chat_answer_has_ollamas_fields_and_counters() -> None:
    fake = FakeClock()
    clock = fake.clock()
    request = parse_chat(raw({"model": "gemma-3-270m:latest", "stream": False}), live=LIVE,
                         clock=clock)
    body = json.loads(answer(completion(reasoning_content="hmm"), request, clock))
    item = ChatResponse(**body)
    assert item.model == "gemma-3-270m:latest" and item.message.content == "Hello there."
    assert item.message.thinking == "hmm" and item.done and item.done_reason == "stop"
    assert (item.prompt_eval_count, item.eval_count) == (12, 3)
    assert item.total_duration == 1_000_000 == item.eval_duration
    assert item.load_duration == 0 and item.prompt_eval_duration == 0
    assert item.created_at == rfc3339(1_764_961_200_123_456_789) == \
        "2025-12-05T19:00:00.123456789Z"


def test_chat_answer_tool_calls_have_object_arguments() -> None:
    request = chat(stream=False, tools=[WEATHER])
    calls = [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "broken",
                                                          "arguments": "{not json"}}]
    item = ChatResponse(**json.loads(answer(completion(None, "tool_calls", tool_calls=calls),
                                            request)))
    assert item.done_reason == "stop"
    assert item.message.tool_calls is not None and len(item.message.tool_calls) == 1
    assert item.message.tool_calls[0].function.name == "get_weather"
    assert item.message.tool_calls[0].function.arguments == {"city": "Paris"}
    assert item.message.content == "{not json"


def test_think_false_drops_thinking() -> None:
    request = chat(stream=False, think=False)
    item = ChatResponse(**json.loads(answer(completion(reasoning_content="x"), request)))
    assert item.message.thinking is None


def test_generate_answer() -> None:
    request = parse_generate(raw({"model": "m", "prompt": "x", "stream": False}))
    item = GenerateResponse(**json.loads(answer(completion("Blue.", "length"), request)))
    assert item.response == "Blue." and item.done_reason == "length" and item.eval_count == 3


def test_embedding_answers() -> None:
    upstream: dict[str, Any] = {"object": "list", "model": "e", "usage": {"prompt_tokens": 4,
                                                          "total_tokens": 4},
                "data": [{"object": "embedding", "index": 1, "embedding": [0.5, 0.5]},
                         {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}]}
    request = parse_embed(raw({"model": "e", "input": ["a", "b"]}))
    item = EmbedResponse(**json.loads(answer(upstream, request)))
    assert item.embeddings == [[1.0, 0.0], [0.5, 0.5]] and item.prompt_eval_count == 4
    legacy = parse_embeddings(raw({"model": "e", "prompt": "a"}))
    upstream["data"] = upstream["data"][1:]
    assert EmbeddingsResponse(**json.loads(answer(upstream, legacy))).embedding == [1.0, 0.0]
    with pytest.raises(APIError) as caught:
        answer({"data": [{"index": 0, "embedding": "AAAA"}]}, request)
    assert caught.value.status == 502


# -- streams -------------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "x", "choices": [{"index": 0, "delta": delta or {},
                                       "finish_reason": finish}]}


USAGE_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "x", "choices": [], "usage": USAGE}


def text_chunks(*pieces: str, finish: str = "stop") -> list[dict[str, Any]]:
    return [chunk({"role": "assistant", "content": ""}),
            *(chunk({"content": p}) for p in pieces), chunk(finish=finish), USAGE_CHUNK]


def run_stream(request: ChatRequest, chunks: list[dict[str, Any]], clock: Clock | None = None
               ) -> list[dict[str, Any]]:
    translator: StreamTranslator = stream_translator(request, clock or FakeClock().clock())
    assert translator.content_type == NDJSON_CONTENT_TYPE
    out = translator.start() + b"".join(translator.feed(c) for c in chunks)
    out += translator.finish()
    assert out.endswith(b"\n")
    return [json.loads(line) for line in out.splitlines()]


def test_chat_stream_lines_and_final_counters() -> None:
    fake = FakeClock()
    clock = fake.clock()
    request = parse_chat(raw({"model": "gemma-3-270m", "messages": [
        {"role": "user", "content": "hi"}]}), live=LIVE, clock=clock)  # t=1ms
    translator = stream_translator(request, clock)
    assert translator.start() == b""  # t=2ms: the node answered
    lines = translator.feed(chunk({"role": "assistant", "content": ""}))
    lines += translator.feed(chunk({"content": "Hel"}))  # t=3ms: first token
    lines += translator.feed(chunk({"content": "lo"}))
    lines += translator.feed(chunk(finish="stop")) + translator.feed(USAGE_CHUNK)
    lines += translator.finish()  # t=4ms
    items = [ChatResponse(**json.loads(line)) for line in lines.splitlines()]
    assert [i.message.content for i in items] == ["Hel", "lo", ""]
    assert [i.done for i in items] == [False, False, True]
    final = items[-1]
    assert final.done_reason == "stop" and final.model == "gemma-3-270m"
    assert (final.total_duration, final.load_duration, final.prompt_eval_duration,
            final.eval_duration) == (3_000_000, 1_000_000, 1_000_000, 1_000_000)
    assert (final.prompt_eval_count, final.eval_count) == (12, 3)
    assert translator.finish() == b"" and translator.feed(chunk({"content": "x"})) == b""


def test_generate_stream_with_thinking() -> None:
    request = parse_generate(raw({"model": "m", "prompt": "x"}))
    items = run_stream(request, [chunk({"reasoning_content": "let me see"}),
                                 *text_chunks("Blue", ".", finish="length")])
    parsed = [GenerateResponse(**item) for item in items]
    assert parsed[0].thinking == "let me see" and parsed[0].response == ""
    assert "".join(p.response or "" for p in parsed) == "Blue."
    assert parsed[-1].done and parsed[-1].done_reason == "length"


def test_stream_tool_calls_arrive_whole_before_the_end() -> None:
    request = chat(tools=[WEATHER])
    chunks = [chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_9", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Rome"}'}}]}),
        chunk(finish="tool_calls"), USAGE_CHUNK]
    items = [ChatResponse(**item) for item in run_stream(request, chunks)]
    assert len(items) == 2
    calls = items[0].message.tool_calls
    assert calls is not None and calls[0].function.arguments == {"city": "Rome"}
    assert items[1].done and items[1].done_reason == "stop"


LOGPROBS = {"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
                         "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": None},
                                          {"token": "Yo", "logprob": -1.5, "bytes": None}]}]}


def test_logprobs_are_asked_for_and_returned() -> None:
    request = chat(logprobs=True, top_logprobs=2, stream=False)
    assert request.body["logprobs"] is True and request.body["top_logprobs"] == 2
    assert chat(top_logprobs=1).body["logprobs"] is True
    assert "logprobs" not in chat(logprobs=False).body
    upstream = completion("Hi")
    upstream["choices"][0]["logprobs"] = LOGPROBS
    item = ChatResponse(**json.loads(answer(upstream, request)))
    assert item.logprobs is not None and item.logprobs[0].token == "Hi"
    assert item.logprobs[0].logprob == -0.25
    assert [t.token for t in item.logprobs[0].top_logprobs or []] == ["Hi", "Yo"]
    streamed = chunk({"content": "Hi"})
    streamed["choices"][0]["logprobs"] = LOGPROBS
    first = ChatResponse(**run_stream(chat(logprobs=True), [streamed, USAGE_CHUNK])[0])
    assert first.logprobs is not None and first.logprobs[0].logprob == -0.25


def test_an_error_chunk_ends_the_stream_with_an_error_line() -> None:
    translator = stream_translator(chat())
    line = translator.feed({"error": {"message": "out of memory", "type": "server_error"}})
    assert json.loads(line) == {"error": "out of memory"}
    assert translator.feed(chunk({"content": "x"})) == b"" and translator.finish() == b""


def calls_of(items: list[dict[str, Any]]) -> list[tuple[str | None, str, Any]]:
    """The tool calls of a stream's lines, each line checked by the client's type."""
    out = []
    for item in items:
        ChatResponse(**item)
        for call in item["message"].get("tool_calls", []):
            out.append((call.get("id"), call["function"]["name"],
                        call["function"]["arguments"]))
    return out


@settings(max_examples=40, deadline=None)
@given(node=node_streams())
def test_random_node_streams_give_their_text_and_tool_calls(node: NodeStream) -> None:
    items = run_stream(chat(tools=[WEATHER]), node.chunks)
    assert "".join(i["message"]["content"] for i in items) == node.text
    assert calls_of(items) == [(call_id, name, json.loads(arguments))
                               for call_id, name, arguments in node.calls]
    assert items[-1]["done"] and items[-1]["done_reason"] == "stop"
    assert [i["done"] for i in items].count(True) == 1


def test_a_long_stream_of_small_argument_pieces() -> None:
    chunks, arguments = many_pieces()
    items = run_stream(chat(tools=[WEATHER]), chunks)
    assert calls_of(items) == [("call_long", "echo", json.loads(arguments))]


def test_a_repeated_name_and_pieces_without_index_make_one_call() -> None:
    items = run_stream(chat(tools=[WEATHER]), [
        tool_chunk(None, call_id="c1", name="get_weather", arguments='{"a":'),
        tool_chunk(None, name="get_weather", arguments="1}"), chunk(finish="tool_calls")])
    assert calls_of(items) == [("c1", "get_weather", {"a": 1})]


def test_too_many_tool_calls_end_the_stream_with_an_error_line() -> None:
    translator = stream_translator(chat(tools=[WEATHER]))
    out = b"".join(translator.feed(tool_chunk(k, call_id=f"c{k}", name="f"))
                   for k in range(MAX_CALLS + 1))
    assert str(MAX_CALLS) in json.loads(out)["error"] and translator.finish() == b""


def test_chunks_and_answers_that_are_not_objects() -> None:
    translator = stream_translator(chat())
    assert [translator.feed(junk) for junk in ([1], None, "x", 3)] == [b""] * 4
    assert translator.feed(chunk({"content": "ok"}))
    for junk in ([1], None, "x"):
        with pytest.raises(APIError) as caught:
            answer(junk, chat(stream=False))
        assert caught.value.status == 502


def test_stream_without_usage_omits_counts() -> None:
    items = run_stream(chat(), text_chunks("a")[:-1])
    assert items[-1]["done"] and "eval_count" not in items[-1]


def test_stream_failure_is_an_error_line() -> None:
    translator = stream_translator(chat())
    translator.feed(chunk({"content": "a"}))
    line = translator.fail(APIError(502, "node went away"))
    assert json.loads(line) == {"error": "node went away"} and line.endswith(b"\n")
    assert translator.finish() == b""


# -- listings and refused routes ------------------------------------------------------

MODELS = [
    NetworkModel(id="gemma-3-270m", owned_by="tooti", created=1_764_900_000, nodes=2,
                 context_length=32768),
    NetworkModel(id="llama3.2:latest", owned_by="ollama", created=1_764_900_100,
                 details=(("format", "gguf"), ("family", "llama"),
                          ("parameter_size", "3.2B"), ("quantization_level", "Q4_K_M"))),
    NetworkModel(id="embedder", endpoints=("embeddings",)),
]


def test_tags_and_ps() -> None:
    tags = ListResponse(**json.loads(tags_body(MODELS)))
    assert [m.model for m in tags.models] == ["embedder:latest", "gemma-3-270m:latest",
                                              "llama3.2:latest"]
    llama = tags.models[2]
    assert llama.details is not None and llama.details.family == "llama"
    assert llama.details.quantization_level == "Q4_K_M" and llama.size == 0
    assert llama.modified_at is not None and llama.modified_at.year == 2025
    ps = ProcessResponse(**json.loads(ps_body(MODELS)))
    assert [m.context_length for m in ps.models] == [None, 32768, None]


def test_show() -> None:
    shown = ShowResponse(**json.loads(show_body(raw({"model": "llama3.2"}), MODELS)))
    assert shown.capabilities == ["completion", "embedding"]
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    gemma = ShowResponse(**json.loads(show_body(raw({"name": "gemma-3-270m:latest"}),
                                                MODELS)))
    assert gemma.modelinfo is not None and gemma.modelinfo["tooti.context_length"] == 32768
    assert gemma.modelinfo["tooti.nodes"] == 2 and gemma.template is None
    embedder = ShowResponse(**json.loads(show_body(raw({"model": "embedder"}), MODELS)))
    assert embedder.capabilities == ["embedding"]
    with pytest.raises(APIError) as caught:
        show_body(raw({"model": "nope"}), MODELS)
    assert caught.value.status == 404 and "nope" in caught.value.message
    with pytest.raises(APIError) as caught:
        show_body(raw({}), MODELS)
    assert caught.value.status == 400


def test_models_from_the_gateways_list() -> None:
    body = {"object": "list", "data": [
        {"id": "llama3.2:latest", "object": "model", "created": 5, "owned_by": "ollama",
         "meta": {"family": "llama", "nodes": 3, "context_length": 4096,
                  "endpoints": ["chat/completions"]}},
        {"id": 7}, "junk"]}
    [model] = models_from_list(body)
    assert model == NetworkModel(id="llama3.2:latest", owned_by="ollama", created=5, nodes=3,
                                 context_length=4096, endpoints=("chat/completions",),
                                 details=(("family", "llama"),))
    assert live_ids([model]) == {"llama3.2:latest"}


def test_version_and_unsupported() -> None:
    assert json.loads(version_body()) == {"version": API_VERSION}
    assert unsupported_action("/api/pull") == "pull"
    assert unsupported_action("/api/blobs/sha256:abc") == "blobs"
    assert unsupported_action("/api/chat") is None
    error = unsupported("pull")
    assert error.status == 501 and "not supported by a network gateway" in error.message


# -- the ollama client end to end, over a mock transport -------------------------------


def canned_stream(text: str) -> list[dict[str, Any]]:
    words = text.split(" ")
    return text_chunks(*(w if i == 0 else " " + w for i, w in enumerate(words)))


class MockOllama:
    """What the mounting step will do, minus HTTP, auth and the proxy: each Ollama
    route runs the front over a canned chat-completions answer."""

    def __init__(self, models: list[NetworkModel]) -> None:
        self.models = models
        self.sent: list[dict[str, Any]] = []
        self.clock = FakeClock().clock()

    def node(self, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        """A node's chat-completions (or embeddings) answer to ``body``."""
        if "input" in body:
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return {"object": "list", "usage": {"prompt_tokens": 2, "total_tokens": 2},
                    "data": [{"object": "embedding", "index": i, "embedding": [0.1 * i, 1.0]}
                             for i in range(len(inputs))]}
        if body.get("tools"):
            call = {"id": "call_1", "type": "function", "function": {
                "name": body["tools"][0]["function"]["name"], "arguments": '{"city":"Oslo"}'}}
            if body["stream"]:
                return [chunk({"role": "assistant", "tool_calls": [{"index": 0, **call}]}),
                        chunk(finish="tool_calls"), USAGE_CHUNK]
            return completion(None, "tool_calls", tool_calls=[call])
        if body["stream"]:
            return canned_stream("Hello from the network.")
        return completion("Hello from the network.")

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        headers = {"content-type": "application/json; charset=utf-8"}
        try:
            if path == "/api/tags":
                return httpx.Response(200, content=tags_body(self.models), headers=headers)
            if path == "/api/ps":
                return httpx.Response(200, content=ps_body(self.models), headers=headers)
            if path == "/api/version":
                return httpx.Response(200, content=version_body(), headers=headers)
            if path == "/api/show":
                return httpx.Response(200, content=show_body(request.content, self.models),
                                      headers=headers)
            action = unsupported_action(path)
            if action is not None:
                raise unsupported(action)
            parse = {"/api/chat": parse_chat, "/api/generate": parse_generate,
                     "/api/embed": parse_embed, "/api/embeddings": parse_embeddings}[path]
            translated = parse(request.content, live=live_ids(self.models), clock=self.clock)
            if translated.model not in live_ids(self.models):
                raise APIError(404, f'model "{translated.context["model"]}" not found')
            self.sent.append(translated.body)
            if translated.context["load"]:
                return httpx.Response(200, content=load_answer(translated, self.clock))
            upstream = self.node(translated.body)
            if not translated.stream:
                assert isinstance(upstream, dict)
                return httpx.Response(200, content=answer(upstream, translated, self.clock),
                                      headers=headers)
            assert isinstance(upstream, list)
            translator = stream_translator(translated, self.clock)

            def lines() -> Iterator[bytes]:
                yield translator.start()
                for item in upstream:
                    yield translator.feed(item)
                yield translator.finish()

            return httpx.Response(200, content=lines(),
                                  headers={"content-type": translator.content_type})
        except APIError as error:
            return httpx.Response(error.status, content=error_body(error), headers=headers)


@pytest.fixture
def client() -> Iterator[tuple[ollama.Client, MockOllama]]:
    mock = MockOllama(MODELS)
    with ollama.Client(host="http://gateway.test", transport=httpx.MockTransport(mock)) as c:
        yield c, mock


def test_ollama_client_lists(client: tuple[ollama.Client, MockOllama]) -> None:
    c, _ = client
    assert [m.model for m in c.list().models] == ["embedder:latest", "gemma-3-270m:latest",
                                                  "llama3.2:latest"]
    assert len(c.ps().models) == 3
    assert c.show("gemma-3-270m").capabilities == ["completion", "embedding"]
    with pytest.raises(ollama.ResponseError) as caught:
        c.show("missing")
    assert caught.value.status_code == 404 and caught.value.error == 'model "missing" not found'


def test_ollama_client_chat(client: tuple[ollama.Client, MockOllama]) -> None:
    c, mock = client
    reply = c.chat(model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}],
                   options={"temperature": 0.1, "num_predict": 20})
    assert reply.message.content == "Hello from the network." and reply.eval_count == 3
    assert mock.sent[-1]["temperature"] == 0.1 and mock.sent[-1]["max_tokens"] == 20
    assert mock.sent[-1]["model"] == "gemma-3-270m" and not mock.sent[-1]["stream"]
    parts = list(c.chat(model="gemma-3-270m:latest", stream=True,
                        messages=[{"role": "user", "content": "hi"}]))
    assert "".join(p.message.content or "" for p in parts) == "Hello from the network."
    assert parts[-1].done and parts[-1].prompt_eval_count == 12
    assert all(not p.done for p in parts[:-1])


def test_ollama_client_tools(client: tuple[ollama.Client, MockOllama]) -> None:
    c, mock = client

    def get_weather(city: str) -> str:
        """Get the weather.

        Args:
          city: The city
        """
        return "sunny"

    for stream in (False, True):
        messages: list[Any] = [{"role": "user", "content": "weather in Oslo?"}]
        if stream:
            parts = list(c.chat(model="llama3.2", messages=messages, tools=[get_weather],
                                stream=True))
            message = next(p.message for p in parts if p.message.tool_calls)
        else:
            message = c.chat(model="llama3.2", messages=messages, tools=[get_weather]).message
        assert message.tool_calls is not None
        call = message.tool_calls[0]
        assert call.function.name == "get_weather" and call.function.arguments == {
            "city": "Oslo"}
        assert mock.sent[-1]["tools"][0]["function"]["parameters"]["required"] == ["city"]
        messages += [message, {"role": "tool", "tool_name": "get_weather",
                               "content": get_weather(**call.function.arguments)}]
        c.chat(model="llama3.2", messages=messages, stream=False)
        sent = mock.sent[-1]["messages"]
        assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert sent[2] == {"role": "tool", "tool_call_id": sent[1]["tool_calls"][0]["id"],
                           "content": "sunny"}


def test_ollama_client_generate_embed_and_refusals(
        client: tuple[ollama.Client, MockOllama]) -> None:
    c, mock = client
    reply = c.generate(model="gemma-3-270m", prompt="hi", system="be kind", images=[PNG],
                       format="json")
    assert reply.response == "Hello from the network." and reply.done
    assert mock.sent[-1]["response_format"] == {"type": "json_object"}
    streamed = list(c.generate(model="gemma-3-270m", prompt="hi", stream=True))
    assert "".join(p.response or "" for p in streamed) == "Hello from the network."
    assert c.generate(model="gemma-3-270m").done_reason == "load"
    assert c.embed(model="embedder", input=["a", "b"]).embeddings == [[0.0, 1.0],
                                                                     [0.1, 1.0]]
    assert c.embeddings(model="embedder", prompt="a").embedding == [0.0, 1.0]
    for call in (lambda: c.pull("llama3.2"), lambda: c.delete("llama3.2"),
                 lambda: c.copy("a", "b"), lambda: c.push("x"),
                 lambda: c.create("x", from_="llama3.2")):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 501
        assert "not supported by a network gateway" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        c.chat(model="gemma-3-270m", messages=[{"role": "user", "content": "x"}],
               options={"top_p": 2})
    assert caught.value.status_code == 400 and "options.top_p" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        c.chat(model="unknown", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404


def test_ollama_client_raises_a_mid_stream_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        translator = stream_translator(parse_chat(request.content))
        body = translator.feed(chunk({"content": "par"}))
        body += translator.fail(APIError(502, "the node went away"))
        return httpx.Response(200, content=body)

    with ollama.Client(transport=httpx.MockTransport(handler)) as c:
        parts = c.chat(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        assert next(parts).message.content == "par"
        with pytest.raises(ollama.ResponseError) as caught:
            next(parts)
        assert caught.value.error == "the node went away"


# -- properties ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
keys = st.sampled_from(["model", "messages", "prompt", "input", "options", "format",
                        "tools", "stream", "think", "images", "system", "role", "content",
                        "tool_calls", "function", "arguments", "name", "temperature",
                        "num_predict", "stop", "raw", "context", "dimensions"])
shaped = st.recursive(
    json_values,
    lambda inner: st.dictionaries(keys, inner, max_size=6) | st.lists(inner, max_size=3),
    max_leaves=30)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=shaped)
def test_any_json_is_a_request_or_an_api_error(body: Any) -> None:
    data = msgspec.json.encode(body)
    for parse in (parse_chat, parse_generate, parse_embed, parse_embeddings):
        try:
            result = parse(data, live=LIVE)
        except APIError as error:
            assert error.status == 400 and error_body(error)
        else:
            assert isinstance(result, ChatRequest)
            msgspec.json.encode(result.body)
    try:
        show_body(data, MODELS)
    except APIError as error:
        assert error.status in (400, 404)


texts = st.text(max_size=20)
messages_strategy = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": texts},
    optional={"images": st.just([PNG])}).map(
        lambda m: m if m["role"] == "user" else {k: v for k, v in m.items() if k != "images"}),
    min_size=1, max_size=5)
options_strategy = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(0, 100),
    "seed": st.integers(-(2**31), 2**31), "num_predict": st.integers(1, 4096),
    "stop": st.lists(st.text(max_size=5), max_size=3),
    "presence_penalty": st.floats(-2, 2), "repeat_penalty": st.floats(0, 2)})


@settings(max_examples=60, deadline=None)
@given(messages=messages_strategy, options=options_strategy,
       tools=st.lists(st.just(WEATHER), max_size=2), stream=st.booleans())
def test_valid_chats_reach_the_node_unchanged(
        messages: list[dict[str, Any]], options: dict[str, Any], tools: list[Any],
        stream: bool) -> None:
    request = parse_chat(raw({"model": "gemma-3-270m", "messages": messages,
                              "options": options, "tools": tools, "stream": stream}),
                         live=LIVE)
    body = request.body
    assert body["stream"] is stream and request.model == "gemma-3-270m"
    assert [m["role"] for m in body["messages"]] == [m["role"] for m in messages]
    for sent, given_message in zip(body["messages"], messages, strict=True):
        content = sent["content"]
        if isinstance(content, list):
            text = "".join(p["text"] for p in content if p["type"] == "text")
            assert sum(p["type"] == "image_url" for p in content) == 1
        else:
            text = content
        assert text == given_message["content"]
    renamed = {"num_predict": "max_tokens"}
    for name, value in options.items():
        if name == "stop" and not value:
            continue
        assert body[renamed.get(name, name)] == value
    assert body.get("tools", []) == tools


def translate_sse(request: ChatRequest, pieces: list[bytes]) -> bytes:
    """What the route will do: decode the node's SSE bytes as they come, feed each
    event's chunk, finish at ``[DONE]``."""
    return through_sse(stream_translator(request, FakeClock().clock()), pieces)


def test_node_bytes_split_at_every_boundary_give_the_same_stream() -> None:
    calls = [{"index": 0, "id": "c1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city":'}}]
    chunks = [*text_chunks("Hé", "llo ✓")[:-2], chunk({"tool_calls": calls}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]}),
              chunk(finish="tool_calls"), USAGE_CHUNK]
    data = sse_wire(chunks, crlf=True)
    request = chat(tools=[WEATHER])
    whole = translate_sse(request, [data])
    items = [ChatResponse(**json.loads(line)) for line in whole.splitlines()]
    assert "".join(i.message.content or "" for i in items) == "Héllo ✓"
    assert items[-2].message.tool_calls is not None
    assert items[-2].message.tool_calls[0].function.arguments == {"city": "Rome"}
    assert items[-1].done and items[-1].eval_count == 3
    for cut in range(len(data) + 1):
        assert translate_sse(request, [data[:cut], data[cut:]]) == whole, cut


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 1000), max_size=10),
       arguments=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5),
                                 max_size=3),
       arg_cuts=st.lists(st.integers(0, 1000), max_size=10), generate=st.booleans(),
       finish=st.sampled_from(["stop", "length", "tool_calls"]),
       byte_cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_stream_comes_back_whole(
        text: str, cuts: list[int], arguments: dict[str, Any], arg_cuts: list[int],
        generate: bool, finish: str, byte_cuts: list[int]) -> None:
    encoded = json.dumps(arguments)
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in _split(text, cuts)]
    if not generate:
        chunks.append(chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                             "function": {"name": "f", "arguments": ""}}]}))
        chunks += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
                   for piece in _split(encoded, arg_cuts)]
    chunks += [chunk(finish=finish), USAGE_CHUNK]
    request = (parse_generate(raw({"model": "m", "prompt": "x"})) if generate else chat())
    items = run_stream(request, chunks)
    data = sse_wire(chunks)
    points = sorted({c % (len(data) + 1) for c in byte_cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    assert [json.loads(line) for line in translate_sse(request, pieces).splitlines()] == items
    if generate:
        generated = [GenerateResponse(**item) for item in items]
        assert "".join(p.response or "" for p in generated) == text
        parsed: list[GenerateResponse | ChatResponse] = list(generated)
    else:
        chatted = [ChatResponse(**item) for item in items]
        assert "".join(p.message.content or "" for p in chatted) == text
        calls = [c for p in chatted for c in p.message.tool_calls or []]
        assert [c.function.arguments for c in calls] == [arguments]
        parsed = list(chatted)
    assert [p.done for p in parsed] == [False] * (len(parsed) - 1) + [True]
    assert parsed[-1].done_reason == ("stop" if finish == "tool_calls" else finish)
    assert parsed[-1].eval_count == 3


ollama_options = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(0, 100),
    "min_p": st.floats(0, 1), "seed": st.integers(0, 2**31), "num_predict": st.integers(1, 512),
    "stop": st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=3),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repeat_penalty": st.floats(0, 2)})
turn = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=10)},
                          optional={"images": st.lists(st.sampled_from([PNG, JPEG]),
                                                       min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.sampled_from(["system", "assistant"]),
                           "content": st.text(max_size=10)}),
    st.builds(lambda city, result: [
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": city}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": result}],
        st.text(max_size=5), st.text(max_size=5)))


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(turn, min_size=1, max_size=5), options=ollama_options,
       fmt=st.sampled_from([None, "json", {"type": "object"}]),
       tools=st.lists(st.just(WEATHER), max_size=1), stream=st.booleans())
def test_ollama_chats_survive_the_round_trip_to_an_ollama_node(
        turns: list[Any], options: dict[str, Any], fmt: Any, tools: list[Any],
        stream: bool) -> None:
    """Ollama client → this front → chat completions → the ``ollama`` backend's request
    translation: the Ollama node receives the messages, tools and options sent."""
    messages = [m for t in turns for m in (t if isinstance(t, list) else [t])]
    sent: dict[str, Any] = {"model": "llama3.2", "messages": messages, "options": options,
                            "tools": tools, "stream": stream}
    if fmt is not None:
        sent["format"] = fmt
    request = parse_chat(raw(sent), live=LIVE)
    node = chat_payload(request.body, "llama3.2:latest", Defaults())
    assert node["stream"] is stream and node.get("tools", []) == tools
    assert node.get("format") == fmt
    assert node.get("options", {}) == options  # num_predict went as max_tokens and back
    expected = []
    for message in messages:
        item = {"role": message["role"], "content": message["content"]}
        if message.get("images"):
            item["images"] = message["images"]
        if message.get("tool_calls"):
            item["tool_calls"] = message["tool_calls"]
        if message["role"] == "tool":
            item["tool_name"] = message["tool_name"]
        expected.append(item)
    assert node["messages"] == expected


node_keys = st.sampled_from(["choices", "delta", "message", "content", "tool_calls",
                             "function", "arguments", "index", "id", "name", "usage",
                             "prompt_tokens", "completion_tokens", "finish_reason",
                             "reasoning_content", "logprobs", "token", "logprob",
                             "top_logprobs", "data", "embedding", "error"])
node_shaped = st.recursive(
    json_values,
    lambda inner: st.dictionaries(node_keys, inner, max_size=5) | st.lists(inner, max_size=3),
    max_leaves=30)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(upstream=[[1], None, "x"])
@example(upstream=[{"choices": [{"delta": {"content": "x"}, "message": {"content": "x"},
                                 "logprobs": {"content": [{"token": "x", "logprob": math.inf,
                                                           "top_logprobs": [None]}]}}]}])
@example(upstream=[{"data": [{"embedding": [1.0, "x"]}]}, {"data": [{"embedding": [math.inf]}]}])
@given(upstream=st.lists(st.dictionaries(node_keys, node_shaped, max_size=5) | node_shaped,
                         max_size=5))
def test_any_node_answer_is_translated_or_a_bad_gateway(upstream: list[Any]) -> None:
    """What a node sends is not trusted: any JSON value gives an answer or a 502 (a
    whole answer), or is skipped or an error line (a stream's chunk)."""
    requests = [chat(stream=False), parse_generate(raw({"model": "m", "prompt": "x"})),
                parse_embed(raw({"model": "m", "input": "x"})),
                parse_embeddings(raw({"model": "m", "prompt": "x"}))]
    kinds: list[Any] = [ChatResponse, GenerateResponse, EmbedResponse, EmbeddingsResponse]
    for request, kind in zip(requests, kinds, strict=True):
        for item in upstream:
            try:
                kind(**json.loads(answer(item, request)))
            except APIError as error:
                assert error.status == 502
    for request, kind in zip(requests[:2], kinds[:2], strict=True):
        translator = stream_translator(request)
        out = translator.start() + b"".join(translator.feed(c) for c in upstream)
        out += translator.finish()
        for line in out.splitlines():
            item = json.loads(line)
            if "error" not in item:
                kind(**item)


def test_the_front_interface() -> None:
    front = ollama_front("chat", live=LIVE, clock=FakeClock().clock())
    request, out = check_front(front, raw({"model": "llama3.2", "messages": [
        {"role": "user", "content": "hi"}]}), media_type="application/json; charset=utf-8",
        stream_media_type="application/x-ndjson")
    assert (request.model, request.context["model"]) == ("llama3.2:latest", "llama3.2")
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1] == {"error": "oom"} and lines[0]["message"]["content"] == "hi"
    ChatResponse(**json.loads(front.answer(request, completion())))
    assert json.loads(front.error_body(APIError(400, "bad"), "req-7")) == {"error": "bad"}
