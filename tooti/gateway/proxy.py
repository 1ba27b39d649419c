"""Forwarding one client request to a node over its tunnel, with failover.

The whole exchange runs in the client's own request task: when the client
disconnects, hypercorn cancels that task, and the ``except BaseException``
paths here send CANCEL down the tunnel so the node stops its backend call.

Before the response head arrives any failure (tunnel lost, node busy, a
retryable backend error, the first-byte timeout) excludes that node and the
next one is tried. A non-streaming answer is collected whole before the
client sees anything, so it can fail over until its END; a streaming one is
committed once its head is sent, and a later failure becomes an in-band
``data: {"error": ...}`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from tooti.errors import APIError, from_end_info
from tooti.gateway.http import Headers, Send, send_bytes
from tooti.gateway.registry import Peer, Registry
from tooti.gateway.validation import ParsedRequest
from tooti.protocol.connection import FlowControlError
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.tunnel import OutboundStream, TunnelLost

log = logging.getLogger("tooti.gateway")
_encoder = msgspec.json.Encoder()

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DONE = b"data: [DONE]\n\n"


@dataclass
class ProxySettings:
    """The gateway settings the proxy reads."""

    max_attempts: int
    first_byte_timeout: float
    request_timeout: float


@dataclass
class Outcome:
    """What happened to one request, filled in as it goes (read by billing)."""

    served: bool = False
    """A node sent a response head (so it did the work)."""
    node_id: str = ""
    model: str = ""
    price_input: float = 0.0
    price_output: float = 0.0
    usage: dict[str, Any] | None = None
    """The END frame's usage, when the node reported it."""
    status: str = "pending"
    """``ok``, ``error``, ``failed_midstream``, ``cancelled`` or ``pending``."""
    delivered_events: int = 0
    """SSE events relayed to the client (an estimate of tokens when usage is missing)."""
    attempts: int = 0


