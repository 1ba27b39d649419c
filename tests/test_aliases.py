"""Model aliases and priority tiers over real sockets and tunnels: which tier serves,
failover down the tiers, the alias's name in answers, the model id the node gets,
``/v1/models`` and ``/v1/models/{id}``, SIGHUP's swap, and config errors."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from tests.conftest import Network
from tests.processes import open_cluster, toml_table, toml_value_lines
from tests.spy import Spy, read_stream
from tooti import config
from tooti.backends.simulated import SimulatedBackend
from tooti.gateway.aliases import OWNED_BY, Aliases
from tooti.mesh.candidates import SlotWaiter
from tooti.mesh.health import CooldownPolicy
from tooti.settings import AliasTiers, BackendSettings

CHAT = "/v1/chat/completions"
LIMIT = 10
ALIASES: dict[str, Any] = {
    "smart": AliasTiers(tiers=[["big"], ["small"]]),
    "pair": ["big", "small"],
    "solo": "big",
}


def chat(model: str = "smart", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **extra}


async def node(network: Network, node_id: str, model: str, gate: trio.Event | None = None,
               **options: Any) -> Spy:
    """A node serving one simulated model, its backend spied on."""
    concurrency = options.pop("max_concurrency", 8)
    spy = Spy(SimulatedBackend(BackendSettings(
        type="simulated", models=[model], max_concurrency=concurrency, options=options)),
        gate)
    await network.add_node([spy.backend], node_id=node_id)
    return spy


@pytest.fixture
def aliased(network: Network) -> Network:
    """The network's gateway with :data:`ALIASES`, applied as SIGHUP applies them."""
    gateway = network.gateway
    gateway.reload(msgspec.structs.replace(gateway.settings, aliases=ALIASES))
    return network


