"""The Responses API's streamed answer: a node's chat-completions chunks as the semantic
events (``response.created`` … ``response.completed``), each an SSE event whose ``event:``
line is its ``type``, numbered by ``sequence_number`` from 0. No ``[DONE]`` line: the
terminal event (``response.completed``, ``response.incomplete`` or ``response.failed``)
ends the stream, as OpenAI's does.

Order: ``response.created``, ``response.in_progress``; then for each output item
``response.output_item.added``, and for a message ``response.content_part.added``,
``response.output_text.delta``…, ``response.output_text.done``,
``response.content_part.done``; for a function call ``response.function_call_arguments.delta``…,
``response.function_call_arguments.done``; then ``response.output_item.done``; last the
terminal event with the whole ``Response`` (output items and usage).

A message item is closed when a tool call starts; the tool calls of one turn stay open
together (backends may interleave parallel calls' argument pieces) and close, in output
order, when text follows them or the stream ends. Only the first choice is read (the
Responses API has no ``n``). Chunks of any shape are taken without raising: what is not
understood is skipped. Streamed ``refusal`` and ``reasoning_content`` deltas are not
translated (non-streamed refusals are).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tooti.errors import APIError
from tooti.fronts.base import ChatRequest
from tooti.fronts.responses import (
    INCOMPLETE_REASONS,
    STREAM_CONTENT_TYPE,
    function_call_item,
    message_item,
    new_id,
    response_object,
    usage_object,
)

_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class _Item:
    """One output item: a message (``call_id`` None) or a function call."""

    output_index: int
    item_id: str
    call_id: str | None = None
    name: str = ""
    pieces: list[str] = field(default_factory=list)
    done: dict[str, Any] | None = None
    """The item as ``response.output_item.done`` sent it (None while open)."""

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def snapshot(self, status: str) -> dict[str, Any]:
        if self.call_id is None:
            return message_item(self.item_id, self.text, status)
        return function_call_item(self.item_id, self.call_id, self.name, self.text, status)


class ResponsesStream:
    """A :class:`~tooti.fronts.base.StreamTranslator` for one ``/v1/responses`` stream."""

    content_type = STREAM_CONTENT_TYPE

    def __init__(self, request: ChatRequest) -> None:
        self._request = request
        self._sequence = 0
        self._started = False
        self._ended = False
        self._items: list[_Item] = []
        self._message: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._model: str | None = None

    # -- the StreamTranslator protocol ----------------------------------------------------

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress`` (once)."""
        if self._started:
            return b""
        self._started = True
        response = self._response("in_progress")
        return (self._event("response.created", response=response)
                + self._event("response.in_progress", response=response))

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events of one decoded ``chat.completion.chunk``."""
        if self._ended or not isinstance(chunk, dict):
            return b""
        out = [self.start()]
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self._model = model
        usage = usage_object(chunk.get("usage"))
        if usage is not None:
            self._usage = usage
        choices = chunk.get("choices")
        error = chunk.get("error")
        if isinstance(error, dict) and not choices:
            message = error.get("message")
            out.append(self.fail(APIError(502, message if isinstance(message, str)
                                          else "backend error")))
            return b"".join(out)
        choice = _first_choice(choices)
        if choice is None:
            return b"".join(out)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                out.append(self._text(content))
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, call in enumerate(calls):
                    if isinstance(call, dict):
                        out.append(self._call(call, position))
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and reason:
            self._finish_reason = reason
        return b"".join(out)

    def finish(self) -> bytes:
        """Close the open items and send ``response.completed`` (``response.incomplete``
        when the node stopped at the token limit or a content filter)."""
        if self._ended:
            return b""
        out = [self.start()]
        reason = INCOMPLETE_REASONS.get(self._finish_reason or "")
        status = "incomplete" if reason else "completed"
        out.append(self._close_all(status))
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

    def _text(self, content: str) -> bytes:
        out = []
        if self._message is None:
            out.append(self._close_calls())
            item = self._message = self._open(None)
            out.append(self._event("response.output_item.added", output_index=item.output_index,
                                   item=item.snapshot("in_progress")))
            out.append(self._event("response.content_part.added", item_id=item.item_id,
                                   output_index=item.output_index, content_index=0,
                                   part=_text_part("")))
        item = self._message
        item.pieces.append(content)
        out.append(self._event("response.output_text.delta", item_id=item.item_id,
                               output_index=item.output_index, content_index=0, delta=content,
                               logprobs=[]))
        return b"".join(out)

    def _call(self, call: dict[str, Any], position: int) -> bytes:
        index = call.get("index")
        key = index if isinstance(index, int) and not isinstance(index, bool) else position
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        name = function.get("name")
        arguments = function.get("arguments")
        out = []
        item = self._calls.get(key)
        if item is None or item.done is not None:
            out.append(self._close_message())
            call_id = call.get("id")
            item = self._open(call_id if isinstance(call_id, str) and call_id
                              else new_id("call"))
            item.name = name if isinstance(name, str) else ""
            self._calls[key] = item
            out.append(self._event("response.output_item.added", output_index=item.output_index,
                                   item=item.snapshot("in_progress")))
        elif isinstance(name, str) and name and name != item.name:
            item.name += name  # a backend sending the name in pieces
        if isinstance(arguments, str) and arguments:
            item.pieces.append(arguments)
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=item.item_id, output_index=item.output_index,
                                   delta=arguments))
        return b"".join(out)

    def _open(self, call_id: str | None) -> _Item:
        item = _Item(len(self._items), new_id("msg" if call_id is None else "fc"), call_id)
        self._items.append(item)
        return item

    def _close(self, item: _Item, status: str) -> bytes:
        out = []
        if item.call_id is None:
            text = item.text
            out.append(self._event("response.output_text.done", item_id=item.item_id,
                                   output_index=item.output_index, content_index=0, text=text,
                                   logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=item.item_id,
                                   output_index=item.output_index, content_index=0,
                                   part=_text_part(text)))
        else:
            out.append(self._event("response.function_call_arguments.done",
                                   item_id=item.item_id, output_index=item.output_index,
                                   name=item.name, arguments=item.text))
        item.done = item.snapshot(status)
        out.append(self._event("response.output_item.done", output_index=item.output_index,
                               item=item.done))
        return b"".join(out)

    def _close_message(self, status: str = "completed") -> bytes:
        item, self._message = self._message, None
        return self._close(item, status) if item is not None else b""

    def _close_calls(self, status: str = "completed") -> bytes:
        open_calls = [item for item in self._calls.values() if item.done is None]
        self._calls = {}
        return b"".join(self._close(item, status)
                        for item in sorted(open_calls, key=lambda i: i.output_index))

    def _close_all(self, status: str) -> bytes:
        # a message and calls are never open together: each closes the other
        return self._close_message(status) + self._close_calls(status)

    # -- events ---------------------------------------------------------------------------

    def _response(self, status: str, *, output: list[dict[str, Any]] | None = None,
                  incomplete_reason: str | None = None, error: dict[str, Any] | None = None,
                  completed_at: float | None = None) -> dict[str, Any]:
        return response_object(
            self._request, status=status, output=output or [],
            usage=self._usage if status != "in_progress" else None, model=self._model,
            incomplete_reason=incomplete_reason, error=error, completed_at=completed_at)

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _first_choice(choices: Any) -> dict[str, Any] | None:
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None
