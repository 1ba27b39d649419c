"""The registry's incremental routing index (candidates, free slots, the keys the
built-in policies read), the :class:`Candidates` views handed to policies, and the
FIFO queue of requests waiting for a slot (``Registry`` with ``NodePicker.pick``).

Every index check compares against a full scan of the peers computed from scratch.
Tests that change a peer's models are async: the registry spaces its ``peer.updated``
events on trio's clock (:func:`tooti.clock.now`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import cast

import pytest
import trio
import trio.testing

from tooti import clock
from tooti.backends.base import ModelInfo
from tooti.errors import APIError
from tooti.gateway.node_picker import NodePicker, _sort_key
from tooti.gateway.proxy import Proxy
from tooti.gateway.proxy_settings import ProxySettings
from tooti.gateway.validation import Preferences
from tooti.mesh.candidates import Candidates
from tooti.mesh.health import CooldownPolicy, ModelHealth
from tooti.mesh.peer import Peer
from tooti.mesh.registry import KnownModels, Registry
from tooti.protocol.connection import Limits
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.routing.policies import Cheapest, Latency, LeastLoaded, RoundRobin, Weighted
from tooti.tunnel import TunnelSession

MODEL = "m"
ROUTE = RouteRequest("req_test", MODEL, "chat/completions", {})
DEFAULT = Preferences()


class FakeConn:
    """A tunnel's stream limit: while ``full``, no stream can be opened on it."""

    def __init__(self) -> None:
        self.full = False
        self.peer_limits = Limits()

    def can_open_stream(self) -> bool:
        return not self.full


class FakeSession:
    """Just what :class:`Peer` and :class:`Registry` read from a tunnel session."""

    def __init__(self) -> None:
        self.closed = trio.Event()
        self.rtt: float | None = None
        self.close_reason = ""
        self.conn = FakeConn()


def info(capacity: int = 2, price: tuple[float, float] = (0.0, 0.0)) -> ModelInfo:
    return ModelInfo(id=MODEL, max_concurrency=capacity, price_input=price[0],
                     price_output=price[1])


def make_peer(peer_id: str, *, capacity: int = 2, in_flight: int = 0,
              ttft_ms: float | None = None, tokens_per_s: float | None = None,
              price: tuple[float, float] = (0.0, 0.0), session: FakeSession | None = None,
              ) -> Peer:
    """A peer serving :data:`MODEL` with the given load, speed and prices."""
    peer = Peer(id=peer_id, role="node", address="test",
                session=cast(TunnelSession, session or FakeSession()))
    peer.models = {MODEL: info(capacity, price)}
    if in_flight:
        peer.in_flight[MODEL] = in_flight
    if ttft_ms is not None or tokens_per_s is not None:
        peer.health[MODEL] = ModelHealth(ttft_ms=ttft_ms, tokens_per_s=tokens_per_s,
                                         samples=1)
    return peer


def tunnel(peer: Peer) -> FakeConn:
    return cast(FakeConn, peer.session.conn)


def registry_of(*peers: Peer) -> Registry:
    registry = Registry()
    for peer in peers:
        registry.add(peer)
    return registry


def proxy_of(*peers: Peer, policy: RoutingPolicy | None = None,
             settings: ProxySettings | None = None) -> Proxy:
    return Proxy(registry_of(*peers), policy or LeastLoaded(), settings or ProxySettings())


def ll_key(peer: Peer) -> tuple[float, float]:
    record = peer.health.get(MODEL)
    ttft = record.ttft_ms if record and record.ttft_ms is not None else 0.0
    return (peer.load(MODEL), ttft)


def scan(registry: Registry) -> tuple[set[str], set[str]]:
    """Candidates and peers with a free slot, computed from scratch (a full scan)."""
    eligible, free = set(), set()
    for peer in registry.peers.values():
        if MODEL not in peer.models or not peer.live:
            continue
        record = peer.health.get(MODEL)
        if record is not None and record.in_cooldown:
            continue
        eligible.add(peer.id)
        if peer.in_flight.get(MODEL, 0) < peer.capacity(MODEL):
            free.add(peer.id)
    return eligible, free


