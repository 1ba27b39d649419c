"""A client must never be able to get an honest node banned. The bounds that depend
on how the gateway reads the client's request (its ``max_tokens`` caps, the number of
prompts, the prompt-size allowance) clamp a report and bill it ``estimated`` without
penalizing the node; only reports impossible whatever the client sent (schema
failures, more completion tokens than bytes relayed) are violations.

Before: ``/v1/completions`` with four prompts and ``max_tokens: 4`` made an honest node
report 16 completion tokens against a cap of 4, and the gateway banned it for 60 s; a
request giving both ``max_tokens`` and ``max_completion_tokens`` was capped at the
smaller while vLLM honours ``max_completion_tokens``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from tests.conftest import simulated
from tests.hostile.ledgered import LedgeredNetwork, start_ledgered
from tests.hostile.scripted_backend import MODEL, Answer, ScriptedBackend, chat_json
from tests.hostile.test_usage_bounds import answering, relay_unchecked
from tooti.node import metering


def like_vllm() -> ScriptedBackend:
    """A backend generating ``max_completion_tokens`` words when it is given (else
    ``max_tokens``), as vLLM does, and reporting them."""
    def script(request: dict[str, Any]) -> Answer:
        cap = request.get("max_completion_tokens") or request.get("max_tokens") or 8
        text = "".join(f" w{i}" for i in range(cap))
        return Answer(chunks=[chat_json({"prompt_tokens": 3, "completion_tokens": cap,
                                         "total_tokens": 3 + cap}, content=text)])
    return ScriptedBackend(script)


async def post(net: LedgeredNetwork, path: str, body: dict[str, Any]) -> str:
    async with net.client() as http:
        response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    return str(response.headers["x-request-id"])


def unbanned(net: LedgeredNetwork, node_id: str) -> None:
    registry = net.gateway.registry
    assert registry.banned(node_id) is None
    assert node_id in registry.peers


async def test_batched_prompts_bill_every_answer_and_ban_nobody(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """Four prompts of ``max_tokens: 4`` are 16 completion tokens, within the bound."""
    net = await start_ledgered(nursery, tmp_path)
    await net.add_node([simulated()], node_id="honest")
    request_id = await post(net, "/v1/completions", {
        "model": "tooti-sim", "prompt": ["a", "b", "c", "d"], "max_tokens": 4})
    unbanned(net, "honest")
    row = (await net.rows())[request_id]
    assert (row["completion_tokens"], row["estimated"]) == (16, 0)


async def test_max_completion_tokens_bounds_when_both_caps_are_given(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    net = await start_ledgered(nursery, tmp_path)
    await net.add_node([like_vllm()], node_id="vllm")
    request_id = await post(net, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1, "max_completion_tokens": 20})
    unbanned(net, "vllm")
    row = (await net.rows())[request_id]
    assert (row["completion_tokens"], row["estimated"]) == (20, 0)


PROMPT = {"model": MODEL, "max_tokens": 5,
          "messages": [{"role": "user", "content": "how many tokens is this?"}]}
BODY_BYTES = len(msgspec.json.encode(PROMPT))

OVER_CLIENT_BOUNDS = {
    "beyond-max-tokens": ({"prompt_tokens": 10, "completion_tokens": 40}, (10, 5)),
    "prompt-far-beyond-body": ({"prompt_tokens": 1_000_000, "completion_tokens": 2},
                               (BODY_BYTES + 4096, 2)),
}


@pytest.mark.parametrize("usage,billed", OVER_CLIENT_BOUNDS.values(),
                         ids=OVER_CLIENT_BOUNDS.keys())
async def test_a_report_over_a_bound_the_client_sets_is_clamped_not_penalized(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    usage: dict[str, Any], billed: tuple[int, int],
) -> None:
    """Even a node passing its backend's figures on verbatim keeps its session: the
    counts are clamped to the bound and billed ``estimated``."""
    relay_unchecked(monkeypatch)
    net = await start_ledgered(nursery, tmp_path)
    await net.add_node([answering(usage, stream=False)], node_id="verbatim")
    request_id = await post(net, "/v1/chat/completions", PROMPT)
    unbanned(net, "verbatim")
    row = (await net.rows())[request_id]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        *billed, 1)


def test_an_honest_node_clamps_at_the_requests_cap_as_the_gateway_would() -> None:
    """The node applies the gateway's bound itself (the cap from ``limits_for``), so it
    reports what the gateway would bill, flagged estimated."""
    body = chat_json({"prompt_tokens": 3, "completion_tokens": 40},
                     content="".join(f" w{i}" for i in range(40)))
    meter = metering.UsageMeter(sse=False, completion_cap=5)
    meter.feed(body)
    meter.finish()
    assert meter.report()["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                       "total_tokens": 8, "estimated": True}
