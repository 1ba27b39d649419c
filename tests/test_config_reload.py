"""SIGHUP re-reads the configuration file and applies it, all or nothing (tooti/reload.py).

End to end with real ``tooti run --config FILE`` processes and real signals: keys,
groups, limits and the routing policy of a gateway, and the backends of a node-only
process, change without a restart and without dropping a stream in flight; a file
that does not validate is refused with the error and the running configuration
stays; the process survives a burst of SIGHUPs. The split of a reload into what is
applied live and what needs a restart is unit-tested below.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.processes import (
    Tooti,
    open_cluster,
    spawn,
    toml_table,
    toml_value_lines,
)
from tooti.config import ConfigError
from tooti.reload import Reloader, live_keys, plan_reload, restart_keys
from tooti.settings import (
    BackendSettings,
    GatewaySettings,
    GroupSettings,
    NodeSettings,
    RoutingSettings,
    Settings,
    TunnelSettings,
)

TIMEOUT = 30.0
"""Hang guard of every wait (never reached when the code works)."""
ADMIN = "adm-secret-one"
OLD_KEY = "sk-blue-old-secret"
NEW_KEY = "sk-blue-new-secret"
JOIN = "tok-blue-secret"


def rewrite(path: Path, text: str) -> None:
    """Replace ``path`` at once (an editor's save), so no reload reads half a file."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def gateway_config(*, keys: list[str], weights: dict[str, float],
                   max_body_bytes: int = 1_000_000, policy: str = "weighted",
                   extra: str = "") -> str:
    """A gateway whose group ``blue`` has ``keys`` and admits nodes with :data:`JOIN`."""
    return (toml_value_lines({"roles": ["gateway"], "log_level": "info", "drain_grace": 0.0})
            + toml_table("gateway", {"listen": "127.0.0.1:0", "auth": "keys",
                                     "admin_key": ADMIN, "max_body_bytes": max_body_bytes})
            + toml_table("gateway.groups.blue", {"join_token": JOIN, "api_keys": keys})
            + toml_table("routing", {"policy": policy})
            + toml_table("routing.options.weights", weights)
            + toml_table("tunnel", {"heartbeat_interval": 0.5})
            + extra)


def chat(model: str = "tooti-sim", stream: bool = False, **body: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}], **body}


