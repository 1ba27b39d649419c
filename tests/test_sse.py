"""The SSE decoder: the same events and the same bytes whatever the line ends and however
the stream is cut into chunks (including between the ``\\r`` and ``\\n`` of ``\\r\\n``)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from tooti.protocol.sse import Event, SSEDecoder, split_events

EOLS = (b"\n", b"\r\n", b"\r")

_value = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"), max_size=12)


@dataclass(frozen=True)
class Spec:
    """One event to write: its fields, and a comment line or not."""

    data: list[str]
    event: str | None
    id: str | None
    retry: int | None
    comment: str | None

    def lines(self) -> list[str]:
        out = [] if self.comment is None else [":" + self.comment]
        if self.event is not None:
            out.append("event: " + self.event)
        out += ["data: " + line for line in self.data]
        if self.id is not None:
            out.append("id: " + self.id)
        if self.retry is not None:
            out.append(f"retry: {self.retry}")
        return [*out, ""]


specs = st.lists(st.builds(
    Spec, st.lists(_value, min_size=1, max_size=3), st.none() | _value.filter(bool),
    st.none() | _value, st.none() | st.integers(0, 10**6), st.none() | _value,
), min_size=1, max_size=4)


def expected(events: list[Spec]) -> list[Event]:
    """What the spec says a reader sees."""
    out, last_id = [], ""
    for spec in events:
        last_id = last_id if spec.id is None else spec.id
        out.append(Event("\n".join(spec.data), spec.event or "message", last_id, spec.retry))
    return out


def serialise(events: list[Spec], eols: list[bytes]) -> tuple[bytes, bytes]:
    """The stream written with the line ends ``eols`` (cycled), and with ``\\n`` alone."""
    lines = [line.encode() for spec in events for line in spec.lines()]
    raw, previous = b"", b""
    for i, line in enumerate(lines):
        eol = eols[i % len(eols)]
        if previous == b"\r" and not line and eol == b"\n":
            eol = b"\r"  # "\r" then "\n" is one line end, not two: write an empty line apart
        raw += line + eol
        previous = eol
    return raw, b"".join(line + b"\n" for line in lines)


def decode(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    """Feed ``chunks``; return the events read and the bytes returned for forwarding."""
    decoder, events, forwarded = SSEDecoder(), [], b""
    for chunk in chunks:
        block = decoder.feed(chunk)
        forwarded += block
        events += [e for raw in split_events(block) if (e := decoder.parse(raw))]
    assert decoder.flush() == b""
    return events, forwarded


def cut(stream: bytes, at: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(at)), len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(specs, st.lists(st.sampled_from(EOLS), min_size=1, max_size=3))
def test_every_single_split_decodes_the_same(events: list[Spec], eols: list[bytes]) -> None:
    stream, normal = serialise(events, eols)
    want = expected(events)
    for at in range(len(stream) + 1):
        assert decode([stream[:at], stream[at:]]) == (want, normal), at


@settings(max_examples=300, deadline=None)
@given(specs, st.sampled_from(EOLS), st.data())
def test_random_multi_splits_decode_the_same(events: list[Spec], eol: bytes,
                                            data: st.DataObject) -> None:
    stream, normal = serialise(events, [eol])
    at = data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream)))
    assert decode(cut(stream, at)) == (expected(events), normal)


@settings(max_examples=100, deadline=None)
@given(specs, st.sampled_from(EOLS))
def test_byte_by_byte(events: list[Spec], eol: bytes) -> None:
    stream, normal = serialise(events, [eol])
    assert decode([stream[i:i + 1] for i in range(len(stream))]) == (expected(events), normal)


def test_split_between_cr_and_lf_of_crlf_crlf() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == b"data: a\n\n"
    assert decoder.feed(b"\ndata: b\r\n\r\n") == b"data: b\n\n"


def test_an_lf_stream_is_returned_as_fed() -> None:
    chunk = b"data: 1\n\nevent: x\ndata: 2\n\n"
    assert SSEDecoder().feed(chunk) is chunk


def test_field_rules() -> None:
    decoder = SSEDecoder()
    events = decoder.events(b": comment\ndata\ndata:x\ndata:  y\nevent\nretry: 1a\nid: 7\n"
                            b"unknown: z\n\nid\x00: 8\nid: a\x00b\nretry: 30\n\n"
                            b"data: [DONE]\nretry:5\n\n")
    assert events == [Event("\nx\n y", "message", "7"), Event("[DONE]", "message", "7", 5)]
    assert decoder.last_id == "7"


def test_extra_blank_lines_dispatch_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.events(b"\n\n\ndata: a\n\n\n\ndata: b\n\n") == [Event("a"), Event("b")]


def test_an_unfinished_event_is_held_then_flushed_or_closed() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\r") == b"data: a\n\n"
    assert decoder.flush() == b"data: b\n"
    assert decoder.feed(b"\ndata: c") == b""  # flush forgot the \r: this \n is a blank line
    assert decoder.close() == Event("c")
    assert decoder.close() is None
