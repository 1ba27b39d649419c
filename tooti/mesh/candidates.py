"""The routing index: per model and node group, the peers that can take a stream,
with the keys the policies rank them by (:data:`~tooti.routing.base.KeyName`), the
:class:`~tooti.routing.base.CandidateSet` a policy is given, and the queue entries of
waiting requests."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from heapq import heapify, heappop, heappush
from operator import attrgetter
from typing import overload

import trio

from tooti.backends.base import ModelInfo
from tooti.mesh.health import ModelHealth
from tooti.mesh.peer import Peer
from tooti.routing.base import KEY_NAMES, CandidateSet, KeyName

Key = tuple[float, ...]


class ModelIndex:
    """The peers of one node group that serve one model, kept current as they change.

    ``serving`` ⊇ ``live`` ⊇ ``eligible`` ⊇ the peers with a free slot, which are the
    keys of every ``keys[name]`` dict (``free`` is ``keys["least_loaded"]``). ``live``
    holds only peers that announce the model ready; ``loading`` (also in ``serving``,
    never in ``live``) those otherwise live that announce it loading. Free peers
    are also kept in buckets of equal least-loaded key under a heap of those keys
    (pruned lazily), and sorted by id.
    """

    __slots__ = ("buckets", "by_id", "eligible", "epoch", "free", "heap", "ids", "in_heap",
                 "keys", "live", "loading", "model", "recheck", "served", "serving")

    def __init__(self, model: str) -> None:
        self.model = model
        self.serving: dict[Peer, None] = {}
        self.live: dict[Peer, None] = {}
        self.loading: dict[Peer, None] = {}
        self.eligible: dict[Peer, None] = {}
        self.keys: dict[str, dict[Peer, Key]] = {name: {} for name in KEY_NAMES}
        self.free = self.keys["least_loaded"]
        self.buckets: dict[Key, list[Peer]] = {}
        self.heap: list[Key] = []
        self.in_heap: set[Key] = set()
        self.ids: list[str] = []
        self.by_id: list[Peer] = []
        self.epoch = 0
        """Bumped whenever a queued request may find a slot it could not find before."""
        self.served = -1
        """``epoch`` when the queue for this index was last served."""
        self.recheck = False
        """A peer stopped being eligible: every queued request must look again."""

    def evaluate(self, peer: Peer) -> bool:
        """File ``peer`` (already in ``serving``) by its current state and load; True if
        it became or stopped being live or eligible."""
        model = self.model
        info = peer.models.get(model)
        announced = info is not None and peer.live
        live = announced and info is not None and info.ready
        _mark(self.loading, peer, announced and not live)
        record = peer.health.get(model)
        eligible = live and (record is None or not record.in_cooldown)
        flipped = _mark(self.live, peer, live)
        if _mark(self.eligible, peer, eligible):
            flipped = True
            self.recheck = self.recheck or not eligible
        if eligible and info is not None:
            capacity = peer.capacity(model)
            in_flight = peer.in_flight.get(model, 0)
            if in_flight < capacity:
                self._put(peer, in_flight / capacity, info, record)
                return flipped
        self._drop(peer)
        return flipped

    def discard(self, peer: Peer) -> None:
        """Forget ``peer`` (it left, or no longer serves the model)."""
        self.serving.pop(peer, None)
        self.live.pop(peer, None)
        self.loading.pop(peer, None)
        if peer in self.eligible:
            del self.eligible[peer]
            self.recheck = True
        self._drop(peer)

    def _put(self, peer: Peer, load: float, info: ModelInfo, record: ModelHealth | None
             ) -> None:
        ttft = None if record is None else record.ttft_ms
        tps = None if record is None else record.tokens_per_s
        ttft0 = 0.0 if ttft is None else ttft
        key = (load, ttft0)
        free = self.free
        old = free.get(peer)
        if old is None:
            self.epoch += 1
            at = bisect_left(self.ids, peer.id)
            self.ids.insert(at, peer.id)
            self.by_id.insert(at, peer)
        elif old != key:
            self._unbucket(peer, old)
        if old != key:
            free[peer] = key
            bucket = self.buckets.get(key)
            if bucket is not None:
                bucket.append(peer)
            else:
                self.buckets[key] = [peer]
                if key not in self.in_heap:
                    self.in_heap.add(key)
                    heappush(self.heap, key)
                    if len(self.heap) > 2 * len(self.buckets) + 64:
                        self.heap = list(self.buckets)
                        heapify(self.heap)
                        self.in_heap = set(self.buckets)
        keys = self.keys
        keys["load"][peer] = (load,)
        keys["price"][peer] = (info.price_input + info.price_output, load)
        keys["latency"][peer] = (ttft0, load)
        keys["throughput"][peer] = (-(1e12 if tps is None else tps), load)
        keys["fastest"][peer] = (-1.0 if ttft is None else ttft,
                                 -(0.0 if tps is None else tps), load)
        keys["ttft"][peer] = (ttft0,)
        keys["price_in"][peer] = (info.price_input,)
        keys["price_out"][peer] = (info.price_output,)

    def _drop(self, peer: Peer) -> None:
        key = self.free.get(peer)
        if key is None:
            return
        self._unbucket(peer, key)
        for keys in self.keys.values():
            del keys[peer]
        at = bisect_left(self.ids, peer.id)
        while self.by_id[at] is not peer:
            at += 1
        del self.ids[at], self.by_id[at]

    def _unbucket(self, peer: Peer, key: Key) -> None:
        bucket = self.buckets[key]
        bucket.remove(peer)
        if not bucket:
            del self.buckets[key]

    def least_loaded(self, rng: random.Random, skip: AbstractSet[Peer]) -> Peer | None:
        """The free peer (not in ``skip``) with the lowest least-loaded key; ties drawn
        with ``rng``. Walks the heap from its top, so it costs O(log n) plus the keys
        whose every peer is skipped."""
        heap, buckets = self.heap, self.buckets
        passed: list[Key] = []
        try:
            while heap:
                key = heap[0]
                bucket = buckets.get(key)
                if bucket is None:  # an emptied bucket: prune its key
                    heappop(heap)
                    self.in_heap.discard(key)
                    continue
                if skip:
                    bucket = [p for p in bucket if p not in skip]
                if bucket:
                    return bucket[0] if len(bucket) == 1 else rng.choice(bucket)
                passed.append(heappop(heap))
            return None
        finally:
            for key in passed:
                heappush(heap, key)


def _mark(members: dict[Peer, None], peer: Peer, present: bool) -> bool:
    """Add ``peer`` to or remove it from ``members``; True if that changed anything."""
    if present == (peer in members):
        return False
    if present:
        members[peer] = None
    else:
        del members[peer]
    return True


class Candidates(CandidateSet[Peer]):
    """The peers with a free slot for one model that one request may use.

    The routing contract's :class:`~tooti.routing.base.CandidateSet`: to a policy a
    read-only sequence (materialized on first use), so any policy works with it. It
    also answers indexed queries without a Python pass
    over every peer (:meth:`least_loaded`, :meth:`min_by`, :meth:`by_id`, ...), which
    the built-in policies use when they are given one. A view reads the registry's
    index as it is now: use it within one routing decision. Whether a peer's tunnel can
    take one more stream is not part of it: the router checks that on the peer chosen.
    """

    __slots__ = ("_index", "_lookup", "_members", "_skip", "_subset")

    def __init__(self, index: ModelIndex, lookup: Mapping[str, Peer],
                 skip: frozenset[Peer] = frozenset(), subset: list[Peer] | None = None
                 ) -> None:
        self._index = index
        self._lookup = lookup
        """Peer id → peer (the registry's ``peers``)."""
        self._skip = skip
        self._subset = subset
        """When set: exactly these peers (free ones, ``skip`` already left out)."""
        self._members = subset

    @property
    def model(self) -> str:
        """The model these peers have a free slot for."""
        return self._index.model

    def _list(self) -> list[Peer]:
        members = self._members
        if members is None:
            skip, free = self._skip, self._index.free
            members = self._members = [p for p in free if p not in skip] if skip else list(free)
        return members

    def __len__(self) -> int:
        if self._members is not None:
            return len(self._members)
        free = self._index.free
        return len(free) - sum(1 for p in self._skip if p in free)

    @overload
    def __getitem__(self, index: int) -> Peer: ...

    @overload
    def __getitem__(self, index: slice) -> list[Peer]: ...

    def __getitem__(self, index: int | slice) -> Peer | list[Peer]:
        return self._list()[index]

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._list())

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, Peer):
            return False
        if self._subset is not None:
            return peer in self._subset
        return peer in self._index.free and peer not in self._skip

    def get(self, peer_id: str) -> Peer | None:
        """The peer with id ``peer_id`` if it is in this view, else None."""
        peer = self._lookup.get(peer_id)
        return peer if peer is not None and peer in self else None

    def without(self, peer: Peer) -> Candidates:
        """This view without ``peer``."""
        return self._skipping(frozenset((peer,)))

    def excluding(self, peer_ids: Iterable[str]) -> Candidates:
        """This view without the peers ``peer_ids`` (ids not registered are ignored)."""
        lookup = self._lookup
        return self._skipping(frozenset(
            peer for peer in map(lookup.get, peer_ids) if peer is not None))

    def _skipping(self, skip: frozenset[Peer]) -> Candidates:
        if not skip:
            return self
        subset = self._subset
        return Candidates(self._index, self._lookup, self._skip | skip,
                          None if subset is None else [p for p in subset if p not in skip])

    def restrict(self, peer_ids: Iterable[str]) -> Candidates:
        """Only the peers ``peer_ids`` that are in this view (looked up one by one)."""
        lookup = self._lookup
        subset = []
        for peer_id in dict.fromkeys(peer_ids):
            peer = lookup.get(peer_id)
            if peer is not None and peer in self:
                subset.append(peer)
        return Candidates(self._index, lookup, self._skip, subset)

    def at_most(self, name: KeyName, limit: float) -> Candidates:
        """Only the peers whose key ``name`` (its first element) is at most ``limit``."""
        keys = self._index.keys[name]
        if self._subset is not None:
            subset = [p for p in self._subset if keys[p][0] <= limit]
        elif self._skip:
            skip = self._skip
            subset = [p for p, key in keys.items() if key[0] <= limit and p not in skip]
        else:
            subset = [p for p, key in keys.items() if key[0] <= limit]
        return Candidates(self._index, self._lookup, self._skip, subset)

    def least_loaded(self, rng: random.Random) -> Peer | None:
        """The peer with the lowest in-flight ÷ capacity, then lowest measured TTFT
        (key ``least_loaded``); exact ties are drawn with ``rng``."""
        index, subset = self._index, self._subset
        if subset is None:
            return index.least_loaded(rng, self._skip)
        if not subset:
            return None
        free = index.free
        best = min(subset, key=free.__getitem__)
        tied = index.buckets[free[best]]
        if len(tied) > 1:
            members = set(subset)
            tied = [p for p in tied if p in members]
            if len(tied) > 1:
                best = rng.choice(tied)
        return best

    def min_by(self, name: KeyName, rng: random.Random | None = None) -> Peer | None:
        """The peer with the lowest key ``name``. Exact ties go to the first in this
        view's order, or with ``rng``, are drawn at random."""
        keys = self._index.keys[name]
        members: Collection[Peer]
        if self._subset is not None:
            members = self._subset
        elif self._skip:
            members = keys.keys() - self._skip
        else:
            members = keys
        if not members:
            return None
        best = min(members, key=keys.__getitem__)
        if rng is not None:
            key = keys[best]
            if self._subset is None and not self._skip:
                tied = [p for p, k in keys.items() if k == key]
            else:
                tied = [p for p in members if keys[p] == key]
            if len(tied) > 1:
                best = rng.choice(tied)
        return best

    def by_id(self) -> list[Peer]:
        """The peers in this view, sorted by id."""
        if self._subset is not None:
            return sorted(self._subset, key=attrgetter("id"))
        skip, by_id = self._skip, self._index.by_id
        return [p for p in by_id if p not in skip] if skip else list(by_id)


class SlotWaiter:
    """One request queued for a free slot of a model (see
    :meth:`~tooti.mesh.slot_queue.SlotQueue.enqueue`)."""

    __slots__ = ("error", "event", "key", "peer", "take")

    def __init__(self, key: tuple[str, str], take: Callable[[], Peer | None]) -> None:
        self.key = key
        """(model, node group)."""
        self.take = take
        """Reserves a slot the request may use (its preferences apply) and returns its
        peer; None while there is none; raises to end the wait with that error."""
        self.event = trio.Event()
        """Set once ``peer`` (a slot reserved for this request) or ``error`` is."""
        self.peer: Peer | None = None
        self.error: Exception | None = None
