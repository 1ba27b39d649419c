"""A scripted hostile node: a real WebSocket client that does the real handshake
(HELLO with its key, WELCOME, PROOF signed with a :class:`tooti.identity.Identity`)
and can then send any frame, with any payload, at any rate."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from tests.conftest import Network
from tooti.identity import Identity, b64, proof_message, unb64
from tooti.mesh.events import BusEvent
from tooti.protocol import frames
from tooti.protocol.connection import (
    Connection,
    GoAwayReceived,
    Limits,
    ProtocolError,
    Side,
    WelcomeReceived,
)
from tooti.protocol.frames import FrameType
from tooti.transport import TransportClosed
from tooti.transport.websocket import SUBPROTOCOL, WebSocketTransport, connect

_json = msgspec.json.Encoder()


async def handshake(send: Callable[[bytes], Awaitable[None]],
                    receive: Callable[[], Awaitable[bytes]], conn: Connection, peer_id: str,
                    identity: Identity, role: str = "node", sign_as: str | None = None,
                    extra: dict[str, Any] | None = None) -> WelcomeReceived:
    """A dialer's side of the handshake by hand: HELLO with ``identity``'s key, the
    WELCOME, then PROOF (signed for ``sign_as``, default ``peer_id``)."""
    await send(conn.send_hello(peer_id, role, "test", {},
                               extra={"public_key": b64(identity.public_key), **(extra or {})}))
    welcome = conn.receive_message(await receive())
    assert isinstance(welcome, WelcomeReceived), welcome
    challenge = unb64(welcome.extra["challenge"])
    assert challenge is not None
    signature = identity.sign(proof_message(challenge, welcome.session_id, sign_as or peer_id))
    await send(conn.send_proof(b64(signature)))
    return welcome


@dataclass
class HostilePeer:
    """One authenticated tunnel a test drives frame by frame."""

    transport: WebSocketTransport
    conn: Connection
    identity: Identity
    id: str
    welcome: WelcomeReceived
    heartbeats_sent: int = 0

    async def send(self, frame: bytes) -> None:
        """Send one frame (any bytes) as one WebSocket message."""
        await self.transport.send(frame)

    async def send_json(self, ftype: FrameType, payload: Any, stream_id: int = 0,
                        flags: int = 0) -> None:
        """Send a frame of ``ftype`` whose payload is ``payload`` as JSON (bytes are sent
        as they are), whatever the protocol says of it."""
        body = payload if isinstance(payload, bytes) else _json.encode(payload)
        await self.send(frames.encode(ftype, stream_id, body, flags))

    async def models(self, models: list[dict[str, Any]]) -> None:
        """Advertise ``models`` (MODELS, entries sent as given)."""
        await self.send_json(FrameType.MODELS, {"models": models})

    async def heartbeat(self, **stats: Any) -> None:
        """A HEARTBEAT with ``stats`` as its figures."""
        await self.send_json(FrameType.HEARTBEAT, stats)

    async def heartbeat_acked(self, **stats: Any) -> None:
        """A HEARTBEAT (with ``t``), returning once the gateway echoed it: the gateway has
        handled every frame sent before it. Other frames meanwhile are dropped."""
        sent_at = float(self.heartbeats_sent)
        self.heartbeats_sent += 1
        await self.heartbeat(**stats, t=sent_at)
        while True:
            message = await self.transport.receive()
            frame = frames.decode(message, 1 << 30)
            if (frame.type is FrameType.HEARTBEAT and frame.flags & frames.FLAG_ACK
                    and msgspec.json.decode(frame.payload).get("t") == sent_at):
                return

    async def goaway(self) -> GoAwayReceived | None:
        """Read until the gateway's GOAWAY (returned) or the tunnel's close (None)."""
        reader = Connection(Side.ACCEPTOR)  # parses GOAWAY without state
        while True:
            try:
                message = await self.transport.receive()
            except TransportClosed:
                return None
            if message and message[0] == FrameType.GOAWAY:
                try:
                    event = reader._dispatch(frames.decode(message, 1 << 30))
                except ProtocolError:
                    continue
                if isinstance(event, GoAwayReceived):
                    return event

    async def flood_until_goaway(self, ftype: FrameType, payload: Any
                                 ) -> GoAwayReceived | None:
        """Send ``ftype`` frames of ``payload`` as fast as the socket takes them until the
        gateway's GOAWAY (returned) or the tunnel's close (None); the caller bounds it."""

        async def flood() -> None:
            try:
                while True:
                    await self.send_json(ftype, payload)
            except TransportClosed:
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            goaway = await self.goaway()
            nursery.cancel_scope.cancel()
        return goaway

    async def drain(self) -> None:
        """Read and drop whatever arrives (heartbeats, OPENs...) until the close."""
        try:
            while True:
                await self.transport.receive()
        except TransportClosed:
            return


@asynccontextmanager
async def hostile_peer(url: str, peer_id: str | None = None,
                       identity: Identity | None = None, role: str = "node",
                       token: str = "", limits: Limits | None = None
                       ) -> AsyncIterator[HostilePeer]:
    """A :class:`HostilePeer` dialed into the tunnel endpoint ``url`` and through the
    handshake (``peer_id`` defaults to ``identity``'s derived id)."""
    identity = identity or Identity.generate()
    headers = [(b"authorization", b"Bearer " + token.encode())] if token else []
    with trio.fail_after(10):
        transport = await connect(url, subprotocol=SUBPROTOCOL, headers=headers,
                                  max_message=1 << 24)
    try:
        conn = Connection(Side.DIALER, limits or Limits())
        with trio.fail_after(10):
            welcome = await handshake(transport.send, transport.receive, conn,
                                      peer_id or identity.id, identity, role)
        yield HostilePeer(transport, conn, identity, peer_id or identity.id, welcome)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await transport.aclose()


def watch(network: Network, kinds: set[str]) -> list[BusEvent]:
    """The gateway's events of ``kinds`` from now on, appended as they are published."""
    seen: list[BusEvent] = []
    network.gateway.registry.bus.listeners.append(
        lambda event: seen.append(event) if event.kind in kinds else None)
    return seen


def relayed_route(node: Identity, relay_id: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    """A genuine ROUTES entry: ``node`` proved itself in a handshake with the relay."""
    challenge, session_id = os.urandom(32), f"{relay_id}.{os.urandom(16).hex()}"
    signature = node.sign(proof_message(challenge, session_id, node.id))
    return {"id": node.id, "public_key": b64(node.public_key), "hops": 1,
            "proof": {"challenge": b64(challenge), "session_id": session_id,
                      "signature": b64(signature)},
            "models": models, "stats": {}, "labels": {}}