async def served_by(http: httpx.AsyncClient, key: str) -> str:
    """Which node answered one request with ``key`` (the gateway's x-tooti-node)."""
    answer = await http.post("/v1/chat/completions", json=chat(max_tokens=2),
                             headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-tooti-node"]


async def reload_and_wait(tooti: Tooti, pattern: str = r"configuration reloaded[^\n]*"
                          ) -> str:
    """SIGHUP ``tooti`` and wait for the log line of the reload (after the signal)."""
    since = tooti.mark()
    tooti.signal(signal.SIGHUP)
    with trio.fail_after(TIMEOUT):
        return (await tooti.wait_for(pattern, since)).group(0)


async def test_gateway_reload_keys_groups_limits_policy_keeps_a_stream(
        tmp_path: Path) -> None:
    """One gateway process, two node processes in group ``blue``: the group's key is
    replaced, the weights of the routing policy are swapped and the body limit cut, with
    a stream in flight across the SIGHUP; then a broken file and an unknown policy are
    refused (the old configuration keeps working), and 20 SIGHUPs in a row change
    nothing and end nothing."""
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_config(keys=[OLD_KEY], weights={"node-a": 1.0, "node-b": 0.0}))
    async with open_cluster(tmp_path) as cluster:
        gateway = await cluster.start_gateway_from(config)
        slow = {"tokens": 30, "tokens_per_second": 15.0}
        await cluster.start_nodes([("node-a", slow), ("node-b", slow)], join_token=JOIN)

        async with httpx.AsyncClient(base_url=cluster.url, timeout=TIMEOUT) as http:
            for _ in range(3):
                assert await served_by(http, OLD_KEY) == "node-a"
            assert (await http.post("/v1/chat/completions", json=chat(), headers={
                "authorization": f"Bearer {NEW_KEY}"})).status_code == 401

            lines: list[str] = []
            async with http.stream("POST", "/v1/chat/completions", json=chat(stream=True),
                                   headers={"authorization": f"Bearer {OLD_KEY}"}
                                   ) as streaming:
                assert streaming.headers["x-tooti-node"] == "node-a"
                async for line in streaming.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if not lines:  # the first token is out: reload now
                        rewrite(config, gateway_config(
                            keys=[NEW_KEY], weights={"node-a": 0.0, "node-b": 1.0},
                            max_body_bytes=2000))
                        reloaded = await reload_and_wait(gateway)
                    lines.append(line)
            assert lines[-1] == "data: [DONE]", lines
            assert sum(" tok" in line for line in lines) == 30
            assert not any('"error"' in line for line in lines), lines
            for key in ("gateway.groups.blue.api_keys", "gateway.max_body_bytes",
                        "routing.options"):
                assert key in reloaded, reloaded

            # The removed key is refused, the added one routed by the new weights.
            refused = await http.post("/v1/chat/completions", json=chat(), headers={
                "authorization": f"Bearer {OLD_KEY}"})
            assert refused.status_code == 401 and refused.json()["error"]["code"] == \
                "invalid_api_key"
            for _ in range(3):
                assert await served_by(http, NEW_KEY) == "node-b"
            too_big = await http.post("/v1/chat/completions", json=chat(pad="x" * 3000),
                                      headers={"authorization": f"Bearer {NEW_KEY}"})
            assert too_big.status_code == 413, too_big.text

            # A broken file: the error config check prints, at ERROR; nothing changes.
            rewrite(config, gateway_config(keys=[OLD_KEY], weights={"node-a": 1.0})
                    + "[gateway\n")
            error = await reload_and_wait(gateway, r"ERROR[^\n]*")
            assert str(config) in error and "not reloaded" in error
            # An unknown routing policy (and a key change with it): refused whole.
            rewrite(config, gateway_config(keys=[OLD_KEY], weights={},
                                           policy="no-such-policy"))
            error = await reload_and_wait(gateway, r"ERROR[^\n]*")
            assert "routing.policy" in error and "no-such-policy" in error
            assert await served_by(http, NEW_KEY) == "node-b"
            assert (await http.post("/v1/chat/completions", json=chat(), headers={
                "authorization": f"Bearer {OLD_KEY}"})).status_code == 401

            # 20 SIGHUPs in a row with the valid file back: the process stays, serving.
            rewrite(config, gateway_config(keys=[NEW_KEY],
                                           weights={"node-a": 0.0, "node-b": 1.0},
                                           max_body_bytes=2000))
            since = gateway.mark()
            for _ in range(20):
                gateway.signal(signal.SIGHUP)
            with trio.fail_after(TIMEOUT):
                await gateway.wait_for(r"configuration reloaded: nothing changed", since)
            assert await served_by(http, NEW_KEY) == "node-b"
            last = await reload_and_wait(gateway)
            assert "nothing changed" in last and gateway.alive
    for secret in (ADMIN, OLD_KEY, NEW_KEY, JOIN):
        assert secret not in gateway.text


def node_config(gateway_url: str, backends: list[dict[str, Any]]) -> str:
    """A node-only process dialling ``gateway_url`` with simulated ``backends``."""
    text = (toml_value_lines({"roles": ["node"], "log_level": "info", "drain_grace": 0.0})
            + toml_table("node", {"id": "solo", "peers": [gateway_url],
                                  "reconnect_initial": 0.1, "reconnect_max": 1.0})
            + toml_table("tunnel", {"heartbeat_interval": 0.5}))
    for backend in backends:
        options = backend.pop("options", {})
        text += toml_table("[[node.backends]]", {"type": "simulated", **backend})
        text += toml_table("node.backends.options", options)
    return text


async def model_ids(http: httpx.AsyncClient) -> set[str]:
    answer = await http.get("/v1/models")
    assert answer.status_code == 200, answer.text
    return {entry["id"] for entry in answer.json()["data"]}


