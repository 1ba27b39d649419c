"""Forwarding one client request to a node over its tunnel: routing, queueing, failover.

The whole exchange runs in the client's own request task: when the client
disconnects, that task is cancelled (see ``cancel_on_disconnect``), and the
``except BaseException`` paths here send CANCEL down the tunnel so the node
stops its backend call.

For each model to try (the request's ``model``, then its ``models`` fallbacks)
the proxy picks a node — per-request preferences first, else the gateway's
routing policy — among live nodes of the request's node group (ungrouped nodes for
an ungrouped request) not in cooldown that have a free slot. When
every candidate is full the request waits for a slot, at most
``queue_timeout`` seconds and behind at most ``max_queue`` others, then gets
429 with ``Retry-After``: the queue is never unbounded.

Before the first token, any failure (tunnel lost, node busy, a retryable
backend status, the first-token timeout) excludes that node and the next one
is tried. A non-streaming answer is collected whole before the client sees
it, so it can fail over until its END; a streaming one is committed with its
first token, and a later failure becomes an in-band ``data: {"error": ...}``
event followed by ``data: [DONE]``. Every failure is counted toward the
node's cooldown (see :mod:`tooti.mesh.health`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from tooti.billing.base import Outcome
from tooti.errors import APIError, from_end_info
from tooti.gateway.byte_budget import BudgetExhausted, ByteBudget, Share
from tooti.gateway.response_headers import BadHeader, content_type, header_value
from tooti.gateway.validation import ParsedRequest, Preferences
from tooti.mesh.health import CooldownPolicy
from tooti.mesh.http import ClientGone, Headers, Send, send_bytes
from tooti.mesh.registry import Candidates, KeyName, Peer, Registry
from tooti.protocol.connection import FlowControlError, ResponseStarted
from tooti.protocol.usage import (
    ReportedUsage,
    UsageViolation,
    check_usage,
    limits_for,
    read_end,
)
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.tunnel import OutboundStream, TunnelLost

__all__ = ["DONE", "Outcome", "Proxy", "ProxySettings", "check_routable"]
"""``Outcome`` is re-exported for the gateway's older imports; its home is
:mod:`tooti.billing.base`."""

log = logging.getLogger("tooti.gateway")
_encoder = msgspec.json.Encoder()

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DONE = b"data: [DONE]\n\n"
GATEWAY_FIELDS = ("provider", "tooti", "models")


@dataclass
class ProxySettings:
    """The gateway settings the proxy reads."""

    max_attempts: int = 3
    first_byte_timeout: float = 60.0
    """Seconds from OPEN to the first token (streams) or the whole answer (non-stream)."""
    request_timeout: float = 600.0
    queue_timeout: float = 30.0
    max_queue: int = 1024
    cooldown: CooldownPolicy = field(default_factory=CooldownPolicy)
    max_response_bytes: int = 64 * 1024 * 1024
    """Largest non-streamed answer collected (502 above)."""
    max_buffered_bytes: int = 256 * 1024 * 1024
    """Bytes of non-streamed answers held at once, over every request."""
    buffer_wait: float = 10.0
    """Seconds an answer may wait for room under ``max_buffered_bytes`` (then 503)."""
    send_deadline: float = 60.0
    """Seconds the client has to take a whole collected answer (its bytes are held
    until then); a client reading more slowly is disconnected."""
    prompt_token_allowance: int = 4096
    media_token_allowance: int = 16_384
    """See :mod:`tooti.protocol.usage`."""


class _Retry(Exception):
    """This node failed before anything reached the client; try another.

    ``counts`` is False when the node was merely full (not a fault of the node), so
    the failure does not push it toward a cooldown.
    """

    def __init__(self, error: APIError, counts: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.counts = counts


class _NoRoute(Exception):
    """No node the request may use serves the model at all, busy or not."""


SORT_KEYS: dict[str, KeyName] = {
    "price": "price", "latency": "latency", "throughput": "throughput", "load": "load"}
"""Each ``sort`` preference → the index key it minimizes (see :data:`KeyName`)."""


NOT_THE_NODES_FAULT = frozenset({"relay_busy", "draining"})
"""END error codes of a refused stream that do not count toward a node's cooldown: a
relay at its stream limit, or a peer that had already sent GOAWAY."""


def check_routable(
    registry: Registry, models: Sequence[str], *,
    serving: Callable[[str], Sequence[Peer]] | None = None,
    known: Container[str] | None = None,
) -> None:
    """404 if no model in ``models`` was ever advertised here, 503 if none has a live node.

    ``serving`` (model → live peers) and ``known`` (models ever advertised) narrow both
    to the nodes one request may use (its node group), so a model only another group
    serves is 404 as if it did not exist.
    """
    serving = serving or registry.serving
    known = registry.known_models if known is None else known
    if any(serving(m) for m in models):
        return
    if any(m in known for m in models):
        raise APIError(503, f"no live node serves model '{models[0]}' right now",
                       code="no_capacity", type="service_unavailable")
    raise APIError(404, f"the model '{models[0]}' does not exist", param="model",
                   code="model_not_found")


def _sort_key(sort: str, model: str) -> Callable[[Peer], tuple[float, ...]]:
    def key(peer: Peer) -> tuple[float, ...]:
        info = peer.models.get(model)
        health = peer.health.get(model)
        load = peer.load(model)
        if sort == "price":
            return ((info.price_input + info.price_output) if info else 0.0, load)
        if sort == "latency":
            ttft = health.ttft_ms if health and health.ttft_ms is not None else 0.0
            return (ttft, load)
        if sort == "throughput":
            tps = health.tokens_per_s if health and health.tokens_per_s is not None else 1e12
            return (-tps, load)
        return (load,)

    return key


class Proxy:
    """Routes and forwards requests for one gateway."""

    def __init__(self, registry: Registry, policy: RoutingPolicy,
                 settings: ProxySettings) -> None:
        self.registry = registry
        self.policy = policy
        self.settings = settings
        self.queued = 0
        """Requests waiting for a free slot right now."""
        self.on_cooldown: Callable[[Peer, str], None] | None = None
        """Called when a node's model enters cooldown (the gateway schedules a probe)."""
        self.buffers = ByteBudget(settings.max_buffered_bytes)
        """Memory held by non-streamed answers being collected, over every request."""
        self.node_buffers: dict[str, ByteBudget] = {}
        """Node id → its part of :attr:`buffers` (see :meth:`node_budget`), while it
        holds any."""

    # ------------------------------------------------------------ choosing

    def choose(self, route: RouteRequest, prefs: Preferences, candidates: Sequence[Peer]
               ) -> Peer | None:
        """The node to try for ``route`` among ``candidates`` (all with a free slot).

        Given a :class:`Candidates` view (as :meth:`acquire` does), ``order`` looks the
        listed ids up directly and ``sort`` takes the minimum of a precomputed key, so
        neither makes a Python pass over every node; a plain sequence is scanned.
        """
        if not candidates:
            return None
        view = candidates if isinstance(candidates, Candidates) else None
        if prefs.order:
            if view is not None:
                for node_id in prefs.order:
                    listed = view.get(node_id)
                    if listed is not None:
                        return listed
            else:
                position = {node: i for i, node in enumerate(prefs.order)}
                in_order = [p for p in candidates if p.id in position]
                if in_order:
                    return min(in_order, key=lambda p: position[p.id])
        if prefs.sort is not None:
            if view is not None:
                return view.min_by(SORT_KEYS[prefs.sort])
            return min(candidates, key=_sort_key(prefs.sort, route.model))
        ranked = self.policy.rank(route, candidates)
        return ranked[0] if ranked else None

    def _free(self, model: str, prefs: Preferences, excluded: set[str]) -> Candidates:
        """The nodes with a free slot the request may use, as an indexed view: ``only``
        and ``order`` look their ids up, ``ignore`` and ``excluded`` skip a few ids."""
        view = self.registry.free_slots(model, prefs.group)
        if excluded or prefs.ignore:
            view = view.excluding(excluded | prefs.ignore if excluded else prefs.ignore)
        allowed = _allowed(prefs)
        if allowed is not None:
            view = view.restrict(allowed)
        if prefs.max_price_prompt is not None:
            view = view.at_most("price_in", prefs.max_price_prompt)
        if prefs.max_price_completion is not None:
            view = view.at_most("price_out", prefs.max_price_completion)
        return view

    def select(self, route: RouteRequest, prefs: Preferences, excluded: set[str]
               ) -> Peer | None:
        """The node a request would take now, without reserving it: chosen (see
        :meth:`choose`) among the nodes with a free slot its preferences allow, and
        able to take a stream now (a node whose tunnel is at its stream limit is passed
        over and the choice made again). None while there is no such node."""
        model = route.model
        view = self._free(model, prefs, excluded)
        passed: set[Peer] = set()
        while True:
            peer = self.choose(route, prefs, view)
            if peer is None or peer in passed:
                return None
            if self.registry.usable(peer, model):
                return peer
            passed.add(peer)
            view = view.without(peer)

    def _take(self, route: RouteRequest, prefs: Preferences, excluded: set[str]
              ) -> Peer | None:
        """Reserve a slot on the node :meth:`select` picks; None while every node the
        request may use is busy. Raises _NoRoute when it may use none at all."""
        peer = self.select(route, prefs, excluded)
        if peer is not None and self.registry.reserve(peer, route.model):
            return peer
        if not self._any_eligible(route.model, prefs, excluded):
            raise _NoRoute
        return None

    def _any_eligible(self, model: str, prefs: Preferences, excluded: set[str]) -> bool:
        """True if any candidate, free or busy, is one the request may use."""
        eligible = self.registry.eligible(model, prefs.group)
        if not eligible:
            return False
        allowed = _allowed(prefs)
        nodes: Collection[Peer]
        if allowed is not None:  # a few ids: look them up
            peers = self.registry.peers
            nodes = [peers[i] for i in allowed if i in peers and peers[i] in eligible]
        elif not excluded and _unfiltered(prefs):
            return True
        else:  # stops at the first match, which is usually among the first few
            nodes = eligible
        return any(p.id not in excluded and p.id not in prefs.ignore
                   and _within_price(p, model, prefs) for p in nodes)

    async def acquire(self, route: RouteRequest, prefs: Preferences, excluded: set[str]
                      ) -> Peer | None:
        """Reserve a slot on the best eligible node, queueing while all are full.

        The queue is FIFO per model (and node group): a slot that frees up goes to the
        oldest waiting request that may use it, and a new request takes a slot only if
        no older one can. Returns None when no node is eligible at all; raises
        APIError(429) when the queue is full or the wait exceeds ``queue_timeout``.
        """
        model, registry = route.model, self.registry
        deadline = trio.current_time() + self.settings.queue_timeout

        def take() -> Peer | None:
            return self._take(route, prefs, excluded)

        registry.dispatch(model, prefs.group)  # older requests first
        try:
            peer = take()
        except _NoRoute:
            return None
        if peer is not None:
            return peer
        if self.queued >= self.settings.max_queue:
            raise _busy(model, "the gateway's queue is full")
        waiter = registry.enqueue(model, prefs.group, take)
        self.queued += 1
        try:
            with trio.move_on_at(deadline):
                await registry.wait_for_slot(waiter)
            peer, waiter.peer = waiter.peer, None  # claimed: leave() will not pass it on
            if peer is not None:
                return peer
            if isinstance(waiter.error, _NoRoute):
                return None
            if waiter.error is not None:
                raise waiter.error
            raise _busy(model, f"every node serving '{model}' stayed busy for "
                        f"{self.settings.queue_timeout:g}s")
        finally:
            self.queued -= 1
            registry.leave(waiter)

    # ------------------------------------------------------------ forwarding

    async def forward(
        self, request: ParsedRequest, route: RouteRequest, raw_body: bytes, send: Send,
        headers: Headers, outcome: Outcome,
        before_last: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Serve ``request``: each model in turn, each node in turn, until one answers.

        ``before_last`` is awaited once a node's answer is complete and its usage
        checked, right before the last bytes go to the client (the gateway settles
        billing there, so a client never sees a complete answer whose record could
        still be lost)."""
        settings = self.settings
        outcome.limits = limits_for(request.endpoint, request.body, len(raw_body),
                                    settings.prompt_token_allowance,
                                    settings.media_token_allowance)
        last_error: APIError | None = None
        with trio.fail_after(self.settings.request_timeout):
            for index, model in enumerate(request.models):
                if not self.registry.serving(model, request.preferences.group):
                    last_error = last_error or APIError(
                        503, f"no live node serves model '{model}' right now",
                        code="no_capacity", type="service_unavailable")
                    continue
                body = raw_body if not request.rewrite else _rewrite(request.body, model)
                model_route = route if model == route.model else RouteRequest(
                    route.request_id, model, route.endpoint, route.headers, route.body,
                    route.key_id)
                try:
                    await self._forward_model(request, model_route, body, send, headers,
                                              outcome, before_last)
                    return
                except APIError as error:
                    if outcome.served or error.status not in RETRYABLE_STATUS:
                        raise
                    last_error = error
                    if index + 1 < len(request.models):
                        log.info("request %s: model %s unavailable (%s), falling back to %s",
                                 route.request_id, model, error.message,
                                 request.models[index + 1])
        raise last_error or APIError(503, "no live node serves the requested models",
                                     code="no_capacity", type="service_unavailable")

    async def _forward_model(
        self, request: ParsedRequest, route: RouteRequest, body: bytes, send: Send,
        headers: Headers, outcome: Outcome,
        before_last: Callable[[], Awaitable[None]] | None,
    ) -> None:
        prefs = request.preferences
        attempts = max(1, self.settings.max_attempts) if prefs.allow_fallbacks else 1
        excluded: set[str] = set()
        last_error: APIError | None = None
        for _ in range(attempts):
            peer = await self.acquire(route, prefs, excluded)
            if peer is None:
                break
            outcome.attempts += 1
            outcome.nodes_tried.append(peer.id)
            self.registry.bus.publish("request.routed", request_id=route.request_id,
                                      node=peer.id, model=route.model, attempt=outcome.attempts)
            try:
                await self._serve_from(peer, request, route, body, send, headers, outcome,
                                       before_last)
                return
            except _Retry as retry:
                excluded.add(peer.id)
                last_error = retry.error
                if retry.counts:
                    self.node_failed(peer, route.model, retry.error.message)
                log.info("request %s: node %s failed before the first token (%s)",
                         route.request_id, peer.id, retry.error.message)
            finally:
                self.registry.release(peer, route.model)
        if (last_error is None and not prefs.is_default
                and self.registry.eligible(route.model, prefs.group)):
            raise APIError(503, f"no node serving '{route.model}' matches the request's "
                           "provider preferences (order/only/ignore/max_price)",
                           code="no_matching_node", type="service_unavailable")
        raise last_error or APIError(503, f"no live node serves model '{route.model}' now",
                                     code="no_capacity", type="service_unavailable")

    def _checked_usage(self, peer: Peer, out: OutboundStream, outcome: Outcome
                       ) -> ReportedUsage | None:
        """The usage the node reported in END, clamped to the request's bounds (see
        :mod:`tooti.protocol.usage`); a report no request could explain penalizes the
        node and counts as none (billing estimates)."""
        assert outcome.limits is not None
        try:
            report = read_end(out.end_info)
            usage, clamped = check_usage(report.usage, outcome.limits,
                                         outcome.relayed_bytes)
        except UsageViolation as exc:
            outcome.violation = str(exc)
            self.registry.penalize(peer, f"usage out of bounds: {exc}")
            return None
        if clamped:
            log.info("node %s reported %s: billed clamped, as estimated", peer.id, clamped)
        return usage

    def node_budget(self, node_id: str) -> ByteBudget:
        """The bytes of answers one directly connected peer (a node, or a relay with all
        its nodes) may have held at once: a quarter of :attr:`buffers`, but at least one
        whole answer, so that slow or huge answers of one peer cannot take the memory
        every other peer's answers need."""
        budget = self.node_buffers.get(node_id)
        if budget is None:
            limit = max(self.settings.max_response_bytes, self.buffers.limit // 4)
            budget = self.node_buffers[node_id] = ByteBudget(limit)
        return budget

    def _release(self, node_id: str, shares: tuple[Share, Share]) -> None:
        for share in shares:
            share.release()
        budget = self.node_buffers.get(node_id)
        if budget is not None and budget.idle:
            del self.node_buffers[node_id]

    async def _collect(self, out: OutboundStream, peer: Peer, shares: tuple[Share, Share]
                       ) -> list[bytes]:
        """Read a whole non-streamed answer, each byte reserved first in the node's share
        of :meth:`node_budget` and then in its share of :attr:`buffers` (the caller
        releases both). Failures before END may fail over; no room within
        ``buffer_wait`` is 503."""
        limit = self.settings.max_response_bytes
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in out.body():
                size += len(chunk)
                if size > limit:
                    raise APIError(502, f"node {peer.id} answered more than {limit} bytes",
                                   code="response_too_large")
                for share in shares:
                    if not share.try_reserve(len(chunk)):
                        await self._wait_for_room(share, len(chunk))
                parts.append(chunk)
        except BaseException as exc:
            parts.clear()  # the exception's traceback would keep them alive while handled
            if isinstance(exc, TunnelLost):
                raise _Retry(APIError(502, f"node {peer.id} lost mid-response: {exc}",
                                      code="node_unavailable")) from None
            raise
        info = out.end_info or {}
        if "error" in info:
            raise _Retry(from_end_info(info))
        return parts

    async def _wait_for_room(self, share: Share, size: int) -> None:
        """Reserve ``size`` bytes in ``share``, waiting at most ``buffer_wait``; else 503
        (also when the answer was refused to let an older one finish)."""
        wait = self.settings.buffer_wait
        why = f"no room within {wait:g}s"
        with trio.move_on_after(wait):
            try:
                await share.reserve(size)
                return
            except BudgetExhausted as exc:
                why = str(exc)
        log.warning("request answer refused: gateway memory for answers full (%d of %d "
                    "bytes held): %s", self.buffers.used, self.buffers.limit, why)
        raise APIError(503, "the gateway is holding as many answers as its memory allows; "
                       "retry shortly", code="gateway_memory_busy",
                       type="service_unavailable", headers={"retry-after": "1"})

    def node_failed(self, peer: Peer, model: str, reason: str) -> None:
        """Count a failure against ``peer``'s ``model``; maybe start a cooldown."""
        peer.failures += 1
        record = peer.health_of(model)
        if record.record_failure(reason, self.settings.cooldown):
            log.warning("node %s model %s in cooldown for %.0fs after repeated failures (%s)",
                        peer.id, model, record.cooldown_until - time.monotonic(), reason)
            self.registry.refresh(peer)
            self.registry.bus.publish("peer.cooldown", peer_id=peer.id, model=model,
                                      **record.describe())
            if self.on_cooldown is not None:
                self.on_cooldown(peer, model)

    async def _serve_from(
        self, peer: Peer, request: ParsedRequest, route: RouteRequest, body: bytes,
        send: Send, headers: Headers, outcome: Outcome,
        before_last: Callable[[], Awaitable[None]] | None,
    ) -> None:
        model = route.model
        meta: dict[str, Any] = {
            "request_id": route.request_id, "endpoint": request.endpoint, "model": model,
            "stream": request.stream,
        }
        out: OutboundStream | None = None
        opened = time.monotonic()
        first: bytes | None = None
        head: ResponseStarted | None = None
        try:
            with trio.move_on_after(self.settings.first_byte_timeout) as timer:
                try:
                    out = await peer.open_stream(meta, body)
                    head = await out.head()
                    if head is not None and request.stream and head.status == 200:
                        first = await _first_token(out)
                except TunnelLost as exc:
                    raise _Retry(APIError(502, f"node {peer.id} unavailable: {exc}",
                                          code="node_unavailable")) from None
                except FlowControlError as exc:  # the tunnel is full or draining
                    raise _Retry(APIError(503, f"node {peer.id} cannot take a stream: {exc}",
                                          code="node_busy"), counts=False) from None
            if timer.cancelled_caught:
                raise _Retry(APIError(504, f"node {peer.id} sent no token within "
                                      f"{self.settings.first_byte_timeout:g}s",
                                      code="first_token_timeout"))
            assert out is not None
            info = peer.models.get(model)
            outcome.node_id, outcome.model = peer.id, model
            outcome.price_input = info.price_input if info else 0.0
            outcome.price_output = info.price_output if info else 0.0
            if head is None or (request.stream and head.status == 200 and first is None):
                end = out.end_info or {}
                error = from_end_info(end)
                retryable = end.get("retryable")
                if retryable is True or (retryable is None and error.status in RETRYABLE_STATUS):
                    raise _Retry(error, counts=error.code not in NOT_THE_NODES_FAULT)
                outcome.status = "error"
                raise error
            try:
                media_type = content_type(head.headers)
            except BadHeader as exc:
                self.registry.penalize(peer, f"bad response header: {exc}")
                raise _Retry(APIError(502, f"node {peer.id} sent an invalid response "
                                      "header", code="bad_response_header"),
                             counts=False) from None
            first_token_at = time.monotonic()
            outcome.ttft_ms = (first_token_at - opened) * 1000
            self.registry.bus.publish("request.first_token", request_id=route.request_id,
                                      node=peer.id, ttft_ms=round(outcome.ttft_ms, 3))
            node_headers = [*headers, (b"x-tooti-node", header_value(peer.id)),
                            (b"x-tooti-model", header_value(model))]

            async def settle() -> None:
                """The answer is complete: check the node's usage, then let the gateway
                settle before the last bytes leave."""
                outcome.usage = self._checked_usage(peer, out, outcome)
                if before_last is not None:
                    await before_last()

            if first is not None:
                outcome.served = True
                await _stream_body(out, first, head.status, media_type, send, node_headers,
                                   route.request_id, outcome, settle)
                if outcome.status == "failed_midstream":
                    self.node_failed(peer, model, "failed mid-stream")
            else:
                holder = peer.via or peer.id  # a relay's nodes share the relay's part
                shares = (self.node_budget(holder).share(), self.buffers.share())
                parts: list[bytes] = []
                try:
                    parts = await self._collect(out, peer, shares)
                    outcome.served = True
                    outcome.status = "ok" if head.status < 400 else "error"
                    outcome.relayed_bytes = sum(map(len, parts))
                    await settle()
                    with trio.move_on_after(self.settings.send_deadline) as sending:
                        await _send_parts(send, head.status, parts,
                                          outcome.relayed_bytes, node_headers, media_type)
                    if sending.cancelled_caught:  # its bytes were held for it long enough
                        log.info("request %s: the client took over %gs to read its answer;"
                                 " disconnected", route.request_id, self.settings.send_deadline)
                        raise ClientGone
                finally:  # the bytes go as the budget gets them back
                    parts.clear()
                    self._release(holder, shares)
            if outcome.status == "ok":
                tokens = outcome.usage.completion_tokens if outcome.usage else None
                # A non-streamed answer arrives whole: only its overall rate is known.
                decode_from = first_token_at if request.stream else opened
                peer.health_of(model).record_success(
                    (first_token_at - opened) if request.stream else None,
                    tokens or 0, time.monotonic() - decode_from,
                )
        except BaseException:
            if out is not None:
                await out.cancel("client gone" if out.end_info is None else "done")
            raise


TOKEN_FIELDS = ((b'"content":', b'"'), (b'"text":', b'"'), (b'"tool_calls":', b"["),
                (b'"finish_reason":', b'"'), (b'"usage":', b"{"))
"""A field, and how its value must start, for a chunk to count as carrying a token."""
MAX_HELD_BYTES = 65_536


def _carries_token(chunk: bytes) -> bool:
    """True if SSE bytes hold more than a role-only opening delta.

    Servers open a chat stream with ``{"delta": {"role": "assistant", "content": ""}}``;
    committing to the client on that would end failover before any real token. A token
    is non-empty ``content`` / ``text``, tool calls, a finish reason, usage, an error or
    ``[DONE]`` (whitespace after the colon allowed).
    """
    if b"[DONE]" in chunk or b'"error"' in chunk:
        return True
    for field_name, opener in TOKEN_FIELDS:
        at = chunk.find(field_name)
        while at >= 0:
            end = at + len(field_name)
            value = chunk[end : end + 16].lstrip()
            if value[:1] == opener and (opener != b'"' or value[1:2] != b'"'):
                return True
            at = chunk.find(field_name, end)
    return False


async def _first_token(out: OutboundStream) -> bytes | None:
    """Hold a stream's opening chunks until one carries a token (or 64 KiB are held);
    returns them joined, or None if the stream ended with an error (or nothing) first."""
    held: list[bytes] = []
    size = 0
    while (chunk := await out.next_chunk()) is not None:
        held.append(chunk)
        size += len(chunk)
        if size >= MAX_HELD_BYTES or _carries_token(chunk):
            return b"".join(held)
    if "error" in (out.end_info or {}):
        return None  # failed before any token: nothing was committed, so fail over
    return b"".join(held) if held else None


def _busy(model: str, why: str) -> APIError:
    return APIError(429, f"{why}; retry shortly", code="capacity_exhausted",
                    type="rate_limit_error", headers={"retry-after": "1"})


def _allowed(prefs: Preferences) -> frozenset[str] | None:
    """The node ids a request is limited to (``only``, and ``order`` without fallbacks),
    or None when it is not limited to a list."""
    allowed = prefs.only
    if not prefs.allow_fallbacks and prefs.order:
        allowed = frozenset(prefs.order) if allowed is None else allowed & set(prefs.order)
    return allowed


def _unfiltered(prefs: Preferences) -> bool:
    """True when the preferences leave every node of the request's group eligible."""
    return (_allowed(prefs) is None and not prefs.ignore and prefs.max_price_prompt is None
            and prefs.max_price_completion is None)


def _within_price(peer: Peer, model: str, prefs: Preferences) -> bool:
    info = peer.models.get(model)
    if info is None:
        return False
    if prefs.max_price_prompt is not None and info.price_input > prefs.max_price_prompt:
        return False
    return not (prefs.max_price_completion is not None
                and info.price_output > prefs.max_price_completion)


def _rewrite(body: dict[str, Any], model: str) -> bytes:
    """The body for the backend: gateway-only fields removed, ``model`` set."""
    clean = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    clean["model"] = model
    return _encoder.encode(clean)


DONE_MARKS = (b"data: [DONE]", b"data:[DONE]")
NEWLINES = (b"\n", b"\r")
DONE_WORD = b"[DONE]"
"""In every mark of :data:`DONE_MARKS`."""


def _done_line(data: bytes, line_start: bool) -> tuple[int, bool]:
    """Where in ``data`` the bytes that must wait for settle begin, and whether they
    hold a whole ``[DONE]`` mark: the start of the first line that is a mark, else of
    an unfinished last line that may yet become one (``len(data)``, False: neither).
    ``line_start`` says whether ``data`` begins a line."""
    if DONE_WORD in data:  # once a stream: most chunks are scanned once, here
        found = len(data)
        for mark in DONE_MARKS:
            at = data.find(mark)
            while 0 <= at < found:
                if (at == 0 and line_start) or data[at - 1 : at] in NEWLINES:
                    found = at
                    break
                at = data.find(mark, at + 1)
        if found < len(data):
            return found, True
    if data[-1:] in NEWLINES:  # most chunks end their last line: nothing to hold
        return len(data), False
    tail = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    if (tail or line_start) and tail < len(data) and any(
            mark.startswith(data[tail:]) for mark in DONE_MARKS):
        return tail, False
    return len(data), False


async def _stream_body(
    out: OutboundStream, first: bytes, status: int, media_type: bytes, send: Send,
    headers: Headers, request_id: str, outcome: Outcome,
    settle: Callable[[], Awaitable[None]],
) -> None:
    """Relay an SSE answer as it arrives; a late failure is reported in-band.

    The closing ``data: [DONE]`` line (and anything after it, up to ``MAX_HELD_BYTES``)
    is held until END has arrived and ``settle`` has run, and goes out as the last body
    part: a client that saw ``[DONE]`` saw an answer whose usage was already settled.
    A node may split the mark across DATA frames (the tunnel splits where credit runs
    out), so an unfinished last line that may yet become it waits for the next chunk.
    """
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", media_type),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *headers,
        ],
    })
    held: list[bytes] = []
    """From the [DONE] line on."""
    held_size = 0
    tail = b""
    """An unfinished last line that may yet become a [DONE] line (a few bytes)."""
    line_start = True
    """The bytes sent so far end a line."""

    async def relay(chunk: bytes) -> None:
        nonlocal held_size, tail, line_start
        outcome.delivered_events += chunk.count(b"\n\n")
        outcome.relayed_bytes += len(chunk)
        if held:
            held.append(chunk)
            held_size += len(chunk)
            if held_size <= MAX_HELD_BYTES:
                return
            chunk = b"".join(held)  # more after [DONE]: stop holding
            held.clear()
        else:
            data = tail + chunk if tail else chunk
            cut, done = _done_line(data, line_start or bool(tail))
            chunk, rest = data[:cut], data[cut:]
            tail = b"" if done else rest
            if done:
                held.append(rest)
                held_size = len(rest)
        if chunk:
            line_start = chunk[-1:] in NEWLINES
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    await relay(first)
    error: APIError | None = None
    try:
        async for chunk in out.body():
            await relay(chunk)
    except TunnelLost as exc:
        error = APIError(502, f"node lost mid-stream: {exc}", code="node_lost")
    else:
        info = out.end_info or {}
        if "error" in info:
            error = from_end_info(info)
    outcome.status = "ok" if error is None else "failed_midstream"
    await settle()
    held.insert(0, tail + b"\n\n" if tail and error is not None else tail)
    if error is not None:
        outcome.error = error.message
        log.warning("request %s: stream failed after first byte: %s", request_id, error.message)
        held.append(b"data: " + error.to_json() + b"\n\n" + DONE)
    await send({"type": "http.response.body", "body": b"".join(held), "more_body": False})


async def _send_parts(send: Send, status: int, parts: list[bytes], size: int,
                      headers: Headers, media_type: bytes) -> None:
    """Send a collected answer of ``size`` bytes with a content-length; several parts go
    out one by one (never joined into one more copy)."""
    if len(parts) <= 1:
        await send_bytes(send, status, parts[0] if parts else b"", headers, media_type)
        return
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", media_type),
                    (b"content-length", str(size).encode()), *headers],
    })
    last = len(parts) - 1
    for index, part in enumerate(parts):
        await send({"type": "http.response.body", "body": part, "more_body": index < last})
