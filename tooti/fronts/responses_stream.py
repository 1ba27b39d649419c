"""The Responses API's streamed answer: a node's chat-completions chunks as the semantic
events (``response.created`` … ``response.completed``), each an SSE event whose ``event:``
line is its ``type``, numbered by ``sequence_number`` from 0. No ``[DONE]`` line: the
terminal event (``response.completed``, ``response.incomplete`` or ``response.failed``)
ends the stream, as OpenAI's does.

Order: ``response.created``, ``response.in_progress``; then for each output item
``response.output_item.added``; for a message, per content part
``response.content_part.added``, its deltas (``response.output_text.delta`` or
``response.refusal.delta``), their done event and ``response.content_part.done``; for a
reasoning item (the chunks' ``reasoning_content`` or ``reasoning``) the same with
``response.reasoning_text.*``; for a function call ``response.function_call_arguments.delta``…
and ``response.function_call_arguments.done``; then ``response.output_item.done``; last the
terminal event with the whole ``Response`` (output items and usage).

A message or reasoning item is closed when another kind of output starts; the tool calls
of one turn stay open together (backends may interleave parallel calls' argument pieces:
each event names its item) and close, in output order, when text follows them or the
stream ends. Calls are accumulated by :mod:`tooti.fronts.tool_calls`: a call's item is
added once its name is known (the argument text before that comes as one delta then);
a call whose name never came is no item; past the accumulator's bounds the stream ends
with ``response.failed``. Only the first choice is read (the Responses API has no
``n``). Chunks of any shape are taken without raising: what is not understood is
skipped; an error chunk is ``response.failed``.

:class:`ResponsesFront` is the ``/v1/responses`` :class:`~tooti.fronts.base.Front`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tooti.errors import APIError
from tooti.fronts.base import (
    MAX_JSON_DEPTH,
    SLOT,
    ChatRequest,
    Front,
    first_choice,
    new_id,
    node_error,
    reasoning_of,
    template,
)
from tooti.fronts.responses import (
    CONTENT_TYPE,
    INCOMPLETE_REASONS,
    STREAM_CONTENT_TYPE,
    answer_body,
    error_body,
    function_call_item,
    message_item,
    parse_request,
    reasoning_item,
    refusal_part,
    response_frame,
    response_state,
    text_part,
    usage_object,
)
from tooti.fronts.tool_calls import ToolCall, ToolCalls
from tooti.protocol.sse import encode_event

__all__ = ["FRONT", "ResponsesFront", "ResponsesStream"]

_encode = msgspec.json.encode


@dataclass(slots=True)
class _Part:
    """One content part of a message (``output_text``, ``refusal``) or of a reasoning item
    (``reasoning_text``)."""

    kind: str
    pieces: list[str] = field(default_factory=list)
    closed: bool = False
    delta: tuple[bytes, ...] = ()
    """The part's delta event cut at its ``sequence_number`` and its ``delta``."""

    @property
    def text(self) -> str:
        pieces = self.pieces
        if len(pieces) == 1:
            return pieces[0]
        text = "".join(pieces)
        if self.closed:  # no more pieces: joined once, not for each closing event
            self.pieces = [text]
        return text

    def snapshot(self, empty: bool = False) -> dict[str, Any]:
        text = "" if empty else self.text
        if self.kind == "refusal":
            return refusal_part(text)
        if self.kind == "reasoning_text":
            return {"type": "reasoning_text", "text": text}
        return text_part(text)


@dataclass(slots=True)
class _Item:
    """One output item: a ``message``, a ``reasoning`` item or a ``function_call``."""

    output_index: int
    item_id: str
    kind: str
    call: ToolCall | None = None
    """A function call's accumulated state."""
    call_id: str = ""
    parts: list[_Part] = field(default_factory=list)
    done: msgspec.Raw | None = None
    """The item as ``response.output_item.done`` sent it, encoded (None while open): the
    terminal event's output repeats those bytes."""

    def snapshot(self, status: str) -> dict[str, Any]:
        if self.call is not None:
            return function_call_item(self.item_id, self.call_id, self.call.name or "",
                                      self.call.arguments, status)
        if self.kind == "reasoning":
            return reasoning_item(self.item_id, "".join(p.text for p in self.parts), status)
        return message_item(self.item_id, [part.snapshot() for part in self.parts], status)