class _Retry(Exception):
    """This node failed before anything reached the client; try another."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


def choose(
    registry: Registry, policy: RoutingPolicy, route: RouteRequest, excluded: set[str]
) -> Peer | None:
    """The best live node for ``route`` per ``policy``, skipping ``excluded`` ones."""
    candidates = registry.candidates(route.model)
    if excluded:
        candidates = [p for p in candidates if p.id not in excluded]
    if not candidates:
        return None
    ranked = policy.rank(route, candidates)
    return ranked[0] if ranked else None


def check_routable(registry: Registry, model: str) -> None:
    """404 for a model never advertised here, 503 for one with no live node now."""
    if registry.candidates(model):
        return
    if model in registry.known_models:
        raise APIError(503, f"no live node serves model '{model}' right now",
                       code="no_capacity", type="service_unavailable")
    raise APIError(404, f"the model '{model}' does not exist", param="model",
                   code="model_not_found")


async def forward(
    registry: Registry,
    policy: RoutingPolicy,
    settings: ProxySettings,
    request: ParsedRequest,
    route: RouteRequest,
    raw_body: bytes,
    send: Send,
    headers: Headers,
    outcome: Outcome,
) -> None:
    """Serve ``request`` from the best node, failing over before the first byte."""
    model = request.model
    request_id = route.request_id
    excluded: set[str] = set()
    last_error: APIError | None = None
    with trio.fail_after(settings.request_timeout):
        for attempt in range(max(1, settings.max_attempts)):
            peer = choose(registry, policy, route, excluded)
            if peer is None:
                break
            outcome.attempts = attempt + 1
            try:
                await _serve_from(peer, settings, request, raw_body, request_id, send, headers,
                                  outcome)
                return
            except _Retry as retry:
                excluded.add(peer.id)
                peer.failures += 1
                last_error = retry.error
                log.info("request %s: node %s failed before first byte (%s), %s",
                         request_id, peer.id, retry.error.message,
                         "retrying" if attempt + 1 < settings.max_attempts else "giving up")
    if last_error is None:
        raise APIError(503, f"no live node serves model '{model}' right now",
                       code="no_capacity", type="service_unavailable")
    raise last_error


async def _serve_from(
    peer: Peer,
    settings: ProxySettings,
    request: ParsedRequest,
    raw_body: bytes,
    request_id: str,
    send: Send,
    headers: Headers,
    outcome: Outcome,
) -> None:
    model = request.model
    meta: dict[str, Any] = {
        "request_id": request_id,
        "endpoint": request.endpoint,
        "model": model,
        "stream": request.stream,
    }
    peer.in_flight[model] = peer.in_flight.get(model, 0) + 1
    out: OutboundStream | None = None
    try:
        with trio.move_on_after(settings.first_byte_timeout) as timer:
            try:
                out = await peer.session.open_stream(meta, raw_body)
                head = await out.head()
            except (TunnelLost, FlowControlError) as exc:
                raise _Retry(APIError(502, f"node {peer.id} unavailable: {exc}",
                                      code="node_unavailable")) from None
        if timer.cancelled_caught:
            raise _Retry(APIError(504, f"node {peer.id} sent no response within "
                                  f"{settings.first_byte_timeout:g}s", code="first_byte_timeout"))
        assert out is not None
        if head is None:
            end = out.end_info or {}
            error = from_end_info(end)
            retryable = end.get("retryable")
            if retryable is True or (retryable is None and error.status in RETRYABLE_STATUS):
                raise _Retry(error)
            outcome.node_id, outcome.model, outcome.status = peer.id, model, "error"
            raise error
        info = peer.models.get(model)
        outcome.node_id, outcome.model = peer.id, model
        outcome.price_input = info.price_input if info else 0.0
        outcome.price_output = info.price_output if info else 0.0
        node_headers = [*headers, (b"x-tooti-node", peer.id.encode()),
                        (b"x-tooti-model", model.encode())]
        content_type = str(head.headers.get("content-type") or "application/json").encode()
        if request.stream and head.status == 200:
            outcome.served = True
            await _stream_body(out, head.status, content_type, send, node_headers, request_id,
                               outcome)
        else:
            body = await _collect(out, peer)
            outcome.served = True
            outcome.usage = _usage_of(out.end_info)
            outcome.status = "ok" if head.status < 400 else "error"
            await send_bytes(send, head.status, body, node_headers, content_type)
    except BaseException:
        if out is not None:
            await out.cancel("client gone" if out.end_info is None else "done")
        raise
    finally:
        peer.in_flight[model] -= 1


async def _collect(out: OutboundStream, peer: Peer) -> bytes:
    """Read a whole non-streamed answer; failures before END may fail over."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in out.body():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise APIError(502, "node response too large", code="response_too_large")
            parts.append(chunk)
    except TunnelLost as exc:
        raise _Retry(APIError(502, f"node {peer.id} lost mid-response: {exc}",
                              code="node_unavailable")) from None
    info = out.end_info or {}
    if "error" in info:
        raise _Retry(from_end_info(info))
    return b"".join(parts)


def _usage_of(info: dict[str, Any] | None) -> dict[str, Any] | None:
    usage = (info or {}).get("usage")
    return usage if isinstance(usage, dict) else None


async def _stream_body(
    out: OutboundStream, status: int, content_type: bytes, send: Send, headers: Headers,
    request_id: str, outcome: Outcome,
) -> None:
    """Relay an SSE answer as it arrives; a late failure is reported in-band."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *headers,
        ],
    })
    error: APIError | None = None
    try:
        async for chunk in out.body():
            outcome.delivered_events += chunk.count(b"\n\n")
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except TunnelLost as exc:
        error = APIError(502, f"node lost mid-stream: {exc}", code="node_lost")
    else:
        info = out.end_info or {}
        outcome.usage = _usage_of(info)
        if "error" in info:
            error = from_end_info(info)
    outcome.status = "ok" if error is None else "failed_midstream"
    tail = b""
    if error is not None:
        log.warning("request %s: stream failed after first byte: %s", request_id, error.message)
        tail = b"data: " + error.to_json() + b"\n\n" + DONE
    await send({"type": "http.response.body", "body": tail, "more_body": False})