async def test_node_only_process_reloads_its_backends(tmp_path: Path) -> None:
    """A node-only process catches SIGHUP: a backend added appears in the gateway's
    /v1/models and a removed one disappears at once, while a stream on the removed one
    finishes (then it is closed); a backend type no plugin provides is refused, the
    backends in use stay."""
    slow = {"tokens": 24, "tokens_per_second": 12.0}
    async with open_cluster(tmp_path) as cluster:
        await cluster.start_gateway()
        config = tmp_path / "solo.toml"
        config.write_text(node_config(cluster.tunnel_url, [
            {"models": ["alpha"], "options": dict(slow)}]))
        since = cluster.gateway.mark() if cluster.gateway else 0
        node = await spawn(cluster.nursery, config, tmp_path / "solo-data", "solo")
        cluster.children.append(node)
        await cluster.wait_registered("solo", since=since)
        assert cluster.gateway is not None
        async with httpx.AsyncClient(base_url=cluster.url, timeout=TIMEOUT) as http:
            assert await model_ids(http) == {"alpha"}
            lines: list[str] = []
            async with http.stream("POST", "/v1/chat/completions",
                                   json=chat("alpha", stream=True)) as streaming:
                async for line in streaming.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if not lines:  # alpha is streaming: replace it by beta and gamma
                        rewrite(config, node_config(cluster.tunnel_url, [
                            {"models": ["beta"], "price_input": 1.5},
                            {"models": ["gamma"]}]))
                        seen = cluster.gateway.mark()
                        started = trio.current_time()
                        reloaded = await reload_and_wait(node)
                        with trio.fail_after(TIMEOUT):
                            await cluster.gateway.wait_for(r"peer solo serves beta, gamma",
                                                           seen)
                        visible = trio.current_time() - started
                        assert await model_ids(http) == {"beta", "gamma"}
                    lines.append(line)
            assert lines[-1] == "data: [DONE]", lines
            assert sum(" tok" in line for line in lines) == 24
            assert not any('"error"' in line for line in lines), lines
            print(f"models changed at the gateway {visible * 1000:.0f} ms after SIGHUP")
            assert "node.backends (backends: 2 new, 1 removed, 0 kept)" in reloaded, reloaded
            with trio.fail_after(TIMEOUT):
                await node.wait_for(r"backend simulated removed: closed after its last stream")
            per_model = (await cluster.peers())["solo"]["per_model"]
            assert per_model["beta"]["price"]["input"] == 1.5, per_model
            answer = await http.post("/v1/chat/completions", json=chat("gamma", max_tokens=2))
            assert answer.status_code == 200, answer.text
            gone = await http.post("/v1/chat/completions", json=chat("alpha", max_tokens=2))
            # The gateway knew alpha: no live node serves it now (not an unknown model).
            assert gone.status_code == 503, gone.text
            assert gone.json()["error"]["code"] == "no_capacity", gone.text

            rewrite(config, node_config(cluster.tunnel_url, [{"type": "no-such-backend"}]))
            error = await reload_and_wait(node, r"ERROR[^\n]*")
            assert "node.backends[0].type" in error and "no-such-backend" in error
            assert await model_ids(http) == {"beta", "gamma"}
            answer = await http.post("/v1/chat/completions", json=chat("beta", max_tokens=2))
            assert answer.status_code == 200, answer.text

            # beta's entry unchanged keeps its backend; gamma's goes.
            rewrite(config, node_config(cluster.tunnel_url, [
                {"models": ["beta"], "price_input": 1.5}]))
            seen = cluster.gateway.mark()
            reloaded = await reload_and_wait(node)
            assert "(backends: 0 new, 1 removed, 1 kept)" in reloaded, reloaded
            with trio.fail_after(TIMEOUT):
                await cluster.gateway.wait_for(r"peer solo serves beta\n", seen)
            assert await model_ids(http) == {"beta"}
            assert node.alive


# ---------------------------------------------------------------- the plan