def check(registry: Registry) -> set[str]:
    """Assert the index agrees with a full scan; returns the ids with a free slot."""
    eligible, free = scan(registry)
    assert {p.id for p in registry.candidates(MODEL)} == eligible
    assert {p.id for p in registry.eligible(MODEL)} == eligible
    live = {p.id for p in registry.peers.values() if MODEL in p.models and p.live}
    assert {p.id for p in registry.serving(MODEL)} == live
    assert ({p.id for p in registry.live_models().get(MODEL, [])}) == live
    view = registry.free_slots(MODEL)
    assert {p.id for p in view} == free and len(view) == len(free)
    assert [p.id for p in view.by_id()] == sorted(free)
    assert {p.id for p in view if registry.usable(p, MODEL)} == {
        i for i in free if not tunnel(registry.peers[i]).full}
    chosen = view.least_loaded(random.Random(0))
    if free:
        assert chosen is not None
        assert ll_key(chosen) == min(ll_key(registry.peers[i]) for i in free)
    else:
        assert chosen is None
    return free


# ---------------------------------------------------------------- the index


async def test_index_follows_add_remove_and_models() -> None:
    a, b = make_peer("a"), make_peer("b", in_flight=2)
    registry = registry_of(a, b)
    assert check(registry) == {"a"}
    registry.set_models(a, [])
    assert check(registry) == set()
    assert registry.candidates(MODEL) == [b]
    registry.set_models(a, [info(capacity=1)])
    assert check(registry) == {"a"}
    registry.set_models(b, [info(capacity=4)])  # more capacity: a free slot again
    assert check(registry) == {"a", "b"}
    registry.remove(b)
    assert check(registry) == {"a"}
    newer = make_peer("a", in_flight=1, capacity=1)  # the same id reconnects
    assert registry.add(newer) is a
    assert check(registry) == set() and registry.candidates(MODEL) == [newer]
    registry.remove(a)  # the replaced session leaving changes nothing
    assert registry.candidates(MODEL) == [newer]
    registry.remove(newer)
    assert check(registry) == set() and registry.serving(MODEL) == []
    assert MODEL in registry.known_models


async def test_index_follows_draining_health_and_closed_tunnels() -> None:
    peers = [make_peer(name) for name in ("a", "b", "c")]
    a, b, c = peers
    registry = registry_of(*peers)
    b.draining = True  # GOAWAY: the gateway calls changed() and peer_updated()
    registry.changed()
    assert check(registry) == {"a", "c"}
    c.stats = {"healthy": False}  # a heartbeat: peer_updated() alone
    registry.peer_updated(c)
    assert check(registry) == {"a"}
    c.stats = {"healthy": True}
    registry.peer_updated(c)
    assert check(registry) == {"a", "c"}
    a.session.closed.set()  # no notice at all until the tunnel task removes it
    registry.changed()
    assert check(registry) == {"c"}


async def test_a_change_the_index_missed_is_caught_on_the_chosen_node() -> None:
    a, b = make_peer("a"), make_peer("b", in_flight=1)
    proxy = proxy_of(a, b)
    a.session.closed.set()  # nobody told the registry: the index still lists "a"
    assert proxy.picker.pick_now(ROUTE, DEFAULT, set()) is b  # "a" was picked, found gone, skipped
    assert check(proxy.registry) == {"b"}


async def test_index_follows_cooldown_start_and_end() -> None:
    a, b = make_peer("a"), make_peer("b")
    proxy = proxy_of(a, b)
    registry = proxy.registry
    for _ in range(CooldownPolicy().failures):
        proxy.node_failed(a, MODEL, "boom")
    record = a.health[MODEL]
    assert record.in_cooldown and check(registry) == {"b"}
    assert [p.id for p in registry.serving(MODEL)] == ["a", "b"]  # live, in cooldown
    # Its time running out does not readmit it: only a successful probe does.
    record.cooldown_until = clock.now() - 1.0
    registry.changed()
    assert check(registry) == {"b"}
    record.end_cooldown()  # what the probe does on success, then changed()
    registry.changed()
    assert check(registry) == {"a", "b"}


async def test_reserve_and_release_track_free_slots() -> None:
    a = make_peer("a", capacity=2)
    registry = registry_of(a)
    assert registry.reserve(a, MODEL) and a.in_flight[MODEL] == 1
    assert check(registry) == {"a"}
    assert registry.reserve(a, MODEL) and a.in_flight[MODEL] == 2
    assert check(registry) == set()
    assert not registry.reserve(a, MODEL) and a.in_flight[MODEL] == 2  # full
    registry.release(a, MODEL)
    assert check(registry) == {"a"}
    tunnel(a).full = True  # the tunnel's stream limit, shared by all its models
    assert not registry.usable(a, MODEL) and not registry.reserve(a, MODEL)
    assert check(registry) == {"a"}  # still indexed: only the choice checks the tunnel
    tunnel(a).full = False
    assert registry.reserve(a, MODEL)
    registry.release(a, MODEL)
    registry.release(a, MODEL)
    assert a.in_flight[MODEL] == 0 and check(registry) == {"a"}


