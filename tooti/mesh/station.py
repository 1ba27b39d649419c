"""The accepting side every gateway and relay is built on.

A :class:`Station` owns what both roles share: the listener, the registry of live
peers, tunnel admission (:class:`~tooti.mesh.admission.TunnelAdmission`), the admin key,
TLS and the process's life cycle (serve, drain, shut down). It answers every HTTP
request's frame - a request id, an OpenAI error object for whatever goes wrong,
``/healthz`` and ``/readyz`` - and hands each path to the handler a role mounted for its prefix (the
gateway mounts ``/v1/``, every role mounts the admin API), so the station itself knows
nothing of the API a role serves above it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import trio
from hypercorn.config import Config

from tooti import clock
from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.errors import APIError
from tooti.mesh.admission import TunnelAdmission
from tooti.mesh.http import (
    ClientGone,
    Headers,
    InternalErrors,
    Receive,
    ResponseSend,
    Scope,
    Send,
    send_error,
    send_json,
    serve_lifespan,
)
from tooti.mesh.identity_store import IdentityStore
from tooti.mesh.join_tokens import BearerAuth, TokenChanges
from tooti.mesh.listener import Limits, serve
from tooti.mesh.registry import Registry
from tooti.settings import GatewaySettings, NetworkSettings, TunnelSettings
from tooti.tls import ServerTLS
from tooti.tunnel import drain_sessions

if TYPE_CHECKING:
    from tooti.dialer import Dialer

log = logging.getLogger("tooti.gateway")

LISTEN_BACKLOG = 2048
"""Pending TCP connections the socket queues (1,000 clients may connect at once)."""
MAX_WELCOME_PEERS = 32
"""Most addresses one WELCOME lists."""

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
"""Whether a process can serve now, and the ``/readyz`` body saying so."""
CorsHook = Callable[[Scope, Send, Headers], Awaitable[bool]]
"""Answers a request itself (True) or adds to its answers' headers (False)."""
Handler = Callable[[Scope, Receive, Send, str, Headers], Awaitable[None]]
"""Serves one HTTP request under a mounted prefix, given its request id and the headers
every answer carries; raises :class:`APIError` to refuse."""