def test_plan_splits_live_keys_from_restart_keys() -> None:
    """What a gateway applies live and what it names as needing a restart: key names,
    the running values kept for the restart ones, the file's for the live ones."""
    running = Settings(gateway=GatewaySettings(
        listen="127.0.0.1:1", admin_key="a", max_queue=5,
        groups={"blue": GroupSettings(join_token="t", api_keys=["k1"])}))
    loaded = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:2", admin_key="b", max_queue=7,
                                max_connections=9, database="elsewhere.sqlite3",
                                groups={"blue": GroupSettings(join_token="t",
                                                              api_keys=["k2"]),
                                        "green": GroupSettings(join_token="g")}),
        routing=RoutingSettings(policy="round-robin"), tunnel=TunnelSettings(max_streams=3),
        node=NodeSettings(backends=[BackendSettings(type="simulated")]))
    plan = plan_reload(running, loaded, live_keys(["gateway"]))
    assert sorted(plan.applied) == [
        "gateway.admin_key", "gateway.groups.blue.api_keys", "gateway.groups.green",
        "gateway.max_connections", "gateway.max_queue", "routing.policy"]
    assert sorted(plan.restart) == [
        "gateway.database", "gateway.listen", "node.backends", "tunnel.max_streams"]
    applied = plan.settings
    assert (applied.gateway.admin_key, applied.gateway.max_queue) == ("b", 7)
    assert set(applied.gateway.groups) == {"blue", "green"}
    assert applied.routing.policy == "round-robin"
    assert (applied.gateway.listen, applied.gateway.database) == ("127.0.0.1:1", "")
    assert applied.gateway.max_connections == 9
    assert applied.tunnel.max_streams == running.tunnel.max_streams
    assert applied.node.backends == [] and running.gateway.admin_key == "a"  # not touched
    assert plan.changed("routing.policy") and not plan.changed("routing.options")
    assert restart_keys(running, loaded) == plan.restart


def test_plan_of_a_node_only_process() -> None:
    """A node applies its backends (and, serving node.admin_listen, the admin key);
    gateway keys it does not run need a restart, as they would to mean anything."""
    running = Settings(roles=["node"])
    loaded = Settings(roles=["node"], log_level="debug",
                      gateway=GatewaySettings(admin_key="x", max_queue=2),
                      node=NodeSettings(backends=[BackendSettings(models=["m"])]))
    plain = plan_reload(running, loaded, live_keys(["node"]))
    assert sorted(plain.applied) == ["log_level", "node.backends"]
    assert sorted(plain.restart) == ["gateway.admin_key", "gateway.max_queue"]
    admin = plan_reload(running, loaded, live_keys(["node"], node_admin=True))
    assert "gateway.admin_key" in admin.applied
    assert admin.settings.node.backends[0].models == ["m"]
    unchanged = plan_reload(running, running, live_keys(["node"]))
    assert unchanged.applied == [] and unchanged.restart == []


class _FailingGateway:
    """A gateway whose reload hits a bug."""

    keys = None

    def __init__(self) -> None:
        self.calls = 0

    def reload(self, settings: GatewaySettings, policy: object = None,
               auth: object = None) -> None:
        self.calls += 1
        raise RuntimeError("a bug while applying")


class _Roles:
    def __init__(self, gateway: Any) -> None:
        self.gateway: Any = gateway
        self.node: Any = None
        self.node_admin: Any = None
        self.station: Any = None


async def test_a_failure_applying_is_logged_and_the_next_reload_still_runs(
        nursery: trio.Nursery, caplog: Any) -> None:
    """The reload task survives any exception (the signal loop, and the process, go on);
    signals that arrive before a reload has read the file fold into that one."""
    gateway = _FailingGateway()
    loaded = Settings(roles=["gateway"], gateway=GatewaySettings(max_queue=3))
    reloader = Reloader(_Roles(gateway), Settings(roles=["gateway"]), lambda: loaded,
                        ["gateway"])
    for _ in range(3):  # all three before the reload task runs: one reload
        reloader.request(nursery)
    with trio.fail_after(TIMEOUT):
        await reloader.finished.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert (reloader.reloads, gateway.calls) == (1, 1)
        reloader.request(nursery)
        await reloader.finished.wait()
    assert (reloader.reloads, gateway.calls) == (2, 2)
    failures = [r for r in caplog.records if "reloading the configuration failed" in
                r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None


async def test_reloaded_connection_limits_apply_to_new_connections(
        nursery: trio.Nursery) -> None:
    """The listener asks the station's limits at every accept: after a reload that cuts
    the per-address burst, new connections beyond it get 429 (those counted before are
    not refused again), and the handshake limiter takes the new caps."""
    from tooti.gateway.app import Gateway

    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), TunnelSettings())
    url = (await nursery.start(gateway.serve))[0]

    async def fresh_connection_status() -> int:
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
            return (await http.get("/healthz")).status_code

    for _ in range(3):
        assert await fresh_connection_status() == 200
    gateway.station.reload_settings(GatewaySettings(
        listen="127.0.0.1:0", connection_burst=2, connection_rate=0.001,
        tunnel_handshakes_per_ip=1))
    statuses = [await fresh_connection_status() for _ in range(3)]
    assert statuses[-1] == 429, statuses
    assert gateway.station.admission.handshakes.concurrent == 1
    gateway.shutdown()


