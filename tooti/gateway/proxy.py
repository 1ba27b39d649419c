"""Forwarding one client request to a node over its tunnel: attempts and failover.

The whole exchange runs in the client's own request task: when the client
disconnects, that task is cancelled (see ``cancel_on_disconnect``), and the
``except BaseException`` paths here send CANCEL down the tunnel so the node
stops its backend call.

For each model to try (the request's ``model``, then its ``models`` fallbacks)
the proxy has a node picked and its slot reserved (:mod:`tooti.gateway.node_picker`,
which also queues the request while every candidate is full).

A request of a private group (its API key's) is routed to that group's nodes first,
then, if the group allows and none of its nodes could take it (none serves the model,
all failed before the first token, or its queue gave up), to the public nodes: the
``groups`` of :meth:`Proxy.forward`, in order.

Before the first token, any failure (tunnel lost, node busy, a retryable
backend status, the first-token timeout) excludes that node and the next one
is tried. A non-streaming answer is collected whole before the client sees
it (:mod:`tooti.gateway.collected_answer`), so it can fail over until its END; a
streaming one is committed with its first token
(:mod:`tooti.gateway.streamed_answer`), and a later failure becomes an in-band
``data: {"error": ...}`` event followed by ``data: [DONE]``. Every failure is
counted toward the node's cooldown (see :mod:`tooti.mesh.health`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import trio

from tooti import clock
from tooti.billing.base import Outcome
from tooti.errors import APIError, from_end_info
from tooti.gateway.aliases import Tier
from tooti.gateway.byte_budget import ByteBudget
from tooti.gateway.collected_answer import AnswerBuffers, AnswerLost
from tooti.gateway.node_picker import NodePicker, model_loading
from tooti.gateway.proxy_settings import ProxySettings
from tooti.gateway.relayed_answer import AsIs
from tooti.gateway.relayed_answer import media_type as relayed_media_type
from tooti.gateway.response_headers import BadHeader, content_type, header_value
from tooti.gateway.streamed_answer import first_token, stream_answer
from tooti.gateway.validation import ParsedRequest
from tooti.mesh.http import Headers, Send
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.protocol.connection import FlowControlError, ResponseStarted
from tooti.protocol.usage import ReportedUsage, UsageViolation, check_usage, limits_for, read_end
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.tunnel import OutboundStream, TunnelLost

log = logging.getLogger("tooti.gateway")
_encoder = msgspec.json.Encoder()

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
GATEWAY_FIELDS = ("provider", "tooti", "models")

NOT_THE_NODES_FAULT = frozenset({"relay_busy", "draining"})
"""END error codes of a refused stream that do not count toward a node's cooldown: a
relay at its stream limit, or a peer that had already sent GOAWAY."""


def endpoint_not_served(model: str, endpoint: str) -> APIError:
    """404 for a model live nodes serve, but none on ``endpoint`` (``/v1/{endpoint}``)."""
    return APIError(404, f"no live node serves model '{model}' on /v1/{endpoint}",
                    code="endpoint_not_served", param="model")


class _Retry(Exception):
    """This node failed before anything reached the client; try another.

    ``counts`` is False when the node was merely full (not a fault of the node), so
    the failure does not push it toward a cooldown.
    """

    def __init__(self, error: APIError, counts: bool = True) -> None:
        super().__init__(error.message)
        self.error = error
        self.counts = counts


class Proxy:
    """Forwards requests for one gateway: the attempts over models and nodes, and what
    each node's failures and usage reports count for."""

    def __init__(self, registry: Registry, policy: RoutingPolicy,
                 settings: ProxySettings) -> None:
        self.registry = registry
        self.settings = settings
        self.picker = NodePicker(registry, policy, settings)
        """Picks the node of each attempt and queues the request for it."""
        self.answers = AnswerBuffers(settings)
        """The memory non-streamed answers are collected in."""
        self.on_cooldown: Callable[[Peer, str], None] | None = None
        """Called when a node's model enters cooldown (the gateway schedules a probe)."""

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot right now."""
        return self.picker.queued

    @property
    def buffers(self) -> ByteBudget:
        """Memory held by non-streamed answers being collected, over every request."""
        return self.answers.buffers

    @property
    def node_buffers(self) -> dict[str, ByteBudget]:
        """Node id → its part of :attr:`buffers`, while it holds any."""
        return self.answers.node_buffers

    async def forward(
        self, request: ParsedRequest, route: RouteRequest, raw_body: bytes, send: Send,
        headers: Headers, outcome: Outcome,
        before_last: Callable[[], Awaitable[None]] | None = None,
        groups: Sequence[str] = (),
        tiers: Sequence[Tier] = (),
        as_is: AsIs | None = None,
    ) -> None:
        """Serve ``request``: each model in turn, each node group in turn (``groups``;
        empty = the request's own), each node in turn, until one answers. ``tiers``
        (an aliased request's plan, :meth:`tooti.gateway.aliases.Aliases.plan`) replaces
        the models: each tier's ids are tried together, and a tier that may not queue
        is passed over at once when none of its nodes can take the request.

        ``before_last`` is awaited once a node's answer is complete and its usage
        checked, right before the last bytes go to the client (the gateway settles
        billing there, so a client never sees a complete answer whose record could
        still be lost).

        ``as_is``: a pass-through request (:mod:`tooti.gateway.relayed_answer`): its
        body may be an upload streamed to the node, and its answer is relayed as the
        node sends it instead of being collected or read as chat's SSE."""
        settings = self.settings
        size = len(raw_body) if as_is is None else as_is.body_bytes(raw_body)
        outcome.limits = limits_for(request.endpoint, request.body, size,
                                    settings.prompt_token_allowance,
                                    settings.media_token_allowance)
        own = request.preferences.group
        groups = groups or (own,)
        last_error: APIError | None = None
        plan = tiers or [((model,), True) for model in request.models]
        with trio.fail_after(self.settings.request_timeout):
            for index, (models, queue) in enumerate(plan):
                model = models[0]
                routes = [g for g in groups if any(
                    self.registry.serving_endpoint(m, request.endpoint, g) for m in models)]
                if not routes:
                    last_error = last_error or (
                        model_loading(model)
                        if any(self.registry.loading(m, g) for m in models for g in groups)
                        else endpoint_not_served(model, request.endpoint)
                        if any(self.registry.serving(m, g) for m in models for g in groups)
                        else APIError(503, f"no live node serves model '{model}' right now",
                                      code="no_capacity", type="service_unavailable"))
                    continue
                try:
                    for position, group in enumerate(routes):
                        attempt = request if group == own else dataclasses.replace(
                            request, preferences=dataclasses.replace(
                                request.preferences, group=group))
                        try:
                            await self._forward_model(attempt, route, models, queue,
                                                      raw_body, send, headers, outcome,
                                                      before_last, as_is)
                            return
                        except APIError as error:
                            if (outcome.served or error.status not in RETRYABLE_STATUS
                                    or position + 1 == len(routes)
                                    or (as_is is not None and not as_is.may_fail_over())):
                                raise
                            log.info("request %s: group %r could not serve %s (%s); trying "
                                     "the public nodes", route.request_id, group, model,
                                     error.message)
                except APIError as error:
                    if (outcome.served or error.status not in RETRYABLE_STATUS
                            or (as_is is not None and not as_is.may_fail_over())):
                        raise
                    last_error = error
                    if index + 1 < len(plan):
                        log.info("request %s: model %s unavailable (%s), falling back to %s",
                                 route.request_id, model, error.message,
                                 plan[index + 1][0][0])
        raise last_error or APIError(503, "no live node serves the requested models",
                                     code="no_capacity", type="service_unavailable")

    async def _forward_model(
        self, request: ParsedRequest, route: RouteRequest, models: Sequence[str],
        queue: bool, raw_body: bytes, send: Send, headers: Headers, outcome: Outcome,
        before_last: Callable[[], Awaitable[None]] | None, as_is: AsIs | None = None,
    ) -> None:
        """Attempts on the nodes of ``models`` (one model, or an alias's tier), each
        picked by :meth:`NodePicker.pick_tier` (queueing only with ``queue``)."""
        prefs = request.preferences
        attempts = max(1, self.settings.max_attempts) if prefs.allow_fallbacks else 1
        # Nodes serving the model but not on this endpoint are never picked (for a tier
        # of several ids, pick_tier passes them over per id).
        excluded: set[str] = (set(self.registry.not_serving(models[0], prefs.group,
                                                            route.endpoint))
                              if len(models) == 1 else set())
        last_error: APIError | None = None
        bodies: dict[str, bytes] = {}
        for _ in range(attempts):
            picked = await self.picker.pick_tier(route, models, prefs, excluded, queue=queue)
            if picked is None:
                break
            peer, model = picked
            body = bodies.get(model)
            if body is None:
                body = bodies[model] = (raw_body if not request.rewrite
                                        else _rewrite(request.body, model))
            model_route = route if model == route.model else RouteRequest(
                route.request_id, model, route.endpoint, route.headers, route.body,
                route.key_id)
            outcome.attempts += 1
            outcome.nodes_tried.append(peer.id)
            self.registry.bus.publish("request.routed", request_id=route.request_id,
                                      node=peer.id, model=model, attempt=outcome.attempts)
            try:
                await self._serve_from(peer, request, model_route, body, send, headers,
                                       outcome, before_last, as_is)
                return
            except _Retry as retry:
                excluded.add(peer.id)
                last_error = retry.error
                if retry.counts:
                    self.node_failed(peer, model, retry.error.message)
                if as_is is not None and not as_is.may_fail_over():
                    raise retry.error from None  # the upload went on past its read-ahead
                log.info("request %s: node %s failed before the first token (%s)",
                         route.request_id, peer.id, retry.error.message)
            finally:
                self.registry.release(peer, model)
        model = models[0]
        if (last_error is None and not prefs.is_default
                and any(self.registry.eligible(m, prefs.group) for m in models)):
            raise APIError(503, f"no node serving '{model}' matches the request's "
                           "provider preferences (order/only/ignore/max_price)",
                           code="no_matching_node", type="service_unavailable")
        if last_error is None and any(self.registry.loading(m, prefs.group) for m in models):
            raise model_loading(model)  # its nodes went back to loading meanwhile
        raise last_error or APIError(503, f"no live node serves model '{model}' now",
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

    def node_failed(self, peer: Peer, model: str, reason: str) -> None:
        """Count a failure against ``peer``'s ``model``; maybe start a cooldown."""
        peer.failures += 1
        record = peer.health_of(model)
        if record.record_failure(reason, self.settings.cooldown):
            log.warning("node %s model %s in cooldown for %.0fs after repeated failures (%s)",
                        peer.id, model, record.cooldown_until - clock.now(), reason)
            self.registry.refresh(peer)
            self.registry.bus.publish("peer.cooldown", peer_id=peer.id, model=model,
                                      **record.describe())
            if self.on_cooldown is not None:
                self.on_cooldown(peer, model)

    async def _serve_from(
        self, peer: Peer, request: ParsedRequest, route: RouteRequest, body: bytes,
        send: Send, headers: Headers, outcome: Outcome,
        before_last: Callable[[], Awaitable[None]] | None, as_is: AsIs | None = None,
    ) -> None:
        """One attempt on ``peer``: open the stream, wait for its head (and, for a
        stream, its first token) within ``first_byte_timeout``, then pass the answer to
        the client. Raises _Retry while nothing reached the client."""
        model = route.model
        meta: dict[str, Any] = {
            "request_id": route.request_id, "endpoint": request.endpoint, "model": model,
            "stream": request.stream,
        }
        out: OutboundStream | None = None
        opened = clock.now()
        first: bytes | None = None
        head: ResponseStarted | None = None
        wants_first = request.stream and as_is is None  # chat's SSE: wait for a token
        try:
            with trio.move_on_after(self.settings.first_byte_timeout) as timer:
                try:
                    if as_is is None:
                        out = await peer.open_stream(meta, body)
                        head = await out.head()
                    else:
                        out = await as_is.open(peer, meta, body, model)
                        head = await as_is.head(out, timer,
                                                self.settings.first_byte_timeout)
                    if head is not None and wants_first and head.status == 200:
                        first = await first_token(out)
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
            outcome.owner = peer.owner
            outcome.price_input = info.price_input if info else 0.0
            outcome.price_output = info.price_output if info else 0.0
            if head is None or (wants_first and head.status == 200 and first is None):
                end = out.end_info or {}
                error = from_end_info(end)
                retryable = end.get("retryable")
                if retryable is True or (retryable is None and error.status in RETRYABLE_STATUS):
                    raise _Retry(error, counts=error.code not in NOT_THE_NODES_FAULT)
                outcome.status = "error"
                raise error
            try:
                media_type = (content_type(head.headers) if as_is is None
                              else relayed_media_type(head.headers))
            except BadHeader as exc:
                self.registry.penalize(peer, f"bad response header: {exc}")
                raise _Retry(APIError(502, f"node {peer.id} sent an invalid response "
                                      "header", code="bad_response_header"),
                             counts=False) from None
            first_token_at = clock.now()
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

            if as_is is not None:
                await as_is.relay(out, head.status, media_type, send, node_headers,
                                  outcome, settle)
                if outcome.status == "failed_midstream":  # cut, never completed
                    self.node_failed(peer, model, "failed mid-answer")
                    raise APIError(502, f"node {peer.id} failed mid-answer: "
                                   f"{outcome.error}", code="backend_failed")
            elif first is not None:
                outcome.served = True
                await stream_answer(out, first, head.status, media_type, send, node_headers,
                                    route.request_id, outcome, settle)
                if outcome.status == "failed_midstream":
                    self.node_failed(peer, model, "failed mid-stream")
            else:
                holder = peer.via or peer.id  # a relay's nodes share the relay's part
                try:
                    await self.answers.collect_and_send(
                        out, peer.id, holder, head.status, media_type, send, node_headers,
                        route.request_id, outcome, settle)
                except AnswerLost as lost:
                    raise _Retry(lost.error) from None
            if outcome.status == "ok":
                tokens = outcome.usage.completion_tokens if outcome.usage else None
                # A non-streamed answer arrives whole: only its overall rate is known.
                decode_from = first_token_at if request.stream else opened
                peer.health_of(model).record_success(
                    (first_token_at - opened) if request.stream else None,
                    tokens or 0, clock.now() - decode_from,
                )
        except BaseException:
            if out is not None:
                await out.cancel("client gone" if out.end_info is None else "done")
            raise


def _rewrite(body: dict[str, Any], model: str) -> bytes:
    """The body for the backend: gateway-only fields removed, ``model`` set."""
    clean = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    clean["model"] = model
    return _encoder.encode(clean)