class Station:
    """Listener, registry, tunnel admission and life cycle of one gateway or relay."""

    def __init__(
        self, settings: GatewaySettings, tunnel: TunnelSettings, *,
        network: NetworkSettings | None = None, identities: IdentityStore | None = None,
        roles: Sequence[str] = ("gateway",), local_id: str = "",
        join_directory: JoinTokenDirectory | None = None,
    ) -> None:
        """``identities`` persists node-name bindings (None = memory only); ``network``
        holds the public addresses given to dialers in WELCOME; ``roles`` are the
        process's roles (shown by the admin API); ``local_id`` is a relay's own id,
        which its session ids start with; ``join_directory`` admits the join tokens
        minted per account and binds each joining node to its owner (its
        :meth:`~JoinTokenDirectory.run` is started by :meth:`serve`, before tunnels are
        taken)."""
        self.settings = settings
        self.tunnel_settings = tunnel
        self.network = network or NetworkSettings()
        self.roles = list(roles)
        self.registry = Registry(identities=identities, ban_seconds=settings.peer_ban_seconds,
                                 max_identities=settings.max_identity_bindings,
                                 heartbeat_interval=tunnel.heartbeat_interval,
                                 relay_strikes=settings.relay_strikes,
                                 relay_strike_seconds=settings.relay_strike_seconds)
        self.join_directory = join_directory
        self.admission = TunnelAdmission(settings, tunnel, self.registry, local_id=local_id,
                                         welcome_peers=self.public_peers,
                                         join_directory=join_directory)
        self.admin_auth = BearerAuth(settings.admin_key)
        self.internal_errors = InternalErrors(log)
        """Reports requests that failed on a bug (one line each, tracebacks rationed)."""
        self.limits = Limits.of(settings)
        """What each new client connection may take (swapped by :meth:`reload_settings`)."""
        self.tls = (ServerTLS(settings.tls_cert, settings.tls_key, settings.tls_reload_interval)
                    if settings.tls_cert else None)
        """The listener's certificate (None: plain HTTP); raises TLSError if unusable."""
        self.dialers: list[Dialer] = []
        """Dialers of roles in the same process (node, relay), shown by the admin API."""
        self._mounts: list[tuple[str, Handler]] = []
        self._exact: dict[str, Handler] = {}
        self.bound: list[str] = []
        self.in_flight = 0
        self._idle: trio.Event | None = None
        """Set when :attr:`in_flight` drops to 0; made only while someone waits for it."""
        self._shutdown = trio.Event()
        self.draining = False
        """Set by :meth:`drain`: new requests get 503 and new tunnels are refused."""
        self.cors: CorsHook | None = None
        """Asked first for every HTTP request when set (the gateway's CORS, see
        :mod:`tooti.gateway.cors`): True when it answered the request (a preflight); it
        may add headers to those every answer of the request carries."""
        self.readiness: Readiness | None = None
        """What ``/readyz`` asks when the station is not a gateway's (a relay sets it:
        ready while an upstream link is up); None: :meth:`gateway_readiness`."""

    def mount(self, prefix: str, handler: Handler) -> None:
        """Serve paths starting with ``prefix`` by ``handler``: the longest matching
        prefix wins (``/admin/v1/accounts`` before ``/admin/v1/``), then the first mount."""
        self._mounts.append((prefix, handler))
        self._mounts.sort(key=lambda mount: -len(mount[0]))  # stable: equal ones keep order

    def mount_exact(self, path: str, handler: Handler) -> None:
        """Serve exactly ``path`` (no path below it) by ``handler``, before any prefix
        mount: the gateway's root ``/``, which Ollama clients probe, without shadowing
        ``/healthz`` or ``/readyz``."""
        self._exact[path] = handler

    def show_dialer(self, dialer: Dialer) -> None:
        """List a same-process role's dialer in the network view and in WELCOME."""
        self.dialers.append(dialer)

    # ------------------------------------------------------------ life cycle

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                    grace: float = 10.0) -> None:
        """Serve HTTP and tunnels until :meth:`shutdown`; reports the bound URLs."""
        config = Config()
        config.bind = [self.settings.listen]
        config.accesslog = None
        # A Logger (not "-"): hypercorn adds no handler of its own, so its errors go
        # through the process's one handler and format (tooti.logging_setup).
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = grace
        config.keep_alive_timeout = self.settings.keep_alive_timeout
        config.websocket_max_message_size = self.tunnel_settings.max_frame_bytes
        config.include_server_header = False
        config.backlog = LISTEN_BACKLOG  # hypercorn's 100 overflows under a burst of clients
        async with trio.open_nursery() as nursery:
            if self.join_directory is not None:
                await nursery.start(self.join_directory.run)
            self.admission.warn_if_loopback_only()
            if self.tls is not None:
                nursery.start_soon(self.tls.watch)
            await self._serve_http(config, task_status)
            nursery.cancel_scope.cancel()

    async def _serve_http(self, config: Config, task_status: trio.TaskStatus[list[str]]
                          ) -> None:
        """Run the listener until it has stopped (gracefully) after :meth:`shutdown`."""
        async with trio.open_nursery() as nursery:
            app: Any = self
            self.bound = await nursery.start(
                lambda task_status: serve(app, config, self.admission.admit_upgrade,
                                          self._shutdown.wait,
                                          tls=self.tls.current if self.tls else None,
                                          limits=lambda: self.limits,
                                          task_status=task_status))
            role = "gateway" if "gateway" in self.roles else "relay"
            logging.getLogger(f"tooti.{role}").info("%s listening on %s", role,
                                                    ", ".join(self.bound))
            task_status.started(self.bound)

    async def wait_idle(self) -> None:
        """Wait until no HTTP request is being served."""
        if self.in_flight == 0:
            await trio.lowlevel.checkpoint()
            return
        if self._idle is None:
            self._idle = trio.Event()
        await self._idle.wait()

    def reload_tokens(self, settings: GatewaySettings) -> TokenChanges:
        """Admit new tunnels by the join tokens of ``settings`` (SIGHUP), those of every
        node group it configures (one added since the start included)."""
        self.admission.group_names = frozenset(settings.groups)
        return self.admission.reload(settings)

    def reload_settings(self, settings: GatewaySettings) -> TokenChanges:
        """SIGHUP: from now on, check the admin API by the admin key of ``settings``,
        admit new tunnels by its join tokens (:meth:`reload_tokens`), limit tunnel
        handshakes per address by its rates and caps (addresses keep what they hold), and
        give each new client connection the connection limits and timeouts of
        ``settings`` (those open keep theirs). ``settings`` keep the running values of
        what needs a restart (``listen``, TLS paths). Tunnels already up stay up. No
        checkpoint: each value read after it is the new one (a request under way reads
        each value when it needs it, so it may read some before and some after)."""
        changes = self.reload_tokens(settings)
        self.settings = settings
        self.limits = Limits.of(settings)
        self.admin_auth = BearerAuth(settings.admin_key)
        handshakes = self.admission.handshakes
        handshakes.rate = settings.tunnel_handshake_rate
        handshakes.burst = settings.tunnel_handshake_burst
        handshakes.concurrent = settings.tunnel_handshakes_per_ip
        return changes

    async def drain(self, grace: float,
                    also: Sequence[Callable[[], Awaitable[None]]] = ()) -> None:
        """Stop taking requests and tunnels, tell peers GOAWAY, wait up to ``grace`` for
        in-flight requests (and for each of ``also``, e.g. a relay's forwarded
        streams), then shut down. Admin event streams (``tooti tui``) end now, and any
        opened during the drain at once: a watcher is no work to wait for."""
        self.draining = self.admission.closed = True
        self.registry.bus.close_all("gateway shutting down")

        async def idle() -> None:
            await self.wait_idle()
            for wait in also:
                await wait()

        await drain_sessions(self.admission.sessions, grace, idle, "gateway shutting down")
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the HTTP server, end event streams and close every tunnel."""
        self._shutdown.set()
        self.registry.bus.close_all("gateway shutting down")
        for session in list(self.admission.sessions):
            session.abort("gateway shutting down")

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: whether a load balancer should send this process traffic, and
        the body saying so. Never while draining; else the relay's :attr:`readiness`
        when set, else :meth:`gateway_readiness`."""
        if self.draining:
            return False, {"status": "not ready", "reason": "draining"}
        if self.readiness is not None:
            return self.readiness()
        return self.gateway_readiness()

    def gateway_readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when at least one live peer serves at least one model ready (from the
        counts the routing index keeps: no walk over peers or models)."""
        registry = self.registry
        peers, models = registry.ready_counts()
        if models:
            return True, {"status": "ready", "peers": peers, "models": models}
        loading = len(registry.index.loading_models)
        reason = (f"{loading} model{'s' if loading != 1 else ''} still loading, none ready"
                  if loading else "no live node serves a model")
        return False, {"status": "not ready", "reason": reason, "peers": peers,
                       "models": 0, "loading": loading}

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

    # ------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self.admission.admit_websocket(scope, receive, send)
        elif kind == "lifespan":
            await serve_lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, raw_send: Send) -> None:
        """Serve one HTTP request. Whatever goes wrong is answered with an OpenAI error
        object: an :class:`APIError` as itself, any other exception (a bug) as a 500
        naming the request id, logged by :attr:`internal_errors`."""
        # Time-ordered (microseconds, then 72 random bits; 32 hex digits as a UUID's):
        # its usage row and settle entry are appended at the end of their indexes.
        request_id = f"req_{int(clock.wall() * 1_000_000):014x}{secrets.token_hex(9)}"
        headers: Headers = [(b"x-request-id", request_id.encode())]
        path, method = scope["path"], scope["method"]
        send = ResponseSend(raw_send)
        self.in_flight += 1
        try:
            if method == "CONNECT":  # a success would switch the connection to a tunnel
                raise APIError(405, "CONNECT is not supported", code="method_not_allowed")
            if self.cors is not None and await self.cors(scope, send, headers):
                return
            exact = self._exact.get(path) if self._exact else None
            if exact is not None:
                await exact(scope, receive, send, request_id, headers)
                return
            for prefix, handler in self._mounts:
                if path.startswith(prefix):
                    await handler(scope, receive, send, request_id, headers)
                    break
            else:
                if path == "/readyz":  # for load balancers: can it serve now?
                    ready, body = self.ready()
                    await send_json(send, 200 if ready else 503, body, headers)
                    return
                if path != "/healthz":  # liveness: 200 while the process runs
                    raise APIError(404, f"no route for {method} {path}", code="not_found")
                await send_json(send, 200, {
                    "status": "draining" if self.draining else "ok",
                    "peers": len(self.registry.peers),
                    "models": self.registry.ready_counts()[1],
                }, headers)
        except APIError as error:
            if not send.started:  # else the answer is under way and hypercorn ends it
                await send_error(send, error, headers)
        except ClientGone:
            return
        except Exception as exc:
            failure = self.internal_errors.report(request_id, exc)
            if not send.started:
                await send_error(send, failure, headers)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None