async def test_measured_speed_is_picked_up_on_release() -> None:
    slow, fast = make_peer("slow", ttft_ms=300), make_peer("fast", ttft_ms=200)
    registry = registry_of(slow, fast)
    view = registry.free_slots(MODEL)
    assert view.least_loaded(random.Random()) is fast
    assert registry.reserve(slow, MODEL)
    slow.health[MODEL].ttft_ms = 10.0  # measured while it served
    registry.release(slow, MODEL)
    assert registry.free_slots(MODEL).least_loaded(random.Random()) is slow


async def test_random_changes_keep_the_index_consistent() -> None:
    rng = random.Random(2024)
    peers = [make_peer(f"n{i:02d}", capacity=rng.choice((1, 2, 4)),
                       ttft_ms=rng.choice((None, 50.0, 80.0))) for i in range(24)]
    proxy = proxy_of(*peers)
    registry = proxy.registry
    held: list[Peer] = []
    for _ in range(600):
        peer = rng.choice(peers)
        action = rng.randrange(9)
        if action <= 2:
            chosen = proxy.picker.pick_now(ROUTE, DEFAULT, set())
            if chosen is not None:
                assert registry.reserve(chosen, MODEL)
                held.append(chosen)
        elif action == 3 and held:
            registry.release(held.pop(rng.randrange(len(held))), MODEL)
        elif action == 4:
            peer.draining = not peer.draining
            registry.peer_updated(peer)
        elif action == 5:
            peer.stats = {"healthy": rng.random() < 0.7}
            registry.changed()
        elif action == 6:
            record = peer.health_of(MODEL)
            if record.in_cooldown:
                record.end_cooldown()
            else:
                record.start_cooldown("test", CooldownPolicy())
            registry.changed()
        elif action == 7 and peer.id in registry.peers:
            registry.set_models(peer, [] if rng.random() < 0.3 else [
                info(rng.choice((1, 2, 4, 8)))])
        elif action == 8:
            tunnel(peer).full = not tunnel(peer).full
            if peer.id in registry.peers and rng.random() < 0.3:
                registry.remove(peer)
            elif peer.id not in registry.peers:
                registry.add(peer)
                registry.set_models(peer, [info(rng.choice((1, 2)))])
        check(registry)


# ---------------------------------------------------------------- choosing


async def test_least_loaded_lowest_load_then_lowest_ttft() -> None:
    registry = registry_of(
        make_peer("busy", capacity=4, in_flight=2, ttft_ms=10),   # 0.5
        make_peer("slow", capacity=4, in_flight=1, ttft_ms=300),  # 0.25, slow
        make_peer("fast", capacity=8, in_flight=2, ttft_ms=40),   # 0.25, fast
        make_peer("full", capacity=1, in_flight=1),
    )
    policy = LeastLoaded()
    assert [p.id for p in policy.rank(ROUTE, registry.free_slots(MODEL))] == ["fast"]
    view = registry.free_slots(MODEL).excluding(["fast"])
    assert [p.id for p in policy.rank(ROUTE, view)] == ["slow"]
    assert [p.id for p in policy.rank(ROUTE, view.restrict(["busy", "full"]))] == ["busy"]
    assert list(policy.rank(ROUTE, view.restrict(["full", "gone"]))) == []


@pytest.mark.parametrize("narrow", ["none", "skip", "subset"])
async def test_least_loaded_ties_are_drawn_at_random(narrow: str) -> None:
    registry = registry_of(make_peer("a"), make_peer("b"), make_peer("worse", in_flight=1),
                           make_peer("other"))
    if narrow == "none":
        registry.set_models(registry.peers["other"], [])
    view = registry.free_slots(MODEL)
    if narrow == "skip":
        view = view.excluding(["other"])
    elif narrow == "subset":
        view = view.restrict(["a", "b", "worse"])
    policy = LeastLoaded()
    policy._random = random.Random(11)
    counts = Counter(policy.rank(ROUTE, view)[0].id for _ in range(400))
    assert set(counts) == {"a", "b"} and min(counts.values()) > 120, counts


