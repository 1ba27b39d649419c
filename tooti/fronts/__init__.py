"""The API dialects the gateway speaks besides OpenAI chat completions, translated to and
from the one request every node serves (OpenAI chat completions).

Each module here is sans-I/O: it turns a client's request body in one dialect into a
chat-completions body, and a node's chat-completions answer (one JSON document, or the
stream of its chunks) back into that dialect's answer or events. The gateway's one proxy
path (routing, failover, cancellation, metering, billing) carries every dialect; only
the shapes at the edges differ.

Every front is a :class:`tooti.fronts.base.Front` (``parse``, ``answer``, ``stream``,
``error_body``, media types), so the gateway mounts them the same way; what they share
(body decoding and its depth limit, param spelling, images, ids, untrusted node output)
is in :mod:`tooti.fronts.base`, and streamed tool calls are accumulated by
:mod:`tooti.fronts.tool_calls`. ``docs/api.md`` states the shared rules once.

- :mod:`tooti.fronts.anthropic_messages`: Anthropic's Messages API (``/v1/messages``);
  its stream and ``FRONT`` in :mod:`tooti.fronts.anthropic_stream`.
- :mod:`tooti.fronts.ollama_api`: Ollama's API (``/api/chat``, ``/api/generate``, ...);
  its answers, NDJSON streams and ``ollama_front`` in :mod:`tooti.fronts.ollama_answers`,
  its model listings in :mod:`tooti.fronts.ollama_models`.
- :mod:`tooti.fronts.responses`: OpenAI's Responses API (``/v1/responses``); its
  stream and ``FRONT`` in :mod:`tooti.fronts.responses_stream`.
"""
