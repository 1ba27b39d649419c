"""Findings 1 and 3: the usage a node reports in END is validated where it enters the
gateway. A count out of bounds penalizes the node and is never billed: the ledger gets
the gateway's own estimate, flagged ``estimated``, and the gateway keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tests.hostile.ledgered import (
    CHAT,
    LedgeredNetwork,
    next_event,
    start_ledgered,
    still_serves,
)
from tests.hostile.scripted_backend import MODEL, Answer, ScriptedBackend, chat_json, chat_sse
from tooti.node import metering
from tooti.protocol.usage import limits_for

HUGE = 10**20
PROMPT = {"model": MODEL, "max_tokens": 50,
          "messages": [{"role": "user", "content": "how many tokens is this?"}]}


def relay_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process's nodes report their backend's usage verbatim in END, as a
    modified (hostile) node would."""
    honest = metering.UsageMeter.report

    def verbatim(meter: metering.UsageMeter) -> dict[str, Any]:
        if meter.usage is None:
            return honest(meter)
        return {"finish_reason": meter.finish_reason, "usage": meter.usage}

    monkeypatch.setattr(metering.UsageMeter, "report", verbatim)


def answering(usage: dict[str, Any], stream: bool) -> ScriptedBackend:
    """A backend that answers every request with ``usage`` (streamed or not)."""
    def script(request: dict[str, Any]) -> Answer:
        if stream:
            return Answer(content_type="text/event-stream", chunks=chat_sse(usage))
        return Answer(chunks=[chat_json(usage)])
    return ScriptedBackend(script)


async def ask(net: LedgeredNetwork, stream: bool, body: dict[str, Any] | None = None
              ) -> tuple[str, bytes]:
    """POST one chat request; return its request id and the whole body the client got."""
    async with net.client() as http:
        response = await http.post(CHAT, json={**(body or PROMPT), "stream": stream})
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.endswith("data: [DONE]\n\n")
    return response.headers["x-request-id"], response.content


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_node_reporting_1e20_prompt_tokens_is_penalized_and_billed_an_estimate(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: bool,
) -> None:
    """Finding 1 end to end: 10**20 prompt tokens used to reach the ledger's
    ``executemany``, whose OverflowError ended the gateway's nursery (the process)."""
    relay_unchecked(monkeypatch)
    net = await start_ledgered(nursery, tmp_path)
    violations = net.gateway.registry.bus.subscribe()
    await net.add_node([answering({"prompt_tokens": HUGE, "completion_tokens": 2,
                                   "total_tokens": HUGE + 2}, stream)], node_id="liar")
    request_id, _ = await ask(net, stream)
    await next_event(violations, "peer.violation", about="liar")
    row = (await net.rows())[request_id]
    body_bytes = len(msgspec.json.encode({**PROMPT, "stream": stream}))
    assert row["estimated"] == 1
    assert 0 < row["prompt_tokens"] <= body_bytes
    assert 0 <= row["completion_tokens"] <= PROMPT["max_tokens"]
    await still_serves(net)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_honest_node_in_front_of_a_lying_backend_reports_no_absurd_count(
    nursery: trio.Nursery, tmp_path: Path, stream: bool,
) -> None:
    """The node bounds what its backend reports: 10**20 never leaves it, so the node
    is not penalized, and the request is billed as estimated."""
    net = await start_ledgered(nursery, tmp_path)
    await net.add_node([answering({"prompt_tokens": HUGE, "completion_tokens": 2,
                                   "total_tokens": HUGE + 2}, stream)], node_id="fooled")
    request_id, _ = await ask(net, stream)
    row = (await net.rows())[request_id]
    assert row["estimated"] == 1
    assert 0 < row["prompt_tokens"] < 1000
    assert "fooled" in net.gateway.registry.peers  # not penalized
    await still_serves(net)


BODY_BYTES = len(msgspec.json.encode({**PROMPT, "stream": False}))

LIES = {
    "negative-prompt": {"prompt_tokens": -10**6, "completion_tokens": 2},
    "negative-completion": {"prompt_tokens": 10, "completion_tokens": -10**6},
    "not-a-number": {"prompt_tokens": "12", "completion_tokens": 2},
    "float": {"prompt_tokens": 12.5, "completion_tokens": 2},
    "total-beyond-max": {"prompt_tokens": 10, "completion_tokens": 2,
                         "total_tokens": 2**33},
}
"""(Counts over a bound the client sets are clamped, not violations: see
``test_usage_client_bounds.py``.)"""