@pytest.fixture
def queued(aliased: Network, monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """Set when a request of the aliased gateway starts waiting in its queue."""
    event = trio.Event()
    registry = aliased.gateway.registry
    original = registry.wait_for_slot

    async def hooked(waiter: SlotWaiter) -> None:
        event.set()
        await original(waiter)

    monkeypatch.setattr(registry, "wait_for_slot", hooked)
    return event


async def settled(network: Network) -> None:
    with trio.fail_after(LIMIT):
        await network.gateway.station.wait_idle()


# ---------------------------------------------------------------- which tier serves


async def test_tier_one_present_never_uses_tier_two(aliased: Network) -> None:
    big = await node(aliased, "n-big", "big")
    small = await node(aliased, "n-small", "small")
    async with aliased.client() as http:
        answers = [await http.post(CHAT, json=chat()) for _ in range(4)]
        streamed, lines = await read_stream(http, chat())
    for answer in (*answers, streamed):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-tooti-node"] == "n-big"
        assert answer.headers["x-tooti-model"] == "big"
    assert not small.requests
    assert [r["model"] for r in big.requests] == ["big"] * 5  # its own id reaches the node
    assert all("tiers" not in r for r in big.requests)
    # The client sees the alias it asked for, in the answer and in every chunk.
    for answer in answers:
        assert answer.json()["model"] == "smart"
        assert int(answer.headers["content-length"]) == len(answer.content)
    chunks = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
    assert chunks and all(chunk["model"] == "smart" for chunk in chunks)
    assert lines[-1] == "data: [DONE]"


async def test_tier_one_absent_falls_to_tier_two(aliased: Network) -> None:
    small = await node(aliased, "n-small", "small")
    async with aliased.client() as http:
        answer = await http.post(CHAT, json=chat())
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tooti-node"] == "n-small"
    assert answer.json()["model"] == "smart"
    assert small.requests[0]["model"] == "small"


async def test_tier_one_node_gone_falls_to_tier_two(aliased: Network) -> None:
    await node(aliased, "n-big", "big")
    small = await node(aliased, "n-small", "small")
    registry = aliased.gateway.registry
    aliased.kill_node("n-big")
    await registry.wait_until(lambda: not registry.serving("big"))
    async with aliased.client() as http:
        answer = await http.post(CHAT, json=chat())
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tooti-node"] == "n-small"
    assert len(small.requests) == 1


async def test_failover_continues_down_the_tiers_then_cooldown_skips_tier_one(
    aliased: Network,
) -> None:
    aliased.gateway.proxy_settings.cooldown = CooldownPolicy(
        failures=1, window=60, base=60, maximum=60)
    broken = await node(aliased, "n-big", "big", fail_rate=1.0, fail_status=503)
    small = await node(aliased, "n-small", "small")
    async with aliased.client() as http:
        first = await http.post(CHAT, json=chat())
        assert aliased.gateway.registry.peers["n-big"].health_of("big").in_cooldown
        second, lines = await read_stream(http, chat())
    for answer in (first, second):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-tooti-node"] == "n-small"
    assert first.json()["model"] == "smart"
    assert lines[-1] == "data: [DONE]"
    assert len(broken.user_requests) == 1  # failed once, then cooling down: not asked
    assert len(small.requests) == 2


async def test_tier_one_full_falls_through_without_queueing(
    aliased: Network, queued: trio.Event,
) -> None:
    gate = trio.Event()
    big = await node(aliased, "n-big", "big", gate, max_concurrency=1)
    small = await node(aliased, "n-small", "small")
    async with aliased.client() as http, trio.open_nursery() as nursery:
        held: list[list[str]] = []

        async def hold() -> None:
            held.append((await read_stream(http, chat()))[1])

        nursery.start_soon(hold)
        await big.wait_until(lambda: big.log == ["open 1"])
        answer = await http.post(CHAT, json=chat())
        assert not queued.is_set()
        gate.set()
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tooti-node"] == "n-small"
    assert held[0][-1] == "data: [DONE]"
    assert len(big.requests) == 1 and len(small.requests) == 1


async def test_last_tier_full_queues(aliased: Network, queued: trio.Event) -> None:
    gate = trio.Event()
    small = await node(aliased, "n-small", "small", gate, max_concurrency=1)
    async with aliased.client() as http, trio.open_nursery() as nursery:
        answers: list[httpx.Response] = []
        nursery.start_soon(read_stream, http, chat())
        await small.wait_until(lambda: small.log == ["open 1"])

        async def second() -> None:
            answers.append(await http.post(CHAT, json=chat()))

        nursery.start_soon(second)
        with trio.fail_after(LIMIT):
            await queued.wait()
        assert aliased.gateway.proxy.queued == 1 and not answers
        gate.set()
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["model"] == "smart"
    assert small.log == ["open 1", "end 1", "open 2", "end 2"]


async def test_one_tier_of_two_ids_takes_the_free_node(aliased: Network) -> None:
    gate = trio.Event()
    big = await node(aliased, "n-big", "big", max_concurrency=1)
    small = await node(aliased, "n-small", "small")
    async with aliased.client() as http, trio.open_nursery() as nursery:
        first = await http.post(CHAT, json=chat("pair"))  # both idle: the first id
        big.gate = gate  # from now on its streams hold their slot until the gate opens
        nursery.start_soon(read_stream, http, chat("pair"))
        await big.wait_until(lambda: big.log[-1:] == ["open 2"])
        second = await http.post(CHAT, json=chat("pair"))
        gate.set()
    assert first.headers["x-tooti-node"] == "n-big"
    assert second.headers["x-tooti-node"] == "n-small"
    assert second.json()["model"] == "pair"
    assert small.requests[0]["model"] == "small"


async def test_last_tier_of_two_ids_queues_for_either(
    aliased: Network, queued: trio.Event,
) -> None:
    """Both ids of a one-tier alias full: the request waits once (one place in the
    gateway's queue) for whichever frees a slot first, and leaves both queues after."""
    registry = aliased.gateway.registry
    big_gate, small_gate = trio.Event(), trio.Event()
    big = await node(aliased, "n-big", "big", big_gate, max_concurrency=1)
    small = await node(aliased, "n-small", "small", small_gate, max_concurrency=1)
    async with aliased.client() as http, trio.open_nursery() as nursery:
        nursery.start_soon(read_stream, http, chat("pair"))
        await big.wait_until(lambda: big.log == ["open 1"])
        nursery.start_soon(read_stream, http, chat("pair"))
        await small.wait_until(lambda: small.log == ["open 1"])
        answers: list[httpx.Response] = []

        async def third() -> None:
            answers.append(await http.post(CHAT, json=chat("pair")))

        nursery.start_soon(third)
        with trio.fail_after(LIMIT):
            await queued.wait()
        assert aliased.gateway.proxy.queued == 1
        small_gate.set()  # the second id frees first: the waiting request takes it
        await small.wait_until(lambda: small.log[-1:] == ["end 2"])
        big_gate.set()
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].headers["x-tooti-node"] == "n-small"
    assert answers[0].json()["model"] == "pair"
    assert big.log == ["open 1", "end 1"]
    await settled(aliased)
    assert aliased.gateway.proxy.queued == 0 and not registry.slots.waiting


