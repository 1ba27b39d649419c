"""The streamed answer's relay state (:class:`DoneHold`): whole events out, counted
once, the ``[DONE]`` event held until the end, whatever the line ends and however the
node's bytes are cut into DATA frames (including between ``\\r`` and ``\\n``)."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from tooti.gateway.streamed_answer import DoneHold, first_token

EOLS = (b"\n", b"\r\n", b"\r")

_data = st.binary(max_size=24).map(
    lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"")
).filter(lambda raw: b"[DONE]" not in raw)
_event = st.lists(_data, min_size=1, max_size=3).map(
    lambda lines: [b"data: " + line for line in lines])


def write(events: list[list[bytes]], eol: bytes) -> bytes:
    """``events`` (each a list of lines) as a stream with line end ``eol``."""
    return b"".join(eol.join(lines) + eol + eol for lines in events)


def relay(chunks: list[bytes], failed: bool = False) -> tuple[list[bytes], bytes, int]:
    """What :class:`DoneHold` sends for each chunk, what it sends at the end, and the
    events it counted."""
    hold = DoneHold()
    sent = [hold.relay(chunk) for chunk in chunks]
    return sent, hold.finish(failed), hold.delivered


def cut(stream: bytes, at: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(at)), len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(st.lists(_event, min_size=1, max_size=4), st.lists(_event, max_size=2),
       st.sampled_from(EOLS), st.sampled_from([b"data: [DONE]", b"data:[DONE]"]))
def test_every_split_sends_whole_events_and_holds_done(
        before: list[list[bytes]], after: list[list[bytes]], eol: bytes,
        mark: bytes) -> None:
    events = [*before, [mark], *after]
    stream = write(events, eol)
    normal = write(events, b"\n")
    done_at = len(write(before, b"\n"))
    for at in range(len(stream) + 1):
        sent, last, delivered = relay([stream[:at], stream[at:]])
        assert delivered == len(events), at
        assert b"".join(sent) == normal[:done_at], at
        assert all(part.endswith(b"\n\n") for part in sent if part), at
        assert last == normal[done_at:], at


@settings(max_examples=200, deadline=None)
@given(st.lists(_event, min_size=1, max_size=5), st.sampled_from(EOLS), st.data())
def test_random_splits_count_each_event_once(events: list[list[bytes]], eol: bytes,
                                             data: st.DataObject) -> None:
    stream = write(events, eol)
    at = data.draw(st.lists(st.integers(0, len(stream)), max_size=len(stream)))
    sent, last, delivered = relay(cut(stream, at))
    assert delivered == len(events)
    assert b"".join(sent) == write(events, b"\n")
    assert last == b""


def test_an_event_whose_blank_line_is_split_is_counted_once() -> None:
    sent, last, delivered = relay([b"data: a\n", b"\ndata: b\n\n"])
    assert (sent, last, delivered) == ([b"", b"data: a\n\ndata: b\n\n"], b"", 2)


def test_crlf_events_are_counted_and_done_held() -> None:
    sent, last, delivered = relay([b"data: a\r\n\r\ndata: b\r\n\r", b"\ndata: [DONE]\r\n\r\n"])
    assert sent == [b"data: a\n\ndata: b\n\n", b""]  # the last \r ended the blank line
    assert (last, delivered) == (b"data: [DONE]\n\n", 3)


def test_done_only_where_a_line_starts() -> None:
    sent, last, _ = relay([b'data: {"text": "data: [DONE]"}\n\n'])
    assert (sent, last) == ([b'data: {"text": "data: [DONE]"}\n\n'], b"")
    sent, last, _ = relay([b"event: end\ndata: [DONE]\n\n"])
    assert (sent, last) == ([b""], b"event: end\ndata: [DONE]\n\n")


def test_an_lf_chunk_of_whole_events_goes_out_as_it_came() -> None:
    chunk = b"data: 1\n\ndata: 2\n\n"
    assert DoneHold().relay(chunk) is chunk


def test_more_than_the_hold_after_done_goes_out() -> None:
    hold = DoneHold()
    assert hold.relay(b"data: [DONE]\n\n") == b""
    big = b"data: " + b"x" * 70_000 + b"\n\n"
    assert hold.relay(big) == b"data: [DONE]\n\n" + big
    assert hold.finish(False) == b""


def test_an_unfinished_last_event_goes_out_at_the_end() -> None:
    assert relay([b"data: a\n\ndata: b"]) == ([b"data: a\n\n"], b"data: b", 1)
    assert relay([b"data: a\n\ndata: b"], failed=True)[1] == b"data: b\n\n"
    assert relay([b"data: b\r"], failed=True)[1] == b"data: b\n\n"


class Chunks:
    """An OutboundStream's ``next_chunk`` and ``end_info`` over chosen chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.end_info: dict[str, object] | None = {}

    async def next_chunk(self) -> bytes | None:
        return self.chunks.pop(0) if self.chunks else None


async def test_first_token_reads_a_field_split_across_chunks() -> None:
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    token = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    stream = Chunks([role + token[:30], token[30:], b"data: later\n\n"])
    assert await first_token(stream) == role + token  # type: ignore[arg-type]
    assert stream.chunks == [b"data: later\n\n"]
