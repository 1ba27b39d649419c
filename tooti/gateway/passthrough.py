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
an answer the node breaks midway, or one past ``gateway.max_response_bytes``, is cut,
never completed. A node's usage (rerank's and images' ``usage``, a native Responses
answer's) is billed as reported, clamped like any (an upload's prompt bound is the
bytes that came: one without a ``content-length`` is admitted and reserved at its
read-ahead's size); an answer without usage (audio) is recorded with zero tokens (see
:mod:`tooti.node.passthrough`).

A pass-through request takes the chat endpoints' one path,
:meth:`Gateway._forward <tooti.gateway.app.Gateway._forward>` and
:meth:`Proxy.forward <tooti.gateway.proxy.Proxy.forward>`: limits, billing, events,
the access log, attempts and failover, timeouts (an answer's in-band error when a
native Responses stream times out), aliases and their tiers, and a JSON body's
``provider`` preferences and ``models`` fallbacks. What differs is the
:class:`~tooti.gateway.relayed_answer.AsIs` part (the upload, the answer relayed as
is). An aliased request's node gets its own id in ``model`` (a form's field rewritten
in the read-ahead); the answer is relayed as is, so it names that id, not the alias.

The seam for the translated ``/v1/responses`` route: :func:`serves_natively` says whether
a live node the caller may use serves ``responses`` natively for a model, and
:func:`forward_native` forwards the raw request body there.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, TypeGuard

import trio

from tooti.accounts.records import Caller
from tooti.errors import APIError
from tooti.gateway import access_log
from tooti.gateway.auth import routes_of
from tooti.gateway.relayed_answer import AsIs, Upload, form_error, too_large
from tooti.gateway.validation import ParsedRequest, parse_request
from tooti.mesh.http import ClientGone, Headers, Receive, Scope, Send, header, read_body
from tooti.protocol.multipart import DuplicateField, FormFields, PartHeadTooLarge, boundary_of

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

_MODEL_ID = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,256}")


def serves_natively(gateway: Gateway, caller: Caller, model: str,
                    endpoint: str = "responses") -> bool:
    """True if a live node the caller may use (its node groups) serves ``model`` (an
    alias: any of its ids the caller may use) on ``endpoint`` itself: the translated
    ``/v1/responses`` route asks this before translating, and calls
    :func:`forward_native` when it holds."""
    models: tuple[str, ...] = (model,)
    if model in gateway.aliases.tiers:
        try:
            plan = gateway.aliases.plan(models, caller.models)
        except APIError:
            return False  # refused where it is forwarded, with the translated path's error
        if plan is not None:
            models = plan[1]
    return any(gateway.registry.serving_endpoint(m, endpoint, group)
               for m in models for group in routes_of(caller))


async def forward_native(gateway: Gateway, scope: Scope, receive: Receive, send: Send,
                         request_id: str, headers: Headers, caller: Caller, raw: bytes,
                         entry: access_log.AccessRecord | None = None,
                         endpoint: str = "responses") -> None:
    """Forward an already read JSON request body ``raw`` untouched to a node serving
    ``endpoint`` natively (the answer relayed as it comes); errors are raised as
    :class:`~tooti.errors.APIError` for the caller's dialect to render."""
    await PassThrough(gateway).serve(scope, receive, send, request_id, headers, caller,
                                     endpoint, entry, raw=raw)


class PassThrough:
    """Serves the pass-through endpoints for one gateway (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def serve(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                    headers: Headers, caller: Caller, endpoint: str,
                    entry: access_log.AccessRecord | None = None,
                    raw: bytes | None = None) -> None:
        """Serve one request for ``endpoint`` (``raw``: its JSON body, already read)
        down the gateway's one proxy path."""
        gateway = self.gateway
        settings = gateway.settings
        if scope["method"] != "POST":
            raise APIError(405, f"{scope['method']} is not allowed on {scope['path']}; "
                           "use POST", code="method_not_allowed")
        if gateway.station.draining:
            raise APIError(503, "gateway is shutting down", code="shutting_down",
                           type="service_unavailable")
        as_is = AsIs(settings.max_response_bytes,
                     prompt_allowance=settings.prompt_token_allowance)
        if endpoint in UPLOADS:
            upload, model = await _read_ahead(scope, receive, settings.max_upload_bytes,
                                              settings.max_form_prefix_bytes,
                                              settings.body_timeout)
            as_is.upload = upload
            declared = header(scope, b"content-length")
            # Without a content-length the upload is assumed as small as its read-ahead
            # (billing counts the bytes that come): never the whole upload limit, which
            # a key's token rate or an account's credit would refuse.
            estimate = (int(declared) if declared is not None and declared.isdigit()
                        else upload.size)
            request = ParsedRequest(endpoint, model, False, {}, models=(model,))
            raw = b""
        else:
            if raw is None:
                raw = await read_body(scope, receive, settings.max_body_bytes,
                                      settings.body_timeout)
            request = parse_request(endpoint, raw, settings.max_json_depth)
            if not _model_id(request.model):
                raise APIError(400, "'model' is required (a string of 1 to 256 characters)",
                               code="invalid_request", param="model")
            estimate = len(raw)
        if entry is not None:
            entry.model, entry.stream = request.model, request.stream
        await gateway._forward(scope, receive, send, request_id, headers, request, raw,
                               caller, entry, as_is=as_is, estimate_bytes=estimate)


def _model_id(value: object) -> TypeGuard[str]:
    """True for a model id a node could announce (1..256 characters, none a control
    character: it reaches logs and events)."""
    return isinstance(value, str) and _MODEL_ID.fullmatch(value) is not None


async def _read_ahead(scope: Scope, receive: Receive, limit: int, prefix_limit: int,
                      seconds: float) -> tuple[Upload, str]:
    """Read a multipart upload's first bytes until its ``model`` field is complete,
    within ``seconds`` (408 else); each byte is scanned once."""
    media = (header(scope, b"content-type") or b"").decode("latin-1").strip()
    boundary = boundary_of(media)
    if boundary is None:
        raise APIError(400, "this endpoint takes a multipart/form-data body with a "
                       "boundary", code="invalid_request")
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    data = bytearray()
    fields = FormFields(boundary)
    complete = False
    with trio.move_on_after(seconds):
        while fields.value is None and not fields.closed and not complete:
            if len(data) > prefix_limit:
                raise APIError(400, "the form's 'model' field must come within its first "
                               f"{prefix_limit} bytes (before the file)",
                               code="invalid_request", param="model")
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone  # logged 499, cancelled
            piece = message.get("body", b"")
            data += piece
            complete = not message.get("more_body", False)
            try:
                fields.feed(piece)
            except (DuplicateField, PartHeadTooLarge) as exc:
                raise form_error(exc) from None
        found = fields.value
        if not _model_id(found):
            raise APIError(400, "the form needs a 'model' field", code="invalid_request",
                           param="model")
        if len(data) > limit:
            raise too_large(limit)
        return Upload(receive, bytes(data), complete, media, limit, fields, seconds), found
    raise APIError(408, f"the form's 'model' field did not come within {seconds:g}s",
                   code="body_timeout")

