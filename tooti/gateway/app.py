"""The gateway: an ASGI app served by hypercorn on trio, behind tooti's listener.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``GET /healthz`` and the tunnel WebSocket at
``/tooti/v1/tunnel`` (taken by the listener, :mod:`tooti.mesh.listener`, on a
fresh connection; by the ASGI app only on a kept-alive one). A plain ASGI
callable (rather than a framework) keeps the per-request path short; every
response carries ``x-request-id``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import msgspec
import trio
from hypercorn.config import Config

from tooti.admin.events import stream_events
from tooti.billing.base import Billing, RequestContext, Usage
from tooti.billing.pipeline import BillingPipeline, usage_from
from tooti.errors import APIError
from tooti.gateway.metrics import CONTENT_TYPE as METRICS_TYPE
from tooti.gateway.metrics import GatewayMetrics
from tooti.gateway.probe import probe_until_healthy
from tooti.gateway.proxy import DONE, Outcome, Proxy, ProxySettings, check_routable
from tooti.gateway.validation import ParsedRequest, parse_request
from tooti.groups import GroupKeys, bearer_token, named_tokens
from tooti.identity import derive_id
from tooti.mesh.admission import (
    UNGROUPED,
    Admission,
    BearerAuth,
    TokenChanges,
    serve_tunnel,
)
from tooti.mesh.events import BusEvent
from tooti.mesh.health import CooldownPolicy
from tooti.mesh.http import (
    ClientGone,
    Headers,
    InternalErrors,
    Receive,
    Scope,
    Send,
    cancel_on_disconnect,
    header,
    read_body,
    send_bytes,
    send_error,
    send_json,
    serve_lifespan,
)
from tooti.mesh.identity_store import IdentityStore, IdentityStoreError
from tooti.mesh.listener import Limits, UpgradeRequest, serve
from tooti.mesh.ratelimit import Limited, PerAddressLimiter, Slot, Throttle
from tooti.mesh.registry import KnownModels, Peer, Registry
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.routing.policies import LeastLoaded
from tooti.settings import GatewaySettings, GroupSettings, NetworkSettings, TunnelSettings
from tooti.tls import ServerTLS
from tooti.transport import Transport
from tooti.transport.websocket import (
    SUBPROTOCOL,
    TUNNEL_PATH,
    ASGIWebSocketTransport,
    WebSocketTransport,
    refusal_response,
    upgrade_response,
)
from tooti.tunnel import CLOSE_TIMEOUT, TunnelSession

if TYPE_CHECKING:
    from tooti.dialer import Dialer

log = logging.getLogger("tooti.gateway")

LISTEN_BACKLOG = 2048
"""Pending TCP connections the gateway's socket queues (1,000 clients may connect at once)."""
MAX_WELCOME_PEERS = 32
"""Most addresses one WELCOME lists."""

IDENTITIES_PATH = "/admin/v1/identities"
T = TypeVar("T")

API_ROUTES = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


def _query_int(scope: Scope, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter, clamped; 400 if it is not an integer."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    if not values:
        return default
    try:
        return max(low, min(high, int(values[-1])))
    except ValueError:
        raise APIError(400, f"{name} must be an integer", param=name,
                       code="invalid_type") from None


def key_id_of(authorization: bytes | None) -> str:
    """A stable, non-secret id for the caller's API key (``anonymous`` without one)."""
    token = bearer_token(authorization)
    if not token:
        return "anonymous"
    return "key-" + hashlib.sha256(token).hexdigest()[:16]


def _store_call(call: Callable[[], T]) -> T:
    """Run an identity store operation; its failure is a 500 naming the file."""
    try:
        return call()
    except IdentityStoreError as exc:
        raise APIError(500, str(exc), code="identity_store_error") from None


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8080`` for IPv6) into host and port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def join_auth(settings: GatewaySettings, groups: Mapping[str, GroupSettings]) -> BearerAuth:
    """The join tokens of ``settings`` (ungrouped) and of ``groups``, by name."""
    return BearerAuth(named_tokens(settings.join_token, settings.join_tokens),
                      {name: named_tokens(group.join_token, group.join_tokens)
                       for name, group in groups.items()})


