"""Live peers known to a gateway, and which of them serve which model."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import trio

from tooti import clock
from tooti.backends.base import ModelInfo
from tooti.mesh.bans import Bans
from tooti.mesh.candidates import KEY_NAMES, Candidates, Key, KeyName, ModelIndex, SlotWaiter
from tooti.mesh.events import EventBus
from tooti.mesh.identities import IdentityBindings
from tooti.mesh.identity_store import IdentityStore
from tooti.mesh.peer import Peer

log = logging.getLogger("tooti.gateway")

__all__ = ["KEY_NAMES", "Candidates", "Key", "KeyName", "Peer", "Registry", "SlotWaiter"]


KNOWN_MODELS_LIMIT = 10_000
"""Model ids a gateway remembers having seen advertised (beyond those served now)."""
VIOLATION = "protocol_violation"
"""GOAWAY code sent to a peer whose session is cut by :meth:`Registry.penalize`."""


class KnownModels:
    """Model ids advertised here, most recently advertised last; past ``limit`` the
    oldest are forgotten. It tells a model nobody ever offered (404) from one with no
    live node right now (503) without growing with every id a node ever made up."""

    def __init__(self, limit: int = KNOWN_MODELS_LIMIT) -> None:
        self.limit = limit
        self._ids: dict[str, None] = {}

    def update(self, ids: Iterable[str]) -> None:
        """Note ``ids`` as advertised now."""
        known = self._ids
        for model in ids:
            known.pop(model, None)
            known[model] = None
        while len(known) > self.limit:
            del known[next(iter(known))]

    def __contains__(self, model: object) -> bool:
        return model in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)


class Registry:
    """Peers by id, an index of them per model and node group, and the queues of
    requests waiting for a slot.

    The index (candidates, the peers with a free slot and the keys the policies rank
    them by) is kept current as peers change, so a routing decision never scans every
    peer: :meth:`add`, :meth:`remove`, :meth:`set_models`, :meth:`reserve` and
    :meth:`release` update it, and whoever changes a peer's state (draining, health,
    cooldowns) calls :meth:`refresh` / :meth:`peer_updated` for that peer or
    :meth:`changed`. Requests waiting for a slot queue FIFO per model and group
    (:meth:`enqueue`); a freed slot goes to the oldest one that may use it.

    It also composes who may join: :attr:`bindings` (which key owns each node id) and
    :attr:`bans` (ids and relay routes refused after a violation), which handshakes
    reach through :meth:`bind_identity`, :meth:`banned` and :meth:`penalize`.
    """

    def __init__(self, bus: EventBus | None = None,
                 identities: IdentityStore | None = None, *, ban_seconds: float = 60.0,
                 max_identities: int = 10_000, heartbeat_interval: float = 3.0,
                 relay_strikes: int = 0, relay_strike_seconds: float = 600.0) -> None:
        """``ban_seconds``: how long a peer :meth:`penalize` cut off is refused;
        ``max_identities``: most chosen node names bound here (trust on first use);
        ``heartbeat_interval``: how often peers report (``peer.updated`` events from
        heartbeats are coalesced to about one per interval and peer);
        ``relay_strikes`` / ``relay_strike_seconds``: a relay through which that many
        different nodes violated the protocol within that time is penalized itself."""
        self.bus = bus or EventBus()
        """Where peer changes are published."""
        self.peers: dict[str, Peer] = {}
        self._index: dict[str, dict[str, ModelIndex]] = {}
        """Model → node group → the index of that group's peers serving the model."""
        self._filed: dict[Peer, tuple[str, set[str]]] = {}
        """Registered peer → (the node group and the models it is indexed under)."""
        self._tunnels: dict[int, set[Peer]] = {}
        """``id`` of a tunnel session → the registered peers reached through it."""
        self._stale = False
        """:meth:`changed` was called: re-evaluate every peer before the next read."""
        self._waiters: dict[tuple[str, str], deque[SlotWaiter]] = {}
        """(model, node group) → requests waiting for a slot, oldest first."""
        self._dispatching = False
        self._pending: set[tuple[str, str]] = set()
        self.known_models = KnownModels()
        """Model ids advertised here (unknown vs. unavailable), the most recent kept."""
        self.bindings = IdentityBindings(identities, limit=max_identities)
        """Chosen node names → the public key that first proved each (trust on first use),
        loaded from ``identities`` and written through to it."""
        self.update_spacing = 0.8 * heartbeat_interval
        """Least time between two ``peer.updated`` events of one peer from heartbeats."""
        self.version = 0
        """Bumped whenever a peer starts or stops being live (or eligible) for a model,
        or a peer's models change: what is cached from the live models is current while
        it stays the same (see :meth:`live_version`)."""
        self.bans = Bans(ban_seconds, relay_strikes=relay_strikes,
                         relay_strike_seconds=relay_strike_seconds)
        """Peer ids and relay routes refused after a violation (see :meth:`penalize`),
        and the strikes counted against relays."""
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, re-checking on every registry change."""
        while not condition():
            await self._changed.wait()

    def changed(self) -> None:
        """Peer state changed somewhere (draining, health, cooldowns, ...): re-evaluate every
        peer before the next routing decision, hand newly usable slots to queued requests
        and wake everyone waiting in :meth:`wait_until`. When the peer is known,
        :meth:`refresh` is cheaper."""
        self._stale = True
        self._notify()
        if self._waiters:
            self._dispatch(list(self._waiters))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ identities

    @property
    def identity_store(self) -> IdentityStore | None:
        """Where identity bindings persist across restarts (None = memory only)."""
        return self.bindings.store

    @identity_store.setter
    def identity_store(self, store: IdentityStore | None) -> None:
        self.bindings.store = store

    @property
    def identities(self) -> dict[str, bytes]:
        """Chosen node names → the public key bound to each (``bindings.bound``)."""
        return self.bindings.bound

    def bind_identity(self, peer_id: str, public_key: bytes) -> None:
        """Accept ``public_key`` for ``peer_id`` or raise ProtocolError ``identity_mismatch``
        (see :meth:`IdentityBindings.bind`)."""
        self.bindings.bind(peer_id, public_key)

    # ------------------------------------------------------------ violations

    def penalize(self, peer: Peer, reason: str) -> None:
        """``peer`` broke the rules (out-of-bounds values, a flood, a protocol error):
        cut it off and refuse it for ``bans.seconds``. A direct peer's session gets
        GOAWAY ``protocol_violation`` with ``reason`` and closes, and its id is refused
        on every path. A node reached through a relay is dropped from this registry
        alone (the relay's tunnel and its other nodes stay) and only its route through
        that relay is refused, since the relay may be the liar (it relays the node's
        END and its ROUTES entry): the node may still dial in directly or come through
        another relay. That counts a strike against the relay: once
        ``bans.relay_strikes`` different nodes did within ``bans.relay_strike_seconds``,
        the relay itself is penalized (a relay minting node ids to lie through cannot
        go on; one bad node behind an honest relay costs it nothing beyond that node's
        route). Logged as a warning and published as ``peer.violation``. Whatever the
        bad values were, the caller must not have stored them."""
        if peer.penalized:
            return
        peer.penalized = True
        reason = reason[:300]
        bans = self.bans
        bans.ban((peer.id, peer.via) if peer.via else peer.id, reason)
        if peer.via:
            log.warning("node %s violated the protocol through relay %s: %s; that route is "
                        "refused for %gs", peer.id, peer.via, reason, bans.seconds)
        else:
            log.warning("peer %s violated the protocol: %s; refused for %gs", peer.id,
                        reason, bans.seconds)
        self.bus.publish("peer.violation", peer_id=peer.id, via=peer.via or None,
                         reason=reason, ban_seconds=bans.seconds)
        if not peer.via:
            peer.session.violate(VIOLATION, reason)
            return
        self.remove(peer, f"protocol violation: {reason}")
        struck = bans.strike(peer.via, peer.id)
        relay = self.peers.get(peer.via)
        if not bans.struck_out(struck) or relay is None or relay.via:
            return
        bans.forget_strikes(relay.id)
        self.penalize(relay, f"{struck} nodes violated the protocol through it within "
                      f"{bans.relay_strike_seconds:g}s (gateway.relay_strikes)")

    def banned(self, peer_id: str, via: str = "") -> str | None:
        """Why ``peer_id`` (reached through relay ``via``, if given) is refused now, with
        the seconds left, or None (see :meth:`Bans.refusal`)."""
        return self.bans.refusal(peer_id, via)

    def add(self, peer: Peer) -> Peer | None:
        """Register ``peer``; returns the peer it replaces (same id), if any. A peer
        registered again (a relayed node re-advertised after its ban) answers for its
        next violation afresh."""
        peer.penalized = False
        old = self.peers.get(peer.id)
        self.peers[peer.id] = peer
        keys = self._unfile(old) if old is not None and old is not peer else []
        keys += self._file(peer)
        self._notify()
        self._wake(keys)
        log.info("peer %s joined from %s (%s)", peer.id, peer.address, peer.role)
        self.bus.publish("peer.joined", peer=peer.describe())
        return old

    def add_relayed(self, peer: Peer) -> bool:
        """Register a node reached through a relay, unless the same node id already has a
        live direct tunnel or a live route through another relay here (a direct tunnel is
        preferred, and the first relay keeps the node while its tunnel lives, so a later
        advertiser cannot take over its traffic); returns True if added."""
        refusal = self.banned(peer.id, peer.via)
        if refusal is not None:
            log.info("node %s via %s not taken: %s", peer.id, peer.via, refusal)
            return False
        current = self.peers.get(peer.id)
        if current is not None and not current.session.closed.is_set() and (
                not current.via or current.session is not peer.session):
            log.info("node %s is also advertised via %s; keeping its %s", peer.id, peer.via,
                     f"route via {current.via}" if current.via else "direct tunnel")
            return False
        self.add(peer)
        return True

    def remove(self, peer: Peer, reason: str = "") -> None:
        """Forget ``peer`` if it is still the registered one for its id (``reason``:
        why, when not that its tunnel closed)."""
        if self.peers.get(peer.id) is peer:
            del self.peers[peer.id]
            keys = self._unfile(peer)
            self._notify()
            self._wake(keys)
            reason = reason or peer.session.close_reason or "closed"
            log.info("peer %s left (%s)", peer.id, reason)
            self.bus.publish("peer.left", peer_id=peer.id, reason=reason)

    def set_models(self, peer: Peer, models: list[ModelInfo]) -> bool:
        """Replace the models a peer serves; returns False (and re-files nothing) if a
        registered peer re-sent the list it had."""
        served = {m.id: m for m in models}
        self.known_models.update(served)
        if served == peer.models and peer in self._filed:
            return False
        peer.models = served
        self.version += 1
        self._notify()
        self.peer_updated(peer)
        return True

    def heartbeat(self, peer: Peer, stats: dict[str, Any]) -> None:
        """A peer's (checked) HEARTBEAT figures: kept; the peer is re-evaluated only if
        its health flipped, and ``peer.updated`` is published at most once per
        :attr:`update_spacing` (a later heartbeat publishes what was held back)."""
        was_live = peer.live
        peer.stats = stats
        if peer.live != was_live:  # health flipped: re-file, wake requests waiting on it
            self.refresh(peer)
        self.publish_updated(peer)

    def publish_updated(self, peer: Peer) -> None:
        """Publish ``peer.updated`` for a registered peer, unless one went out less than
        :attr:`update_spacing` ago (then it goes out with a later call)."""
        if self.peers.get(peer.id) is not peer:
            return
        now = clock.now()
        if now - peer.published_at < self.update_spacing:
            return
        peer.published_at = now
        self.bus.publish("peer.updated", peer=peer.describe())

    def live_version(self) -> int:
        """:attr:`version`, after catching up with pending re-evaluations."""
        self._fresh()
        return self.version

    def peer_updated(self, peer: Peer) -> None:
        """Re-evaluate a peer (see :meth:`refresh`) and publish its current state (models,
        load, health, cooldowns)."""
        if self.peers.get(peer.id) is peer:
            self.refresh(peer)
            peer.published_at = clock.now()
            self.bus.publish("peer.updated", peer=peer.describe())

    def refresh(self, peer: Peer) -> None:
        """Re-evaluate one registered peer for every model it serves (live, draining,
        health, cooldowns, load), waking :meth:`wait_until` if it became or stopped being
        usable and handing slots it now has to queued requests. Call it after changing a
        peer's state; :meth:`changed` does it for every peer."""
        if peer not in self._filed:
            return
        self._wake(self._file(peer, notify=True))

    def candidates(self, model: str) -> list[Peer]:
        """Live peers serving ``model`` and not in cooldown for it."""
        return [peer for index in self._indexes(model) for peer in index.eligible]

    def eligible(self, model: str, group: str = "") -> Collection[Peer]:
        """The :meth:`candidates` of node group ``group`` (a live read-only view)."""
        index = self._find(model, group)
        return () if index is None else index.eligible.keys()

    def free_slots(self, model: str, group: str = "") -> Candidates:
        """The candidates of node group ``group`` with a free slot for ``model``, as a
        view a routing policy can query without a pass over every peer."""
        index = self._find(model, group)
        return Candidates(ModelIndex(model) if index is None else index, self.peers)

    def serving(self, model: str, group: str | None = None) -> list[Peer]:
        """Live peers serving ``model``, cooldown or not (of node group ``group`` only,
        when given)."""
        if group is not None:
            index = self._find(model, group)
            return [] if index is None else list(index.live)
        return [peer for index in self._indexes(model) for peer in index.live]

    def live_models(self) -> dict[str, list[Peer]]:
        """Model id → live peers serving it (models with none are left out)."""
        self._fresh()
        out: dict[str, list[Peer]] = {}
        for model, groups in self._index.items():
            live = [peer for index in groups.values() for peer in index.live]
            if live:
                out[model] = live
        return out

    def live_in_group(self, group: str) -> dict[str, list[Peer]]:
        """Model id → live peers of node group ``group`` serving it (models with none
        are left out)."""
        self._fresh()
        out: dict[str, list[Peer]] = {}
        for model, groups in self._index.items():
            index = groups.get(group)
            if index is not None and index.live:
                out[model] = list(index.live)
        return out

    # ------------------------------------------------------------ slots

    def usable(self, peer: Peer, model: str) -> bool:
        """True if ``peer`` can take one more stream of ``model`` now: indexed with a free
        slot, still in the state it was indexed in (else it is re-evaluated), and its
        tunnel below its stream limit (shared by every model and peer on it)."""
        filed = self._filed.get(peer)
        index = None if filed is None else self._find(model, filed[0])
        if index is None or peer not in index.free:
            return False
        info = peer.models.get(model)
        record = peer.health.get(model)
        if (info is None or not peer.live or (record is not None and record.in_cooldown)
                or peer.in_flight.get(model, 0) >= peer.capacity(model)):
            # It changed without a refresh: catch up (queued requests see it at the next
            # hand-out; handing out now could change the index under the caller's view).
            self._file(peer, notify=True)
            return False
        return peer.session.conn.can_open_stream()

    def reserve(self, peer: Peer, model: str) -> bool:
        """Take a slot of ``model`` on ``peer`` for a new stream if it is :meth:`usable`;
        returns whether it did. Every reservation ends with :meth:`release`."""
        if not self.usable(peer, model):
            return False
        peer.in_flight[model] = peer.in_flight.get(model, 0) + 1
        index = self._find(model, self._filed[peer][0])
        if index is not None and index.evaluate(peer):
            self.version += 1
        return True

    def release(self, peer: Peer, model: str) -> None:
        """A stream of ``model`` on ``peer`` ended: free its slot and hand it (or the
        tunnel stream it held) to the oldest queued request that can use it."""
        peer.in_flight[model] -= 1
        filed = self._filed.get(peer)
        if filed is None:
            return
        index = self._find(model, filed[0])
        if index is not None and index.evaluate(peer):
            self.version += 1
        if self._waiters:
            keys = []
            for sibling in self._tunnels.get(id(peer.session), ()):
                group = self._filed[sibling][0]
                for served in sibling.models:
                    key = (served, group)
                    shared = self._find(served, group)
                    if key in self._waiters and shared is not None:
                        shared.epoch += 1  # the tunnel has a stream to spare again
                        keys.append(key)
            self._dispatch(keys)

    def enqueue(self, model: str, group: str, take: Callable[[], Peer | None]
                ) -> SlotWaiter:
        """Queue a request for a slot of ``model`` on a peer of node group ``group``,
        behind those already waiting. Slots are handed out oldest first, each through
        its ``take`` (see :class:`SlotWaiter`); a request whose ``take`` finds nothing
        it may use lets the next one try. Always end with :meth:`leave`."""
        waiter = SlotWaiter((model, group), take)
        self._waiters.setdefault(waiter.key, deque()).append(waiter)
        return waiter

    async def wait_for_slot(self, waiter: SlotWaiter) -> None:
        """Wait until ``waiter`` has a slot (``waiter.peer``) or an error."""
        await waiter.event.wait()

    def leave(self, waiter: SlotWaiter) -> None:
        """Take ``waiter`` out of its queue. A slot handed to it but not claimed (it was
        cancelled or timed out meanwhile; ``waiter.peer`` still set) passes on to the
        next request in line."""
        queue = self._waiters.get(waiter.key)
        if queue is not None:
            if waiter in queue:
                queue.remove(waiter)
            if not queue:
                del self._waiters[waiter.key]
                self._prune(*waiter.key)
        peer, waiter.peer = waiter.peer, None
        if peer is not None:
            self.release(peer, waiter.key[0])

    def dispatch(self, model: str, group: str = "") -> None:
        """Hand free slots of ``model`` (node group ``group``) to queued requests, oldest
        first. A new request calls this before taking a slot itself, so it only takes
        one that no older request of that model can use."""
        key = (model, group)
        if key in self._waiters:
            self._dispatch([key])

    def _dispatch(self, keys: Iterable[tuple[str, str]]) -> None:
        if self._dispatching:  # a take() re-evaluated a peer: serve again when done
            self._pending.update(keys)
            return
        self._dispatching = True
        try:
            todo = list(keys)
            while todo:
                for key in todo:
                    self._serve_queue(key)
                todo = list(self._pending)
                self._pending.clear()
        finally:
            self._dispatching = False

    def _serve_queue(self, key: tuple[str, str]) -> None:
        queue = self._waiters.get(key)
        if not queue:
            return
        self._fresh()
        index = self._find(*key)
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
        if not queue and self._waiters.get(key) is queue:
            del self._waiters[key]
            self._prune(*key)

    def _wake(self, keys: Iterable[tuple[str, str]]) -> None:
        if self._waiters:
            self._dispatch([key for key in keys if key in self._waiters])

    # ------------------------------------------------------------ the index

    def _find(self, model: str, group: str) -> ModelIndex | None:
        self._fresh()
        groups = self._index.get(model)
        return None if groups is None else groups.get(group)

    def _indexes(self, model: str) -> Iterable[ModelIndex]:
        self._fresh()
        return self._index.get(model, {}).values()

    def _file(self, peer: Peer, notify: bool = False) -> list[tuple[str, str]]:
        """Index a registered peer under its current models and state; returns the
        (model, group) keys it touched."""
        filed = self._filed.get(peer)
        if filed is None:
            filed = self._filed[peer] = (peer.group, set())
            self._tunnels.setdefault(id(peer.session), set()).add(peer)
        group, models = filed
        keys, flipped = [], False
        for model in models - peer.models.keys():
            self._index[model][group].discard(peer)
            models.discard(model)
            keys.append((model, group))
            self._prune(model, group)
            flipped = True
        for model in peer.models:
            groups = self._index.setdefault(model, {})
            index = groups.get(group)
            if index is None:
                index = groups[group] = ModelIndex(model)
            if peer not in index.serving:
                index.serving[peer] = None
                models.add(model)
            flipped = index.evaluate(peer) or flipped
            keys.append((model, group))
        if flipped:
            self.version += 1
            if notify:
                self._notify()
        return keys

    def _unfile(self, peer: Peer) -> list[tuple[str, str]]:
        filed = self._filed.pop(peer, None)
        if filed is None:
            return []
        sharing = self._tunnels.get(id(peer.session))
        if sharing is not None:
            sharing.discard(peer)
            if not sharing:
                del self._tunnels[id(peer.session)]
        group, models = filed
        for model in models:
            self._index[model][group].discard(peer)
            self._prune(model, group)
        self.version += 1
        return [(model, group) for model in models]

    def _prune(self, model: str, group: str) -> None:
        """Drop the index of (model, group) once no peer serves it and no request waits
        for it, so advertising ever new model ids cannot grow the index without end."""
        groups = self._index.get(model)
        index = None if groups is None else groups.get(group)
        if index is None or index.serving or (model, group) in self._waiters:
            return
        assert groups is not None
        del groups[group]
        if not groups:
            del self._index[model]

    def _fresh(self) -> None:
        if self._stale:
            self._stale = False
            for peer in list(self._filed):
                self._file(peer)

    def _reindex(self) -> None:
        """Rebuild the whole index from ``peers`` (after changing ``peers`` directly)."""
        self._index, self._filed, self._tunnels = {}, {}, {}
        self._stale = False
        for peer in self.peers.values():
            self._file(peer)
        for key in self._waiters:
            index = self._find(*key)
            if index is not None:
                index.recheck = True
        self._notify()
        self._wake(list(self._waiters))
