"""Ollama native API answers as OpenAI objects and SSE events (pure, no I/O).

:mod:`tooti.backends.ollama` feeds these what Ollama answers. Whole
``/api/chat``, ``/api/generate`` and ``/api/embed`` bodies map to
``chat.completion``, ``text_completion`` and embedding list objects;
:class:`NdjsonLines` splits a streamed body into items, and
:class:`ChatStream` / :class:`CompletionStream` turn the items into OpenAI SSE
events. Usage comes from ``prompt_eval_count`` and ``eval_count`` of the last
item (its durations are not passed on); ``done_reason`` ``length`` is
``finish_reason`` ``length``, anything else ``stop`` (``tool_calls`` when the
answer called tools). An ``{"error": ...}`` item, a line that is not a JSON
object or an overlong line raises :class:`~tooti.backends.base.BackendError`.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec

from tooti.backends.base import BackendError
from tooti.protocol.numbers import is_int, is_number

MAX_LINE = 16 * 1024 * 1024
"""Longest NDJSON line accepted from a stream."""

_encode = msgspec.json.encode
_decode = msgspec.json.decode

_FINISH_REASONS = {"stop": "stop", "length": "length"}
"""Ollama ``done_reason`` → OpenAI ``finish_reason`` (anything else is ``stop``)."""


# -- small helpers -------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty dict."""
    return value if isinstance(value, dict) else {}


def _count(item: dict[str, Any], key: str) -> int:
    value = item.get(key)
    return value if is_int(value) else 0


def _usage(item: dict[str, Any]) -> dict[str, int]:
    prompt = _count(item, "prompt_eval_count")
    completion = _count(item, "eval_count")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish_reason(item: dict[str, Any]) -> str:
    return _FINISH_REASONS.get(str(item.get("done_reason") or "stop"), "stop")


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


def raise_for_error_line(item: dict[str, Any]) -> None:
    """Raise the mid-stream ``{"error": ...}`` line of an Ollama stream."""
    error = item.get("error")
    if error is not None:
        raise BackendError(
            f"ollama stream error: {error}", status=502, code="backend_stream_error"
        )



# -- response mapping ------------------------------------------------------------


