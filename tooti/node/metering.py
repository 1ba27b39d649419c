"""Reading usage out of a backend's answer as it streams past.

The node forwards backend bytes untouched except for two things this module
does: it forwards SSE only in whole events (so a stream cut mid-event never
leaves half an event at the client; cut by :class:`tooti.protocol.sse.SSEDecoder`,
which writes every line end ``\\n`` however the backend wrote it and however its
chunks fall), and it can drop the usage-only chunk
that the node itself asked the backend for (``stream_options.include_usage``)
when the client did not ask for it. Usage is taken from the backend's own
figures; when a stream dies before reporting them, the count of delivered
content chunks stands in for completion tokens (flagged as estimated).

The backend's figures are checked before they are passed on, by the gateway's
rules (:mod:`tooti.protocol.usage`), so an honest node never reports what the
gateway would refuse: counts that are not integers within ``0..MAX_TOKENS`` (which
the gateway penalizes) make the whole usage unknown (estimated as above);
completion tokens are capped at the bytes forwarded (a token is at least one byte of
output; tokens the client never saw, such as an upstream's hidden reasoning, cannot
be billed; the gateway penalizes more) and at the request's own cap (``completion_cap``,
from :func:`tooti.protocol.usage.completion_limit`; the gateway would clamp them there).
Either cap marks the usage estimated.

Cost: events are looked at as bytes first (:func:`_plain`): only an event carrying
usage or a finish reason is parsed as JSON, and a run of events none of which is
dropped is forwarded as the one bytes object it arrived in.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tooti.protocol.numbers import is_int
from tooti.protocol.sse import EVENT_END, SSEDecoder
from tooti.protocol.usage import MAX_TOKENS

_decoder = msgspec.json.Decoder()
MAX_JSON_BYTES = 64 * 1024 * 1024


class UsageMeter:
    """Feeds on response bytes, returns the bytes to forward, remembers usage."""

    def __init__(self, sse: bool, strip_usage_chunk: bool = False,
                 completion_cap: int | None = None) -> None:
        self.sse = sse
        self.strip_usage_chunk = strip_usage_chunk
        self.completion_cap = completion_cap
        """The most completion tokens the request allows (None: no cap)."""
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.content_chunks = 0
        self.forwarded = 0
        """Bytes returned for forwarding so far."""
        self.done = False
        self._events = SSEDecoder()
        self._json: list[bytes] = []
        self._json_size = 0

    def feed(self, chunk: bytes) -> bytes:
        """Take backend bytes; return what may be forwarded now."""
        out = self._feed(chunk)
        self.forwarded += len(out)
        return out

    def _feed(self, chunk: bytes) -> bytes:
        if not self.sse:
            self._json_size += len(chunk)
            if self._json_size <= MAX_JSON_BYTES:
                self._json.append(chunk)
            return chunk
        complete = self._events.feed(chunk)
        if not complete:
            return b""
        if _plain(complete):
            # Fast path: no usage and no finish reason in any of these events.
            self.content_chunks += complete.count(EVENT_END)
            if b"[DONE]" in complete:
                self.done = True
                self.content_chunks -= 1
            return complete
        return self._inspect(complete)

    def _inspect(self, complete: bytes) -> bytes:
        """Whole events some of which carry usage or a finish reason: walk back from the
        end over just enough events to have seen every one of those (their number is
        known from byte counts) and inspect those; the events before them are plain
        content, counted in bulk. The events, less a dropped usage chunk."""
        parts = complete.split(EVENT_END)
        parts.pop()  # what follows the last event's end: nothing (whole events)
        reasons = (complete.count(b'"finish_reason"')
                   - complete.count(b'"finish_reason":null'))
        usages = complete.count(b'"usage"')
        first = len(parts)
        while first and (reasons > 0 or usages > 0):
            first -= 1
            part = parts[first]
            reasons -= part.count(b'"finish_reason"') - part.count(b'"finish_reason":null')
            usages -= part.count(b'"usage"')
        tail = [part + EVENT_END for part in parts[first:]]
        if first:  # plain content events (a [DONE] among them ends the stream)
            self.content_chunks += first
            head_size = len(complete) - sum(len(event) for event in tail)
            if b"[DONE]" in complete[:head_size]:
                self.done = True
                self.content_chunks -= 1
        kept = [event for event in tail if self._event(event)]
        if len(kept) == len(tail):
            return complete
        head = EVENT_END.join(parts[:first]) + EVENT_END if first else b""
        return head + b"".join(kept)

    def _event(self, event: bytes) -> bool:
        """Inspect one SSE event; return False to drop it."""
        if event.startswith(b"data:") and event.find(b"\n") == len(event) - 2:
            payload = event[5:].strip()  # one data line, the usual event: no parse needed
        else:
            parsed = self._events.parse(event)
            if parsed is None:
                return True
            payload = parsed.data.strip().encode()
        if payload == b"[DONE]":
            self.done = True
            return True
        if _plain(payload):  # a content chunk: nothing to read, no need to parse it
            self.content_chunks += 1
            return True
        try:
            obj = _decoder.decode(payload)
        except msgspec.DecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                    self.finish_reason = choice["finish_reason"]
            if choices:
                self.content_chunks += 1
            elif self.strip_usage_chunk and isinstance(usage, dict):
                return False
        return True

    def finish(self) -> bytes:
        """The backend is done: return any trailing bytes and settle usage."""
        if not self.sse:
            if self._json_size <= MAX_JSON_BYTES and self._json:
                try:
                    obj = _decoder.decode(b"".join(self._json))
                except msgspec.DecodeError:
                    return b""
                if isinstance(obj, dict):
                    usage = obj.get("usage")
                    if isinstance(usage, dict):
                        self.usage = usage
                    choices = obj.get("choices")
                    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                        reason = choices[0].get("finish_reason")
                        self.finish_reason = reason if isinstance(reason, str) else None
            return b""
        tail = self._events.flush()
        self.forwarded += len(tail)
        return tail

    def report(self) -> dict[str, Any]:
        """The END frame's usage fields for what was delivered."""
        out: dict[str, Any] = {"finish_reason": self.finish_reason}
        usage = self.usage
        if usage is not None:
            try:
                prompt = _int(usage.get("prompt_tokens"))
                completion = _int(usage.get("completion_tokens"))
                total = _int(usage.get("total_tokens"))
            except ValueError:
                usage = None
        if usage is not None:
            bound = self._completion_bound()
            capped = completion > bound
            if capped:
                completion = bound
            out["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion if capped or not total else total,
                **({"estimated": True} if capped else {}),
            }
        else:
            # Prompt tokens are unknown (the gateway estimates them from the body).
            out["usage"] = {
                "completion_tokens": min(self.content_chunks, self._completion_bound()),
                "estimated": True,
            }
        return out

    def _completion_bound(self) -> int:
        """The most completion tokens this answer can be billed: the bytes forwarded,
        and the request's cap."""
        if self.completion_cap is None:
            return self.forwarded
        return min(self.forwarded, self.completion_cap)


def _plain(data: bytes) -> bool:
    """True when ``data`` (events or one event's payload) holds no usage and no finish
    reason but ``null`` ones (written compactly, as servers do): nothing in it to read.
    Counting both forms keeps a ``"stop"`` among several events from being missed."""
    if b'"usage"' in data:
        return False
    reasons = data.count(b'"finish_reason"')
    return not reasons or reasons == data.count(b'"finish_reason":null')


def _int(value: Any) -> int:
    """A backend's usage figure: 0 when absent; ValueError unless it is an integer
    within ``0..MAX_TOKENS``."""
    if value is None:
        return 0
    if is_int(value) and 0 <= value <= MAX_TOKENS:
        return value
    raise ValueError(f"usage figure out of bounds: {value!r:.40}")
