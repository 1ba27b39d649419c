"""Routing decisions on hand-made peers: the built-in policies, ``NodePicker.pick_among``
with per-request preferences, ``NodePicker._any_eligible`` and ``NodePicker.pick``, and the
validation of the gateway-only body fields (through the real gateway)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

import pytest
import trio
import trio.testing

from tests.conftest import Network
from tooti.backends.base import ModelInfo
from tooti.errors import APIError
from tooti.gateway.node_picker import NodePicker
from tooti.gateway.proxy_settings import ProxySettings
from tooti.gateway.validation import Preferences, parse_request
from tooti.mesh.health import CooldownPolicy, ModelHealth
from tooti.mesh.peer import Peer
from tooti.mesh.registry import Registry
from tooti.protocol.connection import Connection, Limits, Side, State
from tooti.routing.base import RouteRequest, RoutingPolicy
from tooti.routing.policies import (
    Cheapest,
    Latency,
    LeastLoaded,
    RoundRobin,
    Weighted,
    tooti_routing_policies,
)
from tooti.tunnel import TunnelSession

MODEL = "m"
ROUTE = RouteRequest("req_test", MODEL, "chat/completions", {})


class FakeSession:
    """Just what :class:`Peer` and :class:`Registry` read from a tunnel session."""

    def __init__(self) -> None:
        self.closed = trio.Event()
        self.rtt: float | None = None
        self.close_reason = ""
        self.conn = Connection(Side.ACCEPTOR, Limits())
        self.conn.state = State.OPEN


def make_peer(
    peer_id: str, *, capacity: int = 4, in_flight: int = 0, price: tuple[float, float] = (0, 0),
    ttft_ms: float | None = None, tokens_per_s: float | None = None, model: str = MODEL,
) -> Peer:
    """A peer serving ``model`` with the given load, prices and measured speed."""
    peer = Peer(id=peer_id, role="node", session=cast(TunnelSession, FakeSession()),
                address="test")
    peer.models = {model: ModelInfo(id=model, max_concurrency=capacity,
                                    price_input=price[0], price_output=price[1])}
    peer.in_flight[model] = in_flight
    if ttft_ms is not None or tokens_per_s is not None:
        peer.health[model] = ModelHealth(ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, samples=1)
    return peer


def ids(peers: Sequence[Peer]) -> list[str]:
    return [p.id for p in peers]


def draw(policy: RoutingPolicy, candidates: list[Peer], times: int) -> Counter[str]:
    """How often each candidate comes first over ``times`` requests."""
    return Counter(policy.rank(ROUTE, candidates)[0].id for _ in range(times))


# ---------------------------------------------------------------- policies


def test_builtin_policy_names() -> None:
    assert set(tooti_routing_policies()) == {
        "least-loaded", "round-robin", "latency", "weighted", "price"}


@pytest.mark.parametrize("factory", [LeastLoaded, RoundRobin, Latency, Weighted, Cheapest])
def test_no_candidates_no_route(factory: Any) -> None:
    assert list(factory({}).rank(ROUTE, [])) == []


def test_least_loaded_picks_lowest_load() -> None:
    busy = make_peer("busy", capacity=4, in_flight=2)       # 0.5
    big = make_peer("big", capacity=16, in_flight=4)        # 0.25
    full = make_peer("full", capacity=1, in_flight=1)       # 1.0
    assert ids(LeastLoaded().rank(ROUTE, [busy, big, full])) == ["big"]


def test_least_loaded_breaks_load_ties_on_measured_ttft() -> None:
    slow = make_peer("slow", ttft_ms=300)
    fast = make_peer("fast", ttft_ms=40)
    assert ids(LeastLoaded().rank(ROUTE, [slow, fast])) == ["fast"]
    # Load comes before speed.
    fast.in_flight[MODEL] = 1
    assert ids(LeastLoaded().rank(ROUTE, [slow, fast])) == ["slow"]


def test_least_loaded_random_among_exact_ties() -> None:
    policy = LeastLoaded()
    policy._random = random.Random(7)
    counts = draw(policy, [make_peer("a"), make_peer("b"), make_peer("c")], 300)
    assert set(counts) == {"a", "b", "c"}
    assert all(n > 50 for n in counts.values())


def test_round_robin_rotates_in_id_order() -> None:
    policy = RoundRobin()
    peers = [make_peer("c"), make_peer("a"), make_peer("b")]
    rankings = [ids(policy.rank(ROUTE, peers)) for _ in range(4)]
    assert rankings == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_round_robin_spreads_evenly() -> None:
    counts = draw(RoundRobin(), [make_peer("a"), make_peer("b"), make_peer("c")], 30)
    assert counts == {"a": 10, "b": 10, "c": 10}


def test_latency_prefers_unmeasured_then_fastest() -> None:
    policy = Latency()
    measured = [make_peer("slow", ttft_ms=500), make_peer("fast", ttft_ms=30)]
    new = make_peer("new")
    assert ids(policy.rank(ROUTE, [*measured, new])) == ["new"]
    assert ids(policy.rank(ROUTE, measured)) == ["fast"]


def test_latency_then_decode_speed_then_load() -> None:
    policy = Latency()
    a = make_peer("a", ttft_ms=50, tokens_per_s=20)
    b = make_peer("b", ttft_ms=50, tokens_per_s=80)
    assert ids(policy.rank(ROUTE, [a, b])) == ["b"]
    c = make_peer("c", ttft_ms=50, tokens_per_s=80, in_flight=3)
    assert ids(policy.rank(ROUTE, [c, b])) == ["b"]


def test_weighted_respects_weights() -> None:
    policy = Weighted({"weights": {"a": 3, "b": 1}})
    policy._random = random.Random(1234)
    counts = draw(policy, [make_peer("a"), make_peer("b")], 4000)
    share = counts["a"] / 4000
    assert 0.70 < share < 0.80, counts


def test_weighted_default_weight_applies_to_unlisted_nodes() -> None:
    policy = Weighted({"weights": {"a": 1}, "default_weight": 4})
    policy._random = random.Random(99)
    counts = draw(policy, [make_peer("a"), make_peer("b")], 4000)
    assert 0.75 < counts["b"] / 4000 < 0.85, counts


def test_weighted_zero_weight_is_out_of_rotation() -> None:
    policy = Weighted({"weights": {"off": 0, "a": 1, "b": 2}})
    policy._random = random.Random(5)
    counts = draw(policy, [make_peer("off"), make_peer("a"), make_peer("b")], 1000)
    assert "off" not in counts
    assert counts["a"] > 0 and counts["b"] > 0


def test_weighted_all_zero_still_routes() -> None:
    policy = Weighted({"weights": {"x": 0, "y": 0}})
    policy._random = random.Random(3)
    counts = draw(policy, [make_peer("x"), make_peer("y")], 200)
    assert set(counts) == {"x", "y"}


def test_price_picks_cheapest() -> None:
    peers = [make_peer("dear", price=(5, 10)), make_peer("cheap", price=(1, 2)),
             make_peer("mid", price=(2, 2))]
    assert ids(Cheapest().rank(ROUTE, peers)) == ["cheap"]


def test_price_ties_go_to_less_loaded() -> None:
    a = make_peer("a", price=(1, 1), in_flight=2)
    b = make_peer("b", price=(1, 1), in_flight=1)
    assert ids(Cheapest().rank(ROUTE, [a, b])) == ["b"]


def test_price_with_ttft_ceiling() -> None:
    policy = Cheapest({"max_ttft_ms": 200})
    cheap_slow = make_peer("cheap-slow", price=(1, 1), ttft_ms=900)
    mid_fast = make_peer("mid-fast", price=(2, 2), ttft_ms=100)
    dear_fast = make_peer("dear-fast", price=(9, 9), ttft_ms=20)
    assert ids(policy.rank(ROUTE, [cheap_slow, mid_fast, dear_fast])) == ["mid-fast"]
    # An unmeasured node counts as meeting the ceiling.
    fresh = make_peer("fresh", price=(1.5, 1.5))
    assert ids(policy.rank(ROUTE, [cheap_slow, mid_fast, fresh])) == ["fresh"]


def test_price_falls_back_to_cheapest_when_none_is_fast_enough() -> None:
    policy = Cheapest({"max_ttft_ms": 10})
    peers = [make_peer("dear", price=(9, 9), ttft_ms=50),
             make_peer("cheap", price=(1, 1), ttft_ms=900)]
    assert ids(policy.rank(ROUTE, peers)) == ["cheap"]


# ---------------------------------------------------------------- NodePicker.pick_among


class FirstById:
    """A policy that makes the policy's part of a decision visible."""

    def rank(self, request: RouteRequest, candidates: Sequence[Peer]) -> Sequence[Peer]:
        return sorted(candidates, key=lambda p: p.id)


