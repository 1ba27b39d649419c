"""Finding 6 (the node's part): a header value from a node with CR/LF made h11 raise
``LocalProtocolError`` in the proxy, and the client got an empty 500 and the log a
traceback. Now a node's ``content-type`` is parsed and rebuilt before it reaches the
client, and one that does not parse is a violation: the node is penalized and the
request fails over, or gets a 502 OpenAI error when no other node is left."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.hostile.ledgered import CHAT, next_event, start_ledgered
from tests.hostile.scripted_backend import MODEL, Answer, ScriptedBackend, chat_json, chat_sse

BAD_TYPES = {
    "crlf": "application/json\r\nx-injected: 1",
    "lf": "text/event-stream\nset-cookie: a=b",
    "nul": "application/json\x00",
    "non-ascii": "application/jsön",
    "too-long": "application/json; charset=" + "x" * 300,
}
PROMPT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def answering(content_type: str, stream: bool) -> ScriptedBackend:
    """A backend whose every answer has ``content_type``."""
    def script(request: dict[str, Any]) -> Answer:
        usage = {"prompt_tokens": 5, "completion_tokens": 3}
        return Answer(content_type=content_type,
                      chunks=chat_sse(usage) if stream else [chat_json(usage)])
    return ScriptedBackend(script)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("bad", BAD_TYPES.values(), ids=BAD_TYPES.keys())
async def test_a_bad_content_type_from_the_only_node_is_a_502_error_object(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str,
    stream: bool,
) -> None:
    caplog.set_level(logging.INFO)
    net = await start_ledgered(nursery, tmp_path)
    violations = net.gateway.registry.bus.subscribe()
    await net.add_node([answering(bad, stream)], node_id="liar")
    async with net.client() as http:
        response = await http.post(CHAT, json={**PROMPT, "stream": stream})
    assert response.status_code == 502, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "bad_response_header"
    assert "x-injected" not in response.headers and "set-cookie" not in response.headers
    await next_event(violations, "peer.violation", about="liar")
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def test_a_bad_content_type_fails_over_to_an_honest_node(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    net = await start_ledgered(nursery, tmp_path)
    liar = answering(BAD_TYPES["crlf"], stream=False)
    await net.add_node([liar], node_id="liar")
    honest = answering("application/json", stream=False)
    liar_first = {**PROMPT, "provider": {"order": ["liar", "honest"]}}
    async with net.client() as http:
        await net.add_node([honest], node_id="honest")
        for _ in range(4):  # the liar is tried first, once: then it is cut off
            response = await http.post(CHAT, json=liar_first)
            assert response.status_code == 200, response.text
            assert response.headers["x-tooti-node"] == "honest"
    assert liar.opened == 1


KEPT = {
    "application/json": "application/json",
    "application/json; charset=UTF-8": "application/json; charset=utf-8",
    'text/event-stream;charset="utf-8"': "text/event-stream; charset=utf-8",
    "text/html; charset=utf-8": "text/plain; charset=utf-8",
    "image/svg+xml": "text/plain; charset=utf-8",
}


@pytest.mark.parametrize(("sent", "seen"), KEPT.items(), ids=KEPT.keys())
async def test_a_valid_content_type_is_passed_on_rebuilt_and_only_if_safe(
    nursery: trio.Nursery, tmp_path: Path, sent: str, seen: str,
) -> None:
    """Well-formed values pass (normalized); a media type a browser would render
    (an upstream's HTML error page, SVG) is sent as text/plain."""
    net = await start_ledgered(nursery, tmp_path)
    await net.add_node([answering(sent, stream=False)], node_id="node-a")
    async with net.client() as http:
        response = await http.post(CHAT, json=PROMPT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == seen
    assert "node-a" in net.gateway.registry.peers
