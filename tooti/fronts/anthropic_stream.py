"""A node's chat-completions stream as the Messages API's server-sent events, and
:class:`AnthropicFront`, the ``/v1/messages`` :class:`~tooti.fronts.base.Front`.

The sequence is the one the ``anthropic`` SDK (and its ``messages.stream()`` helper)
expects: ``message_start`` (``usage.input_tokens`` 0: an OpenAI stream reports usage
last), then for each content block ``content_block_start``, its deltas and
``content_block_stop``; then ``message_delta`` with the ``stop_reason`` and the final
usage (``output_tokens`` and the corrected ``input_tokens``, from the chunk with empty
``choices`` that ``stream_options.include_usage`` makes nodes send), and
``message_stop``. An error mid-stream is one ``error`` event, and the stream ends there.

Text (``text_delta``) and, when the request enabled ``thinking``, reasoning
(``thinking_delta``) stream live, each run in a block of its kind. **Tool calls come
whole at the end**: a node may interleave parallel calls' argument pieces, and Anthropic
allows one open block at a time and no delta after a block's stop, so each call
(accumulated by :mod:`tooti.fronts.tool_calls`) is sent once the node's stream ended, in
the order the calls appeared: ``content_block_start`` (``tool_use``), one
``input_json_delta`` with the whole argument text, ``content_block_stop``. The SDK's
accumulated message is the same as if the pieces had streamed. A call whose name never
came is dropped, and ``stop_reason`` is ``tool_use`` only when a call was sent.
Only choice 0 is read (Anthropic answers one message).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tooti.errors import APIError
from tooti.fronts.anthropic_messages import (
    ERROR_CONTENT_TYPE,
    error_body,
    error_dict,
    new_message_id,
    new_tool_use_id,
    parse_request,
    render_message,
    stop_reason,
    usage_dict,
)
from tooti.fronts.base import (
    MAX_JSON_DEPTH,
    SLOT,
    ChatRequest,
    Front,
    first_choice,
    node_error,
    reasoning_of,
    template,
)
from tooti.fronts.tool_calls import ToolCalls
from tooti.protocol.sse import encode_event

_encode = msgspec.json.encode

__all__ = ["CONTENT_TYPE", "FRONT", "AnthropicFront", "AnthropicStream"]

CONTENT_TYPE = "text/event-stream"


class AnthropicStream:
    """A :class:`~tooti.fronts.base.StreamTranslator` for ``/v1/messages``."""

    content_type = CONTENT_TYPE

    def __init__(self, request: ChatRequest, *, message_id: str | None = None) -> None:
        self._model: str = request.context.get("model", request.model)
        self._stop_sequences: tuple[str, ...] = request.context.get("stop_sequences", ())
        self._thinking: bool = bool(request.context.get("thinking"))
        self._request_id: str | None = request.context.get("request_id")
        self._id = message_id or new_message_id()
        self._started = False
        self._done = False
        self._next_block = 0
        self._open: int | None = None
        """The open block's index."""
        self._open_kind = ""
        """``text`` or ``thinking``."""
        self._delta: tuple[bytes, ...] = ()
        """The open text or thinking block's ``content_block_delta``, cut at its text."""
        self._calls = ToolCalls()
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
        return encode_event("message_start", {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "model": self._model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}})

    def feed(self, chunk: Any) -> bytes:
        """The events for one chat-completions chunk."""
        if self._done or not isinstance(chunk, dict):
            return b""
        error = node_error(chunk)
        if error is not None:
            return self.fail(error)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        out = [self.start()]
        choice = first_choice(chunk.get("choices"))
        try:
            if choice is not None:
                self._choice(choice, out)
        except APIError as exc:  # past the tool calls' bounds
            out.append(self.fail(exc))
        return b"".join(out)

    def feed_text(self, text: str) -> bytes:
        """The events for a chunk carrying only ``text`` (what :meth:`feed` sends)."""
        if self._done:
            return b""
        if text and self._open is not None and self._open_kind == "text":
            head, tail = self._delta  # the usual chunk: the open text block's next delta
            return head + _encode(text) + tail
        out = [self.start()]
        if text:
            self._text("text", text, out)
        return b"".join(out)

    def finish(self) -> bytes:
        """Close the open block; the tool calls; ``message_delta`` (stop reason, usage)
        and ``message_stop``."""
        if self._done:
            return b""
        out = [self.start()]
        self._close(out)
        calls = self._calls.named()
        for call in calls:
            index = self._open_block({"type": "tool_use", "id": call.id or new_tool_use_id(),
                                      "name": call.name, "input": {}}, out)
            arguments = call.arguments
            if arguments:
                out.append(encode_event("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": arguments}}))
            self._close(out)
        self._done = True
        reason, sequence = stop_reason(self._finish, self._matched, self._stop_sequences,
                                       bool(calls))
        usage = usage_dict(self._usage)
        out.append(encode_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"output_tokens": usage.pop("output_tokens"), **usage}}))
        out.append(encode_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def fail(self, error: APIError) -> bytes:
        """One ``error`` event in Anthropic's error shape; the stream ends."""
        if self._done:
            return b""
        self._done = True
        return encode_event("error", error_dict(error, self._request_id))

    # -- blocks ----------------------------------------------------------------------

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = reasoning_of(delta) if self._thinking else ""
            if reasoning:
                self._text("thinking", reasoning, out)
            text = delta.get("content")
            if isinstance(text, str) and text:
                self._text("text", text, out)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                self._calls.add(call)
        finish = choice.get("finish_reason")
        if finish is not None:
            self._finish = finish
            self._matched = choice.get("stop_reason")

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(encode_event("content_block_stop",
                                    {"type": "content_block_stop", "index": self._open}))
            self._open = None

    def _open_block(self, block: dict[str, Any], out: list[bytes]) -> int:
        self._close(out)
        index = self._next_block
        self._next_block += 1
        self._open, self._open_kind = index, block["type"]
        out.append(encode_event("content_block_start", {
            "type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _text(self, kind: str, text: str, out: list[bytes]) -> None:
        """A ``text`` or ``thinking`` delta, in a block of its kind."""
        if self._open is None or self._open_kind != kind:
            self._open_block({"type": "text", "text": ""} if kind == "text"
                             else {"type": "thinking", "thinking": "", "signature": ""}, out)
            delta = ({"type": "text_delta", "text": SLOT} if kind == "text"
                     else {"type": "thinking_delta", "thinking": SLOT})
            self._delta = template(encode_event("content_block_delta", {
                "type": "content_block_delta", "index": self._open, "delta": delta}))
        head, tail = self._delta
        out.append(head + _encode(text) + tail)


class AnthropicFront:
    """``POST /v1/messages`` as a :class:`~tooti.fronts.base.Front` (``/v1/messages/
    count_tokens`` is :func:`~tooti.fronts.anthropic_messages.parse_count_tokens` and
    :func:`~tooti.fronts.anthropic_messages.render_count_tokens`)."""

    media_type = ERROR_CONTENT_TYPE
    stream_media_type = CONTENT_TYPE

    def parse(self, raw: bytes, *, max_depth: int = MAX_JSON_DEPTH,
              request_id: str | None = None) -> ChatRequest:
        return parse_request(raw, max_depth=max_depth, request_id=request_id)

    def answer(self, request: ChatRequest, completion: Any) -> bytes:
        return render_message(completion, request)

    def stream(self, request: ChatRequest) -> AnthropicStream:
        return AnthropicStream(request)

    def error_body(self, error: APIError, request_id: str | None = None) -> bytes:
        return error_body(error, request_id)


FRONT: Front = AnthropicFront()
"""The one instance the gateway mounts."""
