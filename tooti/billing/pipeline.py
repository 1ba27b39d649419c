"""Running every active billing plugin around a request."""

from __future__ import annotations

import logging
import time

import trio

from tooti.billing.base import Billing, RequestContext, Usage
from tooti.gateway.proxy import Outcome

log = logging.getLogger("tooti.billing")

SETTLE_TIMEOUT = 5.0
BYTES_PER_TOKEN = 4
"""Rough prompt-token estimate from the body size, used only when a node reports nothing."""


def usage_from(outcome: Outcome, body_bytes: int, started: float) -> Usage:
    """Turn what the proxy saw into a billable record (estimating what is missing)."""
    usage = outcome.usage or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    estimated = bool(usage.get("estimated")) or not isinstance(prompt, int)
    if not isinstance(prompt, int):
        prompt = body_bytes // BYTES_PER_TOKEN
    if not isinstance(completion, int):
        completion = outcome.delivered_events
    return Usage(
        node_id=outcome.node_id, model=outcome.model, prompt_tokens=prompt,
        completion_tokens=completion, status=outcome.status,
        price_input=outcome.price_input, price_output=outcome.price_output,
        estimated=estimated, latency_ms=(time.monotonic() - started) * 1000,
    )


class BillingPipeline:
    """authorize → settle / refund across the configured billing plugins, in order."""

    def __init__(self, plugins: list[Billing]) -> None:
        self.plugins = plugins

    async def run(self) -> None:
        """Run every plugin's background work until cancelled."""
        async with trio.open_nursery() as nursery:
            for plugin in self.plugins:
                nursery.start_soon(plugin.run)

    async def authorize(self, ctx: RequestContext) -> None:
        """Ask every plugin; the first to raise APIError refuses the request."""
        done: list[Billing] = []
        try:
            for plugin in self.plugins:
                await plugin.authorize(ctx)
                done.append(plugin)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_TIMEOUT):
                for plugin in done:
                    await plugin.refund(ctx, "refused by another billing plugin")
            raise

    async def finish(self, ctx: RequestContext, outcome: Outcome, usage: Usage) -> None:
        """Settle a served request with ``usage`` (see :func:`usage_from`) or refund an
        unserved one; never raises, never skipped by cancellation (shielded, bounded)."""
        if not self.plugins:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(SETTLE_TIMEOUT) as timer:
            for plugin in self.plugins:
                try:
                    if outcome.served or outcome.status == "error":
                        await plugin.settle(ctx, usage)
                    else:
                        await plugin.refund(ctx, outcome.status)
                except Exception:
                    log.exception("billing plugin %r failed for %s", plugin, ctx.request_id)
        if timer.cancelled_caught:
            log.error("billing for %s timed out after %.0fs", ctx.request_id, SETTLE_TIMEOUT)

    async def close(self) -> None:
        """Close every plugin (flushing queued records)."""
        with trio.CancelScope(shield=True):
            for plugin in self.plugins:
                try:
                    await plugin.close()
                except Exception:
                    log.exception("closing billing plugin %r failed", plugin)