def _tool_calls_out(calls: Any, first_index: int | None = None) -> list[dict[str, Any]]:
    """Map Ollama tool calls to OpenAI's (with ``index`` from ``first_index`` on)."""
    result: list[dict[str, Any]] = []
    for offset, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = _encode(arguments if arguments is not None else {}).decode()
        call_id = call.get("id")
        out: dict[str, Any] = {
            "id": call_id if isinstance(call_id, str) and call_id else
            f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": str(function.get("name") or ""), "arguments": arguments},
        }
        if first_index is not None:
            out = {"index": first_index + offset, **out}
        result.append(out)
    return result


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def chat_completion(item: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Map a non-streaming ``/api/chat`` answer to a ``chat.completion`` object."""
    message = _dict(item.get("message"))
    calls = _tool_calls_out(message.get("tool_calls"))
    content = _text(message.get("content"))
    out: dict[str, Any] = {
        "role": "assistant", "content": content if content or not calls else None,
        "refusal": None,
    }
    if calls:
        out["tool_calls"] = calls
    thinking = _text(message.get("thinking"))
    if thinking:
        out["reasoning_content"] = thinking
    return {
        **base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": out, "logprobs": None,
                     "finish_reason": "tool_calls" if calls else _finish_reason(item)}],
        "usage": _usage(item),
    }


def text_completion(item: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Map a non-streaming ``/api/generate`` answer to a ``text_completion`` object."""
    return {
        **base,
        "object": "text_completion",
        "choices": [{"index": 0, "text": _text(item.get("response")), "logprobs": None,
                     "finish_reason": _finish_reason(item)}],
        "usage": _usage(item),
    }


def embedding_list(item: dict[str, Any], model: str, fmt: str) -> dict[str, Any]:
    """Map an ``/api/embed`` answer to the OpenAI embeddings list object."""
    vectors = item.get("embeddings")
    if not isinstance(vectors, list):
        raise BackendError("ollama answered no embeddings", status=502, code="backend_error")
    data = []
    for index, vector in enumerate(vectors):
        if not isinstance(vector, list) or not all(is_number(x) for x in vector):
            raise BackendError("ollama answered a bad embedding", status=502,
                               code="backend_error")
        embedding: Any = vector
        if fmt == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt = _usage(item)["prompt_tokens"]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


class _Stream:
    """Turns the NDJSON items of one Ollama stream into OpenAI SSE events.

    :attr:`done` turns true with the item that has ``done``; :meth:`feed`
    raises :class:`BackendError` for an ``{"error": ...}`` item.
    """

    object_name = ""

    def __init__(self, base: dict[str, Any], include_usage: bool) -> None:
        """``base`` holds id, created and model; usage is sent last if asked."""
        self.base = {**base, "object": self.object_name}
        if include_usage:
            self.base["usage"] = None
        self.include_usage = include_usage
        self.done = False

    def feed(self, item: dict[str, Any]) -> list[bytes]:
        """Return the SSE events for one NDJSON item (with ``[DONE]`` after the last)."""
        raise_for_error_line(item)
        events = self._events(item)
        if item.get("done"):
            self.done = True
            events.append(self._event_finish(item))
            if self.include_usage:
                events.append(_sse({**self.base, "choices": [], "usage": _usage(item)}))
            events.append(b"data: [DONE]\n\n")
        return events

    def _events(self, item: dict[str, Any]) -> list[bytes]:
        """The events carrying one item's text."""
        raise NotImplementedError

    def _event_finish(self, item: dict[str, Any]) -> bytes:
        """The event carrying the finish reason of the last item."""
        raise NotImplementedError


class ChatStream(_Stream):
    """Turns ``/api/chat`` NDJSON items into ``chat.completion.chunk`` SSE events."""

    object_name = "chat.completion.chunk"

    def __init__(self, base: dict[str, Any], include_usage: bool) -> None:
        """``base`` holds id, created and model; usage is sent last if asked."""
        super().__init__(base, include_usage)
        self.first = True
        self.tool_calls = 0

    def _event(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return _sse({**self.base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    def _events(self, item: dict[str, Any]) -> list[bytes]:
        message = _dict(item.get("message"))
        delta: dict[str, Any] = {}
        if self.first:
            delta["role"] = "assistant"
        content = _text(message.get("content"))
        if content or self.first:
            delta["content"] = content
        thinking = _text(message.get("thinking"))
        if thinking:
            delta["reasoning_content"] = thinking
        calls = _tool_calls_out(message.get("tool_calls"), self.tool_calls)
        if calls:
            delta["tool_calls"] = calls
            self.tool_calls += len(calls)
        events = [self._event(delta, None)] if self.first or content or thinking or calls else []
        self.first = False
        return events

    def _event_finish(self, item: dict[str, Any]) -> bytes:
        return self._event({}, "tool_calls" if self.tool_calls else _finish_reason(item))


class CompletionStream(_Stream):
    """Turns ``/api/generate`` NDJSON items into ``text_completion`` SSE events."""

    object_name = "text_completion"

    def _event(self, text: str, finish_reason: str | None) -> bytes:
        return _sse({**self.base, "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]})

    def _events(self, item: dict[str, Any]) -> list[bytes]:
        text = _text(item.get("response"))
        return [self._event(text, None)] if text else []

    def _event_finish(self, item: dict[str, Any]) -> bytes:
        return self._event("", _finish_reason(item))


def stream_for(
    endpoint: str, base: dict[str, Any], include_usage: bool
) -> ChatStream | CompletionStream:
    """The translator of a streamed ``chat/completions`` or ``completions`` answer."""
    kind = ChatStream if endpoint == "chat/completions" else CompletionStream
    return kind(base, include_usage)


def answer_base(endpoint: str, model: str, created: int) -> dict[str, Any]:
    """The id, ``created`` time and (public) model every answer object carries."""
    prefix = "chatcmpl" if endpoint == "chat/completions" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": created, "model": model}


def check_first_item(item: dict[str, Any]) -> None:
    """Raise for an ``{"error": ...}`` first stream item.

    The first item comes with Ollama's head, before ours is sent, so it is
    reported as an upstream error the gateway may retry elsewhere.
    """
    if item.get("error") is not None:
        raise BackendError(f"ollama error: {item['error']}", status=500, code="upstream_error")


def stream_ended_early() -> BackendError:
    """The error of a stream whose body ended before its ``done`` item."""
    return BackendError("ollama stream ended before it was done", status=502,
                        code="backend_stream_error")


def _bad_line(line: bytes) -> BackendError:
    return BackendError(f"ollama sent a bad stream line: {line[:200]!r}", status=502,
                        code="backend_stream_error")


def _item(line: bytes) -> dict[str, Any]:
    """Decode one NDJSON line, which must hold a JSON object."""
    try:
        item = _decode(line)
    except msgspec.DecodeError:
        raise _bad_line(line) from None
    if not isinstance(item, dict):
        raise _bad_line(line)
    return item


class NdjsonLines:
    """Splits an NDJSON body, however it is chunked, into its JSON objects.

    Holds the unfinished last line between chunks (at most ``max_line`` bytes).
    Blank lines are skipped; a line that is not a JSON object, or one longer
    than ``max_line``, raises :class:`BackendError` (``backend_stream_error``).
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        """Start with nothing held."""
        self.max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Yield the items completed by ``data`` (exhaust it before the next feed)."""
        buffer = self._buffer
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.strip():
                yield _item(line)
        if len(buffer) > self.max_line:
            raise BackendError("ollama sent an overlong stream line", status=502,
                               code="backend_stream_error")

    def end(self) -> Iterator[dict[str, Any]]:
        """Yield the item of a last line that had no newline, if any."""
        if self._buffer.strip():
            yield _item(bytes(self._buffer))
        self._buffer.clear()


def decode_answer(data: bytes | bytearray) -> dict[str, Any]:
    """Decode a whole (non-streaming) answer; an ``{"error": ...}`` one raises."""
    try:
        item = _decode(data)
    except msgspec.DecodeError:
        item = None
    if not isinstance(item, dict):
        raise BackendError("ollama sent a bad answer", status=502, code="backend_error")
    if item.get("error") is not None:
        raise BackendError(f"ollama error: {item['error']}", status=502, code="upstream_error")
    return item