def make_picker(*peers: Peer, policy: RoutingPolicy | None = None,
                settings: ProxySettings | None = None) -> NodePicker:
    """A node picker over a registry holding ``peers``."""
    registry = Registry()
    for peer in peers:
        registry.add(peer)
    return NodePicker(registry, policy or FirstById(), settings or ProxySettings())


def test_pick_among_without_preferences_asks_the_policy() -> None:
    peers = [make_peer("b"), make_peer("a")]
    assert make_picker().pick_among(ROUTE, Preferences(), peers) is peers[1]
    assert make_picker().pick_among(ROUTE, Preferences(), []) is None


def test_pick_among_follows_order() -> None:
    a, b, c = make_peer("a"), make_peer("b"), make_peer("c")
    picker = make_picker()
    assert picker.pick_among(ROUTE, Preferences(order=("c", "b")), [a, b, c]) is c
    # Listed nodes that are not candidates (gone, full, failed) are skipped.
    assert picker.pick_among(ROUTE, Preferences(order=("zz", "b")), [a, b, c]) is b
    # No listed candidate: the policy (or sort) decides.
    assert picker.pick_among(ROUTE, Preferences(order=("zz",)), [c, b]) is b
    assert picker.pick_among(ROUTE, Preferences(order=("zz",), sort="load"),
                        [make_peer("x", in_flight=2), c]) is c


