"""The relay role: one outbound link for many nodes.

A relay accepts node tunnels exactly like a gateway (it runs the gateway's
listener, with its auth, limits and registry, but no ``/v1`` API) and dials
its upstream peers - gateways or other relays - like a node does. Upstream it
advertises every node it can reach in ROUTES frames (:mod:`tooti.gateway.routes`),
each with the proof that node gave in its own handshake, and keeps the
advertisement current as nodes join, leave, change models or report load.

An OPEN from upstream names its target node; the relay opens a stream to that
node (or to the next relay towards it) and forwards both directions piece by
piece as they arrive: the request body is never collected, and each side's
flow-control window bounds what the relay holds. A CANCEL from upstream, or
the upstream tunnel's loss, cancels the downstream stream; a downstream
failure before the response head is answered with a retryable error so the
gateway fails over.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import msgspec
import trio

from tooti.dialer import Dialer
from tooti.gateway.events import BusEvent
from tooti.gateway.registry import Peer, Registry
from tooti.gateway.routes import advertised, can_advertise
from tooti.identity import Identity
from tooti.protocol.connection import Connection, FlowControlError
from tooti.settings import NetworkSettings, RelaySettings, TunnelSettings
from tooti.tunnel import (
    InboundStream,
    OutboundStream,
    StreamHandler,
    TunnelLost,
    TunnelSession,
)

log = logging.getLogger("tooti.relay")
_json = msgspec.json.Encoder()

ROUTES_BUDGET = 0.5
"""Share of the control-payload limit one ROUTES frame may use (the rest is headroom)."""
PEER_EVENTS = frozenset({"peer.joined", "peer.updated", "peer.left", "peer.cooldown"})


def _error(status: int, code: str, message: str, retryable: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"error": {"status": status, "code": code, "message": message}}
    if retryable:
        info["retryable"] = True
    return info


class Relay:
    """Forwards streams from upstream peers to the nodes in ``registry``."""

    def __init__(
        self, settings: RelaySettings, tunnel: TunnelSettings, registry: Registry,
        relay_id: str, identity: Identity, network: NetworkSettings | None = None,
    ) -> None:
        self.settings = settings
        self.tunnel = tunnel
        self.registry = registry
        self.id = relay_id
        self.draining = False
        self.forwarding = 0
        """Streams being forwarded now."""
        self.per_node: dict[str, int] = {}
        self.forwarded_total = 0
        self.handler: StreamHandler | None = self._forward
        self.dialer = Dialer(
            self, peer_id=relay_id, role="relay", identity=identity, tunnel=tunnel,
            network=network, join_token=settings.join_token,
            reconnect_initial=settings.reconnect_initial,
            reconnect_max=settings.reconnect_max, is_stopping=lambda: self.draining,
        )
        self._idle = trio.Event()
        self._idle.set()

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Dial every upstream peer and serve until cancelled."""
        await self.dialer.run(list(self.settings.peers), task_status=task_status)

    async def drain(self, grace: float) -> None:
        """Tell upstream peers GOAWAY; let forwarded streams finish for up to ``grace``."""
        self.draining = True
        await self.dialer.drain(grace, self.wait_idle, "relay shutting down")

    async def wait_idle(self) -> None:
        """Wait until no stream is being forwarded."""
        await self._idle.wait()

    def stats(self) -> dict[str, Any]:
        """The HEARTBEAT payload sent upstream."""
        nodes = sum(1 for p in self.registry.peers.values() if can_advertise(p))
        return {"in_flight": self.forwarding, "nodes": nodes, "healthy": True,
                "forwarded": self.forwarded_total}

    # ------------------------------------------------------------ advertising

    async def on_session(self, session: TunnelSession) -> None:
        """Advertise every node we can reach on a new upstream session, then each change
        (batched over ``advertise_interval``) for as long as the session lives."""
        dirty: set[str] = set()
        wake = trio.Event()

        def listener(event: BusEvent) -> None:
            nonlocal wake
            if event.kind not in PEER_EVENTS:
                return
            data = event.data
            peer_id = data.get("peer_id") or (data.get("peer") or {}).get("id")
            if isinstance(peer_id, str):
                dirty.add(peer_id)
                wake.set()

        self.registry.bus.listeners.append(listener)
        try:
            await self._send_routes(session, [p.id for p in self.registry.peers.values()])
            while not session.closed.is_set():
                await wake.wait()
                wake = trio.Event()
                await trio.sleep(self.settings.advertise_interval)
                ids, dirty = list(dirty), set()
                await self._send_routes(session, ids)
        finally:
            self.registry.bus.listeners.remove(listener)

    async def _send_routes(self, session: TunnelSession, ids: list[str]) -> None:
        """ROUTES for ``ids`` (advertised if reachable, removed if not), split so that
        no frame exceeds the control-payload budget."""
        budget = int(self.tunnel.max_control_bytes * ROUTES_BUDGET)
        nodes: list[dict[str, Any]] = []
        removed: list[str] = []
        size = 0
        for peer_id in ids:
            peer = self.registry.peers.get(peer_id)
            if peer is not None and not can_advertise(peer) and peer.role != "node":
                continue  # a relay or gateway below us: its nodes are advertised, not it
            entry: dict[str, Any] | None = (
                advertised(peer) if peer is not None and can_advertise(peer) else None)
            cost = len(_json.encode(entry)) if entry is not None else len(peer_id) + 4
            if cost > budget:  # one node's labels and models alone would break the frame
                log.warning("node %r not advertised upstream: its entry is %d bytes, over "
                            "the %d-byte budget", peer_id[:128], cost, budget)
                entry, cost = None, len(peer_id) + 4
            if size + cost > budget and (nodes or removed):
                await session.send_control(
                    partial(Connection.send_routes, nodes=nodes, removed=removed))
                nodes, removed, size = [], [], 0
            if entry is not None:
                nodes.append(entry)
            else:
                removed.append(peer_id)
            size += cost
        if nodes or removed:
            await session.send_control(
                partial(Connection.send_routes, nodes=nodes, removed=removed))

    # ------------------------------------------------------------ forwarding

    async def _forward(self, stream: InboundStream) -> None:
        """Serve one upstream OPEN by forwarding it to its target node."""
        meta = stream.meta
        target, model = meta.get("target"), meta.get("model")
        if not isinstance(target, str) or not isinstance(model, str):
            await stream.end(_error(400, "bad_open", "an OPEN through a relay needs the "
                                    "target node id and the model"))
            return
        peer = self.registry.peers.get(target)
        if peer is None or peer.role != "node" or not peer.live:
            await stream.end(_error(503, "node_unavailable", f"relay {self.id} cannot reach "
                                    f"node {target} now", retryable=True))
            return
        if (self.forwarding >= self.settings.max_streams
                or self.per_node.get(target, 0) >= self.settings.max_streams_per_node
                or not peer.session.conn.can_open_stream()):
            await stream.end(_error(503, "relay_busy", f"relay {self.id} is at its stream "
                                    f"limit for node {target}", retryable=True))
            return
        self.forwarding += 1
        self.forwarded_total += 1
        self.per_node[target] = self.per_node.get(target, 0) + 1
        self._idle = trio.Event() if self.forwarding == 1 else self._idle
        try:
            await self._relay(stream, peer, {k: v for k, v in meta.items() if k != "target"})
        finally:
            self.forwarding -= 1
            left = self.per_node[target] - 1
            if left:
                self.per_node[target] = left
            else:
                del self.per_node[target]
            if self.forwarding == 0:
                self._idle.set()

    async def _relay(self, stream: InboundStream, peer: Peer, meta: dict[str, Any]) -> None:
        out: OutboundStream | None = None
        try:
            first = await stream.read_chunk() or b""
            complete = stream.body_complete  # decided once: the OPEN's FIN says the same
            try:
                out = await peer.open_stream(meta, first, fin=complete)
            except FlowControlError as exc:
                await stream.end(_error(503, "relay_busy", f"node {peer.id}: {exc}",
                                        retryable=True))
                return
            # A nursery wraps what its tasks raise in an ExceptionGroup: a lost tunnel is
            # caught in each task instead, and raised once the nursery is done.
            lost: list[TunnelLost] = []
            async with trio.open_nursery() as nursery:
                if not complete:
                    nursery.start_soon(_pump_request, stream, out, lost, nursery.cancel_scope)
                try:
                    head = await out.head()
                    if head is not None:
                        await stream.respond(head.status, head.headers)
                        # Chunks that queued up meanwhile go on as one frame.
                        limit = stream.session.conn.max_data_payload()
                        while (chunk := await out.next_data(limit)) is not None:
                            await stream.send(chunk)
                except TunnelLost as exc:
                    lost.append(exc)
                nursery.cancel_scope.cancel()
            if lost:
                raise lost[0]
            await stream.end(out.end_info or {})
        except TunnelLost as exc:
            if stream.session.closed.is_set():
                return  # upstream is gone: nobody to tell
            reason = f"node {peer.id} lost behind relay {self.id}: {exc}"
            try:
                await stream.end(_error(502, "node_unavailable", reason,
                                        retryable=not stream.started))
            except TunnelLost:
                return
        finally:
            if out is not None and out.end_info is None:
                await out.cancel("upstream cancelled")


async def _pump_request(stream: InboundStream, out: OutboundStream, lost: list[TunnelLost],
                        scope: trio.CancelScope) -> None:
    """Forward the rest of a request body as it arrives, ending it with FIN; a lost
    tunnel is noted in ``lost`` and cancels ``scope`` (the forwarding)."""
    try:
        while (chunk := await stream.read_chunk()) is not None:
            await out.send_body(chunk, fin=False)
        await out.send_body(b"", fin=True)
    except TunnelLost as exc:
        lost.append(exc)
        scope.cancel()
