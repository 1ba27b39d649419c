"""Running every active billing plugin around a request."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from tooti import clock
from tooti.accounts.money import price_micros
from tooti.backoff import Backoff
from tooti.billing.base import Billing, Outcome, RequestContext, Usage
from tooti.protocol.schemas import MAX_PRICE

log = logging.getLogger("tooti.billing")

SETTLE_TIMEOUT = 5.0
BYTES_PER_TOKEN = 4
"""Rough tokens-from-bytes estimate, used only for what a node did not report (or
reported out of bounds)."""
RESTART_DELAY = 1.0
"""Seconds before a billing plugin's ``run`` that raised is started again."""
MAX_RESTART_DELAY = 60.0


def usage_from(outcome: Outcome, body_bytes: int, started: float) -> Usage:
    """Turn what the proxy saw into a billable record, estimating what is missing.

    ``outcome.usage`` is what the node reported, already checked against the request's
    bounds (:mod:`tooti.protocol.usage`); without it the gateway estimates: prompt
    tokens from the body's size, completion tokens from the SSE events relayed (or the
    bytes of a non-streamed answer), at most one per ``BYTES_PER_TOKEN`` bytes relayed
    (a node sending empty events cannot raise it further) and within the request's
    cap. Without a cap, a node that broke the rules can still inflate its estimate by
    padding its answer: a token per ``BYTES_PER_TOKEN`` bytes the client received."""
    reported = outcome.usage
    prompt = reported.prompt_tokens if reported else None
    completion = reported.completion_tokens if reported else None
    estimated = reported is None or reported.estimated or prompt is None
    if prompt is None:
        prompt = body_bytes // BYTES_PER_TOKEN
    if completion is None:
        completion = 0 if reported else _estimate(outcome)
        cap = outcome.limits.completion if outcome.limits else None
        if cap is not None:
            completion = min(completion, cap)
    return Usage(
        node_id=outcome.node_id, model=outcome.model, prompt_tokens=prompt,
        completion_tokens=completion, status=outcome.status,
        price_input=advertised_price(outcome.price_input),
        price_output=advertised_price(outcome.price_output),
        estimated=estimated, latency_ms=(clock.now() - started) * 1000,
        owner=outcome.owner, ttft_ms=outcome.ttft_ms,
    )


def advertised_price(price: float) -> int:
    """A node's advertised price as integer micro-units per 1M tokens (converted once,
    here); anything not finite or above :data:`MAX_PRICE` counts as that cap, anything
    not positive as zero."""
    return price_micros(min(price, MAX_PRICE)) if price == price else 0


def _estimate(outcome: Outcome) -> int:
    """Completion tokens of an answer whose node reported none: the SSE events relayed
    (or the answer's bytes / ``BYTES_PER_TOKEN``), at most its bytes / ``BYTES_PER_TOKEN``."""
    by_bytes = outcome.relayed_bytes // BYTES_PER_TOKEN
    return min(outcome.delivered_events, by_bytes) if outcome.delivered_events else by_bytes


class BillingPipeline:
    """authorize → settle / refund across the configured billing plugins, in order."""

    def __init__(self, plugins: list[Billing]) -> None:
        self.plugins = plugins
        self.on_late: Callable[[str], None] | None = None
        """Called with the request id of each settle or refund cut off by
        ``SETTLE_TIMEOUT`` (the gateway counts them: a completed answer's last bytes
        then leave before its record is durable)."""

    async def run(self) -> None:
        """Run every plugin's background work until cancelled; one that raises is logged
        and started again (it never ends the gateway)."""
        async with trio.open_nursery() as nursery:
            for plugin in self.plugins:
                nursery.start_soon(_keep_running, plugin)

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
        # One scope, shielded from the caller's cancellation and bounded by its own
        # deadline (as CancelScope(shield) + move_on_after, for one scope's cost).
        with trio.CancelScope(shield=True,
                              deadline=trio.current_time() + SETTLE_TIMEOUT) as timer:
            for plugin in self.plugins:
                try:
                    if outcome.served or outcome.status == "error":
                        await plugin.settle(ctx, usage)
                    else:
                        await plugin.refund(ctx, outcome.status)
                except Exception:
                    log.exception("billing plugin %r failed for %s", plugin, ctx.request_id)
        if timer.cancelled_caught:
            log.error("billing for %s timed out after %gs", ctx.request_id, SETTLE_TIMEOUT)
            if self.on_late is not None:
                try:
                    self.on_late(ctx.request_id)
                except Exception:
                    log.exception("counting a late settle failed")

    async def close(self) -> None:
        """Close every plugin (flushing queued records)."""
        with trio.CancelScope(shield=True):
            for plugin in self.plugins:
                try:
                    await plugin.close()
                except Exception:
                    log.exception("closing billing plugin %r failed", plugin)


async def _keep_running(plugin: Billing) -> None:
    """``plugin.run()``, started again after each exception: ``RESTART_DELAY`` later,
    doubling while it keeps failing within a minute of its start (at most a minute)."""
    backoff = Backoff(RESTART_DELAY, MAX_RESTART_DELAY)
    while True:
        started = clock.now()
        try:
            await plugin.run()
            return
        except Exception:
            delay = backoff.next()
            log.exception("billing plugin %r failed in run(); restarting it in %gs",
                          plugin, delay)
        await trio.sleep(delay)
        if clock.now() - started > MAX_RESTART_DELAY:
            backoff.reset()
