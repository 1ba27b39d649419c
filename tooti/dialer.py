"""Dialing out: keep tunnel sessions with a set of gateways or relays.

Nodes and relays both dial out (no inbound port is needed). A :class:`Dialer`
keeps one session per peer URL: the configured peers and the bootstrap list, and -
only when the operator turned ``network.discover`` on - peers learned from WELCOME
frames. At most ``network.max_peers`` of them are dialed or connected at once; the
rest stand by and take over, in turn, when a session fails.
Each session is re-dialed with exponential backoff and jitter; host names are
resolved at every dial. The handshake proves the dialer's identity (the
WELCOME challenge signed with its key).

A configured or bootstrap peer that refuses the join token (HTTP 401 or 403 on the
tunnel upgrade, other than a gateway shutting down) will keep refusing it until an
operator acts: the dialer logs that at ERROR with what to fix (:func:`token_refusal`),
and re-dials only after ``refused_retry`` seconds (:data:`REFUSED_RETRY`, plus up to a
fifth of it as jitter) instead of the normal backoff, so a changed token on either side
is picked up within about a minute without pressing the peer meanwhile. Every other
failure (peer down, TLS, a refused HELLO, a discovered peer refusing us) keeps the
normal backoff and is logged at INFO.

Each session remembers the endpoint names its peer's WELCOME listed
(:meth:`Dialer.accepted`): an owner announces to that peer only those (a gateway or
relay older than the list decodes only the usual three and would ban a node naming
another), whatever the versions of the other peers it dials.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from tooti import __version__, clock
from tooti.backoff import Backoff
from tooti.identity import Identity, b64, proof_message, unb64
from tooti.protocol.connection import (
    Connection,
    Event,
    GoAwayReceived,
    ProtocolError,
    Side,
    WelcomeReceived,
)
from tooti.protocol.schemas import ENDPOINTS, MAX_CONCURRENCY, accepted_endpoints
from tooti.settings import NetworkSettings, TunnelSettings
from tooti.tls import TLSError, client_context
from tooti.transport import Transport, TransportClosed
from tooti.transport.websocket import SUBPROTOCOL, HandshakeFailed, connect
from tooti.tunnel import (
    CLOSE_TIMEOUT,
    REPLACED,
    StreamHandler,
    StreamOpener,
    TunnelLost,
    TunnelSession,
    control_limits_from,
    drain_sessions,
    limits_from,
)

HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
"""Seconds to reach a peer and complete the WebSocket upgrade."""


MAX_OFFERED_STREAMS = MAX_CONCURRENCY
"""Most concurrent streams a dialer offers its peer for what its models advertise."""
MAX_DISCOVERED_FAILURES = 5
"""Failed dials in a row after which a discovered peer is forgotten."""
FORGET_FOR = 600.0
"""Seconds a forgotten discovered peer stays forgotten, however often it is listed."""
REFUSED_RETRY = 60.0
"""Seconds before re-dialing a peer that refused the join token (it will not fix
itself); the default of the dialer's ``refused_retry``."""
_AUTH_STATUSES = (401, 403)
_NOT_AUTH = ("shutting down",)
"""Refusals with an auth status that are no verdict on the token (a gateway's 403
while it shuts down): those keep the normal backoff."""


_USUAL = frozenset(ENDPOINTS)


class TunnelRefused(Exception):
    """The peer refused our HELLO (GOAWAY or a broken handshake)."""


def token_refusal(exc: BaseException, url: str) -> str | None:
    """The ERROR line for a dial that failed because ``url`` refused the join token
    (HTTP 401/403 on the upgrade), saying what to fix; ``None`` for any other failure.
    The token itself is never in the line."""
    if not isinstance(exc, HandshakeFailed) or exc.status not in _AUTH_STATUSES:
        return None
    if any(phrase in exc.reason for phrase in _NOT_AUTH):
        return None
    refused = f"gateway {url} refused the join token ({exc})"
    if "no token configured" in exc.reason:
        return (f"{refused}: that gateway has no join token and admits nodes from loopback "
                "only: give it one (--join-token / TOOTI_JOIN_TOKEN there) and the same "
                "token here")
    return (f"{refused}: check --join-token / TOOTI_JOIN_TOKEN, or mint one with "
            "`tooti join-tokens create`")


