"""One admitted peer's tunnel, from its HELLO to its end: the identity handshake
(challenge, proof, bans, name binding), registration in the registry, and every control
frame it sends afterwards (heartbeats, MODELS, ROUTES, GOAWAY), checked where it enters."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence

import trio

from tooti import __version__
from tooti.backends.base import ModelInfo
from tooti.identity import CHALLENGE_BYTES, PUBLIC_KEY_BYTES, b64, proof_message, unb64, verify
from tooti.mesh.advertisements import RelayedNodes
from tooti.mesh.join_tokens import UNGROUPED, Admission
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.mesh.serves_log import ServesLog
from tooti.protocol import schemas
from tooti.protocol.connection import (
    Connection,
    Event,
    GoAwayReceived,
    HeartbeatReceived,
    HelloReceived,
    ModelsReceived,
    ProofReceived,
    ProtocolError,
    RoutesReceived,
    Side,
)
from tooti.settings import TunnelSettings
from tooti.transport import Transport, TransportClosed
from tooti.tunnel import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TIMEOUT,
    REPLACED,
    TunnelLost,
    TunnelSession,
    control_limits_from,
    limits_from,
)

log = logging.getLogger("tooti.gateway")

HANDSHAKE_TIMEOUT = 10.0
PEER_ROLES = ("node", "relay")
"""The roles a dialing peer may announce in HELLO."""


async def serve_peer(
    transport: Transport, registry: Registry, settings: TunnelSettings,
    sessions: set[TunnelSession], admission: Admission = UNGROUPED,
    welcome_peers: list[str] | None = None, local_id: str = "",
    on_proven: Callable[[], None] | None = None,
    endpoints: Sequence[str] | None = schemas.ALL_ENDPOINTS,
) -> None:
    """Run the acceptor side of one tunnel until it closes; the peer joins the node
    group its join token admitted it to (``admission``), and its nodes belong to the
    admission's owner (bound by :meth:`Registry.add`). ``welcome_peers`` are
    the public gateway/relay addresses the WELCOME tells the peer about. A relay's
    listener passes its own id as ``local_id``: session ids then start with it, so a
    node's proof names the relay it was made for (see :mod:`tooti.mesh.advertisements`).
    ``on_proven`` is called once the peer has proven its identity (its handshake is
    over: the per-address handshake limit frees its slot). ``endpoints``: the endpoint
    names WELCOME lists, every one this version decodes in model entries, so a node (or
    relay) announces to this session only what it understands
    (:func:`tooti.protocol.schemas.accepted_endpoints`); None leaves the member out, as
    an acceptor older than it did (such a peer then announces only the usual three)."""
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
        extra = schemas.convert(hello.extra, schemas.HelloExtra, "bad_hello", "HELLO")
        public_key = unb64(extra.public_key, PUBLIC_KEY_BYTES)
        if public_key is None:
            raise ProtocolError("bad_hello", "public_key must be a base64 Ed25519 key")
        challenge = os.urandom(CHALLENGE_BYTES)
        session_id = f"{local_id}.{uuid.uuid4().hex}" if local_id else uuid.uuid4().hex
        welcome_extra: dict[str, object] = {"software": f"tooti/{__version__}",
                                            "challenge": b64(challenge)}
        if endpoints is not None:
            welcome_extra["endpoints"] = list(endpoints)
        await transport.send(conn.send_welcome(
            version, session_id, settings.heartbeat_interval, peers=welcome_peers,
            extra=welcome_extra, require_proof=True,
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
        refusal = registry.banned(hello.peer_id)
        if refusal is not None:
            raise ProtocolError("banned", refusal)
        registry.bind_identity(hello.peer_id, public_key)
        conn.proof_verified()
        if on_proven is not None:
            on_proven()
        proven = {"challenge": b64(challenge), "session_id": session_id,
                  "signature": proof.signature}
    except ProtocolError as exc:
        log.warning("tunnel from %s refused: %s", transport.remote, exc)
        with trio.move_on_after(1):
            try:
                await transport.send(conn.send_goaway(exc.code, exc.message))
            except TransportClosed:
                pass
        with trio.move_on_after(CLOSE_TIMEOUT):  # the peer need not answer the close
            await transport.aclose(CLOSE_PROTOCOL_ERROR, exc.code)
        return
    except TransportClosed:
        return
    peer_ref: list[Peer] = []
    relayed: list[RelayedNodes] = []
    serves_log = ServesLog()
    last_stats: list[dict[str, object] | None] = [None]
    """The raw figures of the peer's last checked HEARTBEAT (without ``t``)."""

    def on_event(event: Event) -> None:
        """Peer input enters here: each value is checked (:mod:`tooti.protocol.schemas`)
        before it is stored; a ProtocolError ends the session as a violation."""
        peer = peer_ref[0]
        if isinstance(event, HeartbeatReceived):
            # The idle path: a HEARTBEAT repeating the figures of the last one (its
            # send time ``t`` aside, which the session already acknowledged) is not
            # checked and converted again: the registry only notes it.
            raw = event.stats
            raw.pop("t", None)
            if raw == last_stats[0]:
                registry.heartbeat_unchanged(peer)
            else:
                registry.heartbeat(peer, schemas.stats(raw))
                last_stats[0] = raw  # only once checked: a bad one never matches
        elif isinstance(event, RoutesReceived):
            relayed[0].apply(event)  # the connection accepts ROUTES from relays only
        elif isinstance(event, ModelsReceived):
            if relayed:  # a relay serves nothing itself: its nodes come in ROUTES
                log.warning("relay %s sent MODELS; ignored", peer.id)
                return
            entries = schemas.model_entries(event.models, settings.max_models_per_peer)
            if registry.set_models(peer, [ModelInfo.from_wire(e) for e in entries]):
                serves_log.note(peer)
        elif isinstance(event, GoAwayReceived):
            peer.draining = True
            if relayed:
                relayed[0].mark_draining()
            registry.changed()
            registry.peer_updated(peer)

    session = TunnelSession(
        transport, conn, heartbeat_interval=settings.heartbeat_interval, on_event=on_event,
        name=hello.peer_id, control=control_limits_from(settings),
    )
    peer = Peer(
        id=hello.peer_id, role=hello.role, session=session, address=transport.remote,
        labels=hello.labels, software=hello.software, public_key=public_key, proof=proven,
        group=admission.group, token=admission.token, owner=admission.owner,
        token_id=admission.token_id, group_id=admission.group_id,
        public_url=_public_url(hello.role, extra.public_url),
        stream_limit=conn.peer_limits.max_streams,
    )
    peer_ref.append(peer)
    if hello.role == "relay":
        relayed.append(RelayedNodes(registry, peer, settings.max_relayed_nodes,
                                    settings.max_models_per_peer))
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
    # What only the handshake needed would otherwise stay alive in this frame for the
    # tunnel's whole life (about 1.5 KB per idle node: decoded HELLO/PROOF and friends).
    del hello, extra, proof, proven, welcome_extra, message, signature, challenge
    sessions.add(session)
    try:
        await session.run()
    finally:
        sessions.discard(session)
        if session.violation:  # it broke the protocol: refused for a while
            registry.penalize(peer, session.violation)
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