async def test_built_in_policies_choose_on_the_view_as_on_a_list() -> None:
    rng = random.Random(5)
    peers = []
    for i in range(60):  # distinct speeds and prices: no exact ties
        peer = make_peer(f"n{i:02d}", capacity=rng.choice((1, 2, 4, 8)),
                         ttft_ms=None if i % 7 == 0 else 20.0 + i * 3.1,
                         tokens_per_s=None if i % 11 == 3 else 10.0 + i * 1.7,
                         price=(round(rng.uniform(0, 2), 3) + i / 1000, rng.uniform(0, 6)))
        peer.in_flight[MODEL] = rng.randrange(peer.capacity(MODEL) + 1)
        peers.append(peer)
    registry = registry_of(*peers)
    view = registry.free_slots(MODEL)
    free = [p for p in peers if p.has_slot(MODEL)]
    assert {p.id for p in view} == {p.id for p in free}
    picker = NodePicker(registry, LeastLoaded(), ProxySettings())
    for factory in (Latency, lambda: Cheapest({"max_ttft_ms": 90}), Cheapest):
        policy = factory()
        assert policy.rank(ROUTE, view)[0] is policy.rank(ROUTE, free)[0]
    assert [p.id for p in RoundRobin().rank(ROUTE, view)] == [
        p.id for p in RoundRobin().rank(ROUTE, free)]
    for sort in ("price", "latency", "throughput", "load"):
        prefs = Preferences(sort=sort)
        by_view = picker.pick_among(ROUTE, prefs, view)
        by_list = picker.pick_among(ROUTE, prefs, free)
        assert by_view is not None and by_list is not None
        key = _sort_key(sort, MODEL)  # equal keys may put another peer first
        assert key(by_view) == key(by_list) == min(map(key, free))
    weighted = Weighted({"weights": {"n01": 5, "n02": 0}})
    assert {weighted.rank(ROUTE, view)[0].id for _ in range(300)} <= {p.id for p in free}


async def test_weighted_draws_in_proportion_through_the_view() -> None:
    registry = registry_of(make_peer("a"), make_peer("b"), make_peer("off"))
    policy = Weighted({"weights": {"a": 3, "b": 1, "off": 0}})
    policy._random = random.Random(77)
    counts = Counter(policy.rank(ROUTE, registry.free_slots(MODEL))[0].id
                     for _ in range(4000))
    assert "off" not in counts and 0.70 < counts["a"] / 4000 < 0.80, counts


async def test_preferences_look_up_and_skip_ids() -> None:
    peers = [make_peer(f"n{i}", capacity=4, in_flight=i % 4, price=(i, 10 - i))
             for i in range(10)]
    proxy = proxy_of(*peers)

    def pick(prefs: Preferences, excluded: frozenset[str] = frozenset()) -> str | None:
        chosen = proxy.picker.pick_now(ROUTE, prefs, set(excluded))
        return None if chosen is None else chosen.id

    # Loads: n0, n4, n8 idle; n1, n5, n9 a quarter; n2, n6 half; n3, n7 three quarters.
    assert pick(Preferences(order=("zz", "n3", "n1"))) == "n3"  # the first listed
    tunnel(peers[3]).full = True
    assert pick(Preferences(order=("zz", "n3", "n1"))) == "n1"  # passed over: tunnel full
    assert pick(Preferences(order=("n3",), allow_fallbacks=False)) is None
    assert pick(Preferences(order=("n3",))) in {"n0", "n4", "n8"}  # then least-loaded
    assert pick(Preferences(only=frozenset({"n6", "n7", "n9"}))) == "n9"
    assert pick(Preferences(ignore=frozenset({"n0", "n4"}))) == "n8"
    assert pick(Preferences(ignore=frozenset({"n4"})), frozenset({"n0", "n8"})) in {
        "n1", "n5", "n9"}
    assert pick(Preferences(max_price_prompt=2.5, max_price_completion=8.5)) == "n2"
    assert pick(Preferences(max_price_prompt=0.5, max_price_completion=8.5)) is None
    assert pick(Preferences(sort="price", only=frozenset({"n5", "n6"}))) == "n5"


