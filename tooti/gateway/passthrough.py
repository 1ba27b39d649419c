"""The pass-through endpoints: ``/v1/rerank``, ``/v1/audio/transcriptions``,
``/v1/audio/speech``, ``/v1/images/generations``, and ``/v1/responses`` for nodes whose
backend serves it natively.

Nodes announce, per model, the endpoints it serves (``endpoints`` in MODELS, see
``docs/protocol.md``); a request is routed only to a node that announced its endpoint
for the model (:meth:`~tooti.mesh.routing_index.RoutingIndex.serving_endpoint`), and
failover stays among those. A model some live node serves, but none on this endpoint,
is ``404 endpoint_not_served`` naming both.

Bodies are not translated, only routed:

* JSON endpoints (rerank, speech, images, responses): the body (at most
  ``gateway.max_body_bytes``) is decoded for ``model`` and ``stream`` only and sent as
  the client sent it.
* ``audio/transcriptions`` (``multipart/form-data``, up to ``gateway.max_upload_bytes``):
  the gateway reads ahead at most ``gateway.max_form_prefix_bytes`` to find the
  ``model`` field (the SDKs send the form fields before the file; a form whose ``model``
  is not complete within that bound is a 400) and streams every byte on to the node as it
  arrives, under the tunnel's flow control: the gateway holds the read-ahead and one
  piece at a time, never the upload. Since it is not kept, an upload can fail over
  only while no more than the read-ahead has been sent (the node could not be opened or
  refused the stream at once).

The answer is relayed as the node sends it, with its content type (binary audio for
speech, JSON or SSE otherwise), not collected: failover ends at the response head. Its
last piece is held until the node's END is in and billing has settled (SSE excepted);
an answer the node breaks midway is cut, never completed. A
node's usage (rerank's and images' ``usage``, a native Responses answer's) is billed
as reported, clamped like any; an answer without usage (audio) is recorded with zero
tokens (see :mod:`tooti.node.passthrough`). Limits, billing, events and the access log
are the chat endpoints' (one ``request.received`` / ``request.finished`` each).

The seam for the translated ``/v1/responses`` route: :func:`serves_natively` says whether
a live node the caller may use serves ``responses`` natively for a model, and
:func:`forward_native` forwards the raw request body there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import msgspec
import trio

from tooti import clock
from tooti.accounts.records import Caller
from tooti.billing.base import Outcome, RequestContext, Usage
from tooti.billing.pipeline import BYTES_PER_TOKEN, usage_from
from tooti.errors import APIError, from_end_info
from tooti.gateway import access_log
from tooti.gateway.auth import check_models, routes_of
from tooti.gateway.proxy import NOT_THE_NODES_FAULT, RETRYABLE_STATUS, endpoint_not_served
from tooti.gateway.response_headers import BadHeader, content_type, header_value
from tooti.gateway.validation import ParsedRequest, Preferences
from tooti.mesh.http import Headers, Receive, ResponseSend, Scope, Send, header, read_body
from tooti.mesh.peer import Peer
from tooti.protocol.connection import FlowControlError, ResponseStarted
from tooti.protocol.json_depth import nesting_within
from tooti.protocol.multipart import MORE, boundary_of, find_field
from tooti.protocol.usage import limits_for
from tooti.routing.base import RouteRequest
from tooti.tunnel import OutboundStream, TunnelLost

if TYPE_CHECKING:
    from tooti.gateway.app import Gateway

log = logging.getLogger("tooti.gateway.passthrough")

PASSTHROUGH_ROUTES = {
    "/v1/rerank": "rerank",
    "/v1/audio/transcriptions": "audio/transcriptions",
    "/v1/audio/speech": "audio/speech",
    "/v1/images/generations": "images/generations",
}
"""``/v1`` paths served here → the endpoint name nodes announce."""
UPLOADS = frozenset({"audio/transcriptions"})
"""Endpoints whose body is a streamed multipart upload."""
PIECE = 64 * 1024
"""Most bytes of an answer joined into one piece sent to the client."""

_decoder = msgspec.json.Decoder()
_MODEL_ID = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,256}")


def serves_natively(gateway: Gateway, caller: Caller, model: str,
                    endpoint: str = "responses") -> bool:
    """True if a live node the caller may use (its node groups) serves ``model`` on
    ``endpoint`` itself: the translated ``/v1/responses`` route asks this before
    translating, and calls :func:`forward_native` when it holds."""
    return any(gateway.registry.serving_endpoint(model, endpoint, group)
               for group in routes_of(caller))


async def forward_native(gateway: Gateway, scope: Scope, receive: Receive, send: Send,
                         request_id: str, headers: Headers, caller: Caller, raw: bytes,
                         entry: access_log.AccessRecord | None = None,
                         endpoint: str = "responses") -> None:
    """Forward an already read JSON request body ``raw`` untouched to a node serving
    ``endpoint`` natively (the answer relayed as it comes); errors are raised as
    :class:`~tooti.errors.APIError` for the caller's dialect to render."""
    await PassThrough(gateway).serve(scope, receive, send, request_id, headers, caller,
                                     endpoint, entry, raw=raw)


