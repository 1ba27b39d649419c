"""An ASGI ``send`` that turns the proxy's chat-completions answer into a front's dialect.

The front routes (:mod:`tooti.gateway.front_routes`) run the one proxy path
(:meth:`tooti.gateway.app.Gateway._forward`) on the chat body a front made, with a
:class:`TranslatedSend` in place of the request's ``send``. The proxy answers as it
answers every chat request; this wrapper rewrites what it sends on the way out:

- **A stream** (the request streams and the node answered 200 with server-sent events):
  the response starts with the dialect's media type, and the events the proxy sends
  (whole events: :mod:`tooti.gateway.streamed_answer` cuts them with the one
  :class:`~tooti.protocol.sse.SSEDecoder`) are decoded again here, each ``data:`` event
  fed to the front's :class:`~tooti.fronts.base.StreamTranslator`: a plain text delta
  (nearly every chunk) read typed by :func:`~tooti.fronts.base.text_delta` and given to
  ``feed_text``, any other chunk json-decoded and given to ``feed``;
  ``start()`` goes out with the first bytes, ``finish()`` in place of ``[DONE]``, and an
  in-band error event (the gateway's own, after a stream broke or timed out, or a
  node's) becomes ``fail(error)``. ``[DONE]`` reaches this wrapper only in the proxy's
  last body part, after billing settled, so the dialect's closing event (``message_stop``,
  ``response.completed``, Ollama's ``done`` line) keeps that guarantee.
- **A whole answer**: the body the proxy sends (already bounded by
  ``max_response_bytes``) is collected, decoded and sent as ``front.answer(...)`` (or the
  route's own ``render``) with a content-length; a node's error answer (4xx/5xx, an
  OpenAI error object) is sent as ``front.error_body`` with its status. Billing settles
  a whole answer only once it was translated (:meth:`TranslatedSend.settle_hook`): an
  answer that cannot be (not JSON, not a chat completion) is the client's 502, and the
  request is not served (refunded), not billed as ok.

Every other header the proxy set (``x-request-id``, ``x-ratelimit-*``, ``x-tooti-node``,
``x-tooti-model``, ``cache-control``) is kept; ``content-type`` and ``content-length``
are the dialect's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from tooti.billing.base import Outcome
from tooti.errors import APIError
from tooti.fronts.base import ChatRequest, Front, StreamTranslator, text_delta
from tooti.mesh.http import Headers, Send
from tooti.protocol.numbers import is_int
from tooti.protocol.sse import EVENT_END, SSEDecoder

_decode = msgspec.json.decode
_REPLACED = (b"content-type", b"content-length")
_DONE = b"[DONE]"

Render = Callable[[Any], bytes]
"""A whole (decoded) node answer as the dialect's body; raises APIError."""


def error_of(status: int, body: Any) -> APIError:
    """A node's or the gateway's OpenAI error object (decoded ``body``) as an APIError of
    ``status``; anything else as a plain error of that status."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return APIError(status, error or "the node reported an error", code="bad_gateway")
    if not isinstance(error, dict):
        return APIError(status, "the node reported an error", code="bad_gateway")

    def text(name: str) -> str | None:
        value = error.get(name)
        return value if isinstance(value, str) and value else None

    return APIError(status, text("message") or "the node reported an error",
                    code=text("code"), param=text("param"), type=text("type"))


def inband_status(error: Any) -> int:
    """The status an in-band error event stands for (a stream's status is already 200):
    504 for the gateway's request timeout, 429 for a rate limit, else 502 (the node)."""
    if isinstance(error, dict):
        if error.get("code") == "timeout":
            return 504
        if error.get("type") == "rate_limit_error":
            return 429
    return 502


def malformed(chunk: Any) -> str | None:
    """Why a node's decoded stream chunk is not a ``chat.completion.chunk`` a front can
    read (None: it is): an object whose ``choices``, if any, is a list of objects with
    integer indexes, each ``delta`` an object, each ``tool_calls`` a list of objects
    with integer indexes. What the fronts read beyond that they check as they read."""
    if not isinstance(chunk, dict):
        return "not a JSON object"
    choices = chunk.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list):
        return "choices is not a list"
    for choice in choices:
        if not isinstance(choice, dict) or not is_int(choice.get("index", 0)):
            return "a choice is not an object with an integer index"
        delta = choice.get("delta")
        if delta is None:
            continue
        if not isinstance(delta, dict):
            return "a delta is not an object"
        calls = delta.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list) or not all(
                isinstance(call, dict) and is_int(call.get("index", 0)) for call in calls):
            return "tool_calls is not a list of objects with integer indexes"
    return None


