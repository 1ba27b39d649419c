"""The stream fronts' fast path: a plain text chunk read typed (:func:`text_delta`) and
spliced into pre-encoded events (``feed_text``, :func:`template`) gives the very bytes the
general path (``feed`` of the json-decoded chunk) gives, for every front and any text;
any other chunk falls back to the general path."""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fronts_support import chunk, tool_entry, usage_chunk
from tooti.fronts import anthropic_stream, responses_stream
from tooti.fronts.base import SLOT, Front, StreamTranslator, template, text_delta
from tooti.fronts.ollama_answers import ollama_front
from tooti.fronts.ollama_api import Clock
from tooti.gateway.translated_send import TranslatedSend
from tooti.protocol.sse import SSEDecoder, encode_event

encode = msgspec.json.encode
TICKS = itertools.count()
CLOCK = Clock(monotonic_ns=lambda: 5_000_000, wall_ns=lambda: 1_760_000_000_123_456_789)


def fronts() -> dict[str, tuple[Front, bytes]]:
    """Each stream front with a streamed request body (the Anthropic one with
    ``thinking``, so reasoning is translated too)."""
    messages = [{"role": "user", "content": "hi"}]
    return {
        "anthropic": (anthropic_stream.FRONT, encode({
            "model": "m", "max_tokens": 2048, "stream": True, "messages": messages,
            "thinking": {"type": "enabled", "budget_tokens": 1024}})),
        "responses": (responses_stream.FRONT, encode({"model": "m", "input": "hi",
                                                      "stream": True})),
        "ollama": (ollama_front("chat", live=["m"], clock=CLOCK),
                   encode({"model": "m", "messages": messages})),
        "ollama generate": (ollama_front("generate", live=["m"], clock=CLOCK),
                            encode({"model": "m", "prompt": "hi"})),
    }


@pytest.fixture(autouse=True)
def fixed_ids_and_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ids from a counter (reset per translator by :func:`translator`), a fixed time."""
    monkeypatch.setattr(secrets, "token_hex", lambda n=16: f"{next(TICKS):0{2 * n}x}")
    monkeypatch.setattr(time, "time", lambda: 1_760_000_000.5)
    yield


def translator(front: Front, raw: bytes) -> StreamTranslator:
    global TICKS
    TICKS = itertools.count()
    return front.stream(front.parse(raw, request_id="req_1"))


def general(front: Front, raw: bytes, events: list[bytes]) -> bytes:
    """Every chunk json-decoded and fed whole."""
    t = translator(front, raw)
    return b"".join([t.start(), *(t.feed(msgspec.json.decode(e)) for e in events),
                     t.finish()])


def fast(front: Front, raw: bytes, events: list[bytes]) -> tuple[bytes, int]:
    """As :class:`TranslatedSend` feeds: the text chunks typed; with how many were."""
    t = translator(front, raw)
    out, typed = [t.start()], 0
    for data in events:
        text = text_delta(data)
        if text is None:
            out.append(t.feed(msgspec.json.decode(data)))
        else:
            typed += 1
            out.append(t.feed_text(text))
    out.append(t.finish())
    return b"".join(out), typed


TEXT = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ['"', "\\", "\n", "\u2028", "</script>", "\x00", "é😀", ""])
CHUNKS = st.one_of(
    TEXT.map(lambda text: chunk({"content": text})),
    TEXT.map(lambda text: chunk({"role": "assistant", "content": text})),
    st.just(chunk({"content": None})),
    st.just(chunk({"role": "assistant"})),
    TEXT.map(lambda text: chunk({"reasoning_content": text})),
    TEXT.map(lambda text: chunk({"refusal": text})),
    st.just(chunk({"tool_calls": [tool_entry(0, call_id="call_1", name="f",
                                             arguments='{"a": 1}')]})),
    st.just(chunk({}, "stop")),
)


def canonical(name: str, out: bytes) -> list[Any]:
    """The decoded events (or lines) of ``out``, checking each is written exactly as
    encoding it whole writes it (the splices change no byte) and, for Responses, that
    ``sequence_number`` counts from 0."""
    if name.startswith("ollama"):
        lines = out.splitlines(keepends=True)
        decoded = [msgspec.json.decode(line) for line in lines]
        assert [encode(d) + b"\n" for d in decoded] == lines
        return decoded
    raw_events = [e + b"\n\n" for e in out.split(b"\n\n")[:-1]]
    events = [SSEDecoder().events(e)[0] for e in raw_events]
    decoded = [msgspec.json.decode(e.data) for e in events]
    assert [encode_event(e.event, d) for e, d in zip(events, decoded, strict=True)] == raw_events
    if name == "responses":
        assert [d["sequence_number"] for d in decoded] == list(range(len(decoded)))
    return decoded


def texts(name: str, decoded: list[Any]) -> str:
    """The answer's text as the client reads it from the events."""
    if name == "anthropic":
        return "".join(d["delta"].get("text", "") for d in decoded
                       if d["type"] == "content_block_delta")
    if name == "responses":
        return "".join(d["delta"] for d in decoded if d["type"] == "response.output_text.delta")
    if name == "ollama":
        return "".join(d["message"]["content"] for d in decoded)
    return "".join(d["response"] for d in decoded)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.function_scoped_fixture],
          deadline=None)
