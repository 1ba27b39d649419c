"""The gateway's routes for the other API dialects: Anthropic Messages, OpenAI Responses
and Ollama, mounted beside ``/v1`` on the same station.

Every front request takes the one proxy path: the route reads the body under the same
limits as ``/v1`` (``max_body_bytes``, ``body_timeout``), finds the caller as ``/v1``
does (:mod:`tooti.gateway.auth`: ``Authorization: Bearer`` or Anthropic's ``x-api-key``;
an Ollama client on an open gateway sends none and is the anonymous caller), has the
front (:mod:`tooti.fronts`) parse it into a chat-completions body, checks that body as
any chat request is checked (:func:`~tooti.gateway.validation.parse_request`), and runs
:meth:`~tooti.gateway.app.Gateway._forward` on it (model rights, limits, billing,
failover, cancellation when the client leaves, the TUI's events, ``x-request-id``) with
a :class:`~tooti.gateway.translated_send.TranslatedSend` that turns the node's answer
into the dialect's on the way out. The access log records front requests as it records
``/v1`` ones, under the path the client used.

Routes (``docs/api.md`` lists what each supports and refuses):

- ``POST /v1/messages``, ``POST /v1/messages/count_tokens`` (Anthropic);
- ``POST /v1/responses`` (Responses: passed through untouched to a node whose backend
  serves it natively when a live one the caller may use serves the model and has a free
  slot, else translated to chat completions; see :meth:`FrontRoutes.responses_natively`);
- Ollama: ``POST /api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``,
  ``/api/show``; ``GET /api/tags``, ``/api/ps``; ``GET``/``HEAD /api/version`` and
  ``GET``/``HEAD /`` (``Ollama is running``) without auth, as Ollama clients and Open
  WebUI probe them to find a server; ``/api/pull``, ``push``, ``create``, ``delete``,
  ``copy``, ``blobs`` 501 whatever the method (the ``ollama`` package deletes with ``DELETE``).

Errors before an answer starts are rendered in the dialect's own shape and status
(:meth:`~tooti.fronts.base.Front.error_body`), a bug as a 500 naming the request id in
that shape too; Anthropic answers also carry ``request-id``.

Decisions where the issue is silent: the Ollama listings and names use the caller's
view of the live models, the same groups and allowed models as ``/v1/models``; a model
name an Ollama client sends that no live model of that view matches is Ollama's 404
(``model "x" not found``) before anything is billed; a request that only loads a model
(``/api/chat`` without messages) is answered at once when the model is live, unbilled.
The model-management 501s need no key: they reveal nothing and change nothing. The
probes (``/``, ``/api/version``) are not access-logged, as ``/healthz`` is not: Open WebUI
asks them every few seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from tooti.accounts.records import Caller
from tooti.errors import APIError
from tooti.fronts import anthropic_messages, anthropic_stream, ollama_models, responses_stream
from tooti.fronts.base import ChatRequest, Front
from tooti.fronts.ollama_answers import load_answer, ollama_front
from tooti.fronts.ollama_api import error_body as ollama_error_body
from tooti.gateway import access_log
from tooti.gateway.auth import routes_of
from tooti.gateway.passthrough import forward_native, serves_natively
from tooti.gateway.translated_send import Render, TranslatedSend
from tooti.gateway.validation import parse_request
from tooti.mesh.http import ClientGone, Headers, Receive, ResponseSend, Scope, Send, read_body

if TYPE_CHECKING:
    from tooti.gateway.app import Gateway

log = logging.getLogger("tooti.gateway")
_encode = msgspec.json.encode

ANTHROPIC, RESPONSES, OLLAMA = "anthropic", "responses", "ollama"
OLLAMA_GENERATION = {"/api/chat": "chat", "/api/generate": "generate",
                     "/api/embed": "embed", "/api/embeddings": "embeddings"}
"""Ollama's routes forwarded to a node, and the front ``kind`` of each."""
TEXT_PLAIN = b"text/plain; charset=utf-8"
PROBES = frozenset({"/", "/api/version"})
"""What clients probe to find a server: not access-logged, as ``/healthz`` is not."""

Route = Callable[[Scope, Receive, Send, str, Headers, Caller,
                  access_log.AccessRecord | None], Awaitable[None]]