async def test_alias_beside_the_models_fallback_and_preferences(aliased: Network) -> None:
    await node(aliased, "n-big", "big")
    other = await node(aliased, "n-other", "other")
    async with aliased.client() as http:
        # The request's own fallback list is tried after the alias's tiers.
        fallback = await http.post(CHAT, json=chat(models=["other"],
                                                   provider={"ignore": ["n-big"]}))
        # An unaliased model in the list answers with its own name.
        plain = await http.post(CHAT, json=chat("other", models=["smart"]))
    assert fallback.status_code == 200, fallback.text
    assert fallback.headers["x-tooti-node"] == "n-other"
    assert fallback.json()["model"] == "other"
    assert plain.json()["model"] == "other"
    assert [r["model"] for r in other.requests] == ["other", "other"]
    assert all("provider" not in r and "models" not in r for r in other.requests)


async def test_unknown_alias_target_is_404_naming_the_alias(aliased: Network) -> None:
    async with aliased.client() as http:
        answer = await http.post(CHAT, json=chat())
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and "'smart'" in error["message"]


# ---------------------------------------------------------------- listing and retrieving


async def test_models_list_and_retrieve_show_visible_aliases(aliased: Network) -> None:
    async with aliased.client() as http:
        empty = (await http.get("/v1/models")).json()["data"]
        missing = await http.get("/v1/models/smart")
        await node(aliased, "n-small", "small")
        listed = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
        one = await http.get("/v1/models/smart")
    assert empty == [] and missing.status_code == 404
    assert set(listed) == {"small", "smart", "pair"}  # "solo" has no visible id
    assert listed["smart"]["owned_by"] == OWNED_BY
    assert listed["smart"]["meta"]["models"] == ["small"]
    assert one.status_code == 200 and one.json() == listed["smart"]


def test_a_keys_allowed_models_filter_alias_targets() -> None:
    aliases = Aliases(ALIASES)
    assert aliases.plan(("smart",), ("small",)) == ([(("small",), True)], ("small",))
    assert aliases.plan(("smart",), ("smart",)) == (
        [(("big",), False), (("small",), True)], ("big", "small"))
    assert aliases.plan(("plain",), ()) is None
    with pytest.raises(Exception, match="may not use the model 'smart'"):
        aliases.plan(("smart",), ("other",))


