"""Join-token rotation without downtime: SIGHUP re-reads the configuration and the
gateway (or a relay's listener) admits new tunnels by the new set of join tokens,
while tunnels already up stay up. The log names the tokens, never shows them."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from tests.conftest import simulated
from tests.hostile.peers import hostile_peer
from tests.hostile.signal_loop import signal_loop
from tests.processes import START_TIMEOUT, spawn, toml_table, toml_value_lines
from tooti.config import ConfigError
from tooti.gateway.app import Gateway
from tooti.node.node import Node
from tooti.reload import restart_keys
from tooti.settings import (
    GatewaySettings,
    GroupSettings,
    NodeSettings,
    RelaySettings,
    Settings,
    TunnelSettings,
)
from tooti.transport.websocket import SUBPROTOCOL, TUNNEL_PATH

TIMEOUT = 30.0
"""Hang guard of every wait (never reached when the code works)."""
GOOD = [{"id": "m"}]


async def upgrade_status(url: str, token: str) -> int:
    """The status of a tunnel upgrade presenting ``token`` (101 would be a yes)."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        answer = await http.get(url + TUNNEL_PATH, headers={
            "connection": "upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            "sec-websocket-protocol": SUBPROTOCOL, "authorization": f"Bearer {token}"})
    return answer.status_code


async def admitted_as(url: str, token: str) -> None:
    """Join with ``token`` through a real tunnel, through the handshake (WELCOME, proof)."""
    async with hostile_peer(url.replace("http://", "ws://") + TUNNEL_PATH, token=token) as peer:
        await peer.models(GOOD)


async def test_reload_tokens_admits_by_the_new_set_and_keeps_live_sessions(
        nursery: trio.Nursery) -> None:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", join_tokens={
        "alpha": "tok-alpha", "beta": "tok-beta"}), tunnel)
    url = (await nursery.start(gateway.serve))[0]
    registry = gateway.registry
    for node_id, token in (("on-alpha", "tok-alpha"), ("on-beta", "tok-beta")):
        node = Node(NodeSettings(peers=[url.replace("http://", "ws://") + TUNNEL_PATH],
                                 join_token=token), tunnel, [simulated()], node_id)
        await nursery.start(node.run)
    with trio.fail_after(TIMEOUT):
        await registry.wait_until(lambda: len(registry.peers) == 2)
    before = dict(registry.peers)

    changes = gateway.station.reload_tokens(GatewaySettings(join_tokens={
        "beta": "tok-beta", "gamma": "tok-gamma"}))

    assert (changes.added, changes.removed, changes.replaced) == (["gamma"], ["alpha"], [])
    assert await upgrade_status(url, "tok-alpha") == 403
    with trio.fail_after(TIMEOUT):
        async with hostile_peer(url.replace("http://", "ws://") + TUNNEL_PATH,
                                token="tok-gamma") as peer:
            await peer.models(GOOD)
            await registry.wait_until(lambda: peer.id in registry.peers)
            assert registry.peers[peer.id].token == "gamma"
    # The node that joined with the removed token keeps its session until it reconnects.
    for node_id in ("on-alpha", "on-beta"):
        assert registry.peers[node_id] is before[node_id]
        assert not before[node_id].session.closed.is_set()
    assert registry.peers["on-alpha"].token == "alpha"
    gateway.shutdown()


async def test_reload_tokens_per_group(nursery: trio.Nursery) -> None:
    """A group's tokens are reloaded like the ungrouped ones; a group the gateway did not
    start with admits its nodes at once (its API keys are reloaded with it); a group
    removed from the file admits no one any more."""
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", join_token="tok-plain", groups={
        "blue": GroupSettings(join_token="tok-blue"),
        "red": GroupSettings(join_token="tok-red")}), TunnelSettings())
    url = (await nursery.start(gateway.serve))[0]

    changes = gateway.station.reload_tokens(GatewaySettings(join_token="tok-plain", groups={
        "blue": GroupSettings(join_token="tok-blue-2", join_tokens={"spare": "tok-spare"}),
        "green": GroupSettings(join_token="tok-green")}))

    assert changes.added == ["blue/spare", "green/default"]
    assert changes.removed == ["red/default"]
    assert changes.replaced == ["blue/default"]
    for token in ("tok-blue", "tok-red"):
        assert await upgrade_status(url, token) == 403, token
    registry = gateway.registry
    with trio.fail_after(TIMEOUT):
        for token, group, name in (("tok-blue-2", "blue", "default"),
                                   ("tok-spare", "blue", "spare"),
                                   ("tok-green", "green", "default"),
                                   ("tok-plain", "", "default")):
            async with hostile_peer(url.replace("http://", "ws://") + TUNNEL_PATH,
                                    token=token) as peer:
                await peer.models(GOOD)
                await registry.wait_until(lambda: peer.id in registry.peers)
                joined = registry.peers[peer.id]
                assert (joined.group, joined.token) == (group, name)
    gateway.shutdown()


