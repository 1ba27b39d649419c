"""The billing contract and the records it receives (and the :class:`Outcome` the
gateway fills in for billing to read).

For every request that passes validation the gateway calls, in order:

1. ``authorize(ctx)`` before routing — a plugin may refuse by raising
   :class:`tooti.errors.APIError` (e.g. 402 or 429), or reserve funds;
2. then exactly one of:
   * ``settle(ctx, usage)`` when a node took the request — with the tokens
     actually delivered, whether it finished, was cancelled by the client or
     failed mid-stream (``usage.status`` says which);
   * ``refund(ctx, reason)`` when no node served it (no capacity, every
     attempt failed before the first byte) — nothing was consumed.

``settle`` and ``refund`` must be idempotent by ``ctx.request_id``. For an
answer that completed, ``settle`` is awaited *before* the answer's last bytes
leave the gateway, so a plugin that returns only once its record is durable
guarantees that no client sees a complete answer whose record could be lost;
every other ``settle`` and every ``refund`` is awaited after the response. All
run under a shield with a timeout, so a client that leaves cannot skip them;
keep them quick (queue the write; wait for it only if it must be durable, and
then group the writes of concurrent requests). ``run`` is restarted if it
raises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from tooti.accounts.database import Database
from tooti.accounts.money import cost_micros, price_micros
from tooti.protocol.schemas import MAX_PRICE
from tooti.protocol.usage import MAX_TOKENS, ReportedUsage, UsageLimits

MAX_PRICE_MICROS = price_micros(MAX_PRICE)
"""The highest price a node may advertise, in micro-units per 1M tokens."""


@dataclass(frozen=True)
class BillingSetup:
    """What a billing factory receives."""

    data_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    database: Database | None = None
    """The gateway's accounts database (None: a plugin that needs one opens
    ``<data_dir>/tooti.sqlite3``); shared by the built-in plugins, closed by the gateway."""
    gateway_id: str = ""
    """This gateway's name among those sharing the database."""


class RequestContext(msgspec.Struct, frozen=True):
    """One client request as billing sees it (a frozen struct: a plugin reads it)."""

    request_id: str
    key_id: str
    model: str
    endpoint: str
    stream: bool
    started: float = msgspec.field(default_factory=time.time)
    """Wall-clock time the request arrived (seconds since the epoch)."""
    account_id: str = ""
    """The account the request's API key belongs to (``""``: an open gateway's
    anonymous caller, charged nothing)."""
    group: str = ""
    """The node group the request may use (``""`` = public nodes)."""
    max_cost: int = 0
    """The most the request can cost, in micro-units: its prompt bound plus its
    completion bound at the highest price among the nodes that may serve it. Billing
    reserves this before any node is used."""


class Usage(msgspec.Struct, frozen=True):
    """What one request consumed and delivered (a frozen struct: a plugin reads it)."""

    node_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    status: str
    """``ok``, ``cancelled`` (client left), ``failed_midstream``, or ``error`` (the node
    answered with an error)."""
    price_input: int = 0
    """The serving node's advertised price per 1M prompt tokens, in integer
    micro-units (:func:`tooti.accounts.money.price_micros` of the node's number)."""
    price_output: int = 0
    """The serving node's advertised price per 1M completion tokens, in micro-units."""
    estimated: bool = False
    """True when the node could not report exact token counts, or reported counts out
    of bounds (then the counts are the gateway's own estimate)."""
    latency_ms: float = 0.0
    owner: str = ""
    """The account the serving node earns for, as the gateway knew it when the node
    served (its admission's owner; ``""``: unknown, billing looks it up)."""
    ttft_ms: float | None = None
    """Milliseconds from opening the stream on the serving node to its first token
    (:attr:`Outcome.ttft_ms`; None when unknown)."""

    @property
    def cost(self) -> int:
        """Prompt and completion tokens at the node's own prices, in integer micro-units
        (rounded up to a whole one: :func:`tooti.accounts.money.cost_micros`). Never
        negative, whatever the fields hold: a count or price below zero counts as zero,
        and each is capped at what the gateway accepts from a node (:data:`MAX_TOKENS`,
        :data:`MAX_PRICE`), which it checks before billing."""
        return cost_micros(_bounded(self.prompt_tokens, MAX_TOKENS),
                           _bounded(self.completion_tokens, MAX_TOKENS),
                           _bounded(self.price_input, MAX_PRICE_MICROS),
                           _bounded(self.price_output, MAX_PRICE_MICROS))


class Outcome(msgspec.Struct):
    """What happened to one request, filled in by the gateway's proxy as it goes and
    read by billing at the end (:func:`tooti.billing.pipeline.usage_from` turns it
    into the :class:`Usage` plugins receive)."""

    served: bool = False
    """A node answered (so it did the work)."""
    node_id: str = ""
    model: str = ""
    owner: str = ""
    """The serving node's owner account (the peer's admission owner)."""
    price_input: float = 0.0
    """The serving node's advertised price per 1M prompt tokens (its own number; billing
    receives it in micro-units)."""
    price_output: float = 0.0
    usage: ReportedUsage | None = None
    """The END frame's usage, when the node reported it within bounds."""
    limits: UsageLimits | None = None
    """The most tokens the request can plausibly have used (caps the estimates too)."""
    relayed_bytes: int = 0
    """Bytes of the node's answer passed to the client."""
    violation: str = ""
    """Why the node's usage report was refused (it was penalized), if it was."""
    status: str = "pending"
    """``ok``, ``error``, ``failed_midstream``, ``cancelled``, ``failed`` or ``pending``."""
    delivered_events: int = 0
    """SSE events relayed to the client (an estimate of tokens when usage is missing)."""
    attempts: int = 0
    nodes_tried: list[str] = msgspec.field(default_factory=list)
    ttft_ms: float | None = None
    """Time from opening the stream on the serving node to its first token."""
    error: str = ""
    """The error the client saw, if any."""


def _bounded(value: int, high: int) -> int:
    if not value > 0:  # negative or zero
        return 0
    return int(value) if value < high else high


class Billing(Protocol):
    """A billing plugin (see the module docstring for the call order)."""

    async def run(self) -> None:
        """Background work (e.g. a batching writer) until cancelled; may just sleep forever."""
        ...

    async def authorize(self, ctx: RequestContext) -> None:
        """Reserve before routing, or raise APIError to refuse the request."""
        ...

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        """Record what was delivered (idempotent by request id)."""
        ...

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        """Release the reservation of a request no node served (idempotent)."""
        ...

    async def close(self) -> None:
        """Flush and release resources."""
        ...
