"""What the API fronts' tests share: chat-completions chunks as a node streams them, a
hypothesis strategy of random node streams (junk chunks, interleaved parallel tool calls,
entries without ``index``, names repeated in every chunk) with what a client must get
from them, the long stream of small argument pieces, and running a translator over
chunks or over SSE bytes cut anywhere."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
from hypothesis import strategies as st

from tooti.errors import APIError
from tooti.fronts.base import ChatRequest, Front, StreamTranslator
from tooti.protocol.sse import SSEDecoder

encode = msgspec.json.encode


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with choice 0's ``delta`` (no choices when None)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                         **extra}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "node-m", "choices": choices}


def usage_chunk(prompt: int = 12, completion: int = 5) -> dict[str, Any]:
    """The chunk ``stream_options.include_usage`` makes a node send last."""
    return {**chunk(), "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}}


def tool_entry(index: int | None, *, call_id: str | None = None, name: str | None = None,
               arguments: str | None = None) -> dict[str, Any]:
    """One ``delta.tool_calls`` entry (no ``index`` key when ``index`` is None)."""
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    entry: dict[str, Any] = {"function": function}
    if index is not None:
        entry["index"] = index
    if call_id is not None:
        entry.update(id=call_id, type="function")
    return entry


def tool_chunk(index: int | None, **fields: Any) -> dict[str, Any]:
    """A chunk carrying one tool-call entry."""
    return chunk({"tool_calls": [tool_entry(index, **fields)]})


JUNK: list[Any] = [
    None, 3, "x", [1], [], True, {}, {"choices": "x"}, {"choices": [None, 5]},
    {"choices": [{"index": 0, "delta": 7}]}, {"choices": [{"index": 0, "delta": None}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [5, None, "x"]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": "x", "content": None}}]},
]
"""Chunks a translator must skip without changing what the client gets."""


@dataclass
class NodeStream:
    """A node's chunks and what a client must get from them: the text, and the named
    tool calls (id, name, argument text) in the order they first appeared."""

    chunks: list[Any]
    text: str
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    finish: str = "stop"


def _merge(draw: st.DrawFn, queues: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The queues' entries interleaved at random, each queue's order kept, each queue
    starting after the one before it started (calls first appear in index order)."""
    out: list[dict[str, Any]] = []
    live: list[list[dict[str, Any]]] = []
    waiting = [list(q) for q in queues]
    while waiting or live:
        if waiting and (not live or draw(st.booleans())):
            queue = waiting.pop(0)  # a call's first entry comes as it starts
            live.append(queue)
        else:
            queue = live[draw(st.integers(0, len(live) - 1))]
        out.append(queue.pop(0))
        if not queue:
            live.remove(queue)
    return out


@st.composite
def node_streams(draw: st.DrawFn) -> NodeStream:
    """A random node stream: text, then 0-3 tool calls whose argument text is cut in
    1-4 pieces; with ``index`` they may interleave, without it they come one after the
    other (each starting with its id); names may be repeated in every entry; junk
    chunks anywhere."""
    text_pieces = draw(st.lists(st.text(min_size=1, max_size=5), max_size=3))
    with_index = draw(st.booleans())
    repeat_name = draw(st.booleans())
    queues: list[list[dict[str, Any]]] = []
    calls: list[tuple[str, str, str]] = []
    for k in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["get_weather", "clock", "search_docs"]))
        arguments = json.dumps(draw(st.dictionaries(
            st.sampled_from(["q", "n"]), st.integers() | st.text(max_size=4), max_size=2)))
        cuts = sorted(draw(st.lists(st.integers(0, len(arguments)), max_size=3)))
        pieces = [arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)],
                                                 strict=True)]
        index = k if with_index else None
        queue = [tool_entry(index, call_id=f"call_{k}", name=name, arguments="")]
        queue += [tool_entry(index, name=name if repeat_name else None, arguments=piece)
                  for piece in pieces if piece]
        queues.append(queue)
        calls.append((f"call_{k}", name, arguments))
    entries = _merge(draw, queues) if with_index else [e for q in queues for e in q]
    chunks: list[Any] = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in text_pieces]
    chunks += [chunk({"tool_calls": [entry]}) for entry in entries]
    finish = "tool_calls" if calls else draw(st.sampled_from(["stop", "tool_calls"]))
    chunks += [chunk({}, finish), usage_chunk(7, 4)]
    for junk in draw(st.lists(st.sampled_from(JUNK), max_size=3)):
        chunks.insert(draw(st.integers(1, len(chunks))), junk)
    return NodeStream(chunks, "".join(text_pieces), calls, finish)


def many_pieces(count: int = 50_000) -> tuple[list[dict[str, Any]], str]:
    """One tool call whose arguments come in ``count`` small pieces (the name repeated
    in each, as some nodes do), and the argument text they make."""
    pieces = ['{"text": "', *(["ab"] * count), '"}']
    chunks = [tool_chunk(0, call_id="call_long", name="echo", arguments="")]
    chunks += [tool_chunk(0, name="echo", arguments=piece) for piece in pieces]
    return [*chunks, chunk({}, "tool_calls"), usage_chunk()], "".join(pieces)


def run(translator: StreamTranslator, chunks: list[Any],
        error: APIError | None = None) -> bytes:
    """``start``, each chunk fed, then ``fail(error)`` or ``finish``; afterwards the
    translator answers nothing more."""
    out = [translator.start(), *(translator.feed(c) for c in chunks)]
    out.append(translator.fail(error) if error else translator.finish())
    assert translator.finish() == b"" and translator.feed(chunk({"content": "late"})) == b""
    return b"".join(out)


def sse_wire(chunks: list[Any], crlf: bool = False) -> bytes:
    """``chunks`` as a node's SSE bytes, ``[DONE]`` last."""
    end = b"\r\n\r\n" if crlf else b"\n\n"
    return b"".join(b"data: " + encode(c) + end for c in chunks) + b"data: [DONE]" + end


def through_sse(translator: StreamTranslator, parts: list[bytes]) -> bytes:
    """A node's SSE bytes, cut into ``parts``, decoded and translated."""
    decoder = SSEDecoder()
    out = [translator.start()]
    for part in parts:
        for event in decoder.events(part):
            out.append(translator.finish() if event.data == "[DONE]"
                       else translator.feed(json.loads(event.data)))
    return b"".join(out)


def check_front(front: Front, raw: bytes, *, media_type: str, stream_media_type: str
                ) -> tuple[ChatRequest, bytes]:
    """What the mounting step relies on, the same for every front: ``parse`` with the
    gateway's depth and request id (``request.model`` the id to route, the client's
    spelling in ``context["model"]``), a non-object node answer a 502, the media types,
    and a stream whose error chunk ends it. Returns the request and that stream's bytes."""
    assert (front.media_type, front.stream_media_type) == (media_type, stream_media_type)
    request = front.parse(raw, max_depth=128, request_id="req-7")
    assert request.context["request_id"] == "req-7" and request.body["model"] == request.model
    assert isinstance(request.context["model"], str)
    for junk in ([1], None, "x"):
        try:
            front.answer(request, junk)
        except APIError as error:
            assert error.status == 502
        else:
            raise AssertionError("a node answer that is not an object must be a 502")
    try:
        front.parse(b"[" * 200 + b"]" * 200, max_depth=128, request_id="req-7")
    except APIError as error:
        assert error.status == 400 and front.error_body(error, "req-7")
    else:
        raise AssertionError("a body nesting past max_depth must be refused")
    translator = front.stream(request)
    out = run(translator, [chunk({"content": "hi"}), {"error": {"message": "oom"}}])
    return request, out
