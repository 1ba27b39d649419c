"""The send wrapper that turns the proxy's chat-completions answer into a front's dialect
(:mod:`tooti.gateway.translated_send`), driven with the ASGI messages the proxy sends."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tooti.billing.base import Outcome
from tooti.errors import APIError
from tooti.fronts import anthropic_stream, responses_stream
from tooti.fronts.base import Front
from tooti.fronts.ollama_answers import ollama_front
from tooti.gateway.translated_send import TranslatedSend, error_of, inband_status
from tooti.protocol.sse import SSEDecoder

ANTHROPIC = b'{"model": "m", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "hi"}]}'  # noqa: E501
SSE = b"text/event-stream"


def event(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def chunk(content: str | None = None, finish: str | None = None,
          usage: dict[str, int] | None = None) -> bytes:
    choices = [] if content is None and finish is None else [
        {"index": 0, "delta": {"content": content} if content else {},
         "finish_reason": finish}]
    body: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "model": "m",
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return event(body)


STREAM = (chunk(" tok0") + chunk(" tok1") + chunk(finish="stop")
          + chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
          + b"data: [DONE]\n\n")


class Sink:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def start(self) -> dict[str, Any]:
        return self.messages[0]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.start["headers"]).get(name)


async def run(front: Front, raw: bytes, parts: list[bytes], *, status: int = 200,
              content_type: bytes = SSE) -> Sink:
    sink = Sink()
    send = TranslatedSend(sink, front, front.parse(raw, request_id="req_1"))
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"x-request-id", b"req_1"),
        (b"x-ratelimit-remaining-requests", b"9")]})
    for index, part in enumerate(parts):
        await send({"type": "http.response.body", "body": part,
                    "more_body": index + 1 < len(parts)})
    return sink


def anthropic_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    decoder = SSEDecoder()
    return [(e.event, msgspec.json.decode(e.data)) for e in decoder.events(body)]


async def test_a_stream_is_translated_and_keeps_the_proxys_headers() -> None:
    sink = await run(anthropic_stream.FRONT, ANTHROPIC, [STREAM])
    assert sink.start["status"] == 200 and sink.header(b"content-type") == SSE
    assert sink.header(b"x-request-id") == b"req_1"
    assert sink.header(b"x-ratelimit-remaining-requests") == b"9"
    kinds = [kind for kind, _ in anthropic_events(sink.body)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert sink.messages[-1]["more_body"] is False


async def test_every_split_of_the_stream_gives_the_same_events() -> None:
    whole = anthropic_events((await run(anthropic_stream.FRONT, ANTHROPIC, [STREAM])).body)
    strip = {"id", "request_id"}

    def shape(events: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        return [(kind, {k: v for k, v in data.items() if k != "message"} if kind ==
                 "message_start" else data) for kind, data in events if kind not in strip]

    for cut in range(1, len(STREAM)):
        # The proxy relays whole events; a cut inside one still reaches the wrapper as
        # bytes it must join (an unfinished event at the end included).
        split = await run(anthropic_stream.FRONT, ANTHROPIC, [STREAM[:cut], STREAM[cut:]])
        assert shape(anthropic_events(split.body)) == shape(whole), cut


async def test_an_inband_error_ends_the_stream_in_the_dialect() -> None:
    error = APIError(504, "request exceeded 5s", code="timeout")
    sink = await run(anthropic_stream.FRONT, ANTHROPIC, [
        chunk(" tok0"), b"data: " + error.to_json() + b"\n\ndata: [DONE]\n\n"])
    events = anthropic_events(sink.body)
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "timeout_error"
    assert "message_stop" not in [kind for kind, _ in events]


async def test_a_whole_answer_and_a_nodes_error_answer() -> None:
    raw = b'{"model": "m", "input": "hi"}'
    completion = {"id": "c", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"},
         "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    encoded = msgspec.json.encode(completion)
    sink = await run(responses_stream.FRONT, raw, [encoded[:10], encoded[10:]],
                     content_type=b"application/json")
    answer = msgspec.json.decode(sink.body)
    assert answer["object"] == "response" and answer["output"][0]["content"][0][
        "text"] == "hello"
    assert sink.header(b"content-length") == str(len(sink.body)).encode()
    node_error = APIError(400, "bad 'n'", code="invalid_value", param="n")
    refused = await run(ollama_front("chat", live={"m"}),
                        b'{"model": "m", "stream": false, "messages": []}',
                        [node_error.to_json()], status=400,
                        content_type=b"application/json")
    assert refused.start["status"] == 400
    assert msgspec.json.decode(refused.body) == {"error": "bad 'n'"}
    with pytest.raises(APIError) as not_json:
        await run(responses_stream.FRONT, raw, [b"<html>"], content_type=b"text/html")
    assert not_json.value.status == 502


def test_error_objects_and_inband_statuses() -> None:
    assert error_of(429, {"error": {"message": "slow down", "type": "rate_limit_error",
                                    "code": "rate_limited"}}).code == "rate_limited"
    assert error_of(502, {"error": "boom"}).message == "boom"
    assert error_of(500, [1, 2]).status == 500
    assert inband_status({"code": "timeout"}) == 504
    assert inband_status({"type": "rate_limit_error"}) == 429
    assert inband_status("node lost") == 502


async def _settling(body: bytes) -> tuple[Sink, list[int], Outcome, APIError | None]:
    """Drive a whole Responses answer ``body`` as the proxy does (the node's answer
    complete, then its head and body): what went out, when it settled (the messages sent
    by then), the outcome, the error raised."""
    sink = Sink()
    settled: list[int] = []
    outcome = Outcome()
    outcome.served, outcome.status = True, "ok"

    async def settle() -> None:
        settled.append(len(sink.messages))

    front = responses_stream.FRONT
    send = TranslatedSend(sink, front, front.parse(b'{"model": "m", "input": "hi"}',
                                                   request_id="req_1"))
    await send.settle_hook(outcome, settle)()  # the node's answer is complete
    assert settled == []  # not yet: it is not translated
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    try:
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except APIError as error:
        return sink, settled, outcome, error
    return sink, settled, outcome, None


async def test_a_whole_answer_settles_once_translated() -> None:
    """The proxy's settle runs right before a translated whole answer goes; one that
    cannot be translated never settles and leaves the request unserved (refunded)."""
    completion = msgspec.json.encode({"id": "c", "object": "chat.completion", "model": "m",
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant",
                                                               "content": "hello"}}]})
    sink, settled, outcome, error = await _settling(completion)
    assert error is None and settled == [0] and len(sink.messages) == 2
    assert outcome.served and outcome.status == "ok"
    sink, settled, outcome, error = await _settling(b"<html>")
    assert error is not None and error.status == 502
    assert settled == [] and not sink.messages
    assert not outcome.served and outcome.status == "failed"


async def test_a_translated_stream_settles_at_once() -> None:
    streamed = Sink()
    settled: list[int] = []

    async def settle() -> None:
        settled.append(len(streamed.messages))

    send = TranslatedSend(streamed, anthropic_stream.FRONT,
                          anthropic_stream.FRONT.parse(ANTHROPIC, request_id="req_2"))
    hook = send.settle_hook(Outcome(), settle)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", SSE)]})
    await send({"type": "http.response.body", "body": STREAM[:40], "more_body": True})
    await hook()  # before its last part, as the proxy does
    assert settled == [len(streamed.messages)]


RESPONSES = b'{"model": "asked", "input": "hi", "stream": true}'
OLLAMA = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
BROKEN = [
    b'data: {"choices": [{"index": 0, "delta": {"content": "x"\n\n',  # truncated JSON
    b"data: [1, 2, 3]\n\n",
    b'data: {"model": "m", "choices": "notalist"}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": "x"}]}}]}\n\n',
    b'data: {"choices": [{"index": 0, "delta": {"content": "\xff\xfe"}}]}\n\n',
]


def _ending(front_name: str, body: bytes) -> str:
    """What a translated stream ended with: ``error`` or ``success``."""
    if front_name == "anthropic":
        kinds = [kind for kind, _ in anthropic_events(body)]
        return "error" if kinds[-1] == "error" else "success"
    if front_name == "responses":
        kinds = [json["type"] for _, json in anthropic_events(body)]
        assert kinds[-1] in ("response.failed", "response.completed"), kinds
        return "error" if kinds[-1] == "response.failed" else "success"
    last = msgspec.json.decode(body.strip().split(b"\n")[-1])
    return "error" if "error" in last else "success"


@pytest.mark.parametrize("broken", BROKEN)
async def test_a_malformed_chunk_ends_the_stream_in_the_dialects_error(broken: bytes) -> None:
    fronts = {"anthropic": (anthropic_stream.FRONT, ANTHROPIC),
              "responses": (responses_stream.FRONT, RESPONSES),
              "ollama": (ollama_front("chat", live={"m"}), OLLAMA)}
    for name, (front, raw) in fronts.items():
        sink = Sink()
        outcome = Outcome()
        outcome.served, outcome.status = True, "ok"
        send = TranslatedSend(sink, front, front.parse(raw, request_id="req_1"))
        send.settle_hook(outcome, _nothing)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", SSE)]})
        for part, more in ((chunk(" tok0") + broken, True), (STREAM, False)):
            await send({"type": "http.response.body", "body": part, "more_body": more})
        assert _ending(name, sink.body) == "error", (name, sink.body[-300:])
        assert outcome.status == "failed_midstream", name
        assert b"malformed" in sink.body, name
        assert b"tok1" not in sink.body, name  # nothing after the failure


async def _nothing() -> None:
    pass


async def test_only_choice_zero_and_the_asked_model_reach_the_client() -> None:
    other = event({"model": "node-model", "choices": [
        {"index": 99999999999, "delta": {"content": "SECRET"}, "finish_reason": None}]})
    both = event({"model": "node-model", "choices": [
        {"index": 0, "delta": {"content": " zero"}, "finish_reason": None},
        {"index": 1, "delta": {"content": "ONE"}, "finish_reason": None}]})
    for front, raw in ((responses_stream.FRONT, RESPONSES),
                       (ollama_front("chat", live={"m"}), OLLAMA),
                       (anthropic_stream.FRONT, ANTHROPIC)):
        sink = await run(front, raw, [other + both + STREAM])
        assert b"SECRET" not in sink.body and b"ONE" not in sink.body
        assert b" zero" in sink.body and b"node-model" not in sink.body
    events = [data for _, data in anthropic_events(
        (await run(responses_stream.FRONT, RESPONSES, [other + both + STREAM])).body)]
    assert {e["response"]["model"] for e in events if "response" in e} == {"asked"}