class SessionOwner(Protocol):
    """What a dialer needs from the role it dials for (a node or a relay)."""

    handler: StreamHandler | None
    """Serves the streams the peer opens."""

    opener: StreamOpener | None
    """Called in the read loop as the peer opens a stream, before ``handler`` runs."""

    def stats(self) -> dict[str, Any]:
        """The HEARTBEAT payload."""
        ...

    async def on_session(self, session: TunnelSession) -> None:
        """Runs beside each new session once the handshake is done (send the first
        frames, keep advertisements going); cancelled when the session ends."""
        ...


@dataclass
class Link:
    """What the dialer knows of one peer URL (shown by ``tooti peers``)."""

    url: str
    source: str
    """``configured``, ``bootstrap`` or ``discovered``."""
    state: str = "standby"
    """``standby`` (waiting for one of ``network.max_peers`` slots), ``connecting``,
    ``connected`` or ``backoff``."""
    session_id: str = ""
    since: float = field(default_factory=clock.wall)
    last_error: str = ""
    learned_peers: list[str] = field(default_factory=list)
    """Addresses this peer's last WELCOME listed."""

    def describe(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {"url": self.url, "source": self.source, "state": self.state,
                "session_id": self.session_id or None, "since": self.since,
                "last_error": self.last_error or None, "peers": self.learned_peers}


class Dialer:
    """Sessions from one node or relay to its upstream peers."""

    def __init__(
        self, owner: SessionOwner, *, peer_id: str, role: str, identity: Identity,
        tunnel: TunnelSettings, network: NetworkSettings | None = None,
        labels: dict[str, str] | None = None, join_token: str = "",
        reconnect_initial: float = 0.25, reconnect_max: float = 10.0,
        is_stopping: Callable[[], bool] = lambda: False,
        streams_wanted: Callable[[], int] | None = None,
        rng: random.Random | None = None, refused_retry: float = REFUSED_RETRY,
    ) -> None:
        """``streams_wanted``: how many concurrent streams the owner can serve (a node:
        what its models advertise); each HELLO offers at least that many, up to
        :data:`MAX_OFFERED_STREAMS`, so a peer's requests are not held back by the
        tunnel while the node has slots. ``rng`` draws the re-dial jitter (each delay
        is scaled by a factor between 0.5 and 1). ``refused_retry``: seconds before
        re-dialing a peer that refused the join token (scaled by 1 to 1.2)."""
        self.owner = owner
        self.peer_id = peer_id
        self.role = role
        self.identity = identity
        self.tunnel = tunnel
        self.network = network or NetworkSettings()
        self.labels = labels or {}
        self.join_token = join_token
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.is_stopping = is_stopping
        self.streams_wanted = streams_wanted
        self.rng = rng or random.Random()
        self.refused_retry = refused_retry
        self.log = logging.getLogger(f"tooti.{role}")
        self.links: dict[str, Link] = {}
        self._forgotten: dict[str, float] = {}
        """Discovered peer URL → when it was forgotten (:func:`tooti.clock.now`)."""
        self.sessions: set[TunnelSession] = set()
        self._accepted: dict[TunnelSession, frozenset[str]] = {}
        """Session → the endpoint names its WELCOME accepts (see :meth:`accepted`)."""
        self.connected = trio.Event()
        """Set each time a session completes its handshake (for callers that wait)."""
        self._replaced: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._slots = trio.Semaphore(max(1, self.network.max_peers))
        """At most ``network.max_peers`` peers are dialed or connected at once; the
        others wait their turn (FIFO), taking over when a session fails."""

    # ------------------------------------------------------------ the set of peers

    async def run(self, urls: list[str], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial ``urls`` and the bootstrap peers (and discovered ones, if allowed)
        until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for url in urls:
                self._start(url, "configured")
            for url in self.network.bootstrap_peers:
                self._start(url, "bootstrap")
            task_status.started()
            await trio.sleep_forever()  # discovered peers may still be started here

    def _start(self, url: str, source: str) -> None:
        if url in self.links or self._nursery is None:
            return
        self.links[url] = Link(url, source)
        self._nursery.start_soon(self.dial_forever, url)

    def learn(self, urls: list[str]) -> None:
        """Peers a WELCOME listed: dialed only with ``network.discover`` on, while fewer
        than ``network.max_peers`` peers are dialed."""
        if not self.network.discover:
            return
        from tooti.config import ConfigError, normalize_peer_url

        now = clock.now()
        for url, when in list(self._forgotten.items()):
            if now - when >= FORGET_FOR:
                del self._forgotten[url]
        for raw in urls:
            if len(self.links) >= self.network.max_peers:
                return
            try:
                url = normalize_peer_url(raw)
            except ConfigError:
                self.log.info("ignoring advertised peer %r: not a ws:// or wss:// URL", raw[:200])
                continue
            if url in self._forgotten:
                continue  # it kept failing: another peer's claim does not revive it yet
            if url not in self.links and url != self.network.public_url:
                self.log.info("discovered peer %s: dialing it", url)
                self._start(url, "discovered")

    async def drain(self, grace: float, wait_idle: Callable[[], Awaitable[None]],
                    reason: str) -> None:
        """Tell every peer GOAWAY (no new streams), wait up to ``grace`` for
        ``wait_idle`` (the owner's in-flight streams), then close every session."""
        await drain_sessions(self.sessions, grace, wait_idle, reason)

    def describe(self) -> list[dict[str, Any]]:
        """Every peer URL this dialer knows, with its state."""
        return [link.describe() for link in self.links.values()]

    def accepted(self, session: TunnelSession) -> frozenset[str]:
        """The endpoint names ``session``'s peer decodes in model entries (its WELCOME's
        ``endpoints``, :func:`~tooti.protocol.schemas.accepted_endpoints`); the usual
        three for a session this dialer does not hold."""
        return self._accepted.get(session, _USUAL)

    # ------------------------------------------------------------ one peer

    async def dial_forever(self, url: str) -> None:
        """Keep one session with ``url``, re-dialling with backoff and jitter."""
        link = self.links.setdefault(url, Link(url, "configured"))
        backoff = Backoff(self.reconnect_initial, self.reconnect_max, jitter=(0.5, 1.0),
                          rng=self.rng)
        # A discovered address is only what some peer claimed: it never gets the join
        # token, only the separate discovery token (if the operator set one).
        token = self.network.discover_token if link.source == "discovered" else self.join_token
        headers = [(b"authorization", b"Bearer " + token.encode())] if token else []
        failures = 0
        while not self.is_stopping():
            refusal: str | None = None
            link.state, link.since = "standby", clock.wall()
            async with self._slots:  # released during backoff: a standby peer goes next
                started = clock.now()
                link.state, link.since = "connecting", clock.wall()
                try:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        transport = await connect(
                            url, subprotocol=SUBPROTOCOL, headers=headers,
                            max_message=self.tunnel.max_frame_bytes,
                            ssl_context=self._tls() if url.startswith("wss:") else None)
                    try:
                        await self.serve_transport(transport, link)
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                            await transport.aclose()
                    failures = 0
                except (OSError, HandshakeFailed, TunnelRefused, TLSError,
                        trio.TooSlowError) as exc:
                    failures = 0 if link.state == "connected" else failures + 1
                    # A discovered peer is only some peer's claim, dialed without the
                    # join token: its refusal is no operator's error (it is forgotten
                    # after MAX_DISCOVERED_FAILURES dials at the normal backoff).
                    if link.source != "discovered":
                        refusal = token_refusal(exc, url)
                    link.last_error = refusal or str(exc) or type(exc).__name__
                    if refusal is None:
                        self.log.info("tunnel to %s: %s", url, link.last_error)
            if self.is_stopping():
                return
            if link.source == "discovered" and failures >= MAX_DISCOVERED_FAILURES:
                # Only a peer's claim: after repeated failures, forget it and make room.
                self.log.info("forgetting discovered peer %s after %d failed dials", url,
                              failures)
                del self.links[url]
                self._forgotten[url] = clock.now()
                return
            if url in self._replaced:
                self._replaced.discard(url)
                self.log.error("another process with id %s connected to %s and replaced this "
                          "session: is the same %s running twice? backing off",
                          self.peer_id, url, self.role)
                backoff.hold_at_cap()
            elif clock.now() - started > 10 * self.reconnect_initial + 5:
                backoff.reset()  # the session lasted: start the doubling over
            if refusal is not None:  # it will not fix itself: do not press the peer
                pause = self.refused_retry * self.rng.uniform(1.0, 1.2)
                self.log.error("%s; next dial in %.0f s", refusal, pause)
            else:
                pause = backoff.next()
            link.state, link.since, link.session_id = "backoff", clock.wall(), ""
            self.log.info("re-dialling %s in %.2fs", url, pause)
            await trio.sleep(pause)

    def _tls(self) -> ssl.SSLContext:
        """What ``wss://`` peers' certificates are checked against: the system's trust
        store and ``network.peer_ca`` (loaded at the first ``wss://`` dial)."""
        if self._ssl_context is None:
            self._ssl_context = client_context(self.network.peer_ca)
        return self._ssl_context

    async def serve_transport(self, transport: Transport, link: Link | None = None) -> None:
        """Run the dialer side of one tunnel (handshake, then serve) until it closes."""
        limits = limits_from(self.tunnel)
        if self.streams_wanted is not None:
            wanted = min(self.streams_wanted(), MAX_OFFERED_STREAMS)
            limits = dataclasses.replace(limits, max_streams=max(limits.max_streams, wanted))
        conn = Connection(Side.DIALER, limits)
        extra: dict[str, Any] = {"public_key": b64(self.identity.public_key)}
        if self.network.public_url:
            extra["public_url"] = self.network.public_url
        try:
            await transport.send(conn.send_hello(
                self.peer_id, self.role, f"tooti/{__version__}", dict(self.labels),
                extra=extra))
            event = None
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                event = conn.receive_message(await transport.receive())
        except ProtocolError as exc:
            with trio.move_on_after(CLOSE_TIMEOUT):  # the peer need not answer
                await transport.aclose(1002, exc.code)
            raise TunnelRefused(f"bad handshake: {exc}") from None
        except TransportClosed as exc:
            raise TunnelRefused(f"closed during handshake: {exc}") from None
        if isinstance(event, GoAwayReceived):
            with trio.move_on_after(CLOSE_TIMEOUT):  # the peer need not answer
                await transport.aclose(1000, "refused")
            raise TunnelRefused(f"refused: {event.code} {event.reason}")
        if not isinstance(event, WelcomeReceived):
            with trio.move_on_after(CLOSE_TIMEOUT):  # the peer need not answer
                await transport.aclose(1002, "no welcome")
            raise TunnelRefused("no WELCOME from peer")
        welcome = event

        def on_event(event: Event) -> None:
            if isinstance(event, GoAwayReceived) and event.code == REPLACED:
                self._replaced.add(transport.remote)

        session = TunnelSession(
            transport, conn, heartbeat_interval=welcome.heartbeat_interval,
            stats=self.owner.stats, handler=self.owner.handler, opener=self.owner.opener,
            name=transport.remote, control=control_limits_from(self.tunnel),
            on_event=on_event,
        )
        try:
            challenge = unb64(welcome.extra.get("challenge"))
            if challenge is not None:
                signature = self.identity.sign(
                    proof_message(challenge, welcome.session_id, self.peer_id))
                await transport.send(conn.send_proof(b64(signature)))
        except TransportClosed:
            return
        self.log.info("connected to %s (session %s)", transport.remote, welcome.session_id)
        if link is not None:
            link.state, link.since, link.last_error = "connected", clock.wall(), ""
            link.session_id, link.learned_peers = welcome.session_id, list(welcome.peers)
        self.learn(welcome.peers)
        self._accepted[session] = accepted_endpoints(welcome.extra.get("endpoints"))
        self.sessions.add(session)
        self.connected.set()
        self.connected = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_beside, session, self.owner.on_session)
                await session.run()
                nursery.cancel_scope.cancel()
        finally:
            self.sessions.discard(session)
            self._accepted.pop(session, None)
            self.log.info("tunnel to %s closed: %s", transport.remote, session.close_reason)


async def _beside(session: TunnelSession,
                  work: Callable[[TunnelSession], Awaitable[None]]) -> None:
    """Run ``work`` for a session; a lost tunnel just ends it."""
    try:
        await work(session)
    except TunnelLost:
        return
