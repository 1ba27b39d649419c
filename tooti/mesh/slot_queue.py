"""Slots on the indexed peers: reserving and releasing one stream of a model, and the
FIFO queues of requests waiting for a slot per model and node group."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from tooti.mesh.candidates import SlotWaiter
from tooti.mesh.peer import Peer
from tooti.mesh.routing_index import ModelGroup, RoutingIndex


class SlotQueue:
    """Reserves slots on the peers of a :class:`RoutingIndex` and queues the requests
    that found none. A freed slot goes to the oldest queued request that may use it;
    a new request takes one only if no older request of its model can (see
    :meth:`dispatch`)."""

    def __init__(self, index: RoutingIndex) -> None:
        """Tells ``index`` which (model, group) pairs requests wait for, so their
        indexes stay while empty."""
        self.index = index
        self.waiting: dict[ModelGroup, deque[SlotWaiter]] = {}
        """(model, node group) → requests waiting for a slot, oldest first."""
        index.waited = self.waiting
        self._dispatching = False
        self._pending: set[ModelGroup] = set()

    # ------------------------------------------------------------ slots

    def usable(self, peer: Peer, model: str) -> bool:
        """True if ``peer`` can take one more stream of ``model`` now: indexed with a free
        slot, still in the state it was indexed in (else it is re-evaluated), and its
        tunnel below its stream limit (shared by every model and peer on it)."""
        index = self.index
        filed = index.filed.get(peer)
        found = None if filed is None else index.find(model, filed[0])
        if found is None or peer not in found.free:
            return False
        info = peer.models.get(model)
        record = peer.health.get(model)
        if (info is None or not peer.live or (record is not None and record.in_cooldown)
                or peer.in_flight.get(model, 0) >= peer.capacity(model)):
            # It changed without a refresh: catch up (queued requests see it at the next
            # hand-out; handing out now could change the index under the caller's view).
            index.file(peer, notify=True)
            return False
        return peer.session.conn.can_open_stream()

    def reserve(self, peer: Peer, model: str) -> bool:
        """Take a slot of ``model`` on ``peer`` for a new stream if it is :meth:`usable`;
        returns whether it did. Every reservation ends with :meth:`release`."""
        if not self.usable(peer, model):
            return False
        peer.in_flight[model] = peer.in_flight.get(model, 0) + 1
        index = self.index
        found = index.find(model, index.filed[peer][0])
        if found is not None and index.evaluate(peer, model, found):
            index.version += 1
        return True

    def release(self, peer: Peer, model: str) -> None:
        """A stream of ``model`` on ``peer`` ended: free its slot and hand it (or the
        tunnel stream it held) to the oldest queued request that can use it."""
        peer.in_flight[model] -= 1
        index = self.index
        filed = index.filed.get(peer)
        if filed is None:
            return
        found = index.find(model, filed[0])
        if found is not None and index.evaluate(peer, model, found):
            index.version += 1
        if self.waiting:
            self._dispatch(index.sharing_tunnel(peer, self.waiting))

    # ------------------------------------------------------------ the queue

    def enqueue(self, model: str, group: str, take: Callable[[], Peer | None]
                ) -> SlotWaiter:
        """Queue a request for a slot of ``model`` on a peer of node group ``group``,
        behind those already waiting. Slots are handed out oldest first, each through
        its ``take`` (see :class:`SlotWaiter`); a request whose ``take`` finds nothing
        it may use lets the next one try. Always end with :meth:`leave`."""
        waiter = SlotWaiter((model, group), take)
        self.waiting.setdefault(waiter.key, deque()).append(waiter)
        return waiter

    async def wait_for_slot(self, waiter: SlotWaiter) -> None:
        """Wait until ``waiter`` has a slot (``waiter.peer``) or an error."""
        await waiter.event.wait()

    def leave(self, waiter: SlotWaiter) -> None:
        """Take ``waiter`` out of its queue. A slot handed to it but not claimed (it was
        cancelled or timed out meanwhile; ``waiter.peer`` still set) passes on to the
        next request in line."""
        queue = self.waiting.get(waiter.key)
        if queue is not None:
            if waiter in queue:
                queue.remove(waiter)
            if not queue:
                del self.waiting[waiter.key]
                self.index.prune(*waiter.key)
        peer, waiter.peer = waiter.peer, None
        if peer is not None:
            self.release(peer, waiter.key[0])

    def dispatch(self, model: str, group: str = "") -> None:
        """Hand free slots of ``model`` (node group ``group``) to queued requests, oldest
        first. A new request calls this before taking a slot itself, so it only takes
        one that no older request of that model can use."""
        key = (model, group)
        if key in self.waiting:
            self._dispatch([key])

    def wake(self, keys: Iterable[ModelGroup]) -> None:
        """The peers of these (model, group) pairs changed: serve their queues."""
        if self.waiting:
            self._dispatch([key for key in keys if key in self.waiting])

    def wake_all(self, recheck: bool = False) -> None:
        """Serve every queue (with ``recheck``, every queued request looks again, as
        after the index was rebuilt)."""
        if recheck:
            for key in self.waiting:
                found = self.index.find(*key)
                if found is not None:
                    found.recheck = True
        if self.waiting:
            self._dispatch(list(self.waiting))

    def _dispatch(self, keys: Iterable[ModelGroup]) -> None:
        if self._dispatching:  # a take() re-evaluated a peer: serve again when done
            self._pending.update(keys)
            return
        self._dispatching = True
        try:
            todo = list(keys)
            while todo:
                for key in todo:
                    self._serve(key)
                todo = list(self._pending)
                self._pending.clear()
        finally:
            self._dispatching = False

    def _serve(self, key: ModelGroup) -> None:
        queue = self.waiting.get(key)
        if not queue:
            return
        index = self.index.find(*key)
        everyone = index is None or index.recheck
        if index is not None:
            if not everyone and index.served == index.epoch:
                return  # nothing a queued request could use has freed up since last time
            index.recheck = False
            index.served = index.epoch
        for waiter in list(queue):
            if not everyone and index is not None and not index.free:
                break
            try:
                peer = waiter.take()
            except Exception as exc:  # delivered to the waiting request
                waiter.error = exc
            else:
                if peer is None:
                    continue
                waiter.peer = peer
            queue.remove(waiter)
            waiter.event.set()
        if not queue and self.waiting.get(key) is queue:
            del self.waiting[key]
            self.index.prune(*key)