def test_order_beats_sort() -> None:
    cheap, dear = make_peer("cheap", price=(1, 1)), make_peer("dear", price=(9, 9))
    prefs = Preferences(order=("dear",), sort="price")
    assert make_picker().pick_among(ROUTE, prefs, [cheap, dear]) is dear


def test_sort_price() -> None:
    peers = [make_peer("a", price=(3, 3)), make_peer("b", price=(1, 4)),
             make_peer("c", price=(1, 2))]
    assert make_picker().pick_among(ROUTE, Preferences(sort="price"), peers) is peers[2]
    # Equal prices: the less loaded one.
    x, y = make_peer("x", price=(1, 1), in_flight=3), make_peer("y", price=(1, 1), in_flight=1)
    assert make_picker().pick_among(ROUTE, Preferences(sort="price"), [x, y]) is y


def test_sort_latency() -> None:
    slow, fast = make_peer("slow", ttft_ms=400), make_peer("fast", ttft_ms=25)
    picker = make_picker()
    assert picker.pick_among(ROUTE, Preferences(sort="latency"), [slow, fast]) is fast
    fresh = make_peer("fresh")
    assert picker.pick_among(ROUTE, Preferences(sort="latency"), [slow, fast, fresh]) is fresh


def test_sort_throughput() -> None:
    low = make_peer("low", tokens_per_s=10)
    high = make_peer("high", tokens_per_s=90)
    assert make_picker().pick_among(ROUTE, Preferences(sort="throughput"), [low, high]) is high


def test_sort_load() -> None:
    peers = [make_peer("a", capacity=2, in_flight=1), make_peer("b", capacity=8, in_flight=2),
             make_peer("c", capacity=1, in_flight=0)]
    assert make_picker().pick_among(ROUTE, Preferences(sort="load"), peers) is peers[2]


