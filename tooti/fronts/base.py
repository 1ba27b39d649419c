"""What every API front shares: the translated request, and the stream translator's shape.

A front turns a client's request body into a :class:`ChatRequest` (or raises
:class:`~tooti.errors.APIError`, which the front renders in its own dialect's error shape),
and the node's chat-completions answer back: one JSON document for a non-streamed request,
or a :class:`StreamTranslator` fed the stream's chunks one by one (each already decoded from
its SSE ``data:`` line; the ``[DONE]`` line is :meth:`StreamTranslator.finish`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from tooti.errors import APIError


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A dialect's request, translated for the nodes."""

    body: dict[str, Any]
    """The OpenAI chat-completions body to send (``model``, ``messages``, ``stream`` and,
    when streaming, ``stream_options: {"include_usage": true}``, ...)."""
    model: str
    """The model the client asked for (routing uses it)."""
    stream: bool
    """Whether the client asked for a stream."""
    context: dict[str, Any] = field(default_factory=dict)
    """What the answer's translation needs from the request (dialect-specific)."""


class StreamTranslator(Protocol):
    """Turns one chat-completions stream into one stream of the dialect's events."""

    content_type: str
    """The media type of the dialect's stream (``text/event-stream``,
    ``application/x-ndjson``)."""

    def start(self) -> bytes:
        """Bytes to send before the first chunk (may be empty)."""

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The dialect's bytes for one decoded chat-completions chunk (may be empty)."""

    def finish(self) -> bytes:
        """The dialect's closing bytes once the upstream stream ended normally."""

    def fail(self, error: APIError) -> bytes:
        """The dialect's bytes reporting ``error`` mid-stream, ending the stream."""
