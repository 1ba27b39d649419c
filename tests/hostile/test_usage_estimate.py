"""After a violation the gateway bills its own estimate; the node must not control it.

The estimate of completion tokens was the SSE events relayed (or answer bytes / 4),
within the client's cap when it gave one. Events are counted by their ``\\n\\n``
separators, so a node could send empty events, two bytes each, and be billed a token
per two bytes. Now the estimate is at most a token per ``BYTES_PER_TOKEN`` bytes
relayed, and within the client's cap when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.hostile.ledgered import LedgeredNetwork, next_event, start_ledgered
from tests.hostile.scripted_backend import MODEL, Answer, ScriptedBackend, chat_sse
from tests.hostile.test_usage_bounds import relay_unchecked
from tooti.billing.pipeline import BYTES_PER_TOKEN

PADDING = b"\n\n" * 4000


def padded() -> ScriptedBackend:
    """A stream padded with 4,000 empty events, reporting a negative count (a
    violation, so the gateway estimates)."""
    def script(request: dict[str, Any]) -> Answer:
        events = chat_sse({"prompt_tokens": -1, "completion_tokens": 2})
        return Answer(content_type="text/event-stream",
                      chunks=[events[0], PADDING, *events[1:]])
    return ScriptedBackend(script)


async def ask(net: LedgeredNetwork, body: dict[str, Any]) -> tuple[str, int]:
    async with net.client() as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"], len(response.content)


@pytest.mark.parametrize("cap", [None, 7], ids=["no-cap", "max_tokens"])
async def test_the_estimate_after_a_violation_is_bounded_by_bytes_and_the_cap(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    cap: int | None,
) -> None:
    relay_unchecked(monkeypatch)
    net = await start_ledgered(nursery, tmp_path)
    violations = net.gateway.registry.bus.subscribe()
    await net.add_node([padded()], node_id="padder")
    body: dict[str, Any] = {"model": MODEL, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}
    if cap is not None:
        body["max_tokens"] = cap
    request_id, relayed = await ask(net, body)
    await next_event(violations, "peer.violation", about="padder")
    row = (await net.rows())[request_id]
    assert row["estimated"] == 1
    assert 0 < row["completion_tokens"] <= relayed // BYTES_PER_TOKEN
    if cap is not None:
        assert row["completion_tokens"] <= cap
