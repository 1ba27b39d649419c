"""Accepting node tunnels: authentication, handshake, registration."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import uuid
from collections.abc import Mapping

import trio

from tooti import __version__
from tooti.backends.base import ModelInfo
from tooti.gateway.groups import bearer_token
from tooti.gateway.registry import Peer, Registry
from tooti.gateway.routes import RelayedNodes
from tooti.identity import (
    CHALLENGE_BYTES,
    PUBLIC_KEY_BYTES,
    b64,
    proof_message,
    unb64,
    verify,
)
from tooti.protocol.connection import (
    Connection,
    Event,
    GoAwayReceived,
    HeartbeatReceived,
    HelloReceived,
    Limits,
    ModelsReceived,
    ProofReceived,
    ProtocolError,
    RoutesReceived,
    Side,
)
from tooti.settings import TunnelSettings
from tooti.transport import Transport, TransportClosed
from tooti.tunnel import CLOSE_PROTOCOL_ERROR, TunnelLost, TunnelSession

log = logging.getLogger("tooti.gateway")

HANDSHAKE_TIMEOUT = 10.0
PEER_ROLES = ("node", "relay")
"""The roles a dialing peer may announce in HELLO."""
REPLACED = "replaced"
"""GOAWAY code sent to a session superseded by a newer one with the same peer id."""


def limits_from(settings: TunnelSettings) -> Limits:
    """The protocol limits a tunnel end enforces, from settings."""
    return Limits(
        max_frame_bytes=settings.max_frame_bytes,
        max_streams=settings.max_streams,
        initial_window=settings.initial_window,
        max_control_bytes=settings.max_control_bytes,
    )


class BearerAuth:
    """Checks a bearer secret (a node's join token, or the admin key).

    The secret is kept only as its SHA-256 digest and compared in constant
    time. With no secret configured, only loopback clients are accepted.

    ``groups`` (group name → join token) adds one token per node group: a peer
    presenting a group's token is admitted into that group (see :meth:`admit`).
    With any token configured, every peer must present one.
    """

    def __init__(self, join_token: str, groups: Mapping[str, str] | None = None) -> None:
        self._digest = hashlib.sha256(join_token.encode()).digest() if join_token else None
        self._groups = [(name, hashlib.sha256(token.encode()).digest())
                        for name, token in (groups or {}).items() if token]

    @property
    def open_to_network(self) -> bool:
        """True when a join token is configured (non-loopback peers allowed)."""
        return self._digest is not None or bool(self._groups)

    def check(self, authorization: bytes | None, client_host: str | None) -> str | None:
        """Return None if the peer is admitted, else the reason it is refused."""
        return self.admit(authorization, client_host)[0]

    def admit(self, authorization: bytes | None, client_host: str | None
              ) -> tuple[str | None, str]:
        """``(None, group)`` if the peer is admitted (group ``""`` = ungrouped), else
        ``(reason, "")``. Every configured token is compared, in constant time."""
        if not self.open_to_network:
            if client_host is None or client_host == "memory":
                return None, ""
            try:
                if ipaddress.ip_address(client_host).is_loopback:
                    return None, ""
            except ValueError:
                pass
            return "no token configured: only loopback clients are accepted", ""
        presented = hashlib.sha256(bearer_token(authorization)).digest()
        group: str | None = None
        if self._digest is not None and hmac.compare_digest(presented, self._digest):
            group = ""
        for name, digest in self._groups:
            if hmac.compare_digest(presented, digest):
                group = name
        if group is None:
            return "invalid token", ""
        return None, group


async def serve_tunnel(
    transport: Transport, registry: Registry, settings: TunnelSettings,
    sessions: set[TunnelSession], group: str = "", welcome_peers: list[str] | None = None,
    local_id: str = "",
) -> None:
    """Run the acceptor side of one tunnel until it closes; the peer joins ``group``
    (the one its join token admitted it to, ``""`` = ungrouped). ``welcome_peers`` are
    the public gateway/relay addresses the WELCOME tells the peer about. A relay's
    listener passes its own id as ``local_id``: session ids then start with it, so a
    node's proof names the relay it was made for (see :mod:`tooti.gateway.routes`)."""
    conn = Connection(Side.ACCEPTOR, limits_from(settings))
    hello: Event | None = None
    try:
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            hello = conn.receive_message(await transport.receive())
        if not isinstance(hello, HelloReceived):
            raise ProtocolError("handshake_timeout", "no HELLO received")
        version = conn.choose_version(hello.versions)
        if hello.role not in PEER_ROLES:
            raise ProtocolError("bad_hello", f"role must be one of {', '.join(PEER_ROLES)}")
        public_key = unb64(hello.extra.get("public_key"), PUBLIC_KEY_BYTES)
        if public_key is None:
            raise ProtocolError("bad_hello", "public_key must be a base64 Ed25519 key")
        challenge = os.urandom(CHALLENGE_BYTES)
        session_id = f"{local_id}.{uuid.uuid4().hex}" if local_id else uuid.uuid4().hex
        await transport.send(conn.send_welcome(
            version, session_id, settings.heartbeat_interval, peers=welcome_peers,
            extra={"software": f"tooti/{__version__}", "challenge": b64(challenge)},
            require_proof=True,
        ))
        proof: Event | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            proof = conn.receive_message(await transport.receive())
        if not isinstance(proof, ProofReceived):
            raise ProtocolError("proof_required", "no PROOF received")
        signature = unb64(proof.signature)
        message = proof_message(challenge, session_id, hello.peer_id)
        if signature is None or not verify(public_key, signature, message):
            raise ProtocolError("bad_proof", "the signature does not match the public key")
        registry.bind_identity(hello.peer_id, public_key)
        conn.proof_verified()
        proven = {"challenge": b64(challenge), "session_id": session_id,
                  "signature": proof.signature}
    except ProtocolError as exc:
        log.warning("tunnel from %s refused: %s", transport.remote, exc)
        with trio.move_on_after(1):
            try:
                await transport.send(conn.send_goaway(exc.code, exc.message))
            except TransportClosed:
                pass
        await transport.aclose(CLOSE_PROTOCOL_ERROR, exc.code)
        return
    except TransportClosed:
        return
    peer_ref: list[Peer] = []
    relayed: list[RelayedNodes] = []

    def on_event(event: Event) -> None:
        peer = peer_ref[0]
        if isinstance(event, RoutesReceived):
            relayed[0].apply(event)  # the connection accepts ROUTES from relays only
        elif isinstance(event, HeartbeatReceived):
            was_live = peer.live
            peer.stats = event.stats
            if peer.live != was_live:  # health flipped: wake requests waiting on peers
                registry.changed()
            registry.peer_updated(peer)
        elif isinstance(event, ModelsReceived):
            if relayed:  # a relay serves nothing itself: its nodes come in ROUTES
                log.warning("relay %s sent MODELS; ignored", peer.id)
                return
            try:
                models = [ModelInfo.from_wire(m) for m in event.models]
            except (TypeError, ValueError, AttributeError, OverflowError) as exc:
                session.abort(f"bad MODELS frame: {exc}")
                return
            registry.set_models(peer, models)
            log.info("peer %s serves %s", peer.id, ", ".join(sorted(peer.models)) or "nothing")
        elif isinstance(event, GoAwayReceived):
            peer.draining = True
            if relayed:
                relayed[0].mark_draining()
            registry.changed()
            registry.peer_updated(peer)

    session = TunnelSession(
        transport, conn, heartbeat_interval=settings.heartbeat_interval, on_event=on_event,
        name=hello.peer_id,
    )
    peer = Peer(
        id=hello.peer_id, role=hello.role, session=session, address=transport.remote,
        labels=hello.labels, software=hello.software, public_key=public_key, proof=proven,
        group=group, public_url=_public_url(hello.role, hello.extra.get("public_url")),
    )
    peer_ref.append(peer)
    if hello.role == "relay":
        relayed.append(RelayedNodes(registry, peer, settings.max_relayed_nodes))
        conn.accepts_routes = True
    replaced = registry.add(peer)
    if replaced is not None and not replaced.via:
        # Tell the older session why, so a duplicate node backs off instead of flapping.
        with trio.move_on_after(1):
            try:
                await replaced.session.goaway(REPLACED, "a newer session of this node id "
                                              "connected")
            except TunnelLost:
                pass
        replaced.session.abort("replaced by a newer session of the same node")
    sessions.add(session)
    try:
        await session.run()
    finally:
        sessions.discard(session)
        if relayed:
            relayed[0].clear()
        registry.remove(peer)


def _public_url(role: str, value: object) -> str:
    """A relay's claimed public tunnel URL, if well-formed; other peers have none."""
    from tooti.config import ConfigError, normalize_peer_url

    if role != "relay" or not isinstance(value, str) or len(value) > 2048:
        return ""
    try:
        return normalize_peer_url(value)
    except ConfigError:
        return ""
