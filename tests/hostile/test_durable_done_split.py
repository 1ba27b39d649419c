"""Durable usage when a node splits ``data: [DONE]`` across DATA frames (the tunnel
splits DATA wherever flow-control credit runs out, so an honest node can too).

The gateway held back a chunk holding the whole marker until settle, but relayed
``…data: [DO`` and then ``NE]\\n\\n`` as they came: the client saw the complete
``[DONE]`` before the request was settled, and a ``kill -9`` then could lose the row
of an answer the client saw complete. Now bytes that may be the start of the marker
wait for the next chunk, and the final event goes out only after settle."""

from __future__ import annotations

import trio

from tests.hostile.split_streams import relayed

USAGE = {"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
SPLITS = {
    "mid-marker": [CONTENT + b"data: [DO", b"NE]\n\n"],
    "mid-prefix": [CONTENT + b"da", b"ta: [DONE]", b"\n\n"],
    "compact": [CONTENT + b"data:", b"[DONE]\n\n"],
}


async def test_a_split_done_reaches_the_client_only_after_settle(
        nursery: trio.Nursery) -> None:
    for name, chunks in SPLITS.items():
        spy, whole = await relayed(nursery, chunks, USAGE)
        at_settle = spy.at_settle
        assert at_settle is not None
        assert whole == b"".join(chunks), name
        assert b"[DONE]" not in at_settle, (name, at_settle)
        assert at_settle.startswith(CONTENT), name  # the content was not held back