_PART_ITEMS = {"output_text": "message", "refusal": "message", "reasoning_text": "reasoning"}
"""The item each kind of content part belongs to."""
_PART_EVENTS = {"output_text": ("response.output_text", "text"),
                "refusal": ("response.refusal", "refusal"),
                "reasoning_text": ("response.reasoning_text", "text")}
"""Each part's delta / done event prefix and the done event's field holding the text."""
_ID_PREFIXES = {"message": "msg", "reasoning": "rs", "function_call": "fc"}

# -- the usual message, from templates ---------------------------------------------------
# A stream's usual output is one message of one output_text part: its opening and closing
# events are written from pieces encoded once per process, cut at what changes (sequence
# numbers, the item's id and index, the text, the status); every other shape takes the
# general path. The bytes are the same (tests/test_front_fast_path.py).

_SEQUENCE = 7_391_846_205_117
_INDEX = 7_391_846_205_119
"""Numbers a template is cut at (with :data:`SLOT` for strings): no template's event
holds them otherwise."""
_MARKS = {"s": str(_SEQUENCE).encode(), "i": str(_INDEX).encode(), "x": _encode(SLOT)}


def _cut(encoded: bytes, marks: str) -> tuple[bytes, ...]:
    """``encoded`` cut at each of ``marks`` (keys of :data:`_MARKS`) in turn."""
    pieces = []
    rest = encoded
    for mark in marks:
        head, found, rest = rest.partition(_MARKS[mark])
        if not found:
            raise ValueError(f"template mark {mark} not found")
        pieces.append(head)
    pieces.append(rest)
    if any(mark in piece for piece in pieces for mark in _MARKS.values()):
        raise ValueError("a template holds more marks than it is cut at")
    return tuple(pieces)


def _splice(pieces: tuple[bytes, ...], values: Sequence[bytes]) -> bytes:
    out = [pieces[0]]
    for value, piece in zip(values, pieces[1:], strict=True):
        out.append(value)
        out.append(piece)
    return b"".join(out)


def _plain(kind: str, **fields: Any) -> bytes:
    return encode_event(kind, {"type": kind, "sequence_number": _SEQUENCE, **fields})


@functools.cache
def _message_opening() -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """``response.output_item.added`` and ``response.content_part.added`` of a message
    opening with an output_text part (cut at: sequence, index, id, sequence, id, index),
    and that part's delta event (cut at: id, index; its head ends before the sequence
    number, its tail after the delta's slot)."""
    opening = (_plain("response.output_item.added", output_index=_INDEX,
                      item=message_item(SLOT, [], "in_progress"))
               + _plain("response.content_part.added", item_id=SLOT, output_index=_INDEX,
                        content_index=0, part=text_part("")))
    delta = _plain("response.output_text.delta", item_id=SLOT, output_index=_INDEX,
                   content_index=0, delta=SLOT, logprobs=[])
    return _cut(opening, "sixsxi"), _cut(delta, "sxix")


@functools.cache
def _message_closing(status: str) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """The closing events of a message of one output_text part, ``status`` (cut at:
    sequence, id, index, text; sequence, id, index, text; sequence, index, the item),
    and the item's JSON (cut at: id, text)."""
    closing = (_plain("response.output_text.done", item_id=SLOT, output_index=_INDEX,
                      content_index=0, text=SLOT, logprobs=[])
               + _plain("response.content_part.done", item_id=SLOT, output_index=_INDEX,
                        content_index=0, part=text_part(SLOT))
               + _plain("response.output_item.done", output_index=_INDEX,
                        item=msgspec.Raw(_encode(SLOT))))
    item = _encode(message_item(SLOT, [text_part(SLOT)], status))
    return _cut(closing, "sxixsxixsix"), _cut(item, "xx")


