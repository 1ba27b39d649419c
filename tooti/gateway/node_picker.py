"""Picking the node that serves one attempt of a request, and queueing for it.

The node is picked among live nodes of the request's node group (ungrouped nodes for
an ungrouped request) that serve the model, are not in cooldown, have a free slot and
pass the request's preferences (``only``, ``ignore``, ``order`` without fallbacks, the
price caps): by ``order``, else by ``sort``, else by the gateway's routing policy.
When every such node is full the request waits for a slot, at most ``queue_timeout``
seconds and behind at most ``max_queue`` others, then gets 429 with ``Retry-After``:
the queue is never unbounded.

One verb, *pick*: :meth:`NodePicker.pick` reserves a slot (queueing),
:meth:`NodePicker.pick_now` names the node a request would take now without
reserving it, :meth:`NodePicker.pick_among` picks among given candidates.
:meth:`NodePicker.pick_tier` picks among the nodes of several model ids at once (an
alias's tier, :mod:`tooti.gateway.aliases`): the best node of each id (as above), the
least loaded of those (in-flight ÷ capacity, then measured TTFT; a tie goes to the id
listed first); without a free node it returns None at once (the request falls to the
next tier), or, at a last tier, queues for whichever id frees a slot first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Sequence

import trio

from tooti import clock
from tooti.errors import APIError
from tooti.gateway.proxy_settings import ProxySettings
from tooti.gateway.validation import Preferences
from tooti.mesh.candidates import Candidates, SlotWaiter
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.routing.base import KeyName, RouteRequest, RoutingPolicy

SORT_KEYS: dict[str, KeyName] = {
    "price": "price", "latency": "latency", "throughput": "throughput", "load": "load"}
"""Each ``sort`` preference → the index key it minimizes (see :data:`KeyName`)."""


class _NoRoute(Exception):
    """No node the request may use serves the model at all, busy or not."""


LOADING_RETRY_AFTER = 5
"""Seconds a request for a model still loading is told to wait (``Retry-After``): a
small model loads in seconds, a large one is polled that often without a flood."""


def model_loading(model: str) -> APIError:
    """503 ``model_loading`` with ``Retry-After``: the nodes that serve ``model`` are
    still loading it (like Ollama or a model server warming up, the client may retry)."""
    return APIError(503, f"the model '{model}' is loading on the nodes that serve it; "
                    f"retry in {LOADING_RETRY_AFTER}s", code="model_loading",
                    type="service_unavailable",
                    headers={"retry-after": str(LOADING_RETRY_AFTER)})


def check_routable(
    registry: Registry, models: Sequence[str], *,
    serving: Callable[[str], Sequence[Peer]] | None = None,
    known: Container[str] | None = None,
    loading: Callable[[str], bool] | None = None,
) -> None:
    """404 if no model in ``models`` was ever advertised here, 503 ``model_loading`` if
    only nodes still loading it announce one, 503 ``no_capacity`` if none has a live node.

    ``serving`` (model → live peers with the model ready) and ``known`` (models ever
    advertised, loading or ready) narrow all three to the nodes one request may use (its
    node group), so a model only another group serves is 404 as if it did not exist;
    ``loading`` (model → announced loading by a live node; by default in any group) is
    only asked of models ``known`` holds.
    """
    serving = serving or registry.serving
    known = registry.known_models if known is None else known
    if any(serving(m) for m in models):
        return
    is_loading = loading or registry.loading
    for model in models:
        if model in known and is_loading(model):
            raise model_loading(model)
    if any(m in known for m in models):
        raise APIError(503, f"no live node serves model '{models[0]}' right now",
                       code="no_capacity", type="service_unavailable")
    raise APIError(404, f"the model '{models[0]}' does not exist", param="model",
                   code="model_not_found")


class NodePicker:
    """Picks nodes for one gateway's requests and reserves their slots; counts the
    requests waiting for one."""

    def __init__(self, registry: Registry, policy: RoutingPolicy,
                 settings: ProxySettings) -> None:
        self.registry = registry
        self.policy = policy
        self.settings = settings
        """Shared with the proxy: ``queue_timeout`` and ``max_queue`` are read per request."""
        self.queued = 0
        """Requests waiting for a free slot right now."""

    def use_policy(self, policy: RoutingPolicy) -> None:
        """Rank every pick from now on by ``policy`` (SIGHUP). A pick is made without a
        checkpoint, so none under way is affected; a request still queued is ranked by
        the new policy at its next try."""
        self.policy = policy

    def pick_among(self, route: RouteRequest, prefs: Preferences,
                   candidates: Sequence[Peer]) -> Peer | None:
        """The node to try for ``route`` among ``candidates`` (all with a free slot).

        Given a :class:`Candidates` view (as :meth:`pick` does), ``order`` looks the
        listed ids up directly and ``sort`` takes the minimum of a precomputed key, so
        neither makes a Python pass over every node; a plain sequence is scanned.
        """
        if not candidates:
            return None
        view = candidates if isinstance(candidates, Candidates) else None
        if prefs.order:
            if view is not None:
                for node_id in prefs.order:
                    listed = view.get(node_id)
                    if listed is not None:
                        return listed
            else:
                position = {node: i for i, node in enumerate(prefs.order)}
                in_order = [p for p in candidates if p.id in position]
                if in_order:
                    return min(in_order, key=lambda p: position[p.id])
        if prefs.sort is not None:
            if view is not None:
                return view.min_by(SORT_KEYS[prefs.sort])
            return min(candidates, key=_sort_key(prefs.sort, route.model))
        ranked = self.policy.rank(route, candidates)
        return ranked[0] if ranked else None

    def _candidates(self, model: str, prefs: Preferences, excluded: set[str]) -> Candidates:
        """The nodes with a free slot the request may use, as an indexed view: ``only``
        and ``order`` look their ids up, ``ignore`` and ``excluded`` skip a few ids."""
        view = self.registry.free_slots(model, prefs.group)
        if excluded or prefs.ignore:
            view = view.excluding(excluded | prefs.ignore if excluded else prefs.ignore)
        allowed = _allowed(prefs)
        if allowed is not None:
            view = view.restrict(allowed)
        if prefs.max_price_prompt is not None:
            view = view.at_most("price_in", prefs.max_price_prompt)
        if prefs.max_price_completion is not None:
            view = view.at_most("price_out", prefs.max_price_completion)
        return view

    def pick_now(self, route: RouteRequest, prefs: Preferences, excluded: set[str]
                 ) -> Peer | None:
        """The node a request would take now, without reserving it: picked (see
        :meth:`pick_among`) among the nodes with a free slot its preferences allow, and
        able to take a stream now (a node whose tunnel is at its stream limit is passed
        over and the pick made again). None while there is no such node."""
        model = route.model
        view = self._candidates(model, prefs, excluded)
        passed: set[Peer] = set()
        while True:
            peer = self.pick_among(route, prefs, view)
            if peer is None or peer in passed:
                return None
            if self.registry.usable(peer, model):
                return peer
            passed.add(peer)
            view = view.without(peer)

    def _try_pick(self, route: RouteRequest, prefs: Preferences, excluded: set[str]
                  ) -> Peer | None:
        """Reserve a slot on the node :meth:`pick_now` picks; None while every node the
        request may use is busy. Raises _NoRoute when it may use none at all."""
        peer = self.pick_now(route, prefs, excluded)
        if peer is not None and self.registry.reserve(peer, route.model):
            return peer
        if not self._any_eligible(route.model, prefs, excluded):
            raise _NoRoute
        return None

    def _any_eligible(self, model: str, prefs: Preferences, excluded: set[str]) -> bool:
        """True if any candidate, free or busy, is one the request may use."""
        eligible = self.registry.eligible(model, prefs.group)
        if not eligible:
            return False
        allowed = _allowed(prefs)
        nodes: Collection[Peer]
        if allowed is not None:  # a few ids: look them up
            peers = self.registry.peers
            nodes = [peers[i] for i in allowed if i in peers and peers[i] in eligible]
        elif not excluded and _unfiltered(prefs):
            return True
        else:  # stops at the first match, which is usually among the first few
            nodes = eligible
        return any(p.id not in excluded and p.id not in prefs.ignore
                   and _within_price(p, model, prefs) for p in nodes)

    async def pick(self, route: RouteRequest, prefs: Preferences, excluded: set[str]
                   ) -> Peer | None:
        """Reserve a slot on the best eligible node, queueing while all are full.

        The queue is FIFO per model (and node group): a slot that frees up goes to the
        oldest waiting request that may use it, and a new request takes a slot only if
        no older one can. Returns None when no node is eligible at all; raises
        APIError(429) when the queue is full or the wait exceeds ``queue_timeout``.
        """
        model, registry = route.model, self.registry
        deadline = clock.now() + self.settings.queue_timeout

        def try_pick() -> Peer | None:
            return self._try_pick(route, prefs, excluded)

        registry.dispatch(model, prefs.group)  # older requests first
        try:
            peer = try_pick()
        except _NoRoute:
            return None
        if peer is not None:
            return peer
        if self.queued >= self.settings.max_queue:
            raise _busy("the gateway's queue is full")
        waiter = registry.enqueue(model, prefs.group, try_pick)
        self.queued += 1
        try:
            with trio.move_on_at(deadline):
                await registry.wait_for_slot(waiter)
            peer, waiter.peer = waiter.peer, None  # claimed: leave() will not pass it on
            if peer is not None:
                return peer
            if isinstance(waiter.error, _NoRoute):
                return None
            if waiter.error is not None:
                raise waiter.error
            raise _busy(f"every node serving '{model}' stayed busy for "
                        f"{self.settings.queue_timeout:g}s")
        finally:
            self.queued -= 1
            registry.leave(waiter)


    async def pick_tier(self, route: RouteRequest, models: Sequence[str], prefs: Preferences,
                        excluded: set[str], *, queue: bool = True
                        ) -> tuple[Peer, str] | None:
        """Reserve a slot on the best node serving any of ``models`` (an alias's tier)
        and return it with the id it was picked for; None when none can take the
        request now and ``queue`` is False, or when none may serve it at all. With
        ``queue``, waits (as :meth:`pick`, one place in the gateway's queue) for the
        first slot of any of ``models``. Besides ``excluded``, each id's nodes that do
        not serve ``route.endpoint`` are passed over."""
        if len(models) == 1 and queue:
            peer = await self.pick(_for_model(route, models[0]), prefs, excluded)
            return None if peer is None else (peer, models[0])
        registry = self.registry
        deadline = clock.now() + self.settings.queue_timeout
        routes = [_for_model(route, model) for model in models]
        # Each id's nodes that do not serve the request's endpoint are never picked (a
        # node may serve one id of the tier on it and not another).
        skip = {each.model: excluded | registry.not_serving(each.model, prefs.group,
                                                            route.endpoint)
                for each in routes}
        best: tuple[Peer, str] | None = None
        best_key: tuple[float, float] = (0.0, 0.0)
        for each in routes:
            registry.dispatch(each.model, prefs.group)  # older requests first
            peer = self.pick_now(each, prefs, skip[each.model])
            if peer is not None:
                key = _load_key(peer, each.model)
                if best is None or key < best_key:
                    best, best_key = (peer, each.model), key
        if best is not None and registry.reserve(*best):
            return best
        if not queue:
            return None
        eligible = [each for each in routes
                    if self._any_eligible(each.model, prefs, skip[each.model])]
        if not eligible:
            return None
        if self.queued >= self.settings.max_queue:
            raise _busy("the gateway's queue is full")

        def taker(each: RouteRequest) -> Callable[[], Peer | None]:
            return lambda: self._try_pick(each, prefs, skip[each.model])

        waiters = [registry.enqueue(each.model, prefs.group, taker(each)) for each in eligible]
        self.queued += 1
        try:
            with trio.move_on_at(deadline):
                while True:
                    for waiter in waiters:
                        if waiter.peer is not None:
                            peer, waiter.peer = waiter.peer, None  # claimed
                            return peer, waiter.key[0]
                    pending = [w for w in waiters if not w.event.is_set()]
                    if not pending:
                        break
                    await _first_slot(registry, pending)
            errors = [w.error for w in waiters]
            if all(isinstance(error, _NoRoute) for error in errors):
                return None
            for error in errors:
                if error is not None and not isinstance(error, _NoRoute):
                    raise error
            raise _busy(f"every node serving {', '.join(repr(m) for m in models)} stayed "
                        f"busy for {self.settings.queue_timeout:g}s")
        finally:
            self.queued -= 1
            for waiter in waiters:
                registry.leave(waiter)


def _for_model(route: RouteRequest, model: str) -> RouteRequest:
    """``route`` for ``model`` (itself when it already is)."""
    if route.model == model:
        return route
    return RouteRequest(route.request_id, model, route.endpoint, route.headers, route.body,
                        route.key_id)


def _load_key(peer: Peer, model: str) -> tuple[float, float]:
    """How busy ``peer`` is for ``model``: in-flight ÷ capacity, then measured TTFT."""
    health = peer.health.get(model)
    ttft = health.ttft_ms if health is not None and health.ttft_ms is not None else 0.0
    return (peer.load(model), ttft)


async def _first_slot(registry: Registry, waiters: Sequence[SlotWaiter]) -> None:
    """Wait until any of ``waiters`` has a slot or an error."""
    async with trio.open_nursery() as nursery:
        async def wait(waiter: SlotWaiter) -> None:
            await registry.wait_for_slot(waiter)
            nursery.cancel_scope.cancel()

        for waiter in waiters:
            nursery.start_soon(wait, waiter)


def _sort_key(sort: str, model: str) -> Callable[[Peer], tuple[float, ...]]:
    """What ``sort`` minimizes over a plain list of peers (a :class:`Candidates` view
    keeps the same keys in its index: :data:`SORT_KEYS`)."""
    def key(peer: Peer) -> tuple[float, ...]:
        info = peer.models.get(model)
        health = peer.health.get(model)
        load = peer.load(model)
        if sort == "price":
            return ((info.price_input + info.price_output) if info else 0.0, load)
        if sort == "latency":
            ttft = health.ttft_ms if health and health.ttft_ms is not None else 0.0
            return (ttft, load)
        if sort == "throughput":
            tps = health.tokens_per_s if health and health.tokens_per_s is not None else 1e12
            return (-tps, load)
        return (load,)

    return key


def _busy(why: str) -> APIError:
    return APIError(429, f"{why}; retry shortly", code="capacity_exhausted",
                    type="rate_limit_error", headers={"retry-after": "1"})


def _allowed(prefs: Preferences) -> frozenset[str] | None:
    """The node ids a request is limited to (``only``, and ``order`` without fallbacks),
    or None when it is not limited to a list."""
    allowed = prefs.only
    if not prefs.allow_fallbacks and prefs.order:
        allowed = frozenset(prefs.order) if allowed is None else allowed & set(prefs.order)
    return allowed


def _unfiltered(prefs: Preferences) -> bool:
    """True when the preferences leave every node of the request's group eligible."""
    return (_allowed(prefs) is None and not prefs.ignore and prefs.max_price_prompt is None
            and prefs.max_price_completion is None)


def _within_price(peer: Peer, model: str, prefs: Preferences) -> bool:
    info = peer.models.get(model)
    if info is None:
        return False
    if prefs.max_price_prompt is not None and info.price_input > prefs.max_price_prompt:
        return False
    return not (prefs.max_price_completion is not None
                and info.price_output > prefs.max_price_completion)