"""Serves one front route for a known caller."""
NativeResponses = Callable[[Scope, Receive, Send, str, Headers, Caller, ChatRequest,
                            access_log.AccessRecord | None], Awaitable[bool]]
"""Serves a parsed ``/v1/responses`` request on a node whose backend serves the Responses
API itself (``request.context["raw"]`` is the client's body), returning True; False when
no such node may serve it (then the request is translated)."""


def dialect_of(path: str) -> str:
    """Which dialect's error shape a path's answers take."""
    if path.startswith("/v1/messages"):
        return ANTHROPIC
    if path.startswith("/v1/responses"):
        return RESPONSES
    return OLLAMA


def _method(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise APIError(405, f"{method} is not allowed on {path}; use {allowed}",
                       code="method_not_allowed", headers={"allow": allowed})


class FrontRoutes:
    """The dialects' routes of one gateway (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._routes: dict[str, Route] = {
            "/v1/messages": self._messages, "/v1/messages/count_tokens": self._count_tokens,
            "/v1/responses": self._responses,
            **{path: self._ollama for path in (*OLLAMA_GENERATION, "/api/tags", "/api/ps",
                                               "/api/show")}}
        self.native_responses: NativeResponses | None = self.responses_natively
        """The seam for native ``/v1/responses``: asked first for every Responses request
        once its body was parsed (so the same refusals apply either way); when it serves
        the request (a node whose backend serves ``/v1/responses`` is given the client's
        body and its answer passes through untranslated) nothing else runs. By default
        :meth:`responses_natively`; None: every Responses request is translated."""

    def mount(self) -> None:
        """Mount the routes on the gateway's station: ``/v1/messages*`` and
        ``/v1/responses*`` (longer than ``/v1/``, so they win), ``/api/`` and exactly
        ``/`` (``/healthz``, ``/readyz`` and ``/admin`` stay the station's)."""
        station = self.gateway.station
        station.mount("/v1/messages", self.handle)
        station.mount("/v1/responses", self.handle)
        station.mount("/api/", self.handle)
        station.mount_exact("/", self.handle)

    # ------------------------------------------------------------ frame

    async def handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     headers: Headers) -> None:
        """Serve one front request; errors in its dialect; the access record."""
        path = scope["path"]
        dialect = dialect_of(path)
        extra: Headers = [(b"request-id", request_id.encode())] if dialect == ANTHROPIC else []
        settings = self.gateway.settings
        entry = (access_log.AccessRecord(request_id, scope["method"], path)
                 if access_log.enabled(settings.access_log) and path not in PROBES else None)
        try:
            await self._route(scope, receive, send, request_id, [*headers, *extra], entry)
        except BaseException as exc:
            if entry is not None:
                entry.failed(exc)
            if isinstance(exc, ClientGone) or not isinstance(exc, Exception):
                raise
            error = (exc if isinstance(exc, APIError)  # else a bug: a 500 naming the id
                     else self.gateway.station.internal_errors.report(request_id, exc))
            await self._refuse(send, dialect, error, request_id, [*headers, *extra])
        finally:
            if entry is not None:
                entry.end(send.status if isinstance(send, ResponseSend) else 0)
                access_log.write(entry)

    @staticmethod
    async def _refuse(send: Send, dialect: str, error: APIError, request_id: str,
                      headers: Headers) -> None:
        """``error`` in the dialect's shape, unless an answer already started (then the
        server ends it)."""
        if isinstance(send, ResponseSend) and send.started:
            return
        if dialect == ANTHROPIC:
            body = anthropic_stream.FRONT.error_body(error, request_id)
            media = anthropic_stream.FRONT.media_type
        elif dialect == RESPONSES:
            body = responses_stream.FRONT.error_body(error, request_id)
            media = responses_stream.FRONT.media_type
        else:
            body, media = ollama_error_body(error, request_id), "application/json; charset=utf-8"
        extra = [(k.encode(), v.encode()) for k, v in error.headers.items()]
        await _send_whole(send, error.status, body, [*headers, *extra], media.encode())

    async def _route(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     headers: Headers, entry: access_log.AccessRecord | None) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/":
            if method not in ("GET", "HEAD"):
                raise APIError(405, f"{method} is not allowed on /; use GET",
                               code="method_not_allowed", headers={"allow": "GET, HEAD"})
            await _send_whole(send, 200, ollama_models.ROOT_TEXT, headers, TEXT_PLAIN,
                              head=method == "HEAD")
            return
        if path == "/api/version":
            if method not in ("GET", "HEAD"):
                raise APIError(405, f"{method} is not allowed on {path}; use GET",
                               code="method_not_allowed", headers={"allow": "GET, HEAD"})
            await _send_whole(send, 200, ollama_models.version_body(), headers,
                              b"application/json; charset=utf-8", head=method == "HEAD")
            return
        action = ollama_models.unsupported_action(path)
        if action is not None:
            raise ollama_models.unsupported(action)
        route = self._routes.get(path)
        if route is None:
            raise APIError(404, f"no route for {method} {path}", code="not_found")
        caller = await self.gateway.auth.identify(scope)
        if entry is not None:
            entry.caller = caller
        await route(scope, receive, send, request_id, headers, caller, entry)

    # ------------------------------------------------------------ the proxy path

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        gateway = self.gateway
        if gateway.station.draining:
            raise APIError(503, "gateway is shutting down", code="shutting_down",
                           type="service_unavailable")
        settings = gateway.settings
        return await read_body(scope, receive, settings.max_body_bytes, settings.body_timeout)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     headers: Headers, front: Front, chat: ChatRequest, caller: Caller,
                     entry: access_log.AccessRecord | None, *, endpoint: str,
                     body: bytes, render: Render | None = None) -> None:
        """Forward ``chat`` (sent as ``body`` to ``endpoint``) down the one proxy path,
        its answer translated by ``front`` (``render`` for a whole one, if given)."""
        gateway = self.gateway
        request = parse_request(endpoint, body, gateway.settings.max_json_depth)
        if entry is not None:
            entry.model, entry.stream = request.model, request.stream
        translated = TranslatedSend(send, front, chat, render=render)
        await gateway._forward(scope, receive, translated, request_id, headers, request, body,
                               caller, entry, translated=translated)

    async def _messages(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                        headers: Headers, caller: Caller,
                        entry: access_log.AccessRecord | None) -> None:
        """``POST /v1/messages``."""
        await self._dialect(scope, receive, send, request_id, headers,
                            anthropic_stream.FRONT, caller, entry)

    async def _responses(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                         headers: Headers, caller: Caller,
                         entry: access_log.AccessRecord | None) -> None:
        """``POST /v1/responses``."""
        await self._dialect(scope, receive, send, request_id, headers,
                            responses_stream.FRONT, caller, entry)

    async def responses_natively(self, scope: Scope, receive: Receive, send: Send,
                                 request_id: str, headers: Headers, caller: Caller,
                                 request: ChatRequest,
                                 entry: access_log.AccessRecord | None) -> bool:
        """Serve a Responses request on a node whose backend serves ``/v1/responses``
        itself, when a live one the caller may use serves its model
        (:func:`~tooti.gateway.passthrough.serves_natively`) and one of them has a free
        slot now: the client's body as it came, the answer as the node sends it
        (:func:`~tooti.gateway.passthrough.forward_native`). False (translate it) when
        none does, or when the native attempt ends in a 503 before any byte went out
        (every native node refused or went away meanwhile).

        Decision: native nodes are preferred, never waited for. When all of them are
        busy or cooling down the request is translated at once: translation reaches
        every node serving the model's chat completions (the native ones too) and
        queues there if all are busy, so a request never waits on the few native nodes
        while others could answer. A request that falls back after its native attempt
        was admitted is admitted again (two ``request.received`` events, and two of a
        key's requests per minute, in that rare race)."""
        gateway = self.gateway
        if not (serves_natively(gateway, caller, request.model)
                and self._native_slot_free(caller, request.model)):
            return False
        try:
            await forward_native(gateway, scope, receive, send, request_id, headers, caller,
                                 request.context["raw"], entry)
        except APIError as error:
            if (error.status != 503 or error.code == "shutting_down"
                    or (isinstance(send, ResponseSend) and send.started)):
                raise
            log.info("request %s: no node serving Responses natively took it (%s); "
                     "translating it", request_id, error.message)
            return False
        return True

    def _native_slot_free(self, caller: Caller, model: str) -> bool:
        """True if a node serving ``model`` (an alias: any of its ids) on
        ``/v1/responses`` in a group the caller may use can take a request now (live,
        not cooling down, under its concurrency)."""
        gateway = self.gateway
        registry = gateway.registry
        tiers = gateway.aliases.tiers.get(model)
        ids = [m for tier in tiers for m in tier] if tiers else [model]
        for group in routes_of(caller):
            for m in ids:
                free = registry.free_slots(m, group)
                if any(peer in free for peer in registry.serving_endpoint(m, "responses",
                                                                          group)):
                    return True
        return False

    async def _dialect(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                       headers: Headers, front: Front, caller: Caller,
                       entry: access_log.AccessRecord | None) -> None:
        """A whole front request down the proxy path."""
        _method(scope["method"], "POST", scope["path"])
        raw = await self._read(scope, receive)
        chat = front.parse(raw, max_depth=self.gateway.settings.max_json_depth,
                           request_id=request_id)
        native = self.native_responses if front is responses_stream.FRONT else None
        if native is not None and await native(scope, receive, send, request_id, headers,
                                               caller, chat, entry):
            return
        await self._proxy(scope, receive, send, request_id, headers, front, chat, caller,
                          entry, endpoint="chat/completions", body=_encode(chat.body))

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send,
                            request_id: str, headers: Headers, caller: Caller,
                            entry: access_log.AccessRecord | None) -> None:
        """``POST /v1/messages/count_tokens``: a one-token chat completion on a node, its
        ``usage.prompt_tokens`` the count (metered and billed as that request)."""
        _method(scope["method"], "POST", scope["path"])
        raw = await self._read(scope, receive)
        chat = anthropic_messages.parse_count_tokens(
            raw, max_depth=self.gateway.settings.max_json_depth)
        chat.context["request_id"] = request_id
        await self._proxy(scope, receive, send, request_id, headers, anthropic_stream.FRONT,
                          chat, caller, entry, endpoint="chat/completions",
                          body=_encode(chat.body),
                          render=anthropic_messages.render_count_tokens)

    async def _ollama(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                      headers: Headers, caller: Caller,
                      entry: access_log.AccessRecord | None) -> None:
        """Ollama's listings and generation routes, from the caller's live models."""
        path, method = scope["path"], scope["method"]
        gateway = self.gateway
        models = ollama_models.models_from_list(gateway.models.body(
            groups=routes_of(caller), allowed=caller.models))
        json_type = b"application/json; charset=utf-8"
        if path in ("/api/tags", "/api/ps"):
            _method(method, "GET", path)
            body = (ollama_models.tags_body(models) if path == "/api/tags"
                    else ollama_models.ps_body(models))
            await _send_whole(send, 200, body, headers, json_type)
            return
        _method(method, "POST", path)
        raw = await self._read(scope, receive)
        if path == "/api/show":
            await _send_whole(send, 200, ollama_models.show_body(raw, models), headers,
                              json_type)
            return
        live = ollama_models.live_ids(models)
        front = ollama_front(OLLAMA_GENERATION[path], live=live)
        chat = front.parse(raw, max_depth=gateway.settings.max_json_depth,
                           request_id=request_id)
        if chat.model not in live:
            raise ollama_models.not_found(chat.context.get("model", chat.model))
        if chat.context.get("load"):  # only loads the model: it is live, nothing to ask
            if entry is not None:
                entry.model, entry.stream = chat.model, False
            await _send_whole(send, 200, load_answer(chat), headers, json_type)
            return
        endpoint = chat.context.get("endpoint", "chat/completions")
        await self._proxy(scope, receive, send, request_id, headers, front, chat, caller,
                          entry, endpoint=endpoint, body=_encode(chat.body))


async def _send_whole(send: Send, status: int, body: bytes, headers: Headers,
                      content_type: bytes, *, head: bool = False) -> None:
    """A whole answer with its content-length (no body bytes for ``HEAD``)."""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": b"" if head else body})
