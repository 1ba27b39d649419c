"""Request bodies every front decodes the same way (:func:`tooti.fronts.base.decode_as`):
a lone surrogate escape is named as such, not as truncated input."""

from __future__ import annotations

import pytest

from tooti.errors import APIError
from tooti.fronts import anthropic_stream, responses_stream
from tooti.fronts.base import decode_body
from tooti.fronts.ollama_answers import ollama_front


@pytest.mark.parametrize("text", [b"\\ud800", b"x\\udfff", b"\\ud83dx", b"\\udc00\\ud800"])
def test_a_lone_surrogate_escape_is_named(text: bytes) -> None:
    raw = b'{"model": "m", "max_tokens": 5, "input": "' + text + (
        b'", "messages": [{"role": "user", "content": "' + text + b'"}]}')
    for front in (anthropic_stream.FRONT, responses_stream.FRONT,
                  ollama_front("chat", live={"m"})):
        with pytest.raises(APIError) as refused:
            front.parse(raw)
        assert refused.value.status == 400 and refused.value.code == "invalid_json"
        assert "surrogate" in refused.value.message and "truncated" not in refused.value.message


def test_a_surrogate_pair_and_truncated_input() -> None:
    assert decode_body(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
    with pytest.raises(APIError) as truncated:
        decode_body(b'{"a": "abc')
    assert "truncated" in truncated.value.message


def test_every_front_answers_from_choice_0_only() -> None:
    """A node's choice with another index is not the client's answer: each front reads
    the first choice with index 0 (``fronts.base.first_choice``), whole or streamed."""
    raw = (b'{"model": "m", "max_tokens": 5, "stream": true, "input": "hi", '
           b'"messages": [{"role": "user", "content": "hi"}]}')
    chunk = {"choices": [{"index": 7, "delta": {"content": "WRONG"}},
                         {"index": 0, "delta": {"content": "right"}}]}
    completion = {"choices": [
        {"index": 3, "message": {"role": "assistant", "content": "WRONG"},
         "finish_reason": "stop"},
        {"index": 0, "message": {"role": "assistant", "content": "right"},
         "finish_reason": "stop"}]}
    for front in (anthropic_stream.FRONT, responses_stream.FRONT,
                  ollama_front("chat", live={"m"})):
        request = front.parse(raw)
        stream = front.stream(request)
        streamed = stream.start() + stream.feed(chunk) + stream.finish()
        whole = front.answer(request, completion)
        for out in (streamed, whole):
            assert b"right" in out and b"WRONG" not in out, (front, out)
