"""The node's UsageMeter: whole SSE events forwarded, usage read, whatever the chunking."""

from __future__ import annotations

import json
from typing import Any

from tooti.node.metering import UsageMeter


def _event(obj: dict[str, Any], eol: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + eol + eol


def _content(text: str, eol: bytes = b"\n") -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": text},
                                "finish_reason": None}]}, eol)


def _run(meter: UsageMeter, chunks: list[bytes]) -> bytes:
    out = b"".join(meter.feed(chunk) for chunk in chunks)
    return out + meter.finish()


def test_a_split_inside_crlf_crlf_keeps_two_events() -> None:
    """A chunk boundary between the ``\\r`` and ``\\n`` of ``\\r\\n\\r\\n`` ends one event
    and begins the next: two content chunks counted, each forwarded as a whole event."""
    first, second = _content("a", b"\r\n"), _content("b", b"\r\n")
    stream = first + second
    cut = len(first) - 1  # between the last \r and \n of the first event
    meter = UsageMeter(sse=True)
    out = _run(meter, [stream[:cut], stream[cut:]])
    assert meter.content_chunks == 2
    assert out == _content("a") + _content("b")
    assert b"\n\r\n" not in out


def test_every_split_of_a_crlf_stream_meters_the_same() -> None:
    events = [_content(t, b"\r\n") for t in "abc"]
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    events += [_event({"choices": [], "usage": usage}, b"\r\n"), b"data: [DONE]\r\n\r\n"]
    stream = b"".join(events)
    whole = UsageMeter(sse=True)
    expected = _run(whole, [stream])
    assert expected == stream.replace(b"\r\n", b"\n")
    for cut in range(1, len(stream)):
        meter = UsageMeter(sse=True)
        assert _run(meter, [stream[:cut], stream[cut:]]) == expected, cut
        assert (meter.content_chunks, meter.usage, meter.done) == (3, usage, True), cut


def test_lone_cr_line_ends_end_events() -> None:
    """``\\r`` alone is a line end too (the SSE spec's three kinds)."""
    meter = UsageMeter(sse=True)
    out = _run(meter, [_content("a", b"\r"), _content("b", b"\r")[:-1], b"\r"])
    assert out == _content("a") + _content("b")
    assert meter.content_chunks == 2


def test_strips_the_usage_chunk_it_asked_for() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    stream = _content("a") + _event({"choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        meter = UsageMeter(sse=True, strip_usage_chunk=True)
        out = _run(meter, [stream[:cut], stream[cut:]])
        assert out == _content("a") + b"data: [DONE]\n\n", cut
        assert meter.usage == usage
        assert meter.forwarded == len(out)


def test_an_unfinished_last_event_is_forwarded_at_finish() -> None:
    meter = UsageMeter(sse=True)
    assert meter.feed(b"data: {}\n\ndata: par") == b"data: {}\n\n"
    assert meter.finish() == b"data: par"
    assert meter.forwarded == len(b"data: {}\n\ndata: par")


def test_finish_reason_among_merged_events_is_read() -> None:
    """Events arriving in one chunk, one with ``"finish_reason":null`` and one with
    ``"stop"``: the finish reason is read (a null one elsewhere does not hide it), and
    content events are counted without being parsed."""
    stop = _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    stream = _content("a") + _content("b") + stop + b"data: [DONE]\n\n"
    meter = UsageMeter(sse=True)
    assert _run(meter, [stream]) == stream
    assert (meter.finish_reason, meter.content_chunks, meter.done) == ("stop", 3, True)
    spaced = stream.replace(b'"finish_reason":"stop"', b'"finish_reason": "stop"')
    meter = UsageMeter(sse=True)
    assert _run(meter, [spaced]) == spaced
    assert meter.finish_reason == "stop"


def test_merged_events_meter_as_one_event_per_chunk() -> None:
    """Whatever runs of events arrive together (two choices finishing apart, the usage
    chunk the node asked for, [DONE]), the output and the figures are those of the same
    stream fed one event at a time."""
    usage = {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    events = [
        _content("a"),
        _event({"choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]}),
        _content("b"), _content("c"),
        _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        _event({"choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
    ]
    for strip in (False, True):
        one = UsageMeter(sse=True, strip_usage_chunk=strip)
        expected = _run(one, events)
        figures = (one.content_chunks, one.usage, one.finish_reason, one.done, one.forwarded)
        assert one.finish_reason == "stop" and one.usage == usage
        for start in range(len(events)):
            for end in range(start + 1, len(events) + 1):
                merged = [*events[:start], b"".join(events[start:end]), *events[end:]]
                meter = UsageMeter(sse=True, strip_usage_chunk=strip)
                assert _run(meter, merged) == expected, (strip, start, end)
                assert (meter.content_chunks, meter.usage, meter.finish_reason, meter.done,
                        meter.forwarded) == figures, (strip, start, end)
