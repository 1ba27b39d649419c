"""Server-sent events, decoded incrementally from bytes in any chunking (no I/O).

One :class:`SSEDecoder` per stream. :meth:`SSEDecoder.feed` takes bytes as they arrive
and returns the events they complete as one run of bytes, ready to forward: whole
events only, each ending with its blank line, with every line end written ``\\n``.
The SSE spec allows three line ends (``\\r\\n``, ``\\n``, ``\\r``); the decoder reads
all three, also when a chunk ends between the ``\\r`` and the ``\\n`` of ``\\r\\n``
(that ``\\r`` already ended the line; the ``\\n`` that opens the next chunk belongs
to it). A forwarder on the hot path passes :meth:`~SSEDecoder.feed`'s bytes on as
they are, and never parses them unless it has to: an LF-only stream comes back as
the very bytes it was fed, cut only at event ends.

:func:`split_events` cuts such a run into single events, and
:meth:`SSEDecoder.parse` reads one into an :class:`Event` by the spec's field rules
(``event``, ``data`` lines joined with ``\\n``, ``id``, ``retry``; comments and
unknown fields ignored; an event without data is no event).
:meth:`SSEDecoder.events` does both for readers that want events, not bytes.
:func:`encode_event` writes one event (the other direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

EVENT_END = b"\n\n"
"""Ends every event :meth:`SSEDecoder.feed` returns (line ends are written ``\\n``)."""
_EOL = (0x0A, 0x0D)
"""The bytes ``\\n`` and ``\\r``."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event: its type, its data (lines joined with ``\\n``), the last
    event ID seen so far in the stream, and its reconnection time if it set one."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


def split_events(block: bytes) -> list[bytes]:
    """The single events of a run :meth:`SSEDecoder.feed` returned, each with its
    closing blank line (extra blank lines stay at the start of the event after them)."""
    parts = block.split(EVENT_END)
    return [part + EVENT_END for part in parts[:-1]]


class SSEDecoder:
    """One stream's decoder: the bytes of an unfinished event, whether the last byte
    fed was a ``\\r`` (so a ``\\n`` opening the next chunk completes that line end),
    and the stream's last event ID."""

    __slots__ = ("_after_cr", "_pending", "last_id")

    def __init__(self) -> None:
        self._pending = b""
        self._after_cr = False
        self.last_id = ""
        """The ``id`` field last set in this stream (kept across events, as the spec says)."""

    def feed(self, chunk: bytes) -> bytes:
        """Take the stream's next bytes; return the whole events they complete (see the
        module docstring), ``b""`` if none."""
        # (``0x0D in chunk`` looks for \r by memchr: several times faster than a bytes needle.)
        if not self._pending and not self._after_cr and chunk.endswith(b"\n\n") \
                and 0x0D not in chunk:
            return chunk  # the hot path: whole LF events, as nodes write them
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if 0x0D in chunk:
            # bytes.splitlines cuts at exactly the spec's three line ends, in one pass.
            last = chunk[-1]
            self._after_cr = last == 0x0D
            chunk = b"\n".join(chunk.splitlines()) + (b"\n" if last in _EOL else b"")
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(EVENT_END) + 2
        if cut == 1:  # not found
            self._pending = data
            return b""
        if cut == len(data):
            self._pending = b""
            return data
        self._pending = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        """The stream ended: return the bytes of its unfinished last event (line ends
        written ``\\n``) and forget them."""
        tail, self._pending = self._pending, b""
        self._after_cr = False
        return tail

    def events(self, chunk: bytes) -> list[Event]:
        """The events ``chunk`` completes, parsed."""
        block = self.feed(chunk)
        if not block:
            return []
        return [event for raw in split_events(block) if (event := self.parse(raw))]

    def close(self) -> Event | None:
        """The stream ended: the event left unfinished, parsed as if its blank line had
        come. (The spec drops it; a reader that prefers it to nothing takes it.)"""
        tail = self.flush()
        return self.parse(tail) if tail else None

    def parse(self, raw: bytes) -> Event | None:
        """Read one event's bytes (``\\n`` line ends, as :meth:`feed` returns them) by the
        spec's field rules; None when it holds no data. Updates :attr:`last_id`."""
        kind = ""
        data: list[str] = []
        retry: int | None = None
        for line in raw.decode("utf-8", "replace").split("\n"):
            if not line or line[0] == ":":
                continue
            name, colon, value = line.partition(":")
            if colon and value[:1] == " ":
                value = value[1:]
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
            elif name == "id":
                if "\0" not in value:
                    self.last_id = value
            elif name == "retry":
                if value.isascii() and value.isdigit():
                    retry = int(value)
        if not data:
            return None
        return Event("\n".join(data), kind or "message", self.last_id, retry)


_json = msgspec.json.Encoder()


def encode_event(kind: str, data: Any, event_id: int | str | None = None) -> bytes:
    """One server-sent event to send: ``event: <kind>``, ``id:`` when given, and
    ``data`` encoded as one line of JSON (JSON escapes every line end, so one ``data:``
    line always holds it). The one encoder of every SSE stream tooti writes."""
    head = b"event: " + kind.encode()
    if event_id is not None:
        head += b"\nid: " + str(event_id).encode()
    return head + b"\ndata: " + _json.encode(data) + b"\n\n"
