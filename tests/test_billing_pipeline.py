"""The billing pipeline's finish: shielded from the caller's cancellation, bounded by
SETTLE_TIMEOUT (a stuck plugin is cut off and counted late), never raising."""

from __future__ import annotations

import trio
import trio.testing

from tooti.billing import pipeline as pipeline_module
from tooti.billing.base import Outcome, RequestContext, Usage
from tooti.billing.pipeline import BillingPipeline


class Plugin:
    def __init__(self, hang: float) -> None:
        self.hang = hang
        self.settled: list[str] = []

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        await trio.sleep(self.hang)
        self.settled.append(ctx.request_id)

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        raise RuntimeError("a refund that fails is logged, not raised")


def served() -> Outcome:
    outcome = Outcome()
    outcome.served, outcome.status = True, "ok"
    return outcome


async def test_finish_is_shielded_and_bounded(autojump_clock: trio.testing.MockClock) -> None:
    fast, stuck = Plugin(1.0), Plugin(1e9)
    late: list[str] = []
    pipeline = BillingPipeline([fast, stuck])  # type: ignore[list-item]
    pipeline.on_late = late.append
    ctx = RequestContext("r1", "", "m", "chat/completions", False)
    usage = Usage("n", "m", 1, 1, "ok")
    with trio.CancelScope() as outer:
        outer.cancel()  # the client left: the settle still runs, shielded
        started = trio.current_time()
        await pipeline.finish(ctx, served(), usage)
    assert fast.settled == ["r1"] and stuck.settled == []
    assert trio.current_time() - started == pipeline_module.SETTLE_TIMEOUT
    assert late == ["r1"]
    # a refund that raises is logged; finish returns (and is on time: nothing late)
    unserved = Outcome()
    unserved.status = "failed"
    await pipeline.finish(ctx, unserved, usage)
    assert late == ["r1"]
