"""A node's SSE events as the client and billing see them, however the node's bytes
are cut into DATA frames (the tunnel splits DATA wherever flow-control credit runs
out, so an honest node can split anywhere) and whichever line ends it writes.

The gateway counted events by the ``\\n\\n`` inside each DATA frame: an event whose
blank line was split across two frames was not counted, nor was any event of a
``\\r\\n`` stream, so a node that reported no usage was billed for too few tokens.
Now it reads the stream with the shared SSE decoder: each event is counted once and
goes out whole, with ``\\n`` line ends, and ``[DONE]`` still waits for settle."""

from __future__ import annotations

import trio

from tests.hostile.split_streams import relayed


def token(text: str, eol: bytes = b"\n") -> bytes:
    """One content event of a chat stream, with line end ``eol``."""
    return (b'data: {"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
            % text.encode() + eol + eol)


async def test_an_event_split_between_its_newlines_is_counted_once(
        nursery: trio.Nursery) -> None:
    one, two, three = token("a"), token("b"), token("c")
    chunks = [one + two[:-1], two[-1:] + three[:-1], three[-1:] + b"data: [DONE]\n\n"]
    spy, whole = await relayed(nursery, chunks)
    assert whole == b"".join(chunks)
    assert spy.usage is not None and spy.usage.estimated
    assert spy.usage.completion_tokens == 4  # three tokens and [DONE], each counted once
    assert spy.at_settle == one + two + three  # [DONE] waited for settle


async def test_a_crlf_stream_is_counted_and_its_done_held(nursery: trio.Nursery) -> None:
    events = [token(text, b"\r\n") for text in "abc"]
    chunks = [events[0] + events[1][:-1], events[1][-1:] + events[2],
              b"data: [DO", b"NE]\r\n\r", b"\n"]
    spy, whole = await relayed(nursery, chunks)
    normal = b"".join(token(text) for text in "abc")
    assert whole == normal + b"data: [DONE]\n\n"  # line ends written \n
    assert spy.usage is not None and spy.usage.completion_tokens == 4
    assert spy.at_settle == normal


async def test_a_done_split_in_its_blank_line_is_held(nursery: trio.Nursery) -> None:
    chunks = [token("a") + b"data: [DONE]\n", b"\n"]
    spy, whole = await relayed(nursery, chunks, {"usage": {
        "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    assert whole == b"".join(chunks)
    assert spy.at_settle == token("a")
