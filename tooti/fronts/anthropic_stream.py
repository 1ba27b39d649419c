"""A node's chat-completions stream as the Messages API's server-sent events.

The sequence is the one the ``anthropic`` SDK (and its ``messages.stream()`` helper)
expects: ``message_start`` (``usage.input_tokens`` 0: an OpenAI stream reports usage
last), then for each content block ``content_block_start``, its deltas
(``text_delta``; ``thinking_delta`` when the request enabled ``thinking`` and the node
streams reasoning; ``input_json_delta`` carrying a tool call's argument text as the node
streams it, so one call's arguments may span many chunks) and ``content_block_stop``;
then ``message_delta`` with the ``stop_reason`` and the final usage (``output_tokens``
and the corrected ``input_tokens``, from the chunk with empty ``choices`` that
``stream_options.include_usage`` makes nodes send), and ``message_stop``. An error
mid-stream is one ``error`` event, and the stream ends there.

Blocks follow the node's deltas: text opens a ``text`` block, each new tool-call index
(OpenAI streams them one after the other) closes the open block and opens a
``tool_use`` block. A tool call is opened once its name is known (its argument text
before that is held and sent then); a call whose name never came is dropped. Only
choice 0 is read (Anthropic answers one message). A chunk that is an OpenAI error
object (``{"error": {...}}``, as some servers send mid-stream) ends the stream with an
``error`` event of type ``api_error``. A node's ``reasoning_content`` is
forwarded only as ``thinking`` blocks to a request with ``thinking`` enabled (see
:mod:`tooti.fronts.anthropic_messages`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tooti.errors import APIError
from tooti.fronts.anthropic_messages import (
    error_dict,
    new_message_id,
    new_tool_use_id,
    reasoning_of,
    stop_reason,
    usage_dict,
)
from tooti.fronts.base import ChatRequest

__all__ = ["CONTENT_TYPE", "AnthropicStream", "sse_event"]

CONTENT_TYPE = "text/event-stream"
_encode = msgspec.json.encode


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: ``event: <name>`` and its JSON ``data``."""
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


class _PendingCall:
    """A streamed tool call: its block index once opened, else what came so far."""

    __slots__ = ("block", "held", "id", "name")

    def __init__(self) -> None:
        self.block: int | None = None
        self.id: str | None = None
        self.name: str | None = None
        self.held: list[str] = []


class AnthropicStream:
    """A :class:`~tooti.fronts.base.StreamTranslator` for ``/v1/messages``."""

    content_type = CONTENT_TYPE

    def __init__(self, request: ChatRequest, *, message_id: str | None = None) -> None:
        self._model: str = request.context.get("model", request.model)
        self._stop_sequences: tuple[str, ...] = request.context.get("stop_sequences", ())
        self._thinking: bool = bool(request.context.get("thinking"))
        self._id = message_id or new_message_id()
        self._started = False
        self._done = False
        self._next_block = 0
        self._open: int | None = None
        """The open block's index."""
        self._open_kind = ""
        """``text``, ``thinking`` or ``tool_use``."""
        self._calls: dict[int, _PendingCall] = {}
        self._finish: Any = None
        self._matched: Any = None
        self._usage: Any = None

    # -- the protocol ---------------------------------------------------------------

    def start(self) -> bytes:
        """``message_start``."""
        if self._started or self._done:
            return b""
        self._started = True
        usage = usage_dict(self._usage)
        return sse_event("message_start", {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "model": self._model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}})

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events for one chat-completions chunk."""
        if self._done or not isinstance(chunk, dict):
            return b""
        node_error = chunk.get("error")
        if isinstance(node_error, dict) and not chunk.get("choices"):
            message = node_error.get("message")
            return self.fail(APIError(502, message if isinstance(message, str) and message
                                      else "the node reported an error mid-stream"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        out = [self.start()]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """Close the open block; ``message_delta`` (stop reason, usage) and
        ``message_stop``."""
        if self._done:
            return b""
        out = [self.start()]
        self._close(out)
        self._done = True
        reason, sequence = stop_reason(
            self._finish, self._matched, self._stop_sequences,
            any(call.block is not None for call in self._calls.values()))
        usage = usage_dict(self._usage)
        out.append(sse_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"output_tokens": usage.pop("output_tokens"), **usage}}))
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def fail(self, error: APIError) -> bytes:
        """One ``error`` event in Anthropic's error shape; the stream ends."""
        if self._done:
            return b""
        self._done = True
        return sse_event("error", error_dict(error))

    # -- blocks ----------------------------------------------------------------------

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = reasoning_of(delta) if self._thinking else None
            if reasoning:
                self._text("thinking", reasoning, out)
            text = delta.get("content")
            if isinstance(text, str) and text:
                self._text("text", text, out)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    self._tool_delta(call, out)
        finish = choice.get("finish_reason")
        if finish is not None:
            self._finish = finish
            self._matched = choice.get("stop_reason")

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(sse_event("content_block_stop",
                                 {"type": "content_block_stop", "index": self._open}))
            self._open = None

    def _open_block(self, block: dict[str, Any], out: list[bytes]) -> int:
        self._close(out)
        index = self._next_block
        self._next_block += 1
        self._open, self._open_kind = index, block["type"]
        out.append(sse_event("content_block_start", {
            "type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _text(self, kind: str, text: str, out: list[bytes]) -> None:
        """A ``text`` or ``thinking`` delta, in a block of its kind."""
        if self._open is None or self._open_kind != kind:
            self._open_block({"type": "text", "text": ""} if kind == "text"
                             else {"type": "thinking", "thinking": "", "signature": ""}, out)
        delta = ({"type": "text_delta", "text": text} if kind == "text"
                 else {"type": "thinking_delta", "thinking": text})
        out.append(sse_event("content_block_delta", {
            "type": "content_block_delta", "index": self._open, "delta": delta}))

    def _tool_delta(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index", 0)
        if not isinstance(position, int) or isinstance(position, bool):
            return
        pending = self._calls.get(position)
        if pending is None:
            pending = self._calls[position] = _PendingCall()
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id and pending.id is None:
            pending.id = call_id
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        name = function.get("name")
        if isinstance(name, str) and name and pending.name is None:
            pending.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, dict):  # an object, from servers that send one
            arguments = _encode(arguments).decode()
        if isinstance(arguments, str) and arguments:
            pending.held.append(arguments)
        if pending.block is None and pending.name is not None:
            pending.block = self._open_block(
                {"type": "tool_use", "id": pending.id or new_tool_use_id(),
                 "name": pending.name, "input": {}}, out)
        if pending.block is not None and pending.held:
            out.append(sse_event("content_block_delta", {
                "type": "content_block_delta", "index": pending.block,
                "delta": {"type": "input_json_delta", "partial_json": "".join(pending.held)}}))
            pending.held.clear()