async def test_reload_swaps_the_aliases(network: Network) -> None:
    await node(network, "n-small", "small")
    gateway = network.gateway
    async with network.client() as http:
        before = await http.post(CHAT, json=chat())
        gateway.reload(msgspec.structs.replace(gateway.settings, aliases=ALIASES))
        during = await http.post(CHAT, json=chat())
        listed = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        gateway.reload(msgspec.structs.replace(gateway.settings, aliases={}))
        after = await http.get("/v1/models/smart")
    assert before.status_code == 404
    assert during.status_code == 200 and during.json()["model"] == "smart"
    assert "smart" in listed
    assert after.status_code == 404


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("toml", "message"), [
    ('a = ["a", "b"]', "gateway.aliases.a: alias 'a' may not list itself"),
    ('a = ["b"]\nb = ["c", "a"]', "aliases form a cycle: a -> b -> a"),
    ("a = []", "gateway.aliases.a: an alias needs at least one model id"),
    ("a = {tiers = []}", "gateway.aliases.a.tiers: an alias needs at least one tier"),
    ("a = {tiers = [[]]}", "a.tiers[0]: a tier needs at least one model id"),
    ('a = {tiers = [["x"], ["x"]]}', "'x' is listed twice"),
    ("a = 3", "expected string, array or table, got integer 3"),
    ('"a b" = "x"', "invalid alias name 'a b'"),
    ('a = {tier = [["x"]]}', "unknown key 'gateway.aliases.a.tier'"),
])
def test_config_errors(toml: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(")):
        config.loads("[gateway.aliases]\n" + toml)


def test_config_nested_aliases_expand_in_place() -> None:
    settings = config.loads('[gateway.aliases]\n"fast" = ["a", "b"]\n'
                            '[gateway.aliases.smart]\ntiers = [["big"], ["fast", "c"]]\n')
    assert Aliases(settings.gateway.aliases).tiers == {
        "fast": (("a", "b"),), "smart": (("big",), ("a", "b", "c"))}


# ---------------------------------------------------------------- SIGHUP, real processes


async def test_sighup_applies_aliases_and_cors(tmp_path: Path) -> None:
    """A real ``tooti run`` gateway: an alias and a CORS origin written into its file
    and applied by SIGHUP, without a restart; removed again by the next SIGHUP."""
    def gateway_config(extra: str = "") -> str:
        return (toml_value_lines({"roles": ["gateway"], "log_level": "info",
                                  "drain_grace": 0.0})
                + toml_table("gateway", {"listen": "127.0.0.1:0"})
                + toml_table("tunnel", {"heartbeat_interval": 0.5}) + extra)

    config_file = tmp_path / "gateway.toml"
    config_file.write_text(gateway_config())
    async with open_cluster(tmp_path) as cluster:
        gateway = await cluster.start_gateway_from(config_file)
        await cluster.start_nodes([("node-a", {})])

        async def sighup(text: str) -> str:
            fresh = config_file.with_name("gateway.toml.new")
            fresh.write_text(text)
            os.replace(fresh, config_file)
            since = gateway.mark()
            gateway.signal(signal.SIGHUP)
            with trio.fail_after(30):
                return (await gateway.wait_for(r"configuration reloaded[^\n]*", since)
                        ).group(0)

        async with httpx.AsyncClient(base_url=cluster.url, timeout=30) as http:
            before = await http.post(CHAT, json=chat("fast"))
            applied = await sighup(gateway_config(
                toml_table("gateway.aliases", {"fast": ["tooti-sim"]})
                + toml_table("gateway.cors", {"allow_origins": ["https://app.example"]})))
            during = await http.post(CHAT, json=chat("fast"),
                                     headers={"origin": "https://app.example"})
            listed = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
            await sighup(gateway_config())
            after = await http.post(CHAT, json=chat("fast"),
                                    headers={"origin": "https://app.example"})
            gone = await http.post(CHAT, json=chat("fast"))
    assert before.status_code == 404
    assert "gateway.aliases" in applied and "gateway.cors" in applied
    assert during.status_code == 200, during.text
    assert during.json()["model"] == "fast"
    assert during.headers["access-control-allow-origin"] == "https://app.example"
    assert "fast" in listed
    # CORS off again: that site's pages are refused; the alias is gone too.
    assert after.status_code == 403 and "access-control-allow-origin" not in after.headers
    assert gone.status_code == 404


async def test_an_alias_through_the_anthropic_front(aliased: Network) -> None:
    import anthropic

    small = await node(aliased, "n-small", "small")
    async with anthropic.AsyncAnthropic(base_url=aliased.url, api_key="none",
                                        max_retries=0) as api:
        message = await api.messages.create(
            model="smart", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert message.model == "smart"
    assert small.requests[-1]["model"] == "small"
