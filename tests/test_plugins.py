"""Loading plugins (built-ins, entry points, the plugins dir), failures, name clashes, the
``tooti plugins`` command — and the two example plugin packages as units."""

from __future__ import annotations

import importlib.metadata
import json
import random
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing

from tooti import plugins
from tooti.backends.base import ModelInfo
from tooti.billing.base import BillingSetup, RequestContext, Usage
from tooti.cli import main
from tooti.config import ConfigError
from tooti.errors import APIError
from tooti.mesh.peer import Peer
from tooti.routing.base import RouteRequest
from tooti.runner import check_plugin_names
from tooti.settings import BackendSettings, BillingSettings, NodeSettings, RoutingSettings, Settings

BUILTIN_BACKENDS = {"llamacpp", "openai", "simulated"}
OPTIONAL_BUILTIN_BACKENDS = {"ollama"}

GOOD_PLUGIN = """
from tooti.hookspecs import hookimpl
from tooti.routing.policies import RoundRobin

@hookimpl
def tooti_routing_policies():
    return {"from-a-file": RoundRobin}
"""

BROKEN_PLUGIN = """
from tooti.hookspecs import hookimpl
1 / 0
"""


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No plugin environment leaking in, and no cached plugin manager either side."""
    monkeypatch.delenv(plugins.AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(plugins.PLUGINS_DIR_ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()


def write_plugin(directory: Path, name: str, source: str) -> Path:
    """A ``*.py`` plugin file in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def info_named(loaded: plugins.Plugins, name: str) -> plugins.PluginInfo:
    """The PluginInfo called ``name`` (fails the test if absent)."""
    matches = [info for info in loaded.infos if info.name == name]
    assert matches, f"no plugin {name!r} in {[i.name for i in loaded.infos]}"
    return matches[0]


class FailingEntryPoint:
    """Stands in for an installed distribution whose plugin module cannot be imported."""

    name = "broken-plugin"
    group = "tooti"
    value = "tooti_broken_plugin"
    dist = SimpleNamespace(name="tooti-broken-plugin", version="6.6.6")

    def load(self) -> Any:
        """Fail as a bad import would."""
        raise ImportError("No module named 'tooti_broken_dependency'")


# ---------------------------------------------------------------- loading


def test_builtins_provide_backends_policies_and_billing() -> None:
    loaded = plugins.load(autoload=False)
    backends = set(loaded.table("tooti_backends"))
    assert BUILTIN_BACKENDS <= backends <= BUILTIN_BACKENDS | OPTIONAL_BUILTIN_BACKENDS
    assert set(loaded.table("tooti_routing_policies")) == {
        "least-loaded", "round-robin", "latency", "weighted", "price"}
    assert set(loaded.table("tooti_billing")) == {"credits", "usage-ledger"}
    assert [i.name for i in loaded.infos] == list(plugins.DEFAULT_PLUGINS)
    for info in loaded.infos:
        assert (info.source, info.distribution, info.error) == ("built-in", "tooti", "")
    assert info_named(loaded, "tooti.billing.ledger").provides == {
        "billing": ["credits", "usage-ledger"]}


def test_example_packages_load_from_entry_points(tmp_path: Path) -> None:
    loaded = plugins.load()
    region = info_named(loaded, "region-affinity")
    assert (region.source, region.distribution, region.error) == (
        "entry point", "tooti-region-affinity", "")
    assert region.version == importlib.metadata.version("tooti-region-affinity")
    assert region.provides == {"routing_policies": ["region-affinity"]}
    cap = info_named(loaded, "spend-cap")
    assert (cap.source, cap.distribution, cap.error) == ("entry point", "tooti-spend-cap", "")
    assert cap.provides == {"billing": ["spend-cap"]}

    policy = loaded.factory("tooti_routing_policies", "region-affinity", "routing policy")(
        {"default_region": "eu"})
    assert type(policy).__name__ == "RegionAffinity"
    billing = loaded.factory("tooti_billing", "spend-cap", "billing plugin")(
        BillingSetup(tmp_path, {}))
    assert type(billing).__name__ == "SpendCap"


