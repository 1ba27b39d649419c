"""Relaying a streamed (SSE) answer from a node to the client.

Two holds keep failover and billing honest. Before the first token
(:func:`first_token`) the opening chunks are held, so a node that fails before
sending any real token is replaced by another without the client seeing it. At the
end (:func:`stream_answer`) the closing ``data: [DONE]`` line is held until the
node's END has arrived and the gateway has settled, so a client that saw ``[DONE]``
saw an answer whose usage was already recorded. A failure after the first token
becomes an in-band ``data: {"error": ...}`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from tooti.billing.base import Outcome
from tooti.errors import APIError, from_end_info
from tooti.mesh.http import Headers, Send
from tooti.tunnel import OutboundStream, TunnelLost

log = logging.getLogger("tooti.gateway")

DONE = b"data: [DONE]\n\n"
"""The SSE event that ends a stream."""

TOKEN_FIELDS = ((b'"content":', b'"'), (b'"text":', b'"'), (b'"tool_calls":', b"["),
                (b'"finish_reason":', b'"'), (b'"usage":', b"{"))
"""A field, and how its value must start, for a chunk to count as carrying a token."""
MAX_HELD_BYTES = 65_536
"""Most bytes held before the first token, and after the closing [DONE] line."""


def _carries_token(chunk: bytes) -> bool:
    """True if SSE bytes hold more than a role-only opening delta.

    Servers open a chat stream with ``{"delta": {"role": "assistant", "content": ""}}``;
    committing to the client on that would end failover before any real token. A token
    is non-empty ``content`` / ``text``, tool calls, a finish reason, usage, an error or
    ``[DONE]`` (whitespace after the colon allowed).
    """
    if b"[DONE]" in chunk or b'"error"' in chunk:
        return True
    for field_name, opener in TOKEN_FIELDS:
        at = chunk.find(field_name)
        while at >= 0:
            end = at + len(field_name)
            value = chunk[end : end + 16].lstrip()
            if value[:1] == opener and (opener != b'"' or value[1:2] != b'"'):
                return True
            at = chunk.find(field_name, end)
    return False


async def first_token(out: OutboundStream) -> bytes | None:
    """Hold a stream's opening chunks until one carries a token (or 64 KiB are held);
    returns them joined, or None if the stream ended with an error (or nothing) first."""
    held: list[bytes] = []
    size = 0
    while (chunk := await out.next_chunk()) is not None:
        held.append(chunk)
        size += len(chunk)
        if size >= MAX_HELD_BYTES or _carries_token(chunk):
            return b"".join(held)
    if "error" in (out.end_info or {}):
        return None  # failed before any token: nothing was committed, so fail over
    return b"".join(held) if held else None


DONE_MARKS = (b"data: [DONE]", b"data:[DONE]")
NEWLINES = (b"\n", b"\r")
DONE_WORD = b"[DONE]"
"""In every mark of :data:`DONE_MARKS`."""


def _done_line(data: bytes, line_start: bool) -> tuple[int, bool]:
    """Where in ``data`` the bytes that must wait for settle begin, and whether they
    hold a whole ``[DONE]`` mark: the start of the first line that is a mark, else of
    an unfinished last line that may yet become one (``len(data)``, False: neither).
    ``line_start`` says whether ``data`` begins a line."""
    if DONE_WORD in data:  # once a stream: most chunks are scanned once, here
        found = len(data)
        for mark in DONE_MARKS:
            at = data.find(mark)
            while 0 <= at < found:
                if (at == 0 and line_start) or data[at - 1 : at] in NEWLINES:
                    found = at
                    break
                at = data.find(mark, at + 1)
        if found < len(data):
            return found, True
    if data[-1:] in NEWLINES:  # most chunks end their last line: nothing to hold
        return len(data), False
    tail = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    if (tail or line_start) and tail < len(data) and any(
            mark.startswith(data[tail:]) for mark in DONE_MARKS):
        return tail, False
    return len(data), False


async def stream_answer(
    out: OutboundStream, first: bytes, status: int, media_type: bytes, send: Send,
    headers: Headers, request_id: str, outcome: Outcome,
    settle: Callable[[], Awaitable[None]],
) -> None:
    """Relay an SSE answer as it arrives; a late failure is reported in-band.

    The closing ``data: [DONE]`` line (and anything after it, up to ``MAX_HELD_BYTES``)
    is held until END has arrived and ``settle`` has run, and goes out as the last body
    part: a client that saw ``[DONE]`` saw an answer whose usage was already settled.
    A node may split the mark across DATA frames (the tunnel splits where credit runs
    out), so an unfinished last line that may yet become it waits for the next chunk.
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
    held: list[bytes] = []
    """From the [DONE] line on."""
    held_size = 0
    tail = b""
    """An unfinished last line that may yet become a [DONE] line (a few bytes)."""
    line_start = True
    """The bytes sent so far end a line."""

    async def relay(chunk: bytes) -> None:
        nonlocal held_size, tail, line_start
        outcome.delivered_events += chunk.count(b"\n\n")
        outcome.relayed_bytes += len(chunk)
        if held:
            held.append(chunk)
            held_size += len(chunk)
            if held_size <= MAX_HELD_BYTES:
                return
            chunk = b"".join(held)  # more after [DONE]: stop holding
            held.clear()
        else:
            data = tail + chunk if tail else chunk
            cut, done = _done_line(data, line_start or bool(tail))
            chunk, rest = data[:cut], data[cut:]
            tail = b"" if done else rest
            if done:
                held.append(rest)
                held_size = len(rest)
        if chunk:
            line_start = chunk[-1:] in NEWLINES
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    await relay(first)
    error: APIError | None = None
    try:
        async for chunk in out.body():
            await relay(chunk)
    except TunnelLost as exc:
        error = APIError(502, f"node lost mid-stream: {exc}", code="node_lost")
    else:
        info = out.end_info or {}
        if "error" in info:
            error = from_end_info(info)
    outcome.status = "ok" if error is None else "failed_midstream"
    await settle()
    held.insert(0, tail + b"\n\n" if tail and error is not None else tail)
    if error is not None:
        outcome.error = error.message
        log.warning("request %s: stream failed after first byte: %s", request_id, error.message)
        held.append(b"data: " + error.to_json() + b"\n\n" + DONE)
    await send({"type": "http.response.body", "body": b"".join(held), "more_body": False})
