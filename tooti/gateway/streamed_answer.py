"""Relaying a streamed (SSE) answer from a node to the client.

Two holds keep failover and billing honest. Before the first token
(:func:`first_token`) the opening chunks are held, so a node that fails before
sending any real token is replaced by another without the client seeing it. At the
end (:func:`stream_answer`) the closing ``data: [DONE]`` line is held until the
node's END has arrived and the gateway has settled, so a client that saw ``[DONE]``
saw an answer whose usage was already recorded. A failure after the first token
becomes an in-band ``data: {"error": ...}`` event followed by ``data: [DONE]``.

Once the node's ``[DONE]`` has arrived and every event before it was sent, the answer
is marked :attr:`~tooti.mesh.http.ResponseSend.answered`: the client has every token
and the finish reason, and only the held closing part is left. A client that stops
reading there and closes (it need not wait for ``[DONE]``) was served in full, so its
disconnect no longer cancels the work: the node's END is still awaited and the request
settles ``ok`` with the node's real usage (issue 14, bug 6: it was recorded
``cancelled`` with estimated counts when the END came a moment after the ``[DONE]``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from tooti.billing.base import Outcome
from tooti.errors import APIError, from_end_info
from tooti.mesh.http import Headers, ResponseSend, Send
from tooti.protocol.sse import EVENT_END, SSEDecoder
from tooti.tunnel import OutboundStream, TunnelLost

log = logging.getLogger("tooti.gateway")

DONE = b"data: [DONE]\n\n"
"""The SSE event that ends a stream."""

TOKEN_FIELDS = ((b'"content":', b'"'), (b'"text":', b'"'), (b'"tool_calls":', b"["),
                (b'"finish_reason":', b'"'), (b'"usage":', b"{"))
"""A field, and how its value must start, for a chunk to count as carrying a token."""
MAX_HELD_BYTES = 65_536
"""Most bytes held before the first token, and after the closing [DONE] line."""
COALESCE_BYTES = 65_536
"""Most bytes of chunks already buffered that :func:`stream_answer` hands the server in
one body message. Nothing waits to fill it: a chunk goes out as soon as the stream's
task runs; only chunks that queued meanwhile (the process was busy) go out together,
each SSE event still whole and separate, in one write instead of one per token."""


def _carries_token(events: bytes) -> bool:
    """True if whole SSE events hold more than a role-only opening delta.

    Servers open a chat stream with ``{"delta": {"role": "assistant", "content": ""}}``;
    committing to the client on that would end failover before any real token. A token
    is non-empty ``content`` / ``text``, tool calls, a finish reason, usage, an error or
    ``[DONE]`` (whitespace after the colon allowed).
    """
    if b"[DONE]" in events or b'"error"' in events:
        return True
    for field_name, opener in TOKEN_FIELDS:
        at = events.find(field_name)
        while at >= 0:
            end = at + len(field_name)
            value = events[end : end + 16].lstrip()
            if value[:1] == opener and (opener != b'"' or value[1:2] != b'"'):
                return True
            at = events.find(field_name, end)
    return False


async def first_token(out: OutboundStream) -> bytes | None:
    """Hold a stream's opening chunks until a whole event among them carries a token (or
    64 KiB are held); returns the chunks joined as they came, or None if the stream
    ended with an error (or nothing) first. The events are cut from the chunks by an
    :class:`SSEDecoder`, so a field or event split across DATA frames is read whole."""
    held: list[bytes] = []
    size = 0
    decoder = SSEDecoder()
    while (chunk := await out.next_chunk()) is not None:
        held.append(chunk)
        size += len(chunk)
        if size >= MAX_HELD_BYTES or _carries_token(decoder.feed(chunk)):
            return b"".join(held)
    if "error" in (out.end_info or {}):
        return None  # failed before any token: nothing was committed, so fail over
    return b"".join(held) if held else None


DONE_MARKS = (b"data: [DONE]", b"data:[DONE]")
"""Lines that end a stream (a prefix: what follows on the line does not matter)."""
DONE_WORD = b"[DONE]"
"""In every mark of :data:`DONE_MARKS`."""


def _done_event(events: bytes) -> int:
    """Where in ``events`` (whole events, ``\\n`` line ends, as :meth:`SSEDecoder.feed`
    returns them) the event holding a :data:`DONE_MARKS` line starts; -1 if none does."""
    if DONE_WORD not in events:
        return -1
    found = -1
    for mark in DONE_MARKS:
        at = events.find(mark)
        while at >= 0 and (found < 0 or at < found):
            if at == 0 or events[at - 1] == 0x0A:  # a line starts here
                found = at
                break
            at = events.find(mark, at + 1)
    if found <= 0:
        return found
    start = events.rfind(EVENT_END, 0, found)
    return 0 if start < 0 else start + len(EVENT_END)


class DoneHold:
    """One stream's relay state between the node's chunks and the client: its
    :class:`SSEDecoder`, the events held from the ``[DONE]`` event on (and their
    size), and the events counted so far (no I/O: :func:`stream_answer` sends what
    :meth:`relay` returns)."""

    __slots__ = ("decoder", "delivered", "held", "held_size")

    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.held: list[bytes] = []
        self.held_size = 0
        self.delivered = 0
        """Whole events the node has sent (``[DONE]`` and held ones included)."""

    def relay(self, chunk: bytes) -> bytes:
        """Take the node's next chunk; return the whole events to send now (``b""`` for
        none): all it completes up to the ``[DONE]`` event, or, past ``MAX_HELD_BYTES``
        held after it, everything held."""
        complete = self.decoder.feed(chunk)
        if not complete:
            return complete
        self.delivered += complete.count(b"\n\n")  # EVENT_END, as a constant
        if not self.held and complete.find(b"[DONE]") < 0:  # DONE_WORD: the hot path
            return complete  # (find is faster than ``in`` for a bytes needle)
        if self.held:
            self.held.append(complete)
            self.held_size += len(complete)
            if self.held_size <= MAX_HELD_BYTES:
                return b""
            out = b"".join(self.held)  # more after [DONE]: stop holding
            self.held.clear()
            return out
        cut = _done_event(complete)
        if cut < 0:
            return complete
        rest = complete[cut:]
        self.held.append(rest)
        self.held_size = len(rest)
        return complete[:cut]

    def finish(self, failed: bool) -> bytes:
        """The stream ended (``failed``: with an error still to report): the held events
        then the unfinished last one, closed with its blank line when an error event is
        to follow it."""
        tail = self.decoder.flush()
        if tail and failed:
            tail += b"\n" if tail[-1] == 0x0A else EVENT_END
        self.held.append(tail)
        out = b"".join(self.held)
        self.held.clear()
        return out


async def stream_answer(
    out: OutboundStream, first: bytes, status: int, media_type: bytes, send: Send,
    headers: Headers, request_id: str, outcome: Outcome,
    settle: Callable[[], Awaitable[None]],
) -> None:
    """Relay an SSE answer as it arrives; a late failure is reported in-band.

    The closing ``data: [DONE]`` line (and anything after it, up to ``MAX_HELD_BYTES``)
    is held until END has arrived and ``settle`` has run, and goes out as the last body
    part: a client that saw ``[DONE]`` saw an answer whose usage was already settled.
    Events go out whole, cut by :class:`DoneHold`'s :class:`SSEDecoder` wherever the
    node's DATA frames split them (the tunnel splits where credit runs out), with every
    line end written ``\n``; an unfinished last event goes out after settle.
    """
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", media_type),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *headers,
        ],
    })
    hold = DoneHold()
    tracked = send if isinstance(send, ResponseSend) else None

    async def relay(chunk: bytes) -> None:
        outcome.relayed_bytes += len(chunk)
        body = hold.relay(chunk)
        outcome.delivered_events = hold.delivered
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        if hold.held and tracked is not None:
            tracked.answered = True  # all before [DONE] is sent: a client leaving was served

    await relay(first)
    error: APIError | None = None
    try:
        # The chunks buffered when the task runs go out as one body message (see
        # COALESCE_BYTES); one chunk per message while the gateway keeps up.
        while (chunk := await out.next_data(COALESCE_BYTES)) is not None:
            await relay(chunk)
    except TunnelLost as exc:
        error = APIError(502, f"node lost mid-stream: {exc}", code="node_lost")
    else:
        info = out.end_info or {}
        if "error" in info:
            error = from_end_info(info)
    outcome.status = "ok" if error is None else "failed_midstream"
    await settle()
    last = hold.finish(failed=error is not None)
    if error is not None:
        outcome.error = error.message
        log.warning("request %s: stream failed after first byte: %s", request_id, error.message)
        last += b"data: " + error.to_json() + b"\n\n" + DONE
    await send({"type": "http.response.body", "body": last, "more_body": False})
