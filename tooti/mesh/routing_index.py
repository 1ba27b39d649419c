"""The routing index over a registry's peers: per model and node group, the
:class:`~tooti.mesh.candidates.ModelIndex` of the peers serving it, kept current as
peers come, go and change, so a routing decision never scans every peer."""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Hashable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import TypeVar

from tooti.mesh.candidates import Candidates, ModelIndex
from tooti.mesh.peer import Peer
from tooti.protocol.schemas import ENDPOINTS, PASSTHROUGH_ENDPOINTS

K = TypeVar("K", bound=Hashable)
ModelGroup = tuple[str, str]
"""(model id, node group): what one :class:`ModelIndex` (and one queue) is for."""


class RoutingIndex:
    """Every registered peer filed under each model it serves, in its node group.

    The registry files a peer when it joins, re-files it when its models or state
    change (:meth:`file`) and unfiles it when it leaves (:meth:`unfile`); :meth:`stale`
    marks every peer for re-evaluation before the next read. The reads
    (:meth:`eligible`, :meth:`free_slots`, :meth:`serving`, ...) catch up first.
    """

    def __init__(self, peers: Mapping[str, Peer], on_flip: Callable[[], None]) -> None:
        """``peers``: the registry's peers by id (what :class:`Candidates` look ids up
        in); ``on_flip``: called when a re-evaluation asked to notify finds a peer
        became or stopped being live or eligible somewhere."""
        self.peers = peers
        self.on_flip = on_flip
        self.by_model: dict[str, dict[str, ModelIndex]] = {}
        """Model → node group → the index of that group's peers serving the model."""
        self.filed: dict[Peer, tuple[str, set[str]]] = {}
        """Filed peer → (the node group and the models it is indexed under)."""
        self.tunnels: dict[int, set[Peer]] = {}
        """``id`` of a tunnel session → the filed peers reached through it."""
        self.stale = False
        """Every peer must be re-evaluated before the next read."""
        self.waited: Container[ModelGroup] = ()
        """(model, group) pairs requests wait for: their index stays while empty (set by
        the :class:`~tooti.mesh.slot_queue.SlotQueue`)."""
        self.version = 0
        """Bumped whenever a peer starts or stops being live (or eligible) for a model,
        or a peer's models change: what is cached from the live models is current while
        it stays the same."""
        self.ready_models: dict[str, int] = {}
        """Model → live peers serving it ready (models with none left out): counted as
        peers are filed, so readiness probes cost nothing however many peers there are."""
        self.ready_peers: dict[Peer, int] = {}
        """Live peer → models it serves ready (peers with none left out)."""
        self.loading_models: dict[str, int] = {}
        """Model → live peers announcing it loading (models with none left out)."""
        self.lacking: dict[ModelGroup, dict[str, set[str]]] = {}
        """(model, group) → one of the usual endpoints (chat/completions, completions,
        embeddings) → ids of the peers filed there that do not serve the model on it
        (empty entries left out): nearly every node serves all three, so this stays empty
        and a chat request pays one dict lookup for it (see :meth:`not_serving`)."""
        self.offering: dict[ModelGroup, dict[str, set[str]]] = {}
        """(model, group) → a pass-through endpoint (rerank, audio/*, images/generations,
        responses) → ids of the peers filed there that serve the model on it (empty
        entries left out): few nodes serve them, so this is the small side to keep."""

    # ------------------------------------------------------------ reads

    def find(self, model: str, group: str) -> ModelIndex | None:
        """The index of ``model`` in node group ``group``, if any peer is filed there."""
        if self.stale:
            self.catch_up()
        groups = self.by_model.get(model)
        return None if groups is None else groups.get(group)

    def _indexes(self, model: str) -> Iterable[ModelIndex]:
        if self.stale:
            self.catch_up()
        return self.by_model.get(model, {}).values()

    def candidates(self, model: str) -> list[Peer]:
        """Live peers serving ``model`` and not in cooldown for it, in every group."""
        return [peer for index in self._indexes(model) for peer in index.eligible]

    def eligible(self, model: str, group: str = "") -> Collection[Peer]:
        """The :meth:`candidates` of node group ``group`` (a live read-only view)."""
        index = self.find(model, group)
        return () if index is None else index.eligible.keys()

    def free_slots(self, model: str, group: str = "") -> Candidates:
        """The candidates of node group ``group`` with a free slot for ``model``, as a
        view a routing policy can query without a pass over every peer."""
        index = self.find(model, group)
        return Candidates(ModelIndex(model) if index is None else index, self.peers)

    def serving(self, model: str, group: str | None = None) -> list[Peer]:
        """Live peers serving ``model``, cooldown or not (of node group ``group`` only,
        when given)."""
        if group is not None:
            index = self.find(model, group)
            return [] if index is None else list(index.live)
        return [peer for index in self._indexes(model) for peer in index.live]

    def not_serving(self, model: str, group: str, endpoint: str) -> AbstractSet[str]:
        """Ids of the peers filed under ``model`` in node group ``group`` that do not
        serve it on ``endpoint`` (what a request for that endpoint excludes): a lookup
        for the usual endpoints, a pass over the model's peers for a pass-through one."""
        if self.stale:
            self.catch_up()
        key = (model, group)
        if endpoint in _USUAL:
            lacking = self.lacking.get(key)
            return _NONE if lacking is None else lacking.get(endpoint, _NONE)
        index = self.find(model, group)
        if index is None:
            return _NONE
        offering = self.offering.get(key, {}).get(endpoint, _NONE)
        return {peer.id for peer in index.serving if peer.id not in offering}

    def serving_endpoint(self, model: str, endpoint: str, group: str) -> list[Peer]:
        """Live peers of node group ``group`` serving ``model`` on ``endpoint``."""
        live = self.serving(model, group)
        if endpoint in _USUAL:
            skip = self.not_serving(model, group, endpoint)
            return [peer for peer in live if peer.id not in skip] if skip else live
        offering = self.offering.get((model, group), {}).get(endpoint, _NONE)
        return [peer for peer in live if peer.id in offering]

    def live_models(self) -> dict[str, list[Peer]]:
        """Model id → live peers serving it (models with none are left out)."""
        self.catch_up()
        out: dict[str, list[Peer]] = {}
        for model, groups in self.by_model.items():
            live = [peer for index in groups.values() for peer in index.live]
            if live:
                out[model] = live
        return out

    def live_in_group(self, group: str) -> dict[str, list[Peer]]:
        """Model id → live peers of node group ``group`` serving it (models with none
        are left out)."""
        self.catch_up()
        out: dict[str, list[Peer]] = {}
        for model, groups in self.by_model.items():
            index = groups.get(group)
            if index is not None and index.live:
                out[model] = list(index.live)
        return out

    def loading(self, model: str, group: str | None = None) -> bool:
        """True if a live peer (of node group ``group`` only, when given) announces
        ``model`` as loading."""
        if group is None:
            if self.stale:
                self.catch_up()
            return model in self.loading_models
        index = self.find(model, group)
        return index is not None and bool(index.loading)

    def ready_counts(self) -> tuple[int, int]:
        """(live peers serving at least one model ready, models at least one live peer
        serves ready), from the counts kept as peers are filed."""
        if self.stale:
            self.catch_up()
        return len(self.ready_peers), len(self.ready_models)

    def live_version(self) -> int:
        """:attr:`version`, after catching up with pending re-evaluations."""
        self.catch_up()
        return self.version

    # ------------------------------------------------------------ filing

    def file(self, peer: Peer, notify: bool = False) -> list[ModelGroup]:
        """Index a registered peer under its current models and state; returns the
        (model, group) pairs it touched. With ``notify``, a peer that became or stopped
        being live or eligible anywhere calls ``on_flip``."""
        filed = self.filed.get(peer)
        if filed is None:
            filed = self.filed[peer] = (peer.group, set())
            self.tunnels.setdefault(id(peer.session), set()).add(peer)
        group, models = filed
        keys, flipped = [], False
        for model in models - peer.models.keys():
            self._unfile_endpoints(peer, model, group)
            self._uncount(peer, model, self.by_model[model][group])
            self.by_model[model][group].discard(peer)
            models.discard(model)
            keys.append((model, group))
            self.prune(model, group)
            flipped = True
        for model in peer.models:
            groups = self.by_model.setdefault(model, {})
            index = groups.get(group)
            if index is None:
                index = groups[group] = ModelIndex(model)
            if peer not in index.serving:
                index.serving[peer] = None
                models.add(model)
            self._file_endpoints(peer, model, group)
            flipped = self.evaluate(peer, model, index) or flipped
            keys.append((model, group))
        if flipped:
            self.version += 1
            if notify:
                self.on_flip()
        return keys

    def evaluate(self, peer: Peer, model: str, index: ModelIndex) -> bool:
        """Re-evaluate ``peer`` in ``index`` (that of ``model``), keeping the ready and
        loading counts in step; returns whether it became or stopped being live or
        eligible there. Everything that re-evaluates a filed peer goes through here
        (filing, a slot reserved or released), so no change of state escapes the counts
        :meth:`ready_counts` and :meth:`loading` read."""
        was_live, was_loading = peer in index.live, peer in index.loading
        flipped = index.evaluate(peer)
        is_live, is_loading = peer in index.live, peer in index.loading
        if was_live != is_live:
            self._count_ready(peer, model, 1 if is_live else -1)
        if was_loading != is_loading:
            _bump(self.loading_models, model, 1 if is_loading else -1)
        return flipped

    def unfile(self, peer: Peer) -> list[ModelGroup]:
        """Take ``peer`` out of every index; returns the (model, group) pairs it left."""
        filed = self.filed.pop(peer, None)
        if filed is None:
            return []
        sharing = self.tunnels.get(id(peer.session))
        if sharing is not None:
            sharing.discard(peer)
            if not sharing:
                del self.tunnels[id(peer.session)]
        group, models = filed
        for model in models:
            index = self.by_model[model][group]
            self._unfile_endpoints(peer, model, group)
            self._uncount(peer, model, index)
            index.discard(peer)
            self.prune(model, group)
        self.version += 1
        return [(model, group) for model in models]

    def _file_endpoints(self, peer: Peer, model: str, group: str) -> None:
        """File ``peer`` under the usual endpoints it does not serve ``model`` on
        (:attr:`lacking`) and the pass-through ones it does (:attr:`offering`)."""
        info = peer.models.get(model)
        served = frozenset(info.endpoints) if info is not None else frozenset()
        key = (model, group)
        _mark_ids(self.lacking, key, peer.id, _USUAL - served, _USUAL)
        _mark_ids(self.offering, key, peer.id, served & PASSTHROUGH_ENDPOINTS,
                  PASSTHROUGH_ENDPOINTS)

    def _unfile_endpoints(self, peer: Peer, model: str, group: str) -> None:
        key = (model, group)
        _mark_ids(self.lacking, key, peer.id, _NONE, _USUAL)
        _mark_ids(self.offering, key, peer.id, _NONE, PASSTHROUGH_ENDPOINTS)

    def _count_ready(self, peer: Peer, model: str, delta: int) -> None:
        _bump(self.ready_models, model, delta)
        _bump(self.ready_peers, peer, delta)

    def _uncount(self, peer: Peer, model: str, index: ModelIndex) -> None:
        """``peer`` is leaving ``index``: take it out of the counts."""
        if peer in index.live:
            self._count_ready(peer, model, -1)
        if peer in index.loading:
            _bump(self.loading_models, model, -1)

    def sharing_tunnel(self, peer: Peer, keys: Container[ModelGroup]) -> list[ModelGroup]:
        """The tunnel of ``peer`` has a stream to spare again: the pairs among ``keys``
        served by a peer on it, each index's epoch bumped (a queued request may find a
        slot it could not before)."""
        found = []
        for sibling in self.tunnels.get(id(peer.session), ()):
            group = self.filed[sibling][0]
            for served in sibling.models:
                key = (served, group)
                shared = self.find(served, group)
                if key in keys and shared is not None:
                    shared.epoch += 1
                    found.append(key)
        return found

    def prune(self, model: str, group: str) -> None:
        """Drop the index of (model, group) once no peer serves it and no request waits
        for it, so advertising ever new model ids cannot grow the index without end."""
        groups = self.by_model.get(model)
        index = None if groups is None else groups.get(group)
        if index is None or index.serving or (model, group) in self.waited:
            return
        assert groups is not None
        del groups[group]
        if not groups:
            del self.by_model[model]

    def catch_up(self) -> None:
        """Re-evaluate every peer if :attr:`stale`."""
        if self.stale:
            self.stale = False
            for peer in list(self.filed):
                self.file(peer)

    def rebuild(self) -> None:
        """Index every peer in ``peers`` afresh (after changing ``peers`` directly)."""
        self.by_model, self.filed, self.tunnels = {}, {}, {}
        self.ready_models, self.ready_peers, self.loading_models = {}, {}, {}
        self.lacking, self.offering = {}, {}
        self.stale = False
        for peer in self.peers.values():
            self.file(peer)


_NONE: frozenset[str] = frozenset()
_USUAL = frozenset(ENDPOINTS)


def _mark_ids(table: dict[ModelGroup, dict[str, set[str]]], key: ModelGroup, peer_id: str,
              member_of: AbstractSet[str], endpoints: AbstractSet[str]) -> None:
    """Put ``peer_id`` in ``table[key][e]`` for each ``e`` of ``member_of`` and take it
    out of the rest of ``endpoints``, leaving empty sets and tables out."""
    entry = table.get(key)
    if entry is None:
        if not member_of:
            return
        entry = table[key] = {}
    for endpoint in endpoints:
        ids = entry.get(endpoint)
        if endpoint in member_of:
            if ids is None:
                ids = entry[endpoint] = set()
            ids.add(peer_id)
        elif ids is not None:
            ids.discard(peer_id)
            if not ids:
                del entry[endpoint]
    if not entry:
        del table[key]


def _bump(counts: dict[K, int], key: K, delta: int) -> None:
    """Add ``delta`` to ``counts[key]``, leaving the key out at zero."""
    count = counts.get(key, 0) + delta
    if count > 0:
        counts[key] = count
    else:
        counts.pop(key, None)