class Gateway:
    """Registry, router and HTTP/tunnel front door of one gateway."""

    def __init__(
        self, settings: GatewaySettings, tunnel: TunnelSettings,
        policy: RoutingPolicy | None = None, billing: list[Billing] | None = None,
        identities: IdentityStore | None = None, network: NetworkSettings | None = None,
        serve_api: bool = True, local_id: str = "",
    ) -> None:
        """``identities`` persists node-name bindings (None = memory only, forgotten on
        restart); ``tooti run`` passes the store in the data dir. ``network`` holds the
        public addresses given to dialers in WELCOME. Without ``serve_api`` (a relay
        only) the ``/v1`` API answers 404 and only tunnels and the admin API are served.
        ``local_id`` is a relay's own id, which its session ids start with."""
        self.settings = settings
        self.network = network or NetworkSettings()
        self.serve_api = serve_api
        self.local_id = local_id
        self.dialers: list[Dialer] = []
        """Dialers of roles in the same process (node, relay), shown by /admin/v1/network."""
        self.roles: list[str] = ["gateway"] if serve_api else ["relay"]
        self.policy: RoutingPolicy = policy or LeastLoaded()
        self.billing = BillingPipeline(billing or [])
        self.tunnel_settings = tunnel
        self.registry = Registry(identities=identities, ban_seconds=settings.peer_ban_seconds,
                                 max_identities=settings.max_identity_bindings,
                                 heartbeat_interval=tunnel.heartbeat_interval,
                                 relay_strikes=settings.relay_strikes,
                                 relay_strike_seconds=settings.relay_strike_seconds)
        self.auth = join_auth(settings, settings.groups)
        """The join tokens tunnels are admitted by (swapped by :meth:`reload_tokens`)."""
        self.group_keys = GroupKeys(settings.groups)
        """Which node group a request's API key belongs to."""
        self.known_by_group: dict[str, KnownModels] = {}
        """With groups configured: group → the models its nodes advertised here (the most
        recent ten thousand)."""
        if settings.groups:
            self.registry.bus.listeners.append(self._note_group_models)
        self.admin_auth = BearerAuth(settings.admin_key)
        self.internal_errors = InternalErrors(log)
        """Reports requests that failed on a bug (one line each, tracebacks rationed)."""
        self.handshakes = PerAddressLimiter(settings.tunnel_handshake_rate,
                                            settings.tunnel_handshake_burst,
                                            settings.tunnel_handshakes_per_ip)
        """Tunnel upgrades per client IP: a rate, and a cap on unfinished handshakes."""
        self._refusal_log = Throttle(60.0)
        self._models_lists: dict[str, tuple[int, dict[str, Any], bytes]] = {}
        """Node group → (registry version, ``/v1/models`` body, its JSON) (see
        :meth:`models_list`)."""
        self.proxy_settings = ProxySettings(
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
        self.proxy = Proxy(self.registry, self.policy, self.proxy_settings)
        self.metrics = GatewayMetrics(self.registry, self.registry.bus, self.proxy)
        self.billing.on_late = lambda request_id: self.registry.bus.publish(
            "billing.settle_late", request_id=request_id)
        self.proxy.on_cooldown = self._schedule_probe
        self._nursery: trio.Nursery | None = None
        self.sessions: set[TunnelSession] = set()
        self.bound: list[str] = []
        self.draining = False
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._shutdown = trio.Event()
        self.tls = (ServerTLS(settings.tls_cert, settings.tls_key, settings.tls_reload_interval)
                    if settings.tls_cert else None)
        """The listener's certificate (None: plain HTTP); raises TLSError if unusable."""

    # ------------------------------------------------------------ lifecycle

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                    grace: float = 10.0) -> None:
        """Serve HTTP and tunnels until :meth:`shutdown`; reports the bound URLs."""
        config = Config()
        config.bind = [self.settings.listen]
        config.accesslog = None
        config.graceful_timeout = grace
        config.keep_alive_timeout = self.settings.keep_alive_timeout
        config.websocket_max_message_size = self.tunnel_settings.max_frame_bytes
        config.include_server_header = False
        config.backlog = LISTEN_BACKLOG  # hypercorn's 100 overflows under a burst of clients
        if not self.auth.open_to_network:
            log.warning("no join token configured: node tunnels are accepted from loopback only")

        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.billing.run)
                if self.tls is not None:
                    nursery.start_soon(self.tls.watch)
                await self._serve_http(config, task_status)
                nursery.cancel_scope.cancel()
        finally:
            await self.billing.close()

    def reload_tokens(self, settings: GatewaySettings) -> TokenChanges:
        """Admit new tunnels by the join tokens of ``settings`` from now on (SIGHUP in
        ``tooti run``); returns the changes, by name. Tunnels already up stay up, even
        one whose token is gone, until it reconnects. Node groups are those the gateway
        started with: a group's tokens are reloaded, a group no longer configured admits
        no one, and a new group needs a restart (its API keys are not read here)."""
        groups = {name: group for name, group in settings.groups.items()
                  if name in self.settings.groups}
        auth = join_auth(settings, groups)
        changes = self.auth.changes(auth)
        self.auth = auth
        if not auth.open_to_network:
            log.warning("no join token configured: node tunnels are accepted from loopback only")
        return changes

    async def _serve_http(
        self, config: Config, task_status: trio.TaskStatus[list[str]]
    ) -> None:
        async with trio.open_nursery() as http_nursery:
            app: Any = self
            self.bound = await http_nursery.start(
                lambda task_status: serve(app, config, self.accept_tunnel, self._shutdown.wait,
                                          tls=self.tls.current if self.tls else None,
                                          limits=Limits.of(self.settings),
                                          task_status=task_status)
            )
            log.info("%s listening on %s", "gateway" if self.serve_api else "relay",
                     ", ".join(self.bound))
            task_status.started(self.bound)

    async def drain(self, grace: float,
                    also: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        """Stop taking requests, tell peers GOAWAY, wait up to ``grace`` for in-flight ones
        (and for each of ``also``, e.g. a relay's forwarded streams), then shut down."""
        self.draining = True
        for session in list(self.sessions):
            with trio.move_on_after(1):
                try:
                    await session.goaway("draining", "gateway shutting down")
                except Exception:  # the peer is already gone
                    log.debug("goaway to %s failed", session.name)
        with trio.move_on_after(grace):
            await self._idle.wait()
            for wait in also:
                await wait()
        for session in list(self.sessions):
            await session.flush()
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the HTTP server, end event streams and close every tunnel."""
        self._shutdown.set()
        self.registry.bus.close_all("gateway shutting down")
        for session in list(self.sessions):
            session.abort("gateway shutting down")

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

    async def attach(self, transport: Transport) -> None:
        """Serve a tunnel over an already-connected transport (in-memory peers)."""
        await serve_tunnel(transport, self.registry, self.tunnel_settings, self.sessions,
                           welcome_peers=self.public_peers(), local_id=self.local_id)

    def public_peers(self) -> list[str]:
        """Public tunnel addresses this process tells dialers about in WELCOME: its own
        ``network.public_url``, the configured ``network.advertise`` list, the public
        URLs of relays connected here and those its own dialers learned (never a node's
        address, and nothing unless configured or claimed public)."""
        urls = [self.network.public_url, *self.network.advertise]
        urls += [p.public_url for p in self.registry.peers.values() if p.public_url]
        for dialer in self.dialers:
            if dialer.role == "relay":
                urls += [link.url for link in dialer.links.values()
                         if link.source != "discovered" or link.state == "connected"]
                urls += [u for link in dialer.links.values() for u in link.learned_peers]
        public = (urlunsplit(p._replace(netloc=p.netloc.rpartition("@")[2], query="",
                                        fragment="")) for p in map(urlsplit, urls) if p.netloc)
        return list(dict.fromkeys(public))[:MAX_WELCOME_PEERS]

    def network_view(self) -> dict[str, Any]:
        """What this process knows of the network (``GET /admin/v1/network``)."""
        peers = list(self.registry.peers.values())
        return {
            "roles": self.roles,
            "public_url": self.network.public_url or None,
            "public_peers": self.public_peers(),
            "discover": self.network.discover,
            "dialing": [{"role": d.role, "id": d.peer_id, "links": d.describe()}
                        for d in self.dialers],
            "peers": [{"id": p.id, "role": p.role, "via": p.via or None, "hops": p.hops,
                       "address": p.address, "group": p.group, "token": p.token or None,
                       "state": p.state(), "models": sorted(p.models),
                       "public_url": p.public_url or None}
                      for p in peers],
        }

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await serve_lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, raw_send: Send) -> None:
        """Serve one HTTP request. Whatever goes wrong is answered with an OpenAI error
        object: an :class:`APIError` as itself, any other exception (a bug) as a 500
        naming the request id, logged by :attr:`internal_errors`."""
        request_id = "req_" + uuid.uuid4().hex
        headers: Headers = [(b"x-request-id", request_id.encode())]
        path = scope["path"]
        method = scope["method"]
        answered = False

        async def send(message: dict[str, Any]) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await raw_send(message)

        self.in_flight += 1
        self._idle = trio.Event() if self.in_flight == 1 else self._idle
        try:
            if method == "CONNECT":  # a success would switch the connection to a tunnel
                raise APIError(405, "CONNECT is not supported", code="method_not_allowed")
            endpoint = API_ROUTES.get(path)
            if not self.serve_api and (endpoint is not None or path == "/v1/models"):
                raise APIError(404, "this process is a relay: send API requests to a "
                               "gateway", code="not_a_gateway")
            if endpoint is not None:
                if method != "POST":
                    raise APIError(405, f"{method} is not allowed on {path}; use POST",
                                   code="method_not_allowed")
                if self.draining:
                    raise APIError(503, "gateway is shutting down", code="shutting_down",
                                   type="service_unavailable")
                raw = await read_body(scope, receive, self.settings.max_body_bytes,
                                      self.settings.body_timeout)
                request = parse_request(endpoint, raw, self.settings.max_json_depth)
                await self._serve_api(scope, receive, send, request_id, headers, request, raw)
            elif path == "/v1/models":
                if method != "GET":
                    raise APIError(405, "use GET on /v1/models", code="method_not_allowed")
                group = self.group_keys.group_of(header(scope, b"authorization"))
                await send_bytes(send, 200, self._models_entry(group)[2], headers)
            elif path.startswith("/admin/v1/"):
                self._check_admin(scope)
                await self._admin(scope, receive, send, headers)
            elif path == "/metrics":
                self._check_admin(scope)
                if method != "GET":
                    raise APIError(405, "use GET on /metrics", code="method_not_allowed")
                await send_bytes(send, 200, self.metrics.render(), headers, METRICS_TYPE)
            elif path == "/healthz":
                await send_json(send, 200, {
                    "status": "draining" if self.draining else "ok",
                    "peers": len(self.registry.peers),
                    "models": len(self.registry.live_models()),
                }, headers)
            else:
                raise APIError(404, f"no route for {method} {path}", code="not_found")
        except APIError as error:
            if not answered:  # else the answer is under way and hypercorn ends it
                await send_error(send, error, headers)
        except ClientGone:
            return
        except Exception as exc:
            failure = self.internal_errors.report(request_id, exc)
            if not answered:
                await send_error(send, failure, headers)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _serve_api(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, headers: Headers,
        request: ParsedRequest, raw: bytes,
    ) -> None:
        """Authorize, forward (cancelled if the client leaves), then settle or refund."""
        key_id = key_id_of(header(scope, b"authorization"))
        group = self.group_keys.group_of(header(scope, b"authorization"))
        if group:  # routed only to the group's nodes
            request = dataclasses.replace(
                request, preferences=dataclasses.replace(request.preferences, group=group))
        bus = self.registry.bus
        bus.publish("request.received", request_id=request_id, model=request.model,
                    endpoint=request.endpoint, stream=request.stream, key_id=key_id)
        ctx = RequestContext(request_id, key_id, request.model, request.endpoint, request.stream)
        try:
            if self.settings.groups:
                check_routable(self.registry, request.models,
                               serving=lambda model: self.registry.serving(model, group),
                               known=self.known_by_group.get(group, ()))
            else:
                check_routable(self.registry, request.models)
            await self.billing.authorize(ctx)
        except APIError as refused:
            bus.publish("request.finished", request_id=request_id, status="rejected",
                        model=request.model, node=None, error=refused.message,
                        http_status=refused.status)
            raise
        route = RouteRequest(
            request_id, request.model, request.endpoint,
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            request.body, key_id,
        )
        outcome = Outcome()
        started = time.monotonic()
        settled: Usage | None = None

        async def settle() -> None:
            """A node's answer is complete: settle before its last bytes leave, so no
            client sees a complete answer whose usage record could still be lost."""
            nonlocal settled
            settled = usage_from(outcome, len(raw), started)
            await self.billing.finish(ctx, outcome, settled)

        try:
            complete = await cancel_on_disconnect(receive, send, lambda tracked: (
                self.proxy.forward(request, route, raw, tracked, headers, outcome, settle)))
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
                usage = usage_from(outcome, len(raw), started)
                await self.billing.finish(ctx, outcome, usage)
            self._publish_finished(request_id, outcome, usage, request.stream)

    def _publish_finished(self, request_id: str, outcome: Outcome, usage: Usage,
                          stream: bool) -> None:
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
        )

    def _check_admin(self, scope: Scope) -> None:
        """Admin endpoints need the admin key; without one, they answer loopback only."""
        client = scope.get("client")
        refusal = self.admin_auth.check(header(scope, b"authorization"),
                                        client[0] if client else None)
        if refusal is not None:
            if self.admin_auth.open_to_network:
                raise APIError(401, "a valid admin key is required", code="invalid_admin_key",
                               headers={"www-authenticate": "Bearer"})
            raise APIError(403, "no admin key is configured: the admin API answers on "
                           "loopback only", code="admin_loopback_only")

    async def _admin(self, scope: Scope, receive: Receive, send: Send,
                     headers: Headers) -> None:
        path, method = scope["path"], scope["method"]
        if path == IDENTITIES_PATH or path.startswith(IDENTITIES_PATH + "/"):
            await self._admin_identities(scope, send, headers)
            return
        if method != "GET":
            raise APIError(405, f"use GET on {path}", code="method_not_allowed")
        if path == "/admin/v1/peers":
            await send_json(send, 200, {
                "object": "list",
                "data": [peer.describe() for peer in self.registry.peers.values()],
                "queued": self.proxy.queued,
            }, headers)
        elif path == "/admin/v1/network":
            await send_json(send, 200, self.network_view(), headers)
        elif path == "/admin/v1/requests":
            limit = _query_int(scope, "limit", 100, 1, self.registry.bus.recent_limit)
            await send_json(send, 200, {
                "object": "list", "data": self.registry.bus.recent_requests(limit)}, headers)
        elif path == "/admin/v1/events":
            await cancel_on_disconnect(receive, send, lambda tracked: stream_events(
                self.snapshot, self.registry.bus, tracked, headers))
        else:
            raise APIError(404, f"no admin route {path}", code="not_found")

    async def _admin_identities(self, scope: Scope, send: Send, headers: Headers) -> None:
        """``GET /admin/v1/identities``: bound node names with their keys' fingerprints
        (the key's derived id); ``DELETE /admin/v1/identities/{name}``: forget a binding,
        so the next key to prove the name claims it (a session already up stays up)."""
        path, method = scope["path"], scope["method"]
        store = self.registry.identity_store
        if path == IDENTITIES_PATH:
            if method != "GET":
                raise APIError(405, f"use GET on {path}", code="method_not_allowed")
            bindings: list[tuple[str, bytes, float | None]]
            if store is not None:
                bindings = [(b.name, b.public_key, b.bound_at)
                            for b in _store_call(store.bindings)]
            else:
                bindings = [(name, key, None)
                            for name, key in sorted(self.registry.identities.items())]
            await send_json(send, 200, {"object": "list", "data": [
                {"name": name, "fingerprint": derive_id(key), "bound_at": bound_at,
                 "connected": name in self.registry.peers}
                for name, key, bound_at in bindings
            ]}, headers)
            return
        name = path[len(IDENTITIES_PATH) + 1:]
        if method != "DELETE":
            raise APIError(405, f"use DELETE on {path}", code="method_not_allowed")
        known = store is not None and _store_call(lambda: store.forget(name))
        known = self.registry.identities.pop(name, None) is not None or known
        if not known:
            raise APIError(404, f"no identity is bound to the name '{name}'",
                           code="identity_not_found")
        log.info("identity binding of %s forgotten (admin)", name)
        await send_json(send, 200, {"name": name, "deleted": True}, headers)

    def snapshot(self) -> dict[str, Any]:
        """Peers and recent requests now, for a new events subscriber."""
        return {
            "seq": self.registry.bus.last_seq,
            "ts": time.time(),
            "peers": [peer.describe() for peer in self.registry.peers.values()],
            "requests": self.registry.bus.recent_requests(200),
            "queued": self.proxy.queued,
        }

    def models_list(self, group: str = "") -> dict[str, Any]:
        """The ``/v1/models`` body: the union of the models of the live nodes a request
        of node group ``group`` may use (``""``: the ungrouped nodes). Built again only
        after a peer started or stopped serving a model (the registry's version), so
        asking often costs nothing however many nodes and models there are."""
        return self._models_entry(group)[1]

    def _models_entry(self, group: str) -> tuple[int, dict[str, Any], bytes]:
        """The cached ``(version, body, JSON)`` of :meth:`models_list`, built again if the
        registry's version moved on (the JSON is encoded once, not per request)."""
        version = self.registry.live_version()
        cached = self._models_lists.get(group)
        if cached is not None and cached[0] == version:
            return cached
        data = []
        for model, peers in sorted(self.registry.live_in_group(group).items()):
            info = peers[0].models[model]
            data.append({
                "id": model,
                "object": "model",
                "created": int(min(p.connected_at for p in peers)),
                "owned_by": info.owned_by,
                "meta": {
                    **info.meta,
                    "nodes": len(peers),
                    "context_length": info.context_length,
                    "endpoints": list(info.endpoints),
                },
            })
        body = {"object": "list", "data": data}
        entry = self._models_lists[group] = (version, body, msgspec.json.encode(body))
        return entry

    def _admit_tunnel(self, path: str, subprotocols: Sequence[str],
                      authorization: bytes | None, host: str | None
                      ) -> tuple[int, str, Admission]:
        """Decide a tunnel upgrade: (0, "", admission) to accept (the peer's node group
        and the name of its join token), else (HTTP status, reason, UNGROUPED). Both
        ways in (the listener's and the ASGI app's) ask this."""
        if path != TUNNEL_PATH:
            return 404, "unknown path", UNGROUPED
        if SUBPROTOCOL not in subprotocols:
            return 400, f"subprotocol {SUBPROTOCOL} required", UNGROUPED
        refusal, group = self.auth.admit(authorization, host)
        if refusal is None and self.draining:
            refusal = "gateway is shutting down"
        if refusal is not None:
            log.warning("tunnel from %s refused: %s", host, refusal)
            return 403, refusal, UNGROUPED
        return 0, "", group

    def _handshake_slot(self, host: str | None) -> Slot | str:
        """Count a tunnel upgrade from ``host`` against the per-IP limits: its slot, or
        the reason it is refused (429). Every upgrade counts, refused or not, so
        guessing join tokens is slowed too."""
        try:
            return self.handshakes.acquire(host, "tunnel handshakes")
        except Limited as limited:
            if self._refusal_log.allow(host):
                log.warning("tunnel upgrade from %s refused: %s (more from it this minute "
                            "at debug level)", host, limited.reason)
            else:
                log.debug("tunnel upgrade from %s refused: %s", host, limited.reason)
            return limited.reason

    async def _serve_tunnel(self, transport: Transport, group: Admission, slot: Slot,
                            proven: Callable[[], None] | None = None) -> None:
        """Run a tunnel; its handshake's ``slot`` is released once the peer has proven
        its identity, else when the tunnel ends (by the caller). ``proven`` is called
        then too (the listener stops counting the connection against its address)."""

        def on_proven() -> None:
            slot.release()
            if proven is not None:
                proven()

        started = time.monotonic()
        await serve_tunnel(transport, self.registry, self.tunnel_settings, self.sessions,
                           group, welcome_peers=self.public_peers(), local_id=self.local_id,
                           on_proven=on_proven)
        log.debug("tunnel from %s ended after %.1fs", transport.remote,
                  time.monotonic() - started)

    async def accept_tunnel(self, upgrade: UpgradeRequest) -> None:
        """Serve a tunnel upgrade taken off a fresh connection by the listener."""
        headers = upgrade.headers
        client = upgrade.client
        stream = upgrade.stream
        slot = self._handshake_slot(client[0] if client else None)
        if isinstance(slot, str):
            with trio.move_on_after(1):
                try:
                    await stream.send_all(refusal_response(429, slot))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            return
        with slot:
            subprotocols = [p.strip()
                            for p in headers.get("sec-websocket-protocol", "").split(",")]
            key = headers.get("sec-websocket-key", "")
            if headers.get("sec-websocket-version") != "13" or not key:
                status, reason, group = (426, "WebSocket version 13 with a key is required",
                                         UNGROUPED)
            else:
                authorization = headers.get("authorization")
                status, reason, group = self._admit_tunnel(
                    TUNNEL_PATH, subprotocols,
                    authorization.encode("latin-1") if authorization is not None else None,
                    client[0] if client else None)
            try:
                if status:
                    with trio.move_on_after(1):
                        await stream.send_all(refusal_response(status, reason))
                    return
                await stream.send_all(upgrade_response(key, SUBPROTOCOL))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            remote = f"{client[0]}:{client[1]}" if client else "unknown"
            transport = WebSocketTransport(
                stream, remote, client=False, max_message=self.tunnel_settings.max_frame_bytes,
                buffered=upgrade.buffered)
            try:
                await self._serve_tunnel(transport, group, slot, upgrade.proven)
            finally:  # releases the socket even if the handshake ended without a close
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await transport.aclose()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A tunnel upgrade on a connection that already carried HTTP requests."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        client = scope.get("client")
        slot = self._handshake_slot(client[0] if client else None)
        if isinstance(slot, str):
            await self._refuse_websocket(send, 429, slot)
            return
        with slot:
            status, reason, group = self._admit_tunnel(
                scope["path"], scope.get("subprotocols", []), header(scope, b"authorization"),
                client[0] if client else None)
            if status:
                await self._refuse_websocket(send, status, reason)
                return
            await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
            remote = f"{client[0]}:{client[1]}" if client else "unknown"
            await self._serve_tunnel(ASGIWebSocketTransport(receive, send, remote), group, slot)

    @staticmethod
    async def _refuse_websocket(send: Send, status: int, reason: str) -> None:
        """Refuse an upgrade through ASGI with a plain-text reason."""
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "websocket.http.response.body", "body": reason.encode()})
