"""The relay's forwarding: an OPEN from upstream names its target node; the relay
opens a stream to that node (or to the next relay towards it) and forwards both
directions piece by piece as they arrive. The request body is never collected, and each
side's flow-control window bounds what the relay holds; the node's answer is spliced
straight back from the node tunnel's read loop while upstream credit allows
(:class:`_Splice`). A CANCEL from upstream, or the upstream tunnel's loss, cancels the
downstream stream; a downstream failure before the response head is answered with a
retryable error so the gateway fails over."""

from __future__ import annotations

from typing import Any

import trio

from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.protocol.connection import (
    DataReceived,
    FlowControlError,
    ResponseStarted,
    StreamEnded,
)
from tooti.protocol.usage import end_error
from tooti.settings import RelaySettings
from tooti.tunnel import InboundStream, OutboundStream, TunnelLost


class Forwarder:
    """Forwards streams from upstream peers to the nodes in ``registry``, within the
    relay's stream limits, and counts them."""

    def __init__(self, settings: RelaySettings, registry: Registry, relay_id: str) -> None:
        self.settings = settings
        self.registry = registry
        self.id = relay_id
        self.forwarding = 0
        """Streams being forwarded now."""
        self.per_node: dict[str, int] = {}
        """Node id → streams being forwarded to it now."""
        self.forwarded_total = 0
        """Streams forwarded since start."""
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no stream is being forwarded."""
        await self._idle.wait()

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

    def open(self, stream: InboundStream) -> None:
        """Called in the upstream read loop as an OPEN arrives: open the stream to the
        node there and then, and splice the node's answer straight back (see
        :class:`_Splice`), so no task switch sits on the path. Anything this cannot do
        at once is left to :meth:`forward`."""
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

    async def forward(self, stream: InboundStream) -> None:
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


def _onward(meta: dict[str, Any]) -> dict[str, Any]:
    """An OPEN's metadata as the relay passes it on (the next hop sets its own target)."""
    return {k: v for k, v in meta.items() if k != "target"}


class _Opened:
    """A stream the relay opened to the node from the read loop (see Forwarder.open)."""

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