class _Retry(Exception):
    def __init__(self, error: APIError, counts: bool = True) -> None:
        super().__init__(error.message)
        self.error, self.counts = error, counts


class _Upload:
    """A multipart body being streamed: its read-ahead, then pieces from the client."""

    def __init__(self, prefix: bytes, complete: bool, content_type: str, limit: int
                 ) -> None:
        self.prefix, self.complete, self.content_type = prefix, complete, content_type
        self.limit = limit
        self.started = False
        """More than the read-ahead went to a node: no other node can be tried."""
        self.send_pieces, self.pieces = trio.open_memory_channel[bytes](0)
        self.size = len(prefix)


class PassThrough:
    """Serves the pass-through endpoints for one gateway (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def serve(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                    headers: Headers, caller: Caller, endpoint: str,
                    entry: access_log.AccessRecord | None = None,
                    raw: bytes | None = None) -> None:
        """Serve one request for ``endpoint`` (``raw``: its JSON body, already read)."""
        gateway = self.gateway
        settings = gateway.settings
        if scope["method"] != "POST":
            raise APIError(405, f"{scope['method']} is not allowed on {scope['path']}; "
                           "use POST", code="method_not_allowed")
        if gateway.station.draining:
            raise APIError(503, "gateway is shutting down", code="shutting_down",
                           type="service_unavailable")
        upload: _Upload | None = None
        body: dict[str, Any] = {}
        if endpoint in UPLOADS:
            upload, model = await _read_ahead(scope, receive, settings.max_upload_bytes,
                                              settings.max_form_prefix_bytes)
            declared = header(scope, b"content-length")
            body_bytes = (int(declared) if declared is not None and declared.isdigit()
                          else settings.max_upload_bytes)
            stream = False
        else:
            if raw is None:
                raw = await read_body(scope, receive, settings.max_body_bytes,
                                      settings.body_timeout)
            body, model = _json_body(raw, settings.max_json_depth)
            body_bytes = len(raw)
            stream = body.get("stream") is True
        if entry is not None:
            entry.model, entry.stream = model, stream
        groups = routes_of(caller)
        check_models(caller, [model])
        gateway._check_routable([model], groups)
        if not any(gateway.registry.serving_endpoint(model, endpoint, g) for g in groups):
            raise endpoint_not_served(model, endpoint)
        request = ParsedRequest(endpoint, model, stream, body,
                                Preferences(group=caller.group) if caller.group
                                else Preferences(), (model,))
        await self._forward(scope, receive, send, request_id, headers, caller, request,
                            raw or b"", body_bytes, upload, entry)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                       headers: Headers, caller: Caller, request: ParsedRequest,
                       raw: bytes, body_bytes: int, upload: _Upload | None,
                       entry: access_log.AccessRecord | None) -> None:
        """Admit, authorize, serve, then settle or refund, as the chat endpoints do."""
        gateway = self.gateway
        bus = gateway.registry.bus
        groups = routes_of(caller)
        account = caller.account_name
        bus.publish("request.received", request_id=request_id, model=request.model,
                    endpoint=request.endpoint, stream=request.stream,
                    key_id=caller.key_id, account=account)
        try:
            ctx = RequestContext(
                request_id, caller.key_id, request.model, request.endpoint, request.stream,
                account_id=caller.account_id, group=caller.group,
                max_cost=gateway._max_cost(request, body_bytes, groups)
                if caller.account_id else 0)
            ticket = await gateway.limiter.admit(
                caller, request_id, tokens_estimate=body_bytes // BYTES_PER_TOKEN,
                max_cost=ctx.max_cost)
            try:
                await gateway.billing.authorize(ctx)
            except BaseException:
                await gateway.limiter.finish(ticket, tokens=0, cost=0)
                raise
        except APIError as refused:
            bus.publish("request.finished", request_id=request_id, status="rejected",
                        model=request.model, node=None, error=refused.message,
                        http_status=refused.status, account=account)
            raise
        if ticket.headers:
            headers = [*headers, *ticket.headers]
        outcome = Outcome()
        outcome.limits = limits_for(request.endpoint, request.body, body_bytes,
                                    gateway.settings.prompt_token_allowance,
                                    gateway.settings.media_token_allowance)
        started = clock.now()
        settled: Usage | None = None

        async def settle() -> None:
            nonlocal settled
            settled = usage_from(outcome, body_bytes, started)
            await gateway.billing.finish(ctx, outcome, settled)

        tracked = send if isinstance(send, ResponseSend) else ResponseSend(send)
        route = RouteRequest(request_id, request.model, request.endpoint,
                             {k.decode("latin-1"): v.decode("latin-1")
                              for k, v in scope["headers"]}, request.body, caller.key_id)
        try:
            with trio.fail_after(gateway.settings.request_timeout):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_client, receive, upload, tracked,
                                       nursery.cancel_scope)
                    await self._attempts(request, route, raw, upload, tracked, headers,
                                         outcome, settle, groups)
                    nursery.cancel_scope.cancel()
            if not tracked.complete:
                outcome.status = "cancelled"
        except trio.TooSlowError:
            outcome.status = "failed_midstream" if outcome.served else "failed"
            if not outcome.served:
                raise APIError(504, f"request exceeded {gateway.settings.request_timeout:g}s",
                               code="timeout") from None
        except BaseException as exc:
            if isinstance(exc, BaseExceptionGroup):  # the request's error, if one is
                errors = [e for e in exc.exceptions if isinstance(e, APIError)]
                exc = errors[0] if errors else (
                    exc.exceptions[0] if len(exc.exceptions) == 1 else exc)
            if outcome.status in ("pending", "ok"):
                outcome.status = "cancelled" if outcome.served else "failed"
            if isinstance(exc, APIError):
                outcome.error = exc.message
                raise exc from None
            raise
        finally:
            usage = settled or usage_from(outcome, body_bytes, started)
            await gateway.limiter.finish(
                ticket, tokens=usage.prompt_tokens + usage.completion_tokens
                if outcome.served else 0,
                cost=min(usage.cost, ctx.max_cost) if outcome.served else 0)
            if settled is None:
                await gateway.billing.finish(ctx, outcome, usage)
            gateway._publish_finished(request_id, outcome, usage, request.stream, account)
            if entry is not None:
                entry.outcome, entry.usage = outcome, usage

    async def _attempts(self, request: ParsedRequest, route: RouteRequest, raw: bytes,
                        upload: _Upload | None, send: ResponseSend, headers: Headers,
                        outcome: Outcome, settle: Any, groups: Sequence[str]) -> None:
        """Each node group in turn, each node serving the endpoint in turn, until one
        answers (an upload: until more than its read-ahead went to one)."""
        gateway = self.gateway
        registry, proxy = gateway.registry, gateway.proxy
        model, endpoint = request.model, request.endpoint
        last_error: APIError | None = None
        for group in groups:
            if not registry.serving_endpoint(model, endpoint, group):
                continue
            prefs = Preferences(group=group) if group else Preferences()
            excluded = set(registry.not_serving(model, group, endpoint))
            for _ in range(max(1, proxy.settings.max_attempts)):
                peer = await proxy.picker.pick(route, prefs, excluded)
                if peer is None:
                    break
                outcome.attempts += 1
                outcome.nodes_tried.append(peer.id)
                registry.bus.publish("request.routed", request_id=route.request_id,
                                     node=peer.id, model=model, attempt=outcome.attempts)
                try:
                    await self._serve_from(peer, request, route, raw, upload, send,
                                           headers, outcome, settle)
                    return
                except _Retry as retry:
                    excluded.add(peer.id)
                    last_error = retry.error
                    if retry.counts:
                        proxy.node_failed(peer, model, retry.error.message)
                    if upload is not None and upload.started:
                        raise retry.error from None
                    log.info("request %s: node %s failed before answering (%s)",
                             route.request_id, peer.id, retry.error.message)
                finally:
                    registry.release(peer, model)
        raise last_error or APIError(503, f"no live node serves '{model}' on "
                                     f"/v1/{endpoint} right now", code="no_capacity",
                                     type="service_unavailable")

    async def _serve_from(self, peer: Peer, request: ParsedRequest, route: RouteRequest,
                          raw: bytes, upload: _Upload | None, send: ResponseSend, headers: Headers,
                          outcome: Outcome, settle: Any) -> None:
        """One attempt: open the stream (an upload: pump the body into it), wait for the
        head within ``first_byte_timeout`` (an upload: counted from its last byte), then
        relay the answer. Raises _Retry while nothing reached the client."""
        proxy = self.gateway.proxy
        timeout = proxy.settings.first_byte_timeout
        meta: dict[str, Any] = {"request_id": route.request_id,
                                "endpoint": request.endpoint, "model": request.model,
                                "stream": request.stream}
        if upload is not None:
            meta["content_type"] = upload.content_type
        out: OutboundStream | None = None
        opened = clock.now()
        head: ResponseStarted | None = None
        try:
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as waiting:
                    try:
                        if upload is None:
                            waiting.deadline = clock.now() + timeout
                            out = await peer.open_stream(meta, raw)
                        else:
                            out = await peer.open_stream(meta, upload.prefix,
                                                         fin=upload.complete)
                            if upload.complete:
                                waiting.deadline = clock.now() + timeout
                            else:
                                nursery.start_soon(_pump, upload, out, waiting, timeout)
                        head = await out.head()
                    except TunnelLost as exc:
                        raise _Retry(APIError(502, f"node {peer.id} unavailable: {exc}",
                                              code="node_unavailable")) from None
                    except FlowControlError as exc:
                        raise _Retry(APIError(503, f"node {peer.id} cannot take a stream: "
                                              f"{exc}", code="node_busy"),
                                     counts=False) from None
                if waiting.cancelled_caught:
                    raise _Retry(APIError(504, f"node {peer.id} sent no answer within "
                                          f"{timeout:g}s", code="first_token_timeout"))
                assert out is not None
                await self._relay(peer, request, route, out, head, send, headers, outcome,
                                  settle, opened)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            # the node stops its backend call (a CANCEL), whatever ended the attempt
            if out is not None:
                await out.cancel("client gone" if out.end_info is None else "done")
            if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                raise exc.exceptions[0] from None  # the attempt's own error (a _Retry)
            raise

    async def _relay(self, peer: Peer, request: ParsedRequest, route: RouteRequest,
                     out: OutboundStream,
                     head: ResponseStarted | None, send: ResponseSend, headers: Headers,
                     outcome: Outcome, settle: Any, opened: float) -> None:
        """Relay the node's answer as it comes: head, body pieces, then (once its END
        is in and billing has settled) the end of the body."""
        proxy, model = self.gateway.proxy, request.model
        info = peer.models.get(model)
        outcome.node_id, outcome.model, outcome.owner = peer.id, model, peer.owner
        outcome.price_input = info.price_input if info else 0.0
        outcome.price_output = info.price_output if info else 0.0
        if head is None:
            end = out.end_info or {}
            error = from_end_info(end)
            retryable = end.get("retryable")
            if retryable is True or (retryable is None and error.status in RETRYABLE_STATUS):
                raise _Retry(error, counts=error.code not in NOT_THE_NODES_FAULT)
            outcome.status = "error"
            raise error
        try:
            media = media_type(head.headers)
        except BadHeader as exc:
            self.gateway.registry.penalize(peer, f"bad response header: {exc}")
            raise _Retry(APIError(502, f"node {peer.id} sent an invalid response header",
                                  code="bad_response_header"), counts=False) from None
        outcome.ttft_ms = (clock.now() - opened) * 1000
        self.gateway.registry.bus.publish("request.first_token",
                                          request_id=route.request_id,
                                          node=peer.id, ttft_ms=round(outcome.ttft_ms, 3))
        await send({"type": "http.response.start", "status": head.status, "headers": [
            (b"content-type", media), *headers, (b"x-tooti-node", header_value(peer.id)),
            (b"x-tooti-model", header_value(model))]})
        outcome.served = True
        # The last piece is held until the node's END is in and billing has settled, so
        # no client has a complete answer whose record could still be lost (a JSON
        # answer, one piece, is held whole; audio is one piece behind). SSE (a native
        # Responses stream) is relayed at once: its events are the client's tokens.
        hold = not media.startswith(b"text/event-stream")
        held = b""
        while (piece := await out.next_data(PIECE)) is not None:
            outcome.relayed_bytes += len(piece)
            if hold:
                piece, held = held, piece
                if not piece:
                    continue
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        end = out.end_info or {}
        broken = "error" in end
        if broken:
            outcome.status = "failed_midstream"
            outcome.error = str(from_end_info(end).message)
            proxy.node_failed(peer, model, "failed mid-answer")
        elif outcome.status == "pending":
            outcome.status = "ok"
        outcome.usage = proxy._checked_usage(peer, out, outcome)
        await settle()
        if broken:  # cut, not completed: a truncated audio file must not look whole
            raise APIError(502, f"node {peer.id} failed mid-answer: {outcome.error}",
                           code="backend_failed")
        await send({"type": "http.response.body", "body": held, "more_body": False})
        if outcome.status == "ok":
            peer.health_of(model).record_success(None, 0, clock.now() - opened)


BINARY_MEDIA_TYPES = frozenset({
    "audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav", "audio/wave", "audio/opus",
    "audio/ogg", "audio/aac", "audio/flac", "audio/pcm", "audio/l16", "audio/webm",
    "image/png", "image/jpeg", "image/webp", "image/gif", "application/octet-stream",
})
"""Media types a pass-through answer keeps beside the chat endpoints' safe ones (audio
and raster images; never ``image/svg+xml`` or HTML, which a browser could run)."""


def media_type(headers: dict[str, Any]) -> bytes:
    """The content type to send for a pass-through answer: the node's, checked and
    rebuilt as for any answer (:func:`~tooti.gateway.response_headers.content_type`),
    with :data:`BINARY_MEDIA_TYPES` passed on as they are."""
    checked = content_type(headers)
    if checked.startswith(b"text/plain"):
        value = headers.get("content-type")
        media = value.split(";", 1)[0].strip().lower() if isinstance(value, str) else ""
        if media in BINARY_MEDIA_TYPES:
            return media.encode()
    return checked


def _json_body(raw: bytes, max_depth: int) -> tuple[dict[str, Any], str]:
    """The decoded JSON object (nested at most ``max_depth`` deep) and its ``model``;
    400 otherwise."""
    too_deep = APIError(400, f"request body nests arrays and objects deeper than "
                        f"{max_depth} levels", code="invalid_json")
    try:
        body = _decoder.decode(raw)
    except RecursionError:
        raise too_deep from None
    except msgspec.DecodeError:
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_request")
    if not nesting_within(raw, body, max_depth):
        raise too_deep
    model = body.get("model")
    if not _model_id(model):
        raise APIError(400, "'model' is required (a string of 1 to 256 characters)",
                       code="invalid_request", param="model")
    return body, model


def _model_id(value: object) -> TypeGuard[str]:
    """True for a model id a node could announce (1..256 characters, none a control
    character: it reaches logs and events)."""
    return isinstance(value, str) and _MODEL_ID.fullmatch(value) is not None


async def _read_ahead(scope: Scope, receive: Receive, limit: int, prefix_limit: int
                      ) -> tuple[_Upload, str]:
    """Read a multipart upload's first bytes until its ``model`` field is complete."""
    media = (header(scope, b"content-type") or b"").decode("latin-1").strip()
    boundary = boundary_of(media)
    if boundary is None:
        raise APIError(400, "this endpoint takes a multipart/form-data body with a "
                       "boundary", code="invalid_request")
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"upload over the {limit}-byte limit "
                       "(gateway.max_upload_bytes)", code="request_too_large",
                       headers={"connection": "close"})
    data = b""
    complete = False
    while True:
        found = find_field(data, boundary, "model", complete)
        if found is not MORE:
            break
        if len(data) > prefix_limit:
            raise APIError(400, "the form's 'model' field must come within its first "
                           f"{prefix_limit} bytes (before the file)", code="invalid_request",
                           param="model")
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "the client went away", code="client_gone")
        data += message.get("body", b"")
        complete = not message.get("more_body", False)
    if not _model_id(found):
        raise APIError(400, "the form needs a 'model' field", code="invalid_request",
                       param="model")
    if len(data) > limit:
        raise APIError(413, f"upload over the {limit}-byte limit (gateway.max_upload_bytes)",
                       code="request_too_large", headers={"connection": "close"})
    return _Upload(data, complete, media, limit), found