# ---------------------------------------------------------------- preference filters


def eligible(picker: NodePicker, prefs: Preferences, excluded: set[str] | None = None
             ) -> list[str]:
    """The nodes (all idle here) the request's preferences let ``pick`` pick among;
    ``_any_eligible``, which decides between queueing and "no node", must agree."""
    chosen = sorted(ids(list(picker._candidates(MODEL, prefs, excluded or set()))))
    assert picker._any_eligible(MODEL, prefs, excluded or set()) == bool(chosen)
    return chosen


def three() -> NodePicker:
    return make_picker(make_peer("cheap", price=(1, 2)), make_peer("mid", price=(3, 4)),
                      make_peer("dear", price=(10, 20)))


async def test_eligible_default_is_every_candidate() -> None:
    assert eligible(three(), Preferences()) == ["cheap", "dear", "mid"]


async def test_eligible_only_and_ignore() -> None:
    picker = three()
    assert eligible(picker, Preferences(only=frozenset({"mid", "gone"}))) == ["mid"]
    assert eligible(picker, Preferences(ignore=frozenset({"cheap", "mid"}))) == ["dear"]
    assert eligible(picker, Preferences(only=frozenset({"mid"}),
                                       ignore=frozenset({"mid"}))) == []
    assert eligible(picker, Preferences(), excluded={"cheap"}) == ["dear", "mid"]


async def test_eligible_max_price() -> None:
    picker = three()
    assert eligible(picker, Preferences(max_price_prompt=3)) == ["cheap", "mid"]
    assert eligible(picker, Preferences(max_price_completion=2)) == ["cheap"]
    assert eligible(picker, Preferences(max_price_prompt=3, max_price_completion=3)) == ["cheap"]
    assert eligible(picker, Preferences(max_price_prompt=0.5)) == []


async def test_eligible_allow_fallbacks_false_keeps_to_order() -> None:
    picker = three()
    # With fallbacks allowed, order only ranks.
    assert eligible(picker, Preferences(order=("dear",))) == ["cheap", "dear", "mid"]
    prefs = Preferences(order=("dear", "mid"), allow_fallbacks=False)
    assert eligible(picker, prefs) == ["dear", "mid"]
    both = Preferences(order=("dear", "mid"), only=frozenset({"mid", "cheap"}),
                       allow_fallbacks=False)
    assert eligible(picker, both) == ["mid"]
    # Without an order, allow_fallbacks restricts nothing here (it limits attempts).
    assert eligible(picker, Preferences(allow_fallbacks=False)) == ["cheap", "dear", "mid"]


async def test_eligible_skips_cooldown_draining_unhealthy_and_closed() -> None:
    peers = {name: make_peer(name) for name in ("ok", "cool", "drain", "sick", "gone")}
    picker = make_picker(*peers.values())
    peers["cool"].health_of(MODEL).start_cooldown("test", CooldownPolicy())
    peers["drain"].draining = True
    peers["sick"].stats = {"healthy": False}
    peers["gone"].session.closed.set()
    picker.registry.changed()  # as the gateway does after such changes (the index catches up)
    assert eligible(picker, Preferences()) == ["ok"]
    assert eligible(picker, Preferences(order=("cool",), allow_fallbacks=False)) == []


# ---------------------------------------------------------------- NodePicker.pick


async def test_pick_takes_a_slot_and_queues_when_full() -> None:
    peer = make_peer("solo", capacity=1)
    picker = make_picker(peer, settings=ProxySettings(queue_timeout=5))
    assert await picker.pick(ROUTE, Preferences(), set()) is peer
    assert peer.in_flight[MODEL] == 1
    got: list[Peer | None] = []

    async def second() -> None:
        got.append(await picker.pick(ROUTE, Preferences(), set()))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert picker.queued == 1 and not got
            picker.registry.release(peer, MODEL)
    assert got == [peer] and picker.queued == 0 and peer.in_flight[MODEL] == 1


