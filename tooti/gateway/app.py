"""The gateway: the OpenAI-compatible front door, built on a :class:`~tooti.mesh.station.Station`.

The station (listener, tunnels, registry, life cycle, ``/healthz``) is shared with a
relay in the same process; the gateway mounts on it the ``/v1`` API
(``GET /v1/models``, ``POST /v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``) and the admin API, and owns the proxy, billing and probes. A plain
ASGI callable (rather than a framework) keeps the per-request path short; every
response carries ``x-request-id``.

Every ``/v1`` request is first resolved to its caller (:mod:`tooti.gateway.auth`: the
auth mode, API keys through the cached :class:`~tooti.accounts.directory.KeyDirectory`,
which the gateway runs when it has a database). The caller decides the node groups the
request is routed to (its key's group, then the public nodes if the group allows), the
models it may use and see in ``/v1/models``, the account billing charges, and the
request's reservation ``max_cost``: its prompt bound plus its completion bound
(``max_tokens``, else ``gateway.reserve_completion_tokens``) at the highest prices among
the live nodes that may serve any of its models for that caller. ``/v1/me*`` is the
caller's self-service (:mod:`tooti.admin.self_service`).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

import trio

from tooti import clock
from tooti.accounts.database import Database
from tooti.accounts.directory import KeyDirectory
from tooti.accounts.money import cost_micros, price_micros
from tooti.accounts.records import Caller
from tooti.accounts.service import AccountService
from tooti.accounts.sign_in import SignIn
from tooti.admin.accounts_api import AccountsAPI
from tooti.admin.api import AdminAPI
from tooti.admin.peer_control import PeerControl
from tooti.admin.self_service import SelfService
from tooti.billing.base import Billing, Outcome, RequestContext, Usage
from tooti.billing.credits import Credits
from tooti.billing.pipeline import BYTES_PER_TOKEN, BillingPipeline, usage_from
from tooti.config import ConfigError
from tooti.errors import APIError
from tooti.gateway import access_log
from tooti.gateway.aliases import AliasedSend, Aliases
from tooti.gateway.auth import Authenticator, check_models, routes_of
from tooti.gateway.cors import cors_of
from tooti.gateway.front_routes import FrontRoutes
from tooti.gateway.limits import Limiter
from tooti.gateway.models_list import ModelsList
from tooti.gateway.node_picker import check_routable
from tooti.gateway.passthrough import PASSTHROUGH_ROUTES, PassThrough
from tooti.gateway.probe import probe_until_healthy
from tooti.gateway.proxy import Proxy
from tooti.gateway.proxy_settings import ProxySettings
from tooti.gateway.relayed_answer import AsIs
from tooti.gateway.streamed_answer import DONE
from tooti.gateway.translated_send import TranslatedSend
from tooti.gateway.validation import ParsedRequest, parse_request
from tooti.mesh.events import BusEvent
from tooti.mesh.health import CooldownPolicy
from tooti.mesh.http import (
    DisconnectWatch,
    Headers,
    Receive,
    ResponseSend,
    Scope,
    Send,
    cancel_on_disconnect,
    read_body,
    send_bytes,
)
from tooti.mesh.identity_store import IdentityStore
from tooti.mesh.peer import Peer
from tooti.mesh.registry import KnownModels
from tooti.mesh.station import Station
from tooti.protocol.usage import limits_for
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.routing.policies import LeastLoaded
from tooti.settings import GatewaySettings, NetworkSettings, TunnelSettings

if TYPE_CHECKING:
    from tooti.console.app import Console

log = logging.getLogger("tooti.gateway")

FRONTS = ("anthropic", "responses", "ollama")
"""The API dialects the gateway speaks besides OpenAI's chat (:mod:`tooti.fronts`)."""
API_ROUTES = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


def proxy_settings_of(settings: GatewaySettings) -> ProxySettings:
    """The proxy's limits and timeouts, from the gateway's settings."""
    return ProxySettings(
        max_attempts=settings.max_attempts,
        first_byte_timeout=settings.first_byte_timeout,
        request_timeout=settings.request_timeout,
        queue_timeout=settings.queue_timeout,
        max_queue=settings.max_queue,
        cooldown=CooldownPolicy(
            failures=settings.cooldown_failures, window=settings.cooldown_window,
            base=settings.cooldown_seconds, maximum=settings.cooldown_max_seconds,
        ),
        max_response_bytes=settings.max_response_bytes,
        max_buffered_bytes=settings.max_buffered_bytes,
        buffer_wait=settings.buffer_wait,
        send_deadline=settings.send_timeout,
        prompt_token_allowance=settings.prompt_token_allowance,
        media_token_allowance=settings.media_token_allowance,
    )