async def test_a_third_party_policy_sees_a_plain_sequence() -> None:
    seen: list[list[str]] = []

    class Last:
        def rank(self, request: RouteRequest, candidates: Sequence[Peer]
                 ) -> Sequence[Peer]:
            listed = sorted(candidates, key=lambda p: p.id)
            seen.append([p.id for p in listed])
            assert len(candidates) == len(listed) and candidates[0] in listed
            return listed[::-1]

    a, b, c = make_peer("a"), make_peer("b"), make_peer("c", in_flight=2)
    proxy = proxy_of(a, b, c, policy=Last())
    assert proxy.picker.pick_now(ROUTE, DEFAULT, set()) is b
    tunnel(b).full = True  # its choice cannot take a stream: asked again without it
    assert proxy.picker.pick_now(ROUTE, DEFAULT, set()) is a
    assert seen == [["a", "b"], ["a", "b"], ["a"]]
    assert isinstance(proxy.registry.free_slots(MODEL), Candidates)


# ---------------------------------------------------------------- the queue


async def test_waiters_get_slots_in_arrival_order() -> None:
    peer = make_peer("solo", capacity=1)
    proxy = proxy_of(peer)
    registry = proxy.registry
    held = await proxy.picker.pick(ROUTE, DEFAULT, set())
    assert held is peer
    served: list[int] = []

    async def request(number: int) -> None:
        got = await proxy.picker.pick(ROUTE, DEFAULT, set())
        assert got is peer
        served.append(number)
        registry.release(got, MODEL)  # the slot goes straight to the next in line

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for number in (1, 2, 3):
                nursery.start_soon(request, number)
                await trio.testing.wait_all_tasks_blocked()  # queued in this order
            assert proxy.queued == 3 and not served
            registry.release(peer, MODEL)
    assert served == [1, 2, 3]
    assert proxy.queued == 0 and peer.in_flight[MODEL] == 0 and not registry.slots.waiting


async def test_a_new_request_does_not_overtake_a_waiting_one() -> None:
    peer = make_peer("solo", capacity=1)
    proxy = proxy_of(peer)
    registry = proxy.registry
    assert await proxy.picker.pick(ROUTE, DEFAULT, set()) is peer
    order: list[str] = []
    first_in = trio.Event()

    async def request(name: str) -> None:
        got = await proxy.picker.pick(ROUTE, DEFAULT, set())
        assert got is peer
        order.append(name)
        if name == "waiting":
            first_in.set()
            await trio.sleep_forever()
        registry.release(got, MODEL)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "waiting")
            await trio.testing.wait_all_tasks_blocked()
            registry.release(peer, MODEL)  # handed to the waiting request at once...
            nursery.start_soon(request, "new")  # ...so the newcomer finds no free slot
            await first_in.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["waiting"] and proxy.queued == 1 and peer.in_flight[MODEL] == 1
            nursery.cancel_scope.cancel()
    assert proxy.queued == 0 and not registry.slots.waiting


async def test_a_request_that_cannot_use_a_slot_lets_a_younger_one_have_it() -> None:
    a, b = make_peer("a", capacity=1, in_flight=1), make_peer("b", capacity=1, in_flight=1)
    proxy = proxy_of(a, b)
    registry = proxy.registry
    got: dict[str, str] = {}

    async def request(name: str, prefs: Preferences) -> None:
        peer = await proxy.picker.pick(ROUTE, prefs, set())
        assert peer is not None
        got[name] = peer.id

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "only-a", Preferences(only=frozenset({"a"})))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "any", DEFAULT)
            await trio.testing.wait_all_tasks_blocked()
            registry.release(b, MODEL)  # "only-a" cannot use b: the next one gets it
            await trio.testing.wait_all_tasks_blocked()
            assert got == {"any": "b"} and proxy.queued == 1
            # A newcomer that may use any node does not take a's slot from "only-a".
            nursery.start_soon(request, "late", DEFAULT)
            await trio.testing.wait_all_tasks_blocked()
            registry.release(a, MODEL)
            await trio.testing.wait_all_tasks_blocked()
            assert got == {"any": "b", "only-a": "a"} and proxy.queued == 1
            registry.release(a, MODEL)
    assert got["late"] == "a" and proxy.queued == 0


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    peer = make_peer("solo", capacity=1, in_flight=1)
    proxy = proxy_of(peer)
    registry = proxy.registry
    got: list[str] = []

    async def request(name: str, scope: trio.CancelScope) -> None:
        with scope:
            if await proxy.picker.pick(ROUTE, DEFAULT, set()) is peer:
                got.append(name)

    first, second = trio.CancelScope(), trio.CancelScope()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, "first", first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(request, "second", second)
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.queued == 2
            # The first is cancelled, and before it runs again its slot is handed to it.
            first.cancel()
            registry.release(peer, MODEL)
            assert peer.in_flight[MODEL] == 1  # reserved for the first
    assert got == ["second"] and peer.in_flight[MODEL] == 1
    assert proxy.queued == 0 and not registry.slots.waiting