class ResponsesStream:
    """A :class:`~tooti.fronts.base.StreamTranslator` for one ``/v1/responses`` stream."""

    content_type = STREAM_CONTENT_TYPE

    def __init__(self, request: ChatRequest) -> None:
        self._request = request
        self._sequence = 0
        self._started = False
        self._ended = False
        self._items: list[_Item] = []
        self._current: _Item | None = None
        """The open message or reasoning item."""
        self._accumulated = ToolCalls()
        self._calls: dict[int, _Item] = {}
        """The open function calls of this turn, by the accumulator's call key."""
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._frame: tuple[bytes, bytes] | None = None
        """The encoded ``Response`` around its changing members (made at the first)."""

    # -- the StreamTranslator protocol ----------------------------------------------------

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress`` (once)."""
        if self._started:
            return b""
        self._started = True
        whole, self._frame = response_frame(self._request, "in_progress")
        response = msgspec.Raw(whole)  # encoded once
        return (self._event("response.created", response=response)
                + self._event("response.in_progress", response=response))

    def feed(self, chunk: Any) -> bytes:
        """The events of one decoded ``chat.completion.chunk``."""
        if self._ended or not isinstance(chunk, dict):
            return b""
        out = [self.start()]
        usage = usage_object(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        error = node_error(chunk)
        if error is not None:
            out.append(self.fail(error))
            return b"".join(out)
        choice = first_choice(chunk.get("choices"))
        if choice is None:
            return b"".join(out)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = reasoning_of(delta)
            if reasoning:
                out.append(self._content("reasoning_text", reasoning))
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    out.append(self._content(kind, text))
            calls = delta.get("tool_calls")
            try:
                for call in calls if isinstance(calls, list) else ():
                    out.append(self._call(call))
            except APIError as exc:  # past the tool calls' bounds
                out.append(self.fail(exc))
                return b"".join(out)
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._finish_reason = reason
        return b"".join(out)

    def feed_text(self, text: str) -> bytes:
        """The events of a chunk carrying only ``text`` (what :meth:`feed` sends)."""
        item = self._current
        if item is not None and text and not self._ended:
            part = item.parts[-1]  # an open item has its part
            if part.kind == "output_text":  # the usual token: as _content writes it
                part.pieces.append(text)
                sequence = self._sequence
                self._sequence = sequence + 1
                head, middle, tail = part.delta
                return b"".join((head, str(sequence).encode(), middle, _encode(text), tail))
        if self._ended:
            return b""
        opening = self.start()
        return opening + self._content("output_text", text) if text else opening

    def finish(self) -> bytes:
        """Close the open items and send ``response.completed`` (``response.incomplete``
        when the node stopped at the token limit or a content filter)."""
        if self._ended:
            return b""
        out = [self.start()]
        reason = INCOMPLETE_REASONS.get(self._finish_reason or "")
        status = "incomplete" if reason else "completed"
        # an open message or reasoning item and open calls never coexist: each closes
        # the other when it starts
        out.append(self._close_current(status))
        out.append(self._close_calls(status))
        self._ended = True
        response = self._response(
            status, output=[item.done or item.snapshot(status) for item in self._items],
            incomplete_reason=reason, completed_at=None if reason else time.time())
        out.append(self._event(f"response.{status}", response=response))
        return b"".join(out)

    def fail(self, error: APIError) -> bytes:
        """``response.failed`` with ``error`` (the items so far, open ones incomplete)."""
        if self._ended:
            return b""
        out = [self.start()]
        self._ended = True
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        response = self._response(
            "failed", output=[item.done or item.snapshot("incomplete") for item in self._items],
            error={"code": code, "message": error.message})
        out.append(self._event("response.failed", response=response))
        return b"".join(out)

    # -- items ----------------------------------------------------------------------------

    def _content(self, kind: str, text: str) -> bytes:
        """A piece of text of a content part ``kind``, opening its item and part if new."""
        item = self._current
        part = item.parts[-1] if item is not None and item.parts else None
        opening = b""
        if item is None or part is None or part.kind != kind:
            opening, item, part = self._open_part(kind)
        part.pieces.append(text)
        head, middle, tail = part.delta
        sequence = self._sequence
        self._sequence += 1
        return opening + head + str(sequence).encode() + middle + _encode(text) + tail

    def _open_part(self, kind: str) -> tuple[bytes, _Item, _Part]:
        """The events opening a new content part ``kind`` (and its item when the open
        one is of another kind, or none is open)."""
        if kind == "output_text" and self._current is None and not self._calls:
            return self._open_message()
        out = []
        item = self._current
        if item is None or item.kind != _PART_ITEMS[kind]:
            out.append(self._close_current())
            out.append(self._close_calls())
            item = self._current = self._open(_PART_ITEMS[kind])
            out.append(self._event("response.output_item.added", output_index=item.output_index,
                                   item=item.snapshot("in_progress")))
        if item.parts:
            out.append(self._close_part(item, item.parts[-1]))
        part = _Part(kind)
        item.parts.append(part)
        content_index = len(item.parts) - 1
        out.append(self._event("response.content_part.added", item_id=item.item_id,
                               output_index=item.output_index, content_index=content_index,
                               part=part.snapshot(empty=True)))
        prefix, _ = _PART_EVENTS[kind]
        extra: dict[str, Any] = {"logprobs": []} if kind == "output_text" else {}
        part.delta = template(encode_event(f"{prefix}.delta", {
            "type": f"{prefix}.delta", "sequence_number": SLOT, "item_id": item.item_id,
            "output_index": item.output_index, "content_index": content_index,
            "delta": SLOT, **extra}), 2)
        return b"".join(out), item, part

    def _open_message(self) -> tuple[bytes, _Item, _Part]:
        """:meth:`_open_part` of a message's first output_text part, from templates."""
        opening, delta = _message_opening()
        item = self._current = self._open("message")
        part = _Part("output_text")
        item.parts.append(part)
        sequence = self._sequence
        self._sequence += 2
        item_id = b'"' + item.item_id.encode() + b'"'  # msg_ and hex: nothing to escape
        index = str(item.output_index).encode()
        part.delta = (delta[0], _splice(delta[1:4], (item_id, index)), delta[4])
        return _splice(opening, (str(sequence).encode(), index, item_id,
                                 str(sequence + 1).encode(), item_id, index)), item, part

    def _call(self, entry: Any) -> bytes:
        added = self._accumulated.add(entry)
        if added is None:
            return b""
        call, piece = added
        out = []
        item = self._calls.get(call.key)
        if item is None or item.call is not call:
            if call.name is None:
                return b""  # held in the accumulator until the name comes
            out.append(self._close_current())
            item = self._open("function_call")
            item.call = call
            item.call_id = call.id or new_id("call")
            self._calls[call.key] = item
            out.append(self._event("response.output_item.added", output_index=item.output_index,
                                   item=function_call_item(item.item_id, item.call_id,
                                                           call.name, "", "in_progress")))
            piece = call.arguments  # what came before the name, and this piece
        if piece:
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=item.item_id, output_index=item.output_index,
                                   delta=piece))
        return b"".join(out)

    def _open(self, kind: str) -> _Item:
        item = _Item(len(self._items), new_id(_ID_PREFIXES[kind]), kind)
        self._items.append(item)
        return item

    def _close_part(self, item: _Item, part: _Part) -> bytes:
        part.closed = True
        prefix, field_name = _PART_EVENTS[part.kind]
        index = item.parts.index(part)
        extra: dict[str, Any] = {"logprobs": []} if part.kind == "output_text" else {}
        return (self._event(f"{prefix}.done", item_id=item.item_id,
                            output_index=item.output_index, content_index=index,
                            **{field_name: part.text}, **extra)
                + self._event("response.content_part.done", item_id=item.item_id,
                              output_index=item.output_index, content_index=index,
                              part=part.snapshot()))

    def _close(self, item: _Item, status: str) -> bytes:
        parts = item.parts
        if (item.kind == "message" and len(parts) == 1 and parts[0].kind == "output_text"
                and not parts[0].closed and status in ("completed", "incomplete")):
            return self._close_message(item, parts[0], status)
        out = []
        if item.call is not None:
            out.append(self._event("response.function_call_arguments.done",
                                   item_id=item.item_id, output_index=item.output_index,
                                   name=item.call.name or "", arguments=item.call.arguments))
        else:
            out.extend(self._close_part(item, part) for part in item.parts if not part.closed)
        item.done = msgspec.Raw(_encode(item.snapshot(status)))
        out.append(self._event("response.output_item.done", output_index=item.output_index,
                               item=item.done))
        return b"".join(out)

    def _close_message(self, item: _Item, part: _Part, status: str) -> bytes:
        """:meth:`_close` of a message of one open output_text part, from templates."""
        closing, item_pieces = _message_closing(status)
        part.closed = True
        item_id = b'"' + item.item_id.encode() + b'"'
        index = str(item.output_index).encode()
        text = _encode(part.text)  # encoded once for the three events and the item
        encoded = _splice(item_pieces, (item_id, text))
        item.done = msgspec.Raw(encoded)
        sequence = self._sequence
        self._sequence += 3
        return _splice(closing, (str(sequence).encode(), item_id, index, text,
                                 str(sequence + 1).encode(), item_id, index, text,
                                 str(sequence + 2).encode(), index, encoded))

    def _close_current(self, status: str = "completed") -> bytes:
        item, self._current = self._current, None
        return self._close(item, status) if item is not None else b""

    def _close_calls(self, status: str = "completed") -> bytes:
        if not self._calls:
            return b""
        open_calls, self._calls = self._calls, {}
        self._accumulated.clear()
        return b"".join(self._close(item, status)
                        for item in sorted(open_calls.values(), key=lambda i: i.output_index))

    # -- events ---------------------------------------------------------------------------

    def _response(self, status: str, *, output: list[Any] | None = None,
                  incomplete_reason: str | None = None, error: dict[str, Any] | None = None,
                  completed_at: float | None = None) -> msgspec.Raw:
        """The encoded ``Response`` (the request's part encoded once per stream)."""
        if self._frame is None:  # start() makes it: not reached
            self._frame = response_frame(self._request, status)[1]
        head, tail = self._frame
        state = _encode(response_state(
            self._request, status=status, output=output or [],
            usage=self._usage if status != "in_progress" else None,
            incomplete_reason=incomplete_reason, error=error, completed_at=completed_at))
        return msgspec.Raw(b"".join((head, state[1:-1], tail)))

    def _event(self, kind: str, **fields: Any) -> bytes:
        """The SSE event ``kind`` with ``fields`` after its ``type`` and
        ``sequence_number``: what ``encode_event(kind, {"type": kind,
        "sequence_number": n, **fields})`` writes, without building that dict."""
        sequence = self._sequence
        self._sequence += 1
        kind_bytes = kind.encode()
        head = b"".join((b"event: ", kind_bytes, b'\ndata: {"type":"', kind_bytes,
                         b'","sequence_number":', str(sequence).encode()))
        return b"".join((head, b"," if fields else b"", _encode(fields)[1:], b"\n\n"))


class ResponsesFront:
    """``POST /v1/responses`` as a :class:`~tooti.fronts.base.Front`."""

    media_type = CONTENT_TYPE
    stream_media_type = STREAM_CONTENT_TYPE

    def parse(self, raw: bytes, *, max_depth: int = MAX_JSON_DEPTH,
              request_id: str | None = None) -> ChatRequest:
        return parse_request(raw, max_depth=max_depth, request_id=request_id)

    def answer(self, request: ChatRequest, completion: Any) -> bytes:
        return answer_body(request, completion)

    def stream(self, request: ChatRequest) -> ResponsesStream:
        return ResponsesStream(request)

    def error_body(self, error: APIError, request_id: str | None = None) -> bytes:
        return error_body(error, request_id)


FRONT: Front = ResponsesFront()
"""The one instance the gateway mounts."""
