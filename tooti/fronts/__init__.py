"""The API dialects the gateway speaks besides OpenAI chat completions, translated to and
from the one request every node serves (OpenAI chat completions).

Each module here is sans-I/O: it turns a client's request body in one dialect into a
chat-completions body, and a node's chat-completions answer (one JSON document, or the
stream of its chunks) back into that dialect's answer or events. The gateway's one proxy
path (routing, failover, cancellation, metering, billing) carries every dialect; only
the shapes at the edges differ.

- :mod:`tooti.fronts.anthropic_messages`: Anthropic's Messages API (``/v1/messages``).
- :mod:`tooti.fronts.ollama_api`: Ollama's API (``/api/chat``, ``/api/generate``, ...);
  its answers and NDJSON streams in :mod:`tooti.fronts.ollama_answers`, its model
  listings in :mod:`tooti.fronts.ollama_models`.
- :mod:`tooti.fronts.responses`: OpenAI's Responses API (``/v1/responses``).
"""