def test_disable_autoload_skips_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    loaded = plugins.load()
    assert all(info.source == "built-in" for info in loaded.infos)
    available = "available: latency, least-loaded, price, round-robin, weighted"
    with pytest.raises(plugins.PluginError, match=available):
        loaded.factory("tooti_routing_policies", "region-affinity", "routing policy")
    assert "spend-cap" not in loaded.table("tooti_billing")


def test_plugins_dir_file_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_plugin(tmp_path / "dir", "my_policy", GOOD_PLUGIN)
    loaded = plugins.load(str(path.parent), autoload=False)
    info = info_named(loaded, "my_policy")
    assert (info.source, info.distribution, info.error) == ("plugins dir", str(path), "")
    assert info.provides == {"routing_policies": ["from-a-file"]}
    assert "from-a-file" in loaded.table("tooti_routing_policies")
    # The same through the environment variable (what --plugins-dir falls back to).
    monkeypatch.setenv(plugins.PLUGINS_DIR_ENV, str(path.parent))
    assert "from-a-file" in plugins.load(autoload=False).table("tooti_routing_policies")


def test_plugins_dir_file_that_fails_to_import_is_reported(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    write_plugin(directory, "a_broken", BROKEN_PLUGIN)
    write_plugin(directory, "b_good", GOOD_PLUGIN)
    loaded = plugins.load(str(directory))
    broken = info_named(loaded, "a_broken")
    assert broken.error.startswith("ZeroDivisionError:") and broken.provides == {}
    assert info_named(loaded, "b_good").error == ""
    policies = loaded.table("tooti_routing_policies")
    assert {"least-loaded", "round-robin", "region-affinity", "from-a-file"} <= set(policies)


def test_entry_point_that_fails_to_import_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = importlib.metadata.entry_points

    def entry_points(**params: Any) -> list[Any]:
        return [FailingEntryPoint(), *real(**params)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    loaded = plugins.load()
    broken = info_named(loaded, "broken-plugin")
    assert broken.source == "entry point"
    assert (broken.distribution, broken.version) == ("tooti-broken-plugin", "6.6.6")
    assert broken.error == "ImportError: No module named 'tooti_broken_dependency'"
    assert "broken-plugin" in caplog.text and "tooti-broken-plugin" in caplog.text
    # Everything else still loaded.
    assert info_named(loaded, "region-affinity").error == ""
    assert "region-affinity" in loaded.table("tooti_routing_policies")
    assert "spend-cap" in loaded.table("tooti_billing")


def test_name_provided_twice_is_an_error_naming_both(tmp_path: Path) -> None:
    write_plugin(tmp_path, "dup", """
        from tooti.hookspecs import hookimpl

        @hookimpl
        def tooti_routing_policies():
            return {"least-loaded": object}
    """)
    loaded = plugins.load(str(tmp_path), autoload=False)
    with pytest.raises(plugins.PluginError) as info:
        loaded.table("tooti_routing_policies")
    message = str(info.value)
    assert "'least-loaded'" in message
    assert "tooti.routing.policies" in message and "plugins-dir:dup" in message
    # Other hooks are unaffected.
    assert "usage-ledger" in loaded.table("tooti_billing")


def test_plugin_whose_hook_raises_does_not_stop_the_others(tmp_path: Path) -> None:
    write_plugin(tmp_path, "raiser", """
        from tooti.hookspecs import hookimpl

        @hookimpl
        def tooti_billing():
            raise RuntimeError("boom")
    """)
    loaded = plugins.load(str(tmp_path), autoload=False)
    assert "boom" in info_named(loaded, "raiser").error  # reported: this part works
    assert "usage-ledger" in loaded.table("tooti_billing")  # ... but this raises


def test_async_hookimpl_is_reported_as_failed(tmp_path: Path) -> None:
    write_plugin(tmp_path, "asyncy", """
        from tooti.hookspecs import hookimpl

        @hookimpl
        def tooti_routing_policies():
            async def never_awaited():
                return {}
            coroutine = never_awaited()
            coroutine.close()  # what an async def hookimpl returns, minus the warning
            return coroutine
    """)
    loaded = plugins.load(str(tmp_path), autoload=False)
    assert "coroutine" in info_named(loaded, "asyncy").error


def test_unknown_names_in_config_list_the_available_ones(tmp_path: Path) -> None:
    write_plugin(tmp_path, "extra", GOOD_PLUGIN)
    cases = [
        (Settings(routing=RoutingSettings(policy="nearest")), "routing.policy",
         "unknown routing policy 'nearest'; available: from-a-file, latency, least-loaded, "
         "price, region-affinity, round-robin, weighted"),
        (Settings(billing=BillingSettings(plugins=["usage-ledger", "prepaid"])),
         "billing.plugins[1]",
         "unknown billing plugin 'prepaid'; available: credits, spend-cap, usage-ledger"),
        (Settings(billing=BillingSettings(plugins=["credits", "usage-ledger"])),
         "billing.plugins", "'usage-ledger' is the old name of 'credits'"),
        (Settings(node=NodeSettings(backends=[BackendSettings(type="simulated"),
                                              BackendSettings(type="vllm-direct")])),
         "node.backends[1].type", "unknown backend type 'vllm-direct'; available: "),
    ]
    for settings, key, message in cases:
        settings.plugins_dir = str(tmp_path)
        with pytest.raises(ConfigError) as info:
            check_plugin_names(settings)
        assert info.value.key == key
        assert message in str(info.value)
    # Known names pass, including ones from entry points and the plugins dir.
    check_plugin_names(Settings(
        plugins_dir=str(tmp_path), routing=RoutingSettings(policy="from-a-file"),
        billing=BillingSettings(plugins=["spend-cap", "usage-ledger"])))


def test_unknown_backend_lists_builtin_types() -> None:
    settings = Settings(node=NodeSettings(backends=[BackendSettings(type="nope")]))
    with pytest.raises(ConfigError) as info:
        check_plugin_names(settings)
    listed = str(info.value).split("available: ")[1].split(", ")
    assert BUILTIN_BACKENDS <= set(listed)


def test_cli_plugins_lists_distribution_version_and_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    version = importlib.metadata.version("tooti")
    assert f"tooti.backends  (built-in: tooti {version})\n    backends: " in out
    backends_line = out.split(f"tooti.backends  (built-in: tooti {version})\n")[1]
    backends = set(backends_line.splitlines()[0].removeprefix("    backends: ").split(", "))
    assert BUILTIN_BACKENDS <= backends <= BUILTIN_BACKENDS | OPTIONAL_BUILTIN_BACKENDS
    assert "    routing_policies: latency, least-loaded, price, round-robin, weighted" in out
    assert "    billing: credits, usage-ledger" in out
    ra = importlib.metadata.version("tooti-region-affinity")
    sc = importlib.metadata.version("tooti-spend-cap")
    assert (f"region-affinity  (entry point: tooti-region-affinity {ra})\n"
            "    routing_policies: region-affinity\n") in out
    assert f"spend-cap  (entry point: tooti-spend-cap {sc})\n    billing: spend-cap\n" in out
    assert "FAILED" not in out


def test_cli_plugins_shows_a_failed_plugin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_plugin(tmp_path, "broken", BROKEN_PLUGIN)
    write_plugin(tmp_path, "fine", GOOD_PLUGIN)
    assert main(["plugins", "--plugins-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"broken  (plugins dir: {path})\n    FAILED: ZeroDivisionError: division by zero" in out
    assert "    routing_policies: from-a-file" in out
    assert "region-affinity" in out


def test_cli_plugins_without_autoload(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "usage-ledger" in out and "region-affinity" not in out and "spend-cap" not in out


# ---------------------------------------------------------------- region-affinity


def _policy(options: dict[str, Any] | None = None) -> Any:
    return plugins.load().factory(
        "tooti_routing_policies", "region-affinity", "routing policy")(options or {})


def _peer(node_id: str, region: str | None, in_flight: int = 0, ttft: float = 0.0) -> Peer:
    return Peer(
        id=node_id, role="node", session=cast(Any, None), address="test",
        labels={} if region is None else {"region": region},
        models={"m": ModelInfo("m", max_concurrency=4)}, in_flight={"m": in_flight},
        stats={"ttft_ms": ttft} if ttft else {},
    )


def _route(**headers: str) -> RouteRequest:
    return RouteRequest("req_1", "m", "chat/completions",
                        {k.replace("_", "-"): v for k, v in headers.items()})


def test_region_affinity_prefers_the_requested_region() -> None:
    eu, us, us_busy, bare = (_peer("eu", "eu"), _peer("us", "us"),
                             _peer("us-busy", "us", in_flight=3), _peer("bare", None))
    policy = _policy({"default_region": "eu"})
    first, fallback = policy.rank(_route(x_tooti_region="us"), [eu, us_busy, us, bare])
    assert first is us and fallback in (eu, bare)  # eu and bare tie: either
    assert policy.rank(_route(x_tooti_region=" US "), [eu, us_busy, bare])[0] is us_busy
    assert policy.rank(_route(), [us, bare, eu])[0] is eu  # default_region
    assert policy.rank(_route(x_tooti_region=""), [us, eu])[0] is eu
    # Fallback: nobody in the region, so the least-loaded of the rest.
    ranked = policy.rank(_route(x_tooti_region="ap"), [us_busy, bare])
    assert ranked == [bare]
    assert policy.rank(_route(x_tooti_region="us"), []) == []


def test_region_affinity_returns_the_best_local_then_the_best_fallback() -> None:
    near, near_busy = _peer("near", "eu", in_flight=2), _peer("near-busy", "eu", in_flight=4)
    far, far_slow = _peer("far", "us", ttft=50), _peer("far-slow", "us", ttft=900)
    ranked = _policy().rank(_route(x_tooti_region="eu"), [far_slow, near_busy, far, near])
    assert list(ranked) == [near, far]


def test_region_affinity_without_region_is_least_loaded_with_random_ties() -> None:
    peers = [_peer(f"n{i}", region, in_flight=1) for i, region in enumerate(["eu", "us", None])]
    idle = _peer("idle", "us")
    policy = _policy()
    assert policy.rank(_route(), [*peers, idle]) == [idle]
    policy._random = random.Random(7)
    chosen = {policy.rank(_route(), peers)[0].id for _ in range(200)}
    assert chosen == {"n0", "n1", "n2"}


def test_region_affinity_options() -> None:
    policy = _policy({"header": "X-Zone", "label": "zone", "default_region": "b"})
    a = Peer(id="a", role="node", session=cast(Any, None), address="t", labels={"zone": "a"},
             models={"m": ModelInfo("m")}, in_flight={"m": 5})
    b = Peer(id="b", role="node", session=cast(Any, None), address="t", labels={"zone": "b"},
             models={"m": ModelInfo("m")})
    assert policy.rank(_route(x_zone="a"), [b, a])[0] is a
    assert policy.rank(_route(x_tooti_region="a"), [b, a])[0] is b
    with pytest.raises(ValueError, match=r"routing\.options\.default_region must be a string"):
        _policy({"default_region": 3})


# ---------------------------------------------------------------- spend-cap


def _spend_cap(data_dir: Path, **options: Any) -> Any:
    return plugins.load().factory("tooti_billing", "spend-cap", "billing plugin")(
        BillingSetup(data_dir, options))


def _ctx(request_id: str, key_id: str = "key-a", started: float | None = None) -> RequestContext:
    if started is None:
        return RequestContext(request_id, key_id, "m", "chat/completions", False)
    return RequestContext(request_id, key_id, "m", "chat/completions", False, started)


def _usage(prompt: int, completion: int, status: str = "ok") -> Usage:
    return Usage("node-a", "m", prompt, completion, status)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_spend_cap_refuses_a_key_at_its_cap(tmp_path: Path) -> None:
    cap = _spend_cap(tmp_path, spend_cap_tokens=100)
    await cap.authorize(_ctx("r1"))
    await cap.settle(_ctx("r1"), _usage(40, 50))
    await cap.authorize(_ctx("r2"))  # 90 < 100: still admitted
    await cap.settle(_ctx("r2"), _usage(5, 10))  # 105: over, served in full
    with pytest.raises(APIError) as info:
        await cap.authorize(_ctx("r3"))
    error = info.value
    assert (error.status, error.code, error.type) == (429, "spend_cap_reached",
                                                      "insufficient_quota")
    assert "105 of 100 tokens" in error.message
    assert 0 < int(error.headers["retry-after"]) <= 31 * 24 * 3600
    await cap.authorize(_ctx("r4", key_id="key-b"))  # per key
    await cap.close()
    records = _lines(tmp_path / "spend-cap.jsonl")
    assert [(r["request_id"], r["tokens"]) for r in records] == [("r1", 90), ("r2", 15)]
    assert records[0]["prompt_tokens"] == 40 and records[0]["completion_tokens"] == 50


async def test_spend_cap_settle_is_idempotent_and_refund_writes_nothing(tmp_path: Path) -> None:
    cap = _spend_cap(tmp_path, spend_cap_tokens=1000, spend_cap_path="caps/log.jsonl")
    await cap.settle(_ctx("r1"), _usage(10, 20))
    await cap.settle(_ctx("r1"), _usage(10, 20))
    await cap.refund(_ctx("r2"), "no_capacity")
    await cap.flush()
    await cap.settle(_ctx("r1"), _usage(10, 20))
    await cap.close()
    assert [r["request_id"] for r in _lines(tmp_path / "caps" / "log.jsonl")] == ["r1"]
    assert cap.used("key-a", cap_month()) == 30


def cap_month() -> str:
    """This month (UTC), as the spend-cap plugin names it."""
    return time.strftime("%Y-%m", time.gmtime())


async def test_spend_cap_rebuilds_state_from_the_log(tmp_path: Path) -> None:
    cap = _spend_cap(tmp_path, spend_cap_tokens=50)
    january = 1_704_067_200.0 + 3600  # 2024-01-01T01:00Z
    await cap.settle(_ctx("old", started=january), _usage(1000, 0))  # another month
    await cap.settle(_ctx("r1"), _usage(20, 20))
    await cap.close()
    log = tmp_path / "spend-cap.jsonl"
    with log.open("a") as file:
        file.write('{"request_id": "torn", "key_id": "key-a", "mon')  # a crash mid-line
    again = _spend_cap(tmp_path, spend_cap_tokens=50)
    assert again.used("key-a", "2024-01") == 1000
    assert again.used("key-a", cap_month()) == 40
    await again.authorize(_ctx("r2"))
    await again.settle(_ctx("r1"), _usage(20, 20))  # seen before the restart
    await again.settle(_ctx("r2"), _usage(5, 5))
    with pytest.raises(APIError):
        await again.authorize(_ctx("r3"))
    await again.close()
    third = _spend_cap(tmp_path, spend_cap_tokens=50)
    assert third.used("key-a", cap_month()) == 50
    assert third.seen == {"old", "r1", "r2"}


async def test_spend_cap_per_key_caps_and_unlimited(tmp_path: Path) -> None:
    cap = _spend_cap(tmp_path, spend_cap_tokens=0,
                     spend_cap_keys={"key-small": 10, "anonymous": 0})
    assert (cap.cap_for("key-small"), cap.cap_for("key-other"), cap.cap_for("anonymous")) == (
        10, None, None)
    await cap.settle(_ctx("r1", key_id="key-other"), _usage(10**9, 0))
    await cap.authorize(_ctx("r2", key_id="key-other"))
    await cap.settle(_ctx("r3", key_id="key-small"), _usage(10, 0))
    with pytest.raises(APIError):
        await cap.authorize(_ctx("r4", key_id="key-small"))
    await cap.close()


@pytest.mark.parametrize("options", [
    {"spend_cap_tokens": -1}, {"spend_cap_tokens": "lots"}, {"spend_cap_tokens": True},
    {"spend_cap_keys": ["key-a"]}, {"spend_cap_keys": {"key-a": 1.5}},
])
def test_spend_cap_rejects_bad_options(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"billing\.options\.spend_cap_"):
        _spend_cap(tmp_path, **options)


async def test_spend_cap_run_writes_and_flush_waits_for_it(tmp_path: Path) -> None:
    cap = _spend_cap(tmp_path)
    log = tmp_path / "spend-cap.jsonl"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cap.run)
        await trio.testing.wait_all_tasks_blocked()  # run() is parked, waiting for work
        await cap.settle(_ctx("r0"), _usage(1, 1))
        await cap.flush()  # whether run() already took the line or not, it is on disk now
        assert [r["request_id"] for r in _lines(log)] == ["r0"]
        for i in range(1, 20):
            await cap.settle(_ctx(f"r{i}"), _usage(1, 1))
        # run() wakes up and takes the lines; a write it started completes even when
        # cancelled, so once it has exited everything is on disk — without a flush.
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert [r["request_id"] for r in _lines(log)] == [f"r{i}" for i in range(20)]
    await cap.close()
