"""The relay role: one outbound link for many nodes.

A relay accepts node tunnels exactly like a gateway (it runs the gateway's
listener, with its auth, limits and registry, but no ``/v1`` API) and dials
its upstream peers - gateways or other relays - like a node does. Upstream it
advertises every node it can reach in ROUTES frames (:mod:`tooti.mesh.advertisements`),
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
import math
from functools import partial
from typing import Any

import msgspec
import trio

from tooti.dialer import Dialer
from tooti.identity import Identity
from tooti.mesh.advertisements import advertised, can_advertise, routing_state
from tooti.mesh.events import BusEvent
from tooti.mesh.registry import Peer, Registry
from tooti.protocol.connection import (
    Connection,
    DataReceived,
    FlowControlError,
    ResponseStarted,
    StreamEnded,
)
from tooti.protocol.usage import end_error
from tooti.settings import NetworkSettings, RelaySettings, TunnelSettings
from tooti.tunnel import (
    InboundStream,
    OutboundStream,
    StreamHandler,
    StreamOpener,
    TunnelLost,
    TunnelSession,
)

log = logging.getLogger("tooti.relay")
_json = msgspec.json.Encoder()

ROUTES_BUDGET = 0.5
"""Share of the control-payload limit one ROUTES frame may use (the rest is headroom)."""
PEER_EVENTS = frozenset({"peer.joined", "peer.updated", "peer.left", "peer.cooldown"})


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
        self.opener: StreamOpener | None = self._open
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
        (batched over ``advertise_interval``) for as long as the session lives. A node's
        whole entry goes out only when something that matters for routing changed (models,
        labels, draining, its session, ...); new load figures alone go out in ``loads``,
        at most once per heartbeat interval and batched, so an honest relay's control
        traffic stays far within its upstream's budget however many nodes it has."""
        dirty: set[str] = set()
        wake = trio.Event()
        state = _Advertised()

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
            await self._send_routes(session, [p.id for p in self.registry.peers.values()],
                                    state)
            loads_at = trio.current_time() + session.heartbeat_interval
            while not session.closed.is_set():
                with trio.move_on_at(loads_at if state.loads else math.inf):
                    await wake.wait()
                wake = trio.Event()
                if dirty:
                    await trio.sleep(self.settings.advertise_interval)
                    ids, dirty = list(dirty), set()
                    await self._send_routes(session, ids, state)
                if state.loads and trio.current_time() >= loads_at:
                    await self._send_loads(session, state)
                    loads_at = trio.current_time() + session.heartbeat_interval
        finally:
            self.registry.bus.listeners.remove(listener)

    async def _send_routes(self, session: TunnelSession, ids: list[str],
                           state: _Advertised) -> None:
        """ROUTES for ``ids`` (advertised if reachable, removed if not), split so that
        no frame exceeds the control-payload budget. A node whose routing state is as
        last sent is only noted in ``state.loads`` if its figures changed."""
        budget = int(self.tunnel.max_control_bytes * ROUTES_BUDGET)
        nodes: list[msgspec.Raw] = []  # each entry encoded once, to measure and to send
        removed: list[str] = []
        size = 0
        for peer_id in ids:
            peer = self.registry.peers.get(peer_id)
            if peer is not None and not can_advertise(peer) and peer.role != "node":
                continue  # a relay or gateway below us: its nodes are advertised, not it
            reachable = peer is not None and can_advertise(peer)
            if peer is not None and reachable:
                routing = routing_state(peer)
                if state.sent.get(peer_id) == routing:
                    if state.stats.get(peer_id) != peer.stats:
                        state.loads.add(peer_id)
                    continue
                state.sent[peer_id], state.stats[peer_id] = routing, peer.stats
                state.loads.discard(peer_id)
            else:
                state.forget(peer_id)
            entry: msgspec.Raw | None = (
                msgspec.Raw(_json.encode(advertised(peer)))
                if peer is not None and reachable else None)
            cost = len(entry) if entry is not None else len(peer_id) + 4
            if cost > budget:  # one node's labels and models alone would break the frame
                log.warning("node %r not advertised upstream: its entry is %d bytes, over "
                            "the %d-byte budget", peer_id[:128], cost, budget)
                entry, cost = None, len(peer_id) + 4
                state.forget(peer_id)
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

    async def _send_loads(self, session: TunnelSession, state: _Advertised) -> None:
        """The figures of every node in ``state.loads`` (advertised, only its load
        changed), in as few ROUTES frames as fit."""
        budget = int(self.tunnel.max_control_bytes * ROUTES_BUDGET)
        loads: list[msgspec.Raw] = []
        size = 0
        for peer_id in state.loads:
            peer = self.registry.peers.get(peer_id)
            if peer is None or state.sent.get(peer_id) != routing_state(peer):
                continue  # gone or changed since: its entry goes out (or went) whole
            state.stats[peer_id] = peer.stats
            load = msgspec.Raw(_json.encode({"id": peer_id, "stats": peer.stats}))
            if size + len(load) > budget and loads:
                await session.send_control(
                    partial(Connection.send_routes, nodes=[], removed=[], loads=loads))
                loads, size = [], 0
            loads.append(load)
            size += len(load)
        state.loads.clear()
        if loads:
            await session.send_control(
                partial(Connection.send_routes, nodes=[], removed=[], loads=loads))

    # ------------------------------------------------------------ forwarding

    def _target(self, meta: dict[str, Any]) -> Peer | dict[str, Any]:
        """The node an OPEN targets, or the END that refuses it."""
        target, model = meta.get("target"), meta.get("model")
        if not isinstance(target, str) or not isinstance(model, str):
            return end_error(400, "bad_open", "an OPEN through a relay needs the target node "
                             "id and the model")
        peer = self.registry.peers.get(target)
        if peer is None or peer.role != "node" or not peer.live:
            return end_error(503, "node_unavailable", f"relay {self.id} cannot reach node "
                             f"{target} now", retryable=True)
        if (self.forwarding >= self.settings.max_streams
                or self.per_node.get(target, 0) >= self.settings.max_streams_per_node
                or not peer.session.conn.can_open_stream()):
            return end_error(503, "relay_busy", f"relay {self.id} is at its stream limit for "
                             f"node {target}", retryable=True)
        return peer

    def _count(self, target: str, delta: int) -> None:
        self.forwarding += delta
        left = self.per_node.get(target, 0) + delta
        if left:
            self.per_node[target] = left
        else:
            del self.per_node[target]
        if delta > 0:
            self.forwarded_total += 1
            if self.forwarding == 1:
                self._idle = trio.Event()
        elif self.forwarding == 0:
            self._idle.set()

    def _open(self, stream: InboundStream) -> None:
        """Called in the upstream read loop as an OPEN arrives: open the stream to the
        node there and then, and splice the node's answer straight back (see
        :class:`_Splice`), so no task switch sits on the path. Anything this cannot do
        at once is left to :meth:`_forward`."""
        peer = self._target(stream.meta)
        if not isinstance(peer, Peer) or not stream.body_arrived:
            return  # the task refuses it, or pumps a body still arriving
        first = stream.read_chunk_nowait() or b""
        try:
            out, rest = peer.open_stream_nowait(_onward(stream.meta), first, fin=True)
        except (FlowControlError, TunnelLost):
            return
        self._count(peer.id, +1)
        stream.context = _Opened(out, rest, peer)
        if not rest:
            out.splice = _Splice(stream, out)

    async def _forward(self, stream: InboundStream) -> None:
        """Serve one upstream OPEN by forwarding it to its target node."""
        opened = stream.context
        if not isinstance(opened, _Opened):
            peer = self._target(stream.meta)
            if not isinstance(peer, Peer):
                await stream.end(peer)
                return
            self._count(peer.id, +1)
            opened = _Opened(None, b"", peer)
        try:
            await self._relay(stream, opened)
        finally:
            self._count(opened.peer.id, -1)

    async def _relay(self, stream: InboundStream, opened: _Opened) -> None:
        peer = opened.peer
        out = opened.out
        try:
            if out is None:
                first = await stream.read_chunk() or b""
                complete = stream.body_complete  # decided once: the OPEN's FIN says the same
                try:
                    out = await peer.open_stream(_onward(stream.meta), first, fin=complete)
                except FlowControlError as exc:
                    await stream.end(end_error(503, "relay_busy", f"node {peer.id}: {exc}",
                                               retryable=True))
                    return
            else:
                complete = True
                if opened.rest:
                    await out.send_body(opened.rest, fin=True)
            # A nursery wraps what its tasks raise in an ExceptionGroup: a lost tunnel is
            # caught in each task instead, and raised once the nursery is done.
            lost: list[TunnelLost] = []
            async with trio.open_nursery() as nursery:
                if not complete:
                    nursery.start_soon(_pump_request, stream, out, lost, nursery.cancel_scope)
                try:
                    head = await out.head()
                    if head is not None:
                        if not stream.started:  # else the splice passed the head on
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
            await stream.end(out.end_info or {})  # a no-op if the END was spliced
        except TunnelLost as exc:
            if stream.session.closed.is_set():
                return  # upstream is gone: nobody to tell
            reason = f"node {peer.id} lost behind relay {self.id}: {exc}"
            try:
                await stream.end(end_error(502, "node_unavailable", reason,
                                           retryable=True if not stream.started else None))
            except TunnelLost:
                return
        finally:
            if out is not None and out.end_info is None:
                await out.cancel("upstream cancelled")