class TranslatedSend:
    """The ``send`` of one front request (see the module docstring)."""

    __slots__ = (
        "_decoder",
        "_extra",
        "_front",
        "_headers",
        "_opening",
        "_outcome",
        "_parts",
        "_render",
        "_request",
        "_send",
        "_settle",
        "_status",
        "_translator",
    )

    def __init__(self, send: Send, front: Front, request: ChatRequest, *,
                 render: Render | None = None, extra_headers: Sequence[tuple[bytes, bytes]] = (),
                 ) -> None:
        """``send``: the request's own; ``render``: a whole answer's body (default
        ``front.answer``); ``extra_headers`` go on every answer (Anthropic's
        ``request-id``)."""
        self._send = send
        self._front = front
        self._request = request
        self._render = render
        self._extra = list(extra_headers)
        self._status = 0
        self._headers: Headers = []
        self._parts: list[bytes] = []
        self._translator: StreamTranslator | None = None
        self._decoder: SSEDecoder | None = None
        self._opening = False
        self._outcome: Outcome | None = None
        self._settle: Callable[[], Awaitable[None]] | None = None
        """The proxy's settle, held until the whole answer was translated."""

    def settle_hook(self, outcome: Outcome, settle: Callable[[], Awaitable[None]]
                    ) -> Callable[[], Awaitable[None]]:
        """What the proxy runs in place of the gateway's ``settle`` (the request's
        ``outcome``) once the node's answer is complete: a stream settles at once (its
        events already went out as they came); a whole answer settles once translated,
        right before its bytes go (:meth:`_whole_body`), so one that cannot be translated
        is refused unbilled."""
        self._outcome = outcome

        async def before_last() -> None:
            if self._translator is not None:
                await settle()
            else:
                self._settle = settle

        return before_last

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            more = bool(message.get("more_body", False))
            if self._translator is not None:
                data = self._translate(message.get("body", b""), more)
                if data or not more:
                    await self._send({"type": "http.response.body", "body": data,
                                      "more_body": more})
            else:
                await self._whole_body(message.get("body", b""), more)
        elif kind == "http.response.start":
            await self._start(message)
        else:
            await self._send(message)

    async def _start(self, message: dict[str, Any]) -> None:
        self._status = status = message["status"]
        self._headers = [(name, value) for name, value in message.get("headers", ())
                         if name.lower() not in _REPLACED]
        content_type = b""
        for name, value in message.get("headers", ()):
            if name.lower() == b"content-type":
                content_type = bytes(value)
        if self._request.stream and status == 200 and content_type.startswith(
                b"text/event-stream"):
            self._translator = self._front.stream(self._request)
            self._decoder = SSEDecoder()
            await self._send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", self._front.stream_media_type.encode()),
                *self._headers, *self._extra]})
            self._opening = True

    # ------------------------------------------------------------ streams

    def _translate(self, body: bytes, more: bool) -> bytes:
        """The dialect's bytes for one body part of the node's stream (joined once)."""
        translator, decoder = self._translator, self._decoder
        assert translator is not None and decoder is not None
        out: list[bytes] = []
        if self._opening:  # the first bytes: the dialect's opening
            self._opening = False
            out.append(translator.start())
        block = decoder.feed(body) if body else b""
        events = block.split(EVENT_END)[:-1] if block else []  # whole events
        if not more:
            tail = decoder.flush()
            if tail:
                events.append(tail)
        for raw in events:
            if raw.startswith(b"data: ") and 0x0A not in raw:
                data = raw[6:]  # the usual event: one data line, as nodes write them
            else:
                event = decoder.parse(raw + EVENT_END)
                if event is None:
                    continue
                data = event.data.encode()
            text = text_delta(data)
            if text is not None:  # the usual chunk, a token: typed, no dicts
                out.append(translator.feed_text(text))
            else:
                self._chunk(data, translator, out)
        if not more:
            out.append(translator.finish())  # b"" once finished or failed
        return out[0] if len(out) == 1 else b"".join(out)

    def _chunk(self, data: bytes, translator: StreamTranslator, out: list[bytes]) -> None:
        """Feed one event's data (not a plain text delta) to ``translator`` (which reads
        choice 0 only and names the model the client asked for, never the node's); a
        chunk that is not a ``chat.completion.chunk`` ends the stream in the dialect's
        error."""
        if data.strip() == _DONE:
            out.append(translator.finish())
            return
        try:
            chunk = _decode(data)
        except (msgspec.DecodeError, RecursionError):
            chunk = None  # not JSON (or not UTF-8)
        if isinstance(chunk, dict) and "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            out.append(translator.fail(error_of(inband_status(error), chunk)))
            return
        why = malformed(chunk)
        if why is not None:
            broken = APIError(502, f"the node sent a malformed stream chunk: {why}",
                              code="bad_gateway")
            outcome = self._outcome
            if outcome is not None and outcome.status in ("pending", "ok"):
                outcome.status, outcome.error = "failed_midstream", broken.message
            out.append(translator.fail(broken))
            return
        out.append(translator.feed(chunk))

    # ------------------------------------------------------------ whole answers

    async def _whole_body(self, body: bytes, more: bool) -> None:
        if body:
            self._parts.append(body)
        if more:
            return
        raw = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        status = self._status
        try:
            decoded = _decode(raw) if raw else None
        except (msgspec.DecodeError, RecursionError):
            decoded = None
        front = self._front
        settle, self._settle = self._settle, None
        try:
            if status >= 400:
                error = error_of(status, decoded)
                request_id = self._request.context.get("request_id")
                out = front.error_body(error, request_id)
            elif decoded is None:
                raise APIError(502, "the node's answer is not JSON", code="bad_gateway")
            else:
                out = (self._render(decoded) if self._render is not None
                       else front.answer(self._request, decoded))
        except APIError as refused:
            outcome = self._outcome
            if settle is not None and outcome is not None:  # not settled: not served
                outcome.served, outcome.status = False, "failed"
                outcome.error = refused.message
            raise
        if settle is not None:
            await settle()
        await self._send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", front.media_type.encode()),
            (b"content-length", str(len(out)).encode()), *self._headers, *self._extra]})
        await self._send({"type": "http.response.body", "body": out, "more_body": False})