@pytest.mark.parametrize("usage", LIES.values(), ids=LIES.keys())
async def test_counts_out_of_bounds_are_a_violation_and_never_billed(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    usage: dict[str, Any],
) -> None:
    """Finding 3: negative, non-integer and impossible counts penalize the node; the
    ledger row holds the gateway's estimate (non-negative, within the request's bounds)."""
    relay_unchecked(monkeypatch)
    net = await start_ledgered(nursery, tmp_path)
    violations = net.gateway.registry.bus.subscribe()
    await net.add_node([answering(usage, stream=False)], node_id="liar")
    request_id, _ = await ask(net, stream=False)
    await next_event(violations, "peer.violation", about="liar")
    row = (await net.rows())[request_id]
    assert row["estimated"] == 1
    assert 0 < row["prompt_tokens"] <= BODY_BYTES
    assert 0 <= row["completion_tokens"] <= PROMPT["max_tokens"]
    assert row["cost"] >= 0


async def test_more_completion_tokens_than_bytes_relayed_is_a_violation(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token is at least one byte: a node cannot bill more completion tokens than the
    bytes of the answer the client got (here without any max_tokens to bound them)."""
    relay_unchecked(monkeypatch)
    net = await start_ledgered(nursery, tmp_path)
    violations = net.gateway.registry.bus.subscribe()
    await net.add_node([answering({"prompt_tokens": 10, "completion_tokens": 100_000},
                                  stream=True)], node_id="liar")
    body = {k: v for k, v in PROMPT.items() if k != "max_tokens"}
    request_id, answer = await ask(net, stream=True, body=body)
    assert len(answer) < 100_000
    await next_event(violations, "peer.violation", about="liar")
    row = (await net.rows())[request_id]
    assert row["estimated"] == 1 and row["completion_tokens"] <= len(answer)


async def test_plausible_counts_are_billed_as_reported(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """The bounds leave honest figures alone (a chat template's extra prompt tokens
    included): billed exactly, not estimated, node not penalized."""
    net = await start_ledgered(nursery, tmp_path)
    await net.add_node([answering({"prompt_tokens": BODY_BYTES + 200,
                                   "completion_tokens": 3,
                                   "total_tokens": BODY_BYTES + 203}, stream=False)],
                       node_id="honest-liar")
    request_id, _ = await ask(net, stream=False)
    row = (await net.rows())[request_id]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        BODY_BYTES + 200, 3, 0)
    assert "honest-liar" in net.gateway.registry.peers


def test_the_bounds_follow_the_request() -> None:
    """The larger of ``max_tokens`` and ``max_completion_tokens`` times the choices
    generated per prompt times the prompts batched; nothing for embeddings; prompt
    bytes plus the allowance, plus one media allowance per image, audio or file part."""
    def limits(endpoint: str, body: dict[str, Any]) -> tuple[int, int | None]:
        found = limits_for(endpoint, body, 100, allowance=10, per_media=1000)
        return found.prompt, found.completion

    assert limits("chat/completions", {"max_tokens": 5}) == (110, 5)
    assert limits("chat/completions", {"max_tokens": 9, "max_completion_tokens": 5,
                                       "n": 3}) == (110, 27)
    assert limits("completions", {"max_tokens": 5, "n": 2, "best_of": 4}) == (110, 20)
    assert limits("completions", {"max_tokens": 5, "prompt": ["a", "b", [1, 2]],
                                  "n": 2}) == (110, 30)
    assert limits("completions", {"max_tokens": 5, "prompt": [1, 2, 3]}) == (110, 5)
    assert limits("chat/completions", {"max_tokens": 5, "prompt": ["a", "b"]}) == (110, 5)
    assert limits("chat/completions", {}) == (110, None)
    assert limits("embeddings", {"input": "x"}) == (110, 0)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]},
                {"role": "user", "content": [image, audio]}, {"role": "system"}]
    assert limits("chat/completions", {"messages": messages}) == (3110, None)


def test_a_node_bills_no_more_completion_tokens_than_bytes_it_forwarded() -> None:
    """An upstream counting tokens the client never sees (hidden reasoning) is capped
    by the node itself, so an honest node never trips the gateway's bound."""
    body = chat_json({"prompt_tokens": 5, "completion_tokens": 10_000})
    meter = metering.UsageMeter(sse=False)
    meter.feed(body)
    meter.finish()
    assert meter.report()["usage"] == {"prompt_tokens": 5, "completion_tokens": len(body),
                                       "total_tokens": 5 + len(body), "estimated": True}