class _Advertised:
    """What one upstream session was told of each node."""

    __slots__ = ("loads", "sent", "stats")

    def __init__(self) -> None:
        self.sent: dict[str, tuple[Any, ...]] = {}
        """Node id → its routing state (:func:`routing_state`) as last advertised."""
        self.stats: dict[str, dict[str, Any]] = {}
        """Node id → the load figures last advertised."""
        self.loads: set[str] = set()
        """Nodes whose figures alone changed since: sent with the next ``loads``."""

    def forget(self, peer_id: str) -> None:
        self.sent.pop(peer_id, None)
        self.stats.pop(peer_id, None)
        self.loads.discard(peer_id)


def _onward(meta: dict[str, Any]) -> dict[str, Any]:
    """An OPEN's metadata as the relay passes it on (the next hop sets its own target)."""
    return {k: v for k, v in meta.items() if k != "target"}


class _Opened:
    """A stream the relay opened to the node from the read loop (see Relay._open)."""

    __slots__ = ("out", "peer", "rest")

    def __init__(self, out: OutboundStream | None, rest: bytes, peer: Peer) -> None:
        self.out = out
        self.rest = rest
        self.peer = peer


class _Splice:
    """Passes a node's RESPONSE, DATA and END on upstream from the node tunnel's read
    loop, each re-framed for the upstream stream as it is decoded: no buffering, no
    task wake-up. The node's credit is granted back at once. DATA the upstream stream
    has no credit for (or a closed upstream) ends the splicing: from then on frames are
    buffered and the forwarding task sends them, in order, as credit allows."""

    __slots__ = ("active", "out", "up")

    def __init__(self, up: InboundStream, out: OutboundStream) -> None:
        self.up = up
        self.out = out
        self.active = True

    def __call__(self, event: ResponseStarted | DataReceived | StreamEnded) -> bool:
        if not self.active:
            return False
        up = self.up
        session = up.session
        conn = session.conn
        if session.closed.is_set() or not conn.has_stream(up.id):
            self.active = False
            return False
        if isinstance(event, DataReceived):
            data = event.data
            if (not up.started or len(data) > conn.send_credit(up.id)
                    or len(data) > conn.max_data_payload()):
                self.active = False
                return False
            if data:
                session.enqueue(conn.send_data(up.id, data))
                self.out.session.grant(self.out.id, len(data))
            return True
        if isinstance(event, ResponseStarted):
            up.started = True
            session.enqueue(conn.send_response(up.id, event.status, event.headers))
            return True
        session.enqueue(conn.send_end(up.id, event.info))  # END: the task still wakes
        return False


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