async def _pump(upload: _Upload, out: OutboundStream, waiting: trio.CancelScope,
                seconds: float) -> None:
    """Send the upload's pieces into ``out`` as they come; once the body is all sent,
    the head must come within ``seconds``."""
    async for piece in upload.pieces:  # not closed here: a next attempt may read on
        upload.started = True
        await out.send_body(piece, False)
    await out.send_body(b"", True)
    waiting.deadline = clock.now() + seconds


async def _watch_client(receive: Receive, upload: _Upload | None, tracked: ResponseSend,
                        scope: trio.CancelScope) -> None:
    """Feed an upload's pieces (at most ``max_upload_bytes``) to whoever pumps them,
    then watch for the client leaving: cancel the request unless it was served."""
    if upload is not None:
        async with upload.send_pieces:
            more = not upload.complete
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    scope.cancel()
                    return
                piece = message.get("body", b"")
                more = message.get("more_body", False)
                upload.size += len(piece)
                if upload.size > upload.limit:
                    raise APIError(413, f"upload over the {upload.limit}-byte limit "
                                   "(gateway.max_upload_bytes)", code="request_too_large",
                                   headers={"connection": "close"})
                if piece:
                    await upload.send_pieces.send(piece)
    while (await receive())["type"] != "http.disconnect":
        pass
    if not tracked.complete:
        scope.cancel()