async def test_a_key_table_that_cannot_be_built_changes_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    """Everything is built before anything is swapped: a failure building the gateway's
    key table leaves the station (admin key, join tokens) as it was too."""
    from tooti.gateway import app, auth
    from tooti.gateway.app import Gateway

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConfigError("the key table cannot be built", key="gateway.auth")

    running = Settings(roles=["gateway"], gateway=GatewaySettings(
        listen="127.0.0.1:0", admin_key="adm-old", join_token="join-old"))
    loaded = Settings(roles=["gateway"], gateway=GatewaySettings(
        listen="127.0.0.1:0", admin_key="adm-new", join_token="join-new"))
    gateway = Gateway(running.gateway, TunnelSettings())
    roles = _Roles(gateway)
    roles.station = gateway.station
    reloader = Reloader(roles, running, lambda: loaded, ["gateway"])
    monkeypatch.setattr(auth, "Authenticator", refuse)
    monkeypatch.setattr(app, "Authenticator", refuse)
    await reloader.reload()
    assert gateway.station.settings.admin_key == gateway.settings.admin_key == "adm-old"
    assert gateway.station.settings.join_token == "join-old"
    assert reloader.running is running
    assert any("configuration not reloaded" in r.getMessage()
               and "the key table cannot be built" in r.getMessage()
               for r in caplog.records)


async def test_backends_a_stopped_node_cannot_take_are_closed_and_nothing_changes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload whose backend swap is refused (the node stopped meanwhile) closes the
    backends it started and keeps the running configuration, so the next reload
    compares against what the node really runs."""
    import tooti.backends
    from tooti.backends.simulated import SimulatedBackend
    from tooti.node.node import Node

    closed: list[str] = []

    class Noted(SimulatedBackend):
        async def close(self) -> None:
            closed.append(self.settings.models[0])
            await super().close()

    old_entry = BackendSettings(type="simulated", models=["a"])
    new_entry = BackendSettings(type="simulated", models=["b"])
    running = Settings(roles=["node"], node=NodeSettings(peers=[], backends=[old_entry]))
    loaded = Settings(roles=["node"], node=NodeSettings(peers=[], backends=[new_entry]))
    old = Noted(old_entry)
    node = Node(running.node, TunnelSettings(), [old], "node-a", dial=False)
    roles = _Roles(None)
    roles.node = node
    monkeypatch.setattr(tooti.backends, "create_backend", Noted)
    reloader = Reloader(roles, running, lambda: loaded, ["node"])
    with pytest.raises(RuntimeError, match="not running"):
        await reloader.reload()
    assert closed == ["b"]
    assert node.backends == [old]
    assert reloader.running is running


async def test_reload_messages_say_what_happened_once(caplog: Any) -> None:
    """A newcomer's SIGHUPs: the loopback-only join warning is not repeated by every
    reload, a change that needs a restart is "nothing applied live" (then named), and a
    process without a configuration file says only the environment and flags were read
    again."""
    from tooti.gateway.app import Gateway

    running = Settings(roles=["gateway"], gateway=GatewaySettings(listen="127.0.0.1:0"))
    moved = Settings(roles=["gateway"], gateway=GatewaySettings(listen="127.0.0.1:9"))
    gateway = Gateway(running.gateway, TunnelSettings())
    roles = _Roles(gateway)
    roles.station = gateway.station
    caplog.set_level("INFO", logger="tooti")
    caplog.clear()
    for _ in range(3):
        await Reloader(roles, running, lambda: running, ["gateway"]).reload()
    await Reloader(roles, running, lambda: moved, ["gateway"],
                   config_file="tooti.toml").reload()
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "no join token" in line], lines
    assert lines == [
        "SIGHUP: configuration reloaded: nothing changed (no configuration file: the "
        "environment and flags were read again)"] * 3 + [
        "SIGHUP: configuration reloaded: nothing applied live",
        "SIGHUP: changed settings need a restart to apply: gateway.listen"]