class Gateway:
    """The ``/v1`` front door of one station: routing, proxying, billing, probes."""

    def __init__(
        self, settings: GatewaySettings, tunnel: TunnelSettings,
        policy: RoutingPolicy | None = None, billing: list[Billing] | None = None,
        identities: IdentityStore | None = None, network: NetworkSettings | None = None,
        station: Station | None = None, database: Database | None = None,
        gateway_id: str = "",
    ) -> None:
        """``station`` is the process's shared accepting side (a relay in the same
        process uses it too); without one the gateway builds its own from ``settings``,
        ``tunnel``, ``identities`` (node-name bindings; None = memory only) and
        ``network`` (the public addresses given to dialers in WELCOME). ``database``:
        the accounts database (its API keys are recognised; None = only the admin key
        and the static group keys); its owner closes it.

        Raises :class:`~tooti.config.ConfigError` when ``settings`` listen beyond
        loopback with ``auth`` unset (see :func:`tooti.gateway.auth.resolve_mode`)."""
        self.settings = settings
        self.database = database
        self.keys = KeyDirectory(database) if database is not None else None
        """The database's API keys, cached (None without a database)."""
        self.auth = Authenticator(settings, self.keys)
        """Who each ``/v1`` request is."""
        self.gateway_id = gateway_id or settings.gateway_id or f"gw-{secrets.token_hex(4)}"
        """This gateway's name among those sharing the database (the runner gives
        the id stored in its data dir when the config names none)."""
        self.limiter = Limiter(database, self.gateway_id)
        """Rate limits, concurrency and budgets per key and account (shared through the
        database by every gateway on it)."""
        self.station = station or Station(settings, tunnel, network=network,
                                          identities=identities)
        self.registry = self.station.registry
        self.policy: RoutingPolicy = policy or LeastLoaded()
        self.billing = BillingPipeline(billing or [])
        self.known_by_group: dict[str, KnownModels] = {}
        """Node group → the models its nodes advertised here (the most recent ten
        thousand): unknown vs. unavailable per group, so no caller learns of another
        group's models."""
        self.registry.bus.listeners.append(self._note_group_models)
        self.self_service: SelfService | None = None
        """Serves ``/v1/me*`` (with a database)."""
        self.aliases = Aliases(settings.aliases)
        """Public model names → node model ids in tiers (``[gateway.aliases]``)."""
        self.models = ModelsList(self.registry, self.aliases)
        self.station.cors = cors_of(settings.cors)
        self.proxy_settings = proxy_settings_of(settings)
        self.proxy = Proxy(self.registry, self.policy, self.proxy_settings)
        self.disconnects = DisconnectWatch()
        """Sees the clients of requests in flight leave (no task per request)."""
        self.proxy.on_cooldown = self._schedule_probe
        self.billing.on_late = lambda request_id: self.registry.bus.publish(
            "billing.settle_late", request_id=request_id)
        self.passthrough = PassThrough(self)
        """Rerank, audio, images and native responses, to nodes that announce them."""
        self.peer_control = PeerControl(self.registry)
        """Disable, enable and drain nodes (the admin API, the CLI and the console)."""
        self.admin = AdminAPI(self.station, lambda: self.proxy.queued, self.peer_control)
        self.station.mount("/v1/", self.handle)
        self.fronts = FrontRoutes(self)
        """The Anthropic, Responses and Ollama routes, over :meth:`_forward`."""
        self.fronts.mount()
        self.admin.mount()
        self.accounts: AccountService | None = None
        self.sign_in: SignIn | None = None
        """Console passwords, login links and sessions (with a database), shared by the
        admin API and the console."""
        if database is not None:
            self.accounts = AccountService(database, reserved_groups=settings.groups)
            self.accounts.on_credit = self._credit_changed
            self.self_service = SelfService(self.accounts, database)
            self.sign_in = SignIn.of(database)
            AccountsAPI(self.station, self.accounts, database, self.sign_in).mount()
        self._nursery: trio.Nursery | None = None
        self.console: Console | None = None  # imported only when on: Quart is not light
        """The web console under ``/console`` (``gateway.console``; needs a database)."""
        if settings.console:
            if self.accounts is None or database is None:
                raise ConfigError("the console needs the accounts database "
                                  "(gateway.database, or the default SQLite file)",
                                  key="gateway.console")
            from tooti.console.app import PREFIX as CONSOLE_PREFIX
            from tooti.console.app import Console
            from tooti.console.context import ConsoleContext

            self.console = Console(ConsoleContext(
                settings=lambda: self.settings, database=database, accounts=self.accounts,
                registry=self.registry, admin=self.admin, peer_control=self.peer_control,
                gateway_id=self.gateway_id, fronts=FRONTS,
                routing_policy=lambda: type(self.policy).__name__, sign_in=self.sign_in,
                public_url=lambda: self.station.network.public_url,
            ), secure_cookies=bool(settings.tls_cert))
            self.station.mount(CONSOLE_PREFIX + "/", self.console)  # not /consolex
            self.station.mount_exact(CONSOLE_PREFIX, self.console)

    # ------------------------------------------------------------ life cycle

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                    grace: float = 10.0) -> None:
        """Serve the station with billing and probes running, until it shuts down;
        reports the bound URLs. With a database, the ``admin`` account (which the admin
        key acts as) is created first if it does not exist."""
        if self.accounts is not None:
            await self.accounts.ensure_admin()
        if self.console is not None:
            await self.console.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.billing.run)
                nursery.start_soon(self.limiter.run)
                nursery.start_soon(self.disconnects.run)
                if self.keys is not None:
                    nursery.start_soon(self.keys.run)
                await self.station.serve(task_status=task_status, grace=grace)
                nursery.cancel_scope.cancel()
        finally:
            await self.billing.close()

    async def drain(self, grace: float,
                    also: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        """Drain the station (see :meth:`Station.drain`)."""
        await self.station.drain(grace, also)

    def shutdown(self) -> None:
        self.station.shutdown()

    def reload(self, settings: GatewaySettings, policy: RoutingPolicy | None = None,
               auth: Authenticator | None = None) -> None:
        """SIGHUP: serve new requests by ``settings`` (which keep the running values of
        what needs a restart) and, if given, rank nodes by ``policy``. The admin key and
        the static group keys are matched by the new table from the next request on (a
        key removed gets 401; they are matched before the database's key cache, so no
        cache keeps one), the request-path limits and timeouts change in one step, with
        no checkpoint, for every new request. Requests under way keep their caller and
        their node. A group name stays reserved against database groups for the
        process's life once configured: nodes joined under a removed group keep their
        tunnel until they reconnect, and must not serve a database group of that name.
        The station (join tokens, admin API key) is reloaded by its owner.

        ``auth``: the key table for ``settings``, built by the caller beforehand (a
        reload builds everything before it swaps anything); built here when not given.
        Raises :class:`~tooti.config.ConfigError` (naming ``gateway.auth``) before
        changing anything if the settings resolve to no auth mode."""
        if auth is None:
            auth = Authenticator(settings, self.keys)
        aliases = Aliases(settings.aliases)
        self.settings = settings
        self.auth = auth
        self.aliases = aliases
        self.models.use_aliases(aliases)
        self.station.cors = cors_of(settings.cors)
        self.proxy_settings.replace_with(proxy_settings_of(settings))
        self.proxy.answers.buffers.limit = settings.max_buffered_bytes
        if policy is not None:
            self.policy = policy
            self.proxy.picker.use_policy(policy)
        if self.accounts is not None:
            self.accounts.reserved_groups |= frozenset(settings.groups)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The gateway as an ASGI app: its station's (``/v1``, admin, tunnels)."""
        await self.station(scope, receive, send)

    def _credit_changed(self, account_id: str) -> None:
        """Credit reached an account through this gateway: billing asks the database
        again at its next request instead of remembering it short."""
        for plugin in self.billing.plugins:
            if isinstance(plugin, Credits):
                plugin.credit_changed(account_id)

    def _schedule_probe(self, peer: Peer, model: str) -> None:
        """A node's model entered cooldown: probe it when the cooldown ends."""
        if self._nursery is not None:
            self._nursery.start_soon(
                probe_until_healthy, self.registry, peer, model, self.proxy_settings)

    def _note_group_models(self, event: BusEvent) -> None:
        """Remember which group advertised which models (unknown vs. unavailable, per
        group, so no request learns of another group's models)."""
        if event.kind in ("peer.joined", "peer.updated"):
            peer = event.data["peer"]
            models = peer.get("models")
            if models:
                self.known_by_group.setdefault(peer.get("group", ""), KnownModels()).update(models)

    # ------------------------------------------------------------ /v1

    async def handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     headers: Headers) -> None:
        """Serve one ``/v1`` request (mounted on the station); with the access log on,
        write its record when it ends (:mod:`tooti.gateway.access_log`)."""
        if not access_log.enabled(self.settings.access_log):
            await self._handle(scope, receive, send, request_id, headers, None)
            return
        entry = access_log.AccessRecord(request_id, scope["method"], scope["path"])
        try:
            await self._handle(scope, receive, send, request_id, headers, entry)
        except BaseException as exc:
            entry.failed(exc)
            raise
        finally:
            entry.end(send.status if isinstance(send, ResponseSend) else 0)
            access_log.write(entry)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                      headers: Headers, entry: access_log.AccessRecord | None) -> None:
        path, method = scope["path"], scope["method"]
        caller = await self.auth.identify(scope)
        if entry is not None:
            entry.caller = caller
        endpoint = API_ROUTES.get(path)
        if endpoint is not None:
            if method != "POST":
                raise APIError(405, f"{method} is not allowed on {path}; use POST",
                               code="method_not_allowed")
            if self.station.draining:
                raise APIError(503, "gateway is shutting down", code="shutting_down",
                               type="service_unavailable")
            raw = await read_body(scope, receive, self.settings.max_body_bytes,
                                  self.settings.body_timeout)
            request = parse_request(endpoint, raw, self.settings.max_json_depth)
            if entry is not None:
                entry.model, entry.stream = request.model, request.stream
            await self._forward(scope, receive, send, request_id, headers, request, raw,
                                caller, entry)
        elif path in PASSTHROUGH_ROUTES:
            await self.passthrough.serve(scope, receive, send, request_id, headers, caller,
                                         PASSTHROUGH_ROUTES[path], entry)
        elif path == "/v1/models":
            if method != "GET":
                raise APIError(405, "use GET on /v1/models", code="method_not_allowed")
            await send_bytes(send, 200, self.models.json(groups=routes_of(caller),
                                                         allowed=caller.models), headers)
        elif path.startswith("/v1/models/"):
            await self._model(scope, send, headers, caller)
        elif (path == "/v1/me" or path.startswith("/v1/me/")) and self.self_service is not None:
            # Counted against the caller's request rate like any request (a key cannot
            # hammer the database through its reports).
            ticket = await self.limiter.admit(caller, request_id, tokens_estimate=0,
                                              max_cost=0)
            try:
                await self.self_service.handle(scope, receive, send, request_id,
                                               [*headers, *ticket.headers], caller)
            finally:
                await self.limiter.finish(ticket, tokens=0, cost=0)
        else:
            raise APIError(404, f"no route for {method} {path}", code="not_found")

    async def _model(self, scope: Scope, send: Send, headers: Headers, caller: Caller
                     ) -> None:
        """``GET /v1/models/{id}``: the model (or alias) as ``/v1/models`` lists it for
        this caller; 404 ``model_not_found`` when that list has no such id. The id is
        all of the path after ``/v1/models/`` (ids hold ``/`` and ``:``), percent-decoded
        as the client's HTTP library encoded it."""
        model = _model_id(scope)
        if scope["method"] != "GET":
            raise APIError(405, f"use GET on /v1/models/{model}", code="method_not_allowed")
        found = self.models.model(model, groups=routes_of(caller), allowed=caller.models)
        if found is None:
            raise APIError(404, f"the model '{model}' does not exist", param="model",
                           code="model_not_found", type="invalid_request_error")
        await send_bytes(send, 200, found, headers)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, headers: Headers,
        request: ParsedRequest, raw: bytes, caller: Caller,
        entry: access_log.AccessRecord | None = None, as_is: AsIs | None = None,
        estimate_bytes: int | None = None, translated: TranslatedSend | None = None,
    ) -> None:
        """Authorize, forward (cancelled if the client leaves), then settle or refund;
        ``entry`` (the access record) gets billing's outcome and usage.

        ``as_is``: a pass-through request (its upload streamed, its answer relayed as
        the node sends it, not rewritten for an alias); ``estimate_bytes``: the body
        size admission and the reservation assume (an upload's declared or read-ahead
        size; billing then counts the bytes that came); ``translated``: a front's
        ``send`` (a whole answer settles once translated, see its ``settle_hook``)."""
        key_id, group, account = caller.key_id, caller.group, caller.account_name
        groups = routes_of(caller)
        if group:  # routed to the group's nodes (then, if it allows, the public ones)
            request = dataclasses.replace(
                request, preferences=dataclasses.replace(request.preferences, group=group))
        bus = self.registry.bus
        bus.publish("request.received", request_id=request_id, model=request.model,
                    endpoint=request.endpoint, stream=request.stream, key_id=key_id,
                    account=account)
        estimate = len(raw) if estimate_bytes is None else estimate_bytes
        aliases = self.aliases
        plan = aliases.plan(request.models, caller.models) if aliases else None
        if plan is not None:  # an alias: its tiers' ids are routed, its name answered
            served_as = {m: name for name in request.models if name in aliases.tiers
                         for tier in aliases.tiers[name] for m in tier}
            request = dataclasses.replace(request, models=plan[1], rewrite=True)
        try:
            if plan is None:
                check_models(caller, request.models)
                self._check_routable(request.models, groups)
            else:
                check_models(caller, [m for m in request.models if m not in served_as])
                try:
                    self._check_routable(request.models, groups)
                except APIError as error:
                    if error.status != 404:
                        raise
                    raise APIError(404, f"the model '{request.model}' does not exist",
                                   param="model", code="model_not_found") from None
            ctx = RequestContext(
                request_id, key_id, request.model, request.endpoint, request.stream,
                account_id=caller.account_id, group=group,
                max_cost=self._max_cost(request, estimate, groups)
                if caller.account_id else 0)
            ticket = await self.limiter.admit(
                caller, request_id, tokens_estimate=estimate // BYTES_PER_TOKEN,
                max_cost=ctx.max_cost)
            try:
                await self.billing.authorize(ctx)
            except BaseException:
                await self.limiter.finish(ticket, tokens=0, cost=0)
                raise
        except APIError as refused:
            bus.publish("request.finished", request_id=request_id, status="rejected",
                        model=request.model, node=None, error=refused.message,
                        http_status=refused.status, account=account)
            raise
        if ticket.headers:  # x-ratelimit-* on the answer
            headers = [*headers, *ticket.headers]
        route = RouteRequest(
            request_id, request.model, request.endpoint,
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            request.body, key_id,
        )
        outcome = Outcome()
        started = clock.now()
        settled: Usage | None = None

        async def settle() -> None:
            """A node's answer is complete: settle before its last bytes leave, so no
            client sees a complete answer whose usage record could still be lost."""
            nonlocal settled
            settled = usage_from(outcome, size(), started)
            await self.billing.finish(ctx, outcome, settled)

        def size() -> int:
            return len(raw) if as_is is None else as_is.body_bytes(raw)

        watched = receive if as_is is None or as_is.upload is None else as_is.upload.receive
        connection = (scope["extensions"].get("tooti.http1") if watched is receive
                      and "extensions" in scope else None)
        last = settle if translated is None else translated.settle_hook(outcome, settle)
        try:
            complete = await cancel_on_disconnect(watched, send, lambda tracked: (
                self.proxy.forward(request, route, raw, tracked, headers, outcome, last,
                                   groups, as_is=as_is) if plan is None else
                self.proxy.forward(request, route, raw, tracked if as_is is not None
                                   else AliasedSend(tracked, served_as, outcome),
                                   headers, outcome, last, groups, plan[0], as_is)),
                watch=self.disconnects, connection=connection)
            if not complete:
                outcome.status = "cancelled"
        except trio.TooSlowError:
            outcome.status = "failed_midstream" if outcome.served else "failed"
            timeout = APIError(504, f"request exceeded {self.settings.request_timeout:g}s",
                               code="timeout")
            if not (outcome.served and request.stream):
                raise timeout from None
            # The stream has started: the error goes in-band, then [DONE].
            await send({"type": "http.response.body", "more_body": False,
                        "body": b"data: " + timeout.to_json() + b"\n\n" + DONE})
        except BaseException as exc:
            if outcome.status in ("pending", "ok"):
                outcome.status = "cancelled" if outcome.served else "failed"
            if isinstance(exc, APIError):
                outcome.error = exc.message
            raise
        finally:
            usage = settled
            if usage is None:
                usage = usage_from(outcome, size(), started)
            await self.limiter.finish(  # never waits: safe under cancellation
                ticket, tokens=usage.prompt_tokens + usage.completion_tokens
                if outcome.served else 0,
                cost=min(usage.cost, ctx.max_cost) if outcome.served else 0)
            if settled is None:
                await self.billing.finish(ctx, outcome, usage)
            self._publish_finished(request_id, outcome, usage, request.stream, account)
            if entry is not None:
                entry.outcome, entry.usage = outcome, usage

    def _check_routable(self, models: Sequence[str], groups: Sequence[str]) -> None:
        """404 / 503 as :func:`check_routable`, over the node groups a caller may use."""
        registry = self.registry
        if len(groups) == 1:
            only = groups[0]
            check_routable(registry, models, serving=lambda model: registry.serving(model, only),
                           known=self.known_by_group.get(only, ()),
                           loading=lambda model: registry.loading(model, only))
            return
        check_routable(registry, models,
                       serving=lambda model: [peer for g in groups
                                              for peer in registry.serving(model, g)],
                       known=_KnownIn([self.known_by_group[g] for g in groups
                                       if g in self.known_by_group]),
                       loading=lambda model: any(registry.loading(model, g) for g in groups))

    def _max_cost(self, request: ParsedRequest, body_bytes: int, groups: Sequence[str]) -> int:
        """The most ``request`` can cost, in micro-units: its prompt bound and completion
        bound (:func:`tooti.protocol.usage.limits_for`; ``reserve_completion_tokens``
        when it sets no ``max_tokens``) at the highest prompt and completion prices among
        the live nodes of ``groups`` serving any of its models."""
        settings = self.settings
        limits = limits_for(request.endpoint, request.body, body_bytes,
                            settings.prompt_token_allowance, settings.media_token_allowance)
        price_in = price_out = 0.0
        for model in request.models:
            for group in groups:
                for peer in self.registry.serving(model, group):
                    info = peer.models.get(model)
                    if info is not None:
                        price_in = max(price_in, info.price_input)
                        price_out = max(price_out, info.price_output)
        completion = (settings.reserve_completion_tokens if limits.completion is None
                      else limits.completion)
        return cost_micros(limits.prompt, completion, price_micros(price_in),
                           price_micros(price_out))

    def _publish_finished(self, request_id: str, outcome: Outcome, usage: Usage,
                          stream: bool, account: str = "") -> None:
        # Decode speed is only known for streams; a non-streamed answer arrives whole.
        decode_s = usage.latency_ms / 1000 - (outcome.ttft_ms or 0.0) / 1000 if stream else 0
        self.registry.bus.publish(
            "request.finished", request_id=request_id, status=outcome.status,
            node=outcome.node_id or None, model=outcome.model or None,
            attempts=outcome.attempts, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, estimated=usage.estimated,
            ttft_ms=None if outcome.ttft_ms is None else round(outcome.ttft_ms, 3),
            tok_s=round(usage.completion_tokens / decode_s, 2) if decode_s > 0.001
            and usage.completion_tokens else None,
            latency_ms=round(usage.latency_ms, 3), error=outcome.error or None,
            account=account,
        )


def _model_id(scope: Scope) -> str:
    """The model id of a ``/v1/models/{id}`` path: everything after the prefix, with
    ``%2F`` and the like decoded (the server decoded the path; a raw path keeps an
    encoded ``/`` apart, and clients encode ids both ways)."""
    raw = scope.get("raw_path")
    if raw:
        text = bytes(raw).split(b"?", 1)[0].decode("latin-1")
        if text.startswith("/v1/models/"):
            return unquote(text[len("/v1/models/"):])
    return str(scope["path"])[len("/v1/models/"):]


class _KnownIn:
    """Models known in any of several node groups (``in`` only)."""

    def __init__(self, groups: list[KnownModels]) -> None:
        self.groups = groups

    def __contains__(self, model: object) -> bool:
        return any(model in known for known in self.groups)

    def __iter__(self) -> Iterator[str]:
        for known in self.groups:
            yield from known