@given(st.lists(CHUNKS, max_size=12))
def test_the_typed_path_writes_the_same_bytes_as_the_general_one(
        chunks: list[dict[str, Any]]) -> None:
    events = [encode(c) for c in [*chunks, usage_chunk()]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"] and c["choices"][0]["delta"].keys() <= {"role", "content"})
    for name, (front, raw) in fronts().items():
        typed_out, _ = fast(front, raw, events)
        assert typed_out == general(front, raw, events), name
        decoded = canonical(name, typed_out)
        if not any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"]):
            # (Ollama writes call arguments that are no JSON object as text)
            assert texts(name, decoded) == text, name


def test_plain_text_chunks_take_the_typed_path() -> None:
    events = [encode(chunk({"role": "assistant", "content": "Hel"})),
              encode(chunk({"content": "lo \"you\""})), encode(chunk({}, "stop")),
              encode(usage_chunk())]
    for name, (front, raw) in fronts().items():
        out, typed = fast(front, raw, events)
        assert typed == 2 and out == general(front, raw, events), name
        assert b'lo \\"you\\"' in out, name


@pytest.mark.parametrize("data", [
    chunk({"content": "x", "tool_calls": [tool_entry(0, name="f")]}),
    chunk({"content": "x", "reasoning_content": "why"}),
    chunk({"content": "x", "reasoning": "why"}),
    chunk({"content": "x", "refusal": "no"}),
    chunk({"content": "x"}, "stop"),
    chunk({"content": "x"}, logprobs={"content": []}),
    {**chunk({"content": "x"}), "usage": {"prompt_tokens": 1}},
    {**chunk({"content": "x"}), "error": {"message": "oom"}},
    {"error": {"message": "oom"}},
    {"choices": [{"index": 1, "delta": {"content": "x"}}]},
    {"choices": [{"index": 0, "delta": {"content": "x"}}] * 2},
    {"choices": [{"index": 0, "delta": {"content": 5}}]},
    {"choices": [{"index": True, "delta": {"content": "x"}}]},
    {"choices": []},
    {"choices": "x"},
    [1],
    "x",
])
def test_a_chunk_the_typed_decoder_cannot_read_takes_the_general_path(data: Any) -> None:
    assert text_delta(encode(data)) is None
    assert text_delta(b"[DONE]") is None and text_delta(b'{"choices": [') is None


def test_a_plain_text_chunk_reads_as_its_text_and_model() -> None:
    assert text_delta(encode(chunk({"role": "assistant", "content": "hé"}))) == "hé"
    assert text_delta(encode(chunk({"content": None}))) == ""
    assert text_delta(b'{"choices": [{"delta": {"content": "a"}}]}') == "a"


def test_a_template_is_cut_at_its_slots_only() -> None:
    head, tail = template(encode({"a": 1, "text": SLOT, "b": [2]}))
    assert head + encode('x"\n') + tail == encode({"a": 1, "text": 'x"\n', "b": [2]})
    with pytest.raises(ValueError):
        template(encode({"a": SLOT}), 2)


class Spy:
    """A translator recording how each chunk reached it."""

    content_type = "text/event-stream"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def start(self) -> bytes:
        return b""

    def feed(self, chunk: Any) -> bytes:
        self.calls.append(("feed", chunk))
        return b"f"

    def feed_text(self, text: str) -> bytes:
        self.calls.append(("text", text))
        return b"t"

    def finish(self) -> bytes:
        self.calls.append(("finish", None))
        return b""

    def fail(self, error: Any) -> bytes:
        self.calls.append(("fail", error.status))
        return b""


async def test_the_send_wrapper_feeds_text_chunks_typed_and_others_whole() -> None:
    spy = Spy()

    class SpyFront:
        media_type = "application/json"
        stream_media_type = "text/event-stream"

        def stream(self, request: Any) -> Spy:
            return spy

    sent: list[dict[str, Any]] = []

    async def sink(message: dict[str, Any]) -> None:
        sent.append(message)

    front, raw = fronts()["anthropic"]
    send = TranslatedSend(sink, SpyFront(), front.parse(raw))  # type: ignore[arg-type]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    tools = chunk({"tool_calls": [tool_entry(0, name="f")]})
    body = b"".join(b"data: " + encode(c) + b"\n\n" for c in [chunk({"content": "a"}), tools])
    await send({"type": "http.response.body", "body": body + b"data: [DONE]\n\n",
                "more_body": False})
    assert spy.calls == [("text", "a"), ("feed", tools), ("finish", None), ("finish", None)]
    assert sent[-1] == {"type": "http.response.body", "body": b"tf", "more_body": False}