async def test_pick_busy_is_429_with_retry_after() -> None:
    peer = make_peer("solo", capacity=1, in_flight=1)
    picker = make_picker(peer, settings=ProxySettings(queue_timeout=0.05))
    with trio.fail_after(5), pytest.raises(APIError) as info:
        await picker.pick(ROUTE, Preferences(), set())
    assert info.value.status == 429 and info.value.headers["retry-after"]
    assert info.value.code == "capacity_exhausted" and picker.queued == 0
    picker.settings.max_queue = 0
    with trio.fail_after(1), pytest.raises(APIError) as info:
        await picker.pick(ROUTE, Preferences(), set())
    assert info.value.status == 429 and "queue is full" in info.value.message


async def test_pick_none_when_nothing_is_eligible() -> None:
    picker = make_picker(make_peer("a", price=(9, 9)))
    assert await picker.pick(ROUTE, Preferences(max_price_prompt=1), set()) is None
    assert await picker.pick(ROUTE, Preferences(), {"a"}) is None


# ---------------------------------------------------------------- validation


def test_parse_request_collects_preferences_and_models() -> None:
    raw = (b'{"model":"a","messages":[{"role":"user","content":"x"}],"models":["b","a","c"],'
           b'"provider":{"order":["n1","n2"],"only":["n1","n2","n3"],"ignore":["n4"],'
           b'"sort":"price","max_price":{"prompt":1,"completion":2.5},'
           b'"allow_fallbacks":false}}')
    parsed = parse_request("chat/completions", raw)
    assert parsed.models == ("a", "b", "c") and parsed.rewrite
    assert parsed.preferences == Preferences(
        order=("n1", "n2"), only=frozenset({"n1", "n2", "n3"}), ignore=frozenset({"n4"}),
        sort="price", max_price_prompt=1.0, max_price_completion=2.5, allow_fallbacks=False)
    plain = parse_request("chat/completions",
                          b'{"model":"a","messages":[{"role":"user","content":"x"}]}')
    assert plain.preferences.is_default and not plain.rewrite and plain.models == ("a",)
    alias = parse_request("chat/completions",
                          b'{"model":"a","messages":[{"role":"user"}],"tooti":{"sort":"load"}}')
    assert alias.preferences == Preferences(sort="load") and alias.rewrite


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"provider": "fast"}, "provider"),
        ({"provider": ["a"]}, "provider"),
        ({"provider": {"order": "a"}}, "provider.order"),
        ({"provider": {"order": [1, 2]}}, "provider.order"),
        ({"provider": {"only": "a"}}, "provider.only"),
        ({"provider": {"ignore": [None]}}, "provider.ignore"),
        ({"provider": {"sort": "fastest"}}, "provider.sort"),
        ({"provider": {"sort": 3}}, "provider.sort"),
        ({"provider": {"allow_fallbacks": "no"}}, "provider.allow_fallbacks"),
        ({"provider": {"allow_fallbacks": 0}}, "provider.allow_fallbacks"),
        ({"provider": {"max_price": 5}}, "provider.max_price"),
        ({"provider": {"max_price": {"prompt": -1}}}, "provider.max_price"),
        ({"provider": {"max_price": {"prompt": "1"}}}, "provider.max_price"),
        ({"provider": {"max_price": {"prompt": True}}}, "provider.max_price"),
        ({"provider": {"max_price": {"total": 1}}}, "provider.max_price"),
        ({"provider": {"quantizations": ["q4"]}}, "provider.quantizations"),
        ({"tooti": 1}, "tooti"),
        ({"tooti": {"sort": "cheap"}}, "tooti.sort"),
        ({"tooti": {"only": [5]}}, "tooti.only"),
        ({"models": "tooti-sim"}, "models"),
        ({"models": [1]}, "models"),
        ({"models": [""]}, "models"),
    ],
)
async def test_bad_preferences_are_400_naming_the_param(
    network: Network, extra: dict[str, Any], param: str,
) -> None:
    # Validation comes before routing: no node is needed.
    body = {"model": "tooti-sim", "messages": [{"role": "user", "content": "x"}], **extra}
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