async def test_queue_bounds_are_kept(autojump_clock: trio.testing.MockClock) -> None:
    peer = make_peer("solo", capacity=1, in_flight=1)
    proxy = proxy_of(peer, settings=ProxySettings(queue_timeout=2.0, max_queue=1))
    errors: list[APIError] = []

    async def request() -> None:
        try:
            await proxy.picker.pick(ROUTE, DEFAULT, set())
        except APIError as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.queued == 1
        started = trio.current_time()
        await request()  # the queue is full: refused at once
        assert trio.current_time() == started
        assert "queue is full" in errors[0].message
    assert trio.current_time() - started == pytest.approx(2.0)
    assert [e.status for e in errors] == [429, 429]
    assert "stayed busy for 2s" in errors[1].message and errors[1].headers["retry-after"]
    assert proxy.queued == 0 and not proxy.registry.slots.waiting and peer.in_flight[MODEL] == 1


async def test_tunnel_full_everywhere_waits_not_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = make_peer("a"), make_peer("b")
    tunnel(a).full = tunnel(b).full = True
    proxy = proxy_of(a, b, settings=ProxySettings(queue_timeout=1.0))
    with pytest.raises(APIError) as info_:
        await proxy.picker.pick(ROUTE, DEFAULT, set())
    assert info_.value.status == 429  # busy, not "no node"
    assert a.in_flight.get(MODEL, 0) == 0 and b.in_flight.get(MODEL, 0) == 0


async def test_peer_changes_wake_waiters() -> None:
    full = make_peer("full", capacity=1, in_flight=1)
    proxy = proxy_of(full)
    registry = proxy.registry
    got: list[Peer | None] = []

    async def request(prefs: Preferences = DEFAULT) -> None:
        got.append(await proxy.picker.pick(ROUTE, prefs, set()))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            joined = make_peer("joined", capacity=1)  # a node joins, then says its models
            registry.add(joined)
            registry.set_models(joined, [info(capacity=1)])
            await trio.testing.wait_all_tasks_blocked()
            assert got == [joined]
            nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            registry.set_models(full, [info(capacity=2)])  # more capacity
            await trio.testing.wait_all_tasks_blocked()
            assert got == [joined, full]
            # Nothing left that the request may use: it stops waiting with no node.
            nursery.start_soon(request, Preferences(only=frozenset({"joined"})))
            await trio.testing.wait_all_tasks_blocked()
            registry.remove(joined)
    assert got == [joined, full, None] and proxy.queued == 0


# ---------------------------------------------------------------- bounded state


def test_known_models_keeps_the_most_recently_advertised() -> None:
    known = KnownModels(limit=3)
    known.update(["a", "b", "c"])
    known.update(["a"])  # advertised again: now the most recent
    known.update(["d"])
    assert "b" not in known and list(known) == ["c", "a", "d"] and len(known) == 3


async def test_a_model_nobody_serves_leaves_the_index() -> None:
    """Advertising ever new model ids must not grow the routing index without end: an
    index goes once its last peer stops serving the model, but not while a request waits
    for it."""
    a = make_peer("a")
    registry = registry_of(a)
    registry.set_models(a, [ModelInfo(id=f"made-up-{n}", max_concurrency=1)
                            for n in range(100)])
    assert set(registry.index.by_model) == {f"made-up-{n}" for n in range(100)}
    registry.set_models(a, [info()])
    assert set(registry.index.by_model) == {MODEL}
    waiter = registry.enqueue(MODEL, "", lambda: None)
    registry.remove(a)
    assert MODEL in registry.index.by_model  # a request still waits for it
    registry.leave(waiter)
    assert registry.index.by_model == {}
    assert MODEL in registry.known_models and "made-up-7" in registry.known_models
    again = make_peer("b")  # a model served again is indexed afresh
    registry.add(again)
    assert registry.candidates(MODEL) == [again]