async def test_sighup_reloads_join_tokens_of_a_relay_without_tls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``tooti run``'s signal loop in this process, for a relay (its own station, no API)
    and no TLS: SIGHUP rebuilds the settings the way they were first built and swaps the
    tokens; a rebuild that fails (a bad file) is one error line, the tokens stay."""

    def settings_with(token: str) -> Settings:
        return Settings(roles=["relay"], data_dir=str(tmp_path / "data"), drain_grace=0.0,
                        gateway=GatewaySettings(listen="127.0.0.1:0",
                                                join_tokens={"current": token}),
                        relay=RelaySettings(peers=[]))

    loaded = [settings_with("tok-one")]
    rebuilt = [trio.Event(), trio.Event()]

    def rebuild() -> Settings:
        rebuilt.pop(0).set()
        if len(rebuilt) == 1:
            return settings_with("tok-two")
        raise ConfigError("expected a string, got integer", source="relay.toml", line=3,
                          key="gateway.join_tokens.current")

    first, second = rebuilt
    caplog.set_level(logging.INFO, logger="tooti")
    with trio.fail_after(TIMEOUT):
        async with signal_loop(monkeypatch, loaded[0], rebuild) as running:
            url = running.process.urls[0]
            assert await upgrade_status(url, "tok-two") == 403
            os.kill(os.getpid(), signal.SIGHUP)
            await first.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert await upgrade_status(url, "tok-one") == 403
            async with hostile_peer(url.replace("http://", "ws://") + TUNNEL_PATH,
                                    token="tok-two", role="node"):
                pass
            os.kill(os.getpid(), signal.SIGHUP)
            await second.wait()
            await trio.testing.wait_all_tasks_blocked()
            async with hostile_peer(url.replace("http://", "ws://") + TUNNEL_PATH,
                                    token="tok-two"):
                pass
            os.kill(os.getpid(), signal.SIGTERM)
    exit_codes = running.exit_codes
    assert exit_codes == [0]
    lines = [r.getMessage() for r in caplog.records]
    replaced = [line for line in lines if "configuration reloaded" in line]
    assert len(replaced) == 1 and "replaced current" in replaced[0]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "the current one stays in force" in errors[0].getMessage()
    assert "relay.toml" in errors[0].getMessage() and not errors[0].exc_info
    assert not any("tok-" in line for line in lines)


def config_text(tokens: dict[str, str], peer_ban_seconds: float = 60.0) -> str:
    return (toml_value_lines({"roles": ["gateway"], "log_level": "info", "drain_grace": 0.0})
            + toml_table("gateway", {"listen": "127.0.0.1:0",
                                     "peer_ban_seconds": peer_ban_seconds})
            + toml_table("gateway.join_tokens", tokens))


def rewrite(path: Path, text: str) -> None:
    """Replace ``path`` at once (an editor's save), so the reload never reads half a file."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


async def test_sighup_rotates_the_join_tokens_of_a_running_gateway(tmp_path: Path) -> None:
    """A real ``tooti run`` process: the config file gets a new token in place of an old
    one, SIGHUP, and nodes are admitted by the new set at once, without a restart."""
    config = tmp_path / "gateway.toml"
    config.write_text(config_text({"spring": "tok-spring-secret", "keep": "tok-keep-secret"}))
    async with trio.open_nursery() as nursery:
        tooti = await spawn(nursery, config, tmp_path / "data", "gateway")
        try:
            with trio.fail_after(START_TIMEOUT):
                match = await tooti.wait_for(r"gateway listening on (http://127\.0\.0\.1:\d+)")
            url = match.group(1)
            with trio.fail_after(TIMEOUT):
                await admitted_as(url, "tok-spring-secret")
            assert await upgrade_status(url, "tok-autumn-secret") == 403

            rewrite(config, config_text({"autumn": "tok-autumn-secret",
                                         "keep": "tok-keep-secret"}, peer_ban_seconds=30.0))
            since = tooti.mark()
            tooti.signal(signal.SIGHUP)
            with trio.fail_after(TIMEOUT):
                reloaded = await tooti.wait_for(r"configuration reloaded[^\n]*", since)
                restart = await tooti.wait_for(r"[^\n]*need a restart[^\n]*", since)
                await admitted_as(url, "tok-autumn-secret")
                await admitted_as(url, "tok-keep-secret")
            assert await upgrade_status(url, "tok-spring-secret") == 403
            assert "added autumn" in reloaded.group(0) and "removed spring" in reloaded.group(0)
            assert "gateway.peer_ban_seconds" in restart.group(0)

            # A broken file: one clear error, the tokens in use stay.
            rewrite(config, config_text({"autumn": "tok-autumn-secret"}) + "[gateway\n")
            since = tooti.mark()
            tooti.signal(signal.SIGHUP)
            with trio.fail_after(TIMEOUT):
                error = await tooti.wait_for(r"ERROR[^\n]*", since)
                await admitted_as(url, "tok-keep-secret")
            assert str(config) in error.group(0)
            assert tooti.alive
        finally:
            await tooti.kill()
        nursery.cancel_scope.cancel()
    assert "secret" not in tooti.text


def test_a_reload_names_every_other_change_as_needing_a_restart() -> None:
    """Keys only, never values; what a gateway applies live (join tokens, groups, their
    keys, request limits) is not named."""
    running = Settings(gateway=GatewaySettings(join_token="tok-a", groups={
        "blue": GroupSettings(join_token="tok-b")}))
    loaded = Settings(
        gateway=GatewaySettings(join_token="tok-a2", join_tokens={"x": "tok-x"}, max_queue=3,
                                groups={"blue": GroupSettings(join_token="tok-b2",
                                                              api_keys=["k"]),
                                        "green": GroupSettings(join_token="tok-g")}),
        node=NodeSettings(join_token="tok-n"))
    assert sorted(restart_keys(running, loaded)) == ["node.join_token"]
    assert restart_keys(running, running) == []
