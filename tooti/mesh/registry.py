"""Live peers known to a gateway, and which of them serve which model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import trio

from tooti import clock
from tooti.accounts.join_directory import JoinTokenDirectory
from tooti.backends.base import ModelInfo
from tooti.mesh.bans import Bans
from tooti.mesh.events import EventBus
from tooti.mesh.identity_bindings import IdentityBindings
from tooti.mesh.identity_store import IdentityStore
from tooti.mesh.peer import Peer
from tooti.mesh.routing_index import RoutingIndex
from tooti.mesh.slot_queue import SlotQueue
from tooti.tunnel import TunnelLost, TunnelSession

log = logging.getLogger("tooti.gateway")

KNOWN_MODELS_LIMIT = 10_000
"""Model ids a gateway remembers having seen advertised (beyond those served now)."""
VIOLATION = "protocol_violation"
"""GOAWAY code sent to a peer whose session is cut by :meth:`Registry.penalize`."""
DRAINING = "draining"
"""GOAWAY code sent to a peer an admin drained, once its last stream ended."""
IDLE_SPACING_INTERVALS = 10
"""Heartbeat intervals between two ``peer.updated`` events of a peer whose figures did not
change (see :meth:`Registry.heartbeat`)."""
DISABLED_LIMIT = 10_000
"""Node ids a gateway remembers as disabled (:meth:`Registry.disable`) at most."""


class TooManyDisabled(Exception):
    """:attr:`Registry.disabled_ids` is full: enable some ids before disabling more."""


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
    """Peers by id, and who may join: the one entry point the roles use for peers
    coming, going and changing, for the routing index and for slots.

    It composes :attr:`index` (a :class:`RoutingIndex`: per model and node group, the
    peers that can take a stream and the keys the policies rank them by, kept current
    as peers change, so a routing decision never scans every peer) and :attr:`slots`
    (a :class:`SlotQueue`: reservations, and the FIFO queues of requests waiting for a
    slot per model and group), whose methods callers use are bound as its own
    (``free_slots``, ``eligible``, ``serving``, ``loading``, ``ready_counts``,
    ``reserve``, ``release``, ``enqueue``, ``leave``, ...). :meth:`add`, :meth:`remove`
    and :meth:`set_models` keep the index current; whoever changes a peer's state
    (draining, health, cooldowns) calls :meth:`refresh` / :meth:`peer_updated` for that
    peer or :meth:`changed`.

    An admin's peer control lives here too: :meth:`disable` / :meth:`enable` (node ids
    routed nothing new, remembered across re-joins in :attr:`disabled_ids`) and
    :meth:`drain` (no new streams, then the tunnel closes with GOAWAY ``draining`` once
    the last stream on it ended, seen in :meth:`release`).

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
        self.index = RoutingIndex(self.peers, self._notify)
        """The peers filed per model and node group (read through :meth:`free_slots`,
        :meth:`eligible`, :meth:`serving`, ...)."""
        self.slots = SlotQueue(self.index)
        """Slot reservations and the requests waiting for one."""
        # What callers ask of the index and of the slots, bound here so that the registry
        # stays their one entry point without a layer of calls on the routing path.
        index, slots = self.index, self.slots
        self.candidates = index.candidates
        self.eligible = index.eligible
        self.free_slots = index.free_slots
        self.serving = index.serving
        self.serving_endpoint = index.serving_endpoint
        self.not_serving = index.not_serving
        self.live_models = index.live_models
        self.live_in_group = index.live_in_group
        self.live_version = index.live_version
        self.loading = index.loading
        self.ready_counts = index.ready_counts
        self.usable = slots.usable
        self.reserve = slots.reserve
        self.enqueue = slots.enqueue
        self.wait_for_slot = slots.wait_for_slot
        self.leave = slots.leave
        self.dispatch = slots.dispatch
        self.known_models = KnownModels()
        """Model ids advertised here (unknown vs. unavailable), the most recent kept."""
        self.bindings = IdentityBindings(identities, limit=max_identities)
        """Chosen node names → the public key that first proved each (trust on first use),
        loaded from ``identities`` and written through to it."""
        self.update_spacing = 0.8 * heartbeat_interval
        """Least time between two ``peer.updated`` events of one peer from heartbeats."""
        self.idle_spacing = IDLE_SPACING_INTERVALS * heartbeat_interval
        """Time after which a heartbeat repeating the last published figures publishes
        ``peer.updated`` anyway (its round-trip time and liveness, for the TUI)."""
        self.bans = Bans(ban_seconds, relay_strikes=relay_strikes,
                         relay_strike_seconds=relay_strike_seconds)
        """Peer ids and relay routes refused after a violation (see :meth:`penalize`),
        and the strikes counted against relays."""
        self._changed = trio.Event()
        self.disabled_ids: dict[str, float] = {}
        """Node ids an admin disabled (→ when, wall clock), at most :data:`DISABLED_LIMIT`;
        a peer registered under one of them is disabled at once (memory only: a gateway
        restart forgets them)."""
        self.closing: dict[TunnelSession, Peer] = {}
        """Tunnels drained by an admin (:meth:`drain`) → their peer, closed as soon as
        no stream is left on them."""
        self.join_directory: JoinTokenDirectory | None = None
        """Where each node registered here is bound to its owner account (the account
        of the join token that admitted it, or its relay), when the gateway has an
        accounts database."""

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, re-checking on every registry change."""
        while not condition():
            await self._changed.wait()

    def changed(self) -> None:
        """Peer state changed somewhere (draining, health, cooldowns, ...): re-evaluate every
        peer before the next routing decision, hand newly usable slots to queued requests
        and wake everyone waiting in :meth:`wait_until`. When the peer is known,
        :meth:`refresh` is cheaper."""
        self.index.stale = True
        self._notify()
        self.slots.wake_all()

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
        peer.disabled = peer.id in self.disabled_ids
        old = self.peers.get(peer.id)
        self.peers[peer.id] = peer
        index = self.index
        keys = index.unfile(old) if old is not None and old is not peer else []
        keys += index.file(peer)
        self._notify()
        self.slots.wake(keys)
        if self.join_directory is not None and peer.role == "node":
            self.join_directory.bind_owner(peer.id, peer.owner, peer.group_id, peer.token_id,
                                           public_key=peer.public_key)
        log.info("peer %s joined %s (%s)", peer.id,
                 f"via {peer.via}" if peer.via else f"from {peer.address}", peer.role)
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
            if self.closing.get(peer.session) is peer:
                del self.closing[peer.session]
            keys = self.index.unfile(peer)
            self._notify()
            self.slots.wake(keys)
            reason = reason or peer.session.close_reason or "closed"
            log.info("peer %s left (%s)", peer.id, reason)
            self.bus.publish("peer.left", peer_id=peer.id, reason=reason)

    def set_models(self, peer: Peer, models: list[ModelInfo]) -> bool:
        """Replace the models a peer serves; returns False (and re-files nothing) if a
        registered peer re-sent the list it had."""
        served = {m.id: m for m in models}
        self.known_models.update(served)
        if served == peer.models and peer in self.index.filed:
            return False
        peer.models = served
        self.index.version += 1
        self._notify()
        self.peer_updated(peer)
        return True

    def heartbeat(self, peer: Peer, stats: dict[str, Any]) -> None:
        """A peer's (checked) HEARTBEAT figures: kept; the peer is re-evaluated only if
        its health flipped. ``peer.updated`` is published at most once per
        :attr:`update_spacing`, and only if the figures differ from the ones last
        published (a later heartbeat publishes what was held back) or
        :attr:`idle_spacing` has passed (its round-trip time moves on): an idle peer
        repeating the same figures costs no event, so thousands of idle nodes do not
        flood the bus and every subscriber (the TUI)."""
        previous = peer.stats
        peer.stats = stats
        if (stats.get("healthy", True) is not False) != (
                previous.get("healthy", True) is not False):
            self.refresh(peer)  # health flipped: re-file, wake requests waiting on it
        if self.peers.get(peer.id) is not peer:
            return
        now = clock.now()
        since = now - peer.published_at
        if since >= self.update_spacing and (since >= self.idle_spacing
                                             or stats != peer.published_stats):
            peer.published_at, peer.published_stats = now, stats
            self.bus.publish("peer.updated", peer=peer.describe())

    def heartbeat_unchanged(self, peer: Peer) -> None:
        """A peer's HEARTBEAT repeated the figures it sent last (see :meth:`heartbeat`,
        which this is for unchanged ``peer.stats``: no health flip is possible, only a
        held-back or an idle ``peer.updated`` may be due)."""
        if self.peers.get(peer.id) is not peer:
            return
        now = clock.now()
        since = now - peer.published_at
        if since >= self.update_spacing and (
                since >= self.idle_spacing or (peer.stats is not peer.published_stats
                                               and peer.stats != peer.published_stats)):
            peer.published_at, peer.published_stats = now, peer.stats
            self.bus.publish("peer.updated", peer=peer.describe())

    def peer_updated(self, peer: Peer) -> None:
        """Re-evaluate a peer (see :meth:`refresh`) and publish its current state (models,
        load, health, cooldowns)."""
        if self.peers.get(peer.id) is peer:
            self.refresh(peer)
            peer.published_at, peer.published_stats = clock.now(), peer.stats
            self.bus.publish("peer.updated", peer=peer.describe())

    def refresh(self, peer: Peer) -> None:
        """Re-evaluate one registered peer for every model it serves (live, draining,
        health, cooldowns, load), waking :meth:`wait_until` if it became or stopped being
        usable and handing slots it now has to queued requests. Call it after changing a
        peer's state; :meth:`changed` does it for every peer."""
        if peer in self.index.filed:
            self.slots.wake(self.index.file(peer, notify=True))

    def _reindex(self) -> None:
        """Rebuild the whole index from ``peers`` (after changing ``peers`` directly)."""
        self.index.rebuild()
        self._notify()
        self.slots.wake_all(recheck=True)

    # ------------------------------------------------------------ admin control

    def release(self, peer: Peer, model: str) -> None:
        """A stream of ``model`` on ``peer`` ended (see :meth:`SlotQueue.release`); the
        last one on a tunnel an admin drained closes that tunnel."""
        self.slots.release(peer, model)
        if self.closing and peer.session in self.closing:
            self._close_if_idle(peer.session)

    def disable(self, peer_id: str) -> bool:
        """Route ``peer_id`` nothing new (its streams under way finish) until
        :meth:`enable`, across its re-joins; returns False if it already was. Raises
        :class:`TooManyDisabled` when :data:`DISABLED_LIMIT` ids are disabled."""
        if peer_id in self.disabled_ids:
            return False
        if len(self.disabled_ids) >= DISABLED_LIMIT:
            raise TooManyDisabled(f"{DISABLED_LIMIT} node ids are disabled already")
        self.disabled_ids[peer_id] = clock.wall()
        self._set_disabled(peer_id, True)
        log.info("node %s disabled (admin)", peer_id)
        return True

    def enable(self, peer_id: str) -> bool:
        """Undo :meth:`disable`; returns False if ``peer_id`` was not disabled."""
        if self.disabled_ids.pop(peer_id, None) is None:
            return False
        self._set_disabled(peer_id, False)
        log.info("node %s enabled (admin)", peer_id)
        return True

    def _set_disabled(self, peer_id: str, disabled: bool) -> None:
        peer = self.peers.get(peer_id)
        if peer is not None and peer.disabled != disabled:
            peer.disabled = disabled
            self.peer_updated(peer)  # re-filed now: routing sees it at once
            self.changed()

    def drain(self, peer: Peer) -> None:
        """Route ``peer`` (a direct tunnel: a node or a relay with every node behind
        it) nothing new and close its tunnel with GOAWAY ``draining`` once its last
        stream ended (at once if none is open). The peer may dial in again afterwards
        (keep it out with :meth:`disable`). A node reached through a relay has no tunnel
        of its own here: ValueError."""
        if peer.via:
            raise ValueError(f"node {peer.id} is reached through relay {peer.via}")
        session = peer.session
        if session.closed.is_set() or self.peers.get(peer.id) is not peer:
            return
        behind = [p for p in self.peers.values() if p.session is session]
        for each in behind:  # the relay itself, and every node reached through it
            if not each.draining:
                each.draining = True
                self.peer_updated(each)
        self.changed()
        if session not in self.closing:
            log.info("peer %s draining (admin): its tunnel closes once its %d streams end",
                     peer.id, self._streams_on(session))
            self.closing[session] = peer
        self._close_if_idle(session)

    def _streams_on(self, session: TunnelSession) -> int:
        return sum(p.total_in_flight() for p in self.peers.values() if p.session is session)

    def _close_if_idle(self, session: TunnelSession) -> None:
        """Close a drained tunnel if no stream is left on it: GOAWAY ``draining``,
        written with what is queued (the last stream's frames), then the close."""
        if self._streams_on(session):
            return
        peer = self.closing.pop(session)
        log.info("peer %s drained: closing its tunnel", peer.id)
        self.bus.publish("peer.drained", peer_id=peer.id)
        try:
            session.enqueue(session.conn.send_goaway(DRAINING, "drained by an admin"))
        except (TunnelLost, RuntimeError):
            pass
        else:
            session.flush_nowait()
        session.abort("drained by an admin")
