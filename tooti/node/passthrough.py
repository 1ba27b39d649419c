"""Serving a pass-through endpoint on a node: rerank, audio, images, native responses.

The backend's answer is relayed as it comes, whatever its content type (audio/speech is
binary audio), without the SSE and JSON handling of the chat endpoints
(:mod:`tooti.node.metering`), and an ``audio/transcriptions`` upload goes to the backend
piece by piece as it arrives through the tunnel (:class:`~tooti.backends.base.Upload`):
no more of it is in the node's memory than the tunnel's flow-control window.

Usage: what the backend's answer reports, read from a JSON answer of at most
:data:`MAX_USAGE_JSON` bytes (larger ones, such as images, are not kept: their
``usage`` is looked for in the last :data:`MAX_USAGE_JSON` bytes, where OpenAI puts it)
or from the SSE events of a streamed ``responses`` answer. Both spellings are read:
``prompt_tokens`` / ``completion_tokens`` (rerank servers) and ``input_tokens`` /
``output_tokens`` (images, responses). Without one (audio, most rerank servers) the END
reports zero tokens, not an estimate: the request is recorded and billed at its
per-token prices times zero, which is what the node's answer can justify.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from tooti.backends.base import Backend, BackendError, BackendResponse, Upload, open_upload_of
from tooti.protocol.numbers import is_int
from tooti.protocol.sse import SSEDecoder, split_events
from tooti.protocol.usage import MAX_TOKENS
from tooti.tunnel import InboundStream

UPLOAD_ENDPOINTS = frozenset({"audio/transcriptions"})
"""Endpoints whose request body is a multipart upload, streamed rather than read whole."""
MAX_USAGE_JSON = 1 << 20
"""Most bytes of a JSON answer kept to read its usage from."""

_decoder = msgspec.json.Decoder()


async def upload_chunks(stream: InboundStream) -> AsyncGenerator[bytes, None]:
    """The request body of ``stream`` as it arrives (credit granted as each piece is
    taken, so the tunnel's window bounds what is buffered)."""
    while (chunk := await stream.read_chunk()) is not None:
        yield chunk


def open_answer(backend: Backend, stream: InboundStream, endpoint: str, model: str,
                body: bytes, request: dict[str, Any]) -> Any:
    """The backend call for a pass-through ``endpoint``: ``open_upload`` with the
    streamed body for an upload, else :meth:`Backend.open` with the JSON body."""
    if endpoint in UPLOAD_ENDPOINTS:
        method = open_upload_of(backend)
        if method is None:
            raise BackendError(f"backend {backend.type_name} takes no uploads", status=404,
                               code="endpoint_not_served", retryable=False)
        content_type = str(stream.meta.get("content_type") or "")
        return method(endpoint, Upload(content_type, model, upload_chunks(stream)))
    return backend.open(endpoint, body, request)


class PassThroughMeter:
    """Watches a pass-through answer go by (forwarding it untouched) for its usage."""

    def __init__(self, response: BackendResponse) -> None:
        media = response.content_type.split(";", 1)[0].strip().lower()
        self.sse = media == "text/event-stream"
        self.json = media.endswith("json")
        self.forwarded = 0
        self._tail = bytearray()
        self._events = SSEDecoder() if self.sse else None
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        self.forwarded += len(chunk)
        if self._events is not None:
            complete = self._events.feed(chunk)
            if complete and b'"usage"' in complete:
                for event in split_events(complete):
                    parsed = self._events.parse(event)
                    if parsed is not None:
                        self._look(parsed.data.encode())
        elif self.json:
            self._tail += chunk
            if len(self._tail) > 2 * MAX_USAGE_JSON:
                del self._tail[:-MAX_USAGE_JSON]

    def _look(self, payload: bytes) -> None:
        try:
            obj = _decoder.decode(payload)
        except msgspec.DecodeError:
            return
        if not isinstance(obj, dict):
            return
        usage = obj.get("usage")
        inner = obj.get("response")
        if not isinstance(usage, dict) and isinstance(inner, dict):
            usage = inner.get("usage")  # a responses stream's response.completed
        if isinstance(usage, dict):
            self.usage = usage

    def report(self) -> dict[str, Any]:
        """The END frame's usage: the backend's, else zero tokens."""
        if self.json and self._tail:
            data = bytes(self._tail)
            if len(data) <= MAX_USAGE_JSON:
                self._look(data)
            else:  # an answer too large to parse: its usage object, at the end
                start = data.rfind(b'"usage"')
                if start >= 0:
                    member = data[start:].rstrip()
                    self._look(b"{" + member.removesuffix(b"}") + b"}")
        prompt, completion = _counts(self.usage)
        completion = min(completion, self.forwarded)
        return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
                "finish_reason": None}


def _counts(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens of a usage object in either spelling; zeros when
    absent or out of bounds."""
    if usage is None:
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not (is_int(prompt) and is_int(completion)
            and 0 <= prompt <= MAX_TOKENS and 0 <= completion <= MAX_TOKENS):
        return 0, 0
    return prompt, completion
