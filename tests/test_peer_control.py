"""An admin disables, enables and drains a node on a gateway (:mod:`tooti.admin.peer_control`).

A real gateway on a loopback port with an admin key, real nodes dialling it over
WebSocket tunnels (in this process), and a relay built as ``tooti run --role relay``
builds one: ``POST /admin/v1/peers/{id}/disable|enable|drain`` through HTTP, and
``tooti nodes …`` through the command line's own ``main``. Every wait is on a registry
change or an event, bounded by :data:`LIMIT`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Network
from tests.test_completion import complete_bash
from tests.test_relay import start_node, start_relay
from tooti.backends.simulated import SimulatedBackend
from tooti.cli import _parser, main
from tooti.cli_completion import script
from tooti.gateway.app import Gateway
from tooti.identity import Identity
from tooti.mesh import registry as registry_module
from tooti.mesh.events import BusEvent
from tooti.settings import BackendSettings, GatewaySettings, TunnelSettings

KEY = "adm-peer-control-secret"
MODEL = "tooti-sim"
LIMIT = 10.0
"""Hang guard of every wait (never reached when the code works)."""
FAST = {"reconnect_initial": 0.05, "reconnect_max": 0.5}
"""Nodes re-dial at once after their tunnel closed."""


class Held(SimulatedBackend):
    """A simulated backend whose streams stop after their first event until
    :attr:`go` is set (a request in flight for as long as the test wants)."""

    def __init__(self) -> None:
        super().__init__(BackendSettings(type="simulated", options={"tokens": 3}))
        self.started = trio.Event()
        self.go = trio.Event()

    async def _stream(self, job: Any) -> AsyncGenerator[bytes, None]:
        first = True
        async for event in super()._stream(job):
            yield event
            if first:
                first = False
                self.started.set()
                await self.go.wait()


@pytest.fixture
async def network(nursery: trio.Nursery) -> AsyncIterator[Network]:
    """A gateway with an admin key on an ephemeral loopback port (no nodes yet)."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", admin_key=KEY,
                                      first_byte_timeout=10), tunnel)
    urls = await nursery.start(gateway.serve)
    yield Network(nursery, gateway, urls[0], tunnel)
    gateway.shutdown()


def admin(network: Network) -> httpx.AsyncClient:
    return network.client(headers={"authorization": f"Bearer {KEY}"})


def chat(stream: bool = False) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3, "stream": stream}


async def served_by(http: httpx.AsyncClient, count: int = 4) -> list[str]:
    """The nodes that served ``count`` chat requests (each must succeed)."""
    nodes = []
    for _ in range(count):
        response = await http.post("/v1/chat/completions", json=chat())
        assert response.status_code == 200, response.text
        nodes.append(response.headers["x-tooti-node"])
    return nodes


def record(gateway: Gateway) -> list[BusEvent]:
    """Every event the gateway's bus publishes from now on (what ``/events`` relays)."""
    events: list[BusEvent] = []
    gateway.registry.bus.listeners.append(events.append)
    return events


def states(events: list[BusEvent], node_id: str) -> list[str]:
    """The states ``peer.updated`` / ``peer.joined`` events gave ``node_id``, in order."""
    return [e.data["peer"]["state"] for e in events
            if e.kind in ("peer.updated", "peer.joined") and e.data["peer"]["id"] == node_id]


async def until(network: Network, condition: Any) -> None:
    with trio.fail_after(LIMIT):
        await network.gateway.registry.wait_until(condition)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


# ------------------------------------------------------------ disable / enable


async def test_disable_sends_requests_elsewhere_then_503_and_enable_restores(
        network: Network) -> None:
    await start_node(network, "node-a", [network.tunnel_url])
    await start_node(network, "node-b", [network.tunnel_url])
    events = record(network.gateway)
    async with admin(network) as http:
        assert set(await served_by(http, 6)) == {"node-a", "node-b"}  # both routed
        answer = await http.post("/admin/v1/peers/node-a/disable")
        assert answer.status_code == 200, answer.text
        view = answer.json()
        assert view["id"] == "node-a" and view["state"] == "disabled"
        assert view["disabled"] is True
        assert set(await served_by(http, 6)) == {"node-b"}
        listed = (await http.get("/admin/v1/peers")).json()
        by_id = {p["id"]: p for p in listed["data"]}
        assert by_id["node-a"]["state"] == "disabled" and by_id["node-b"]["state"] == "live"
        assert listed["disabled"] == ["node-a"]
        network_view = (await http.get("/admin/v1/network")).json()
        assert {p["id"]: p["state"] for p in network_view["peers"]}["node-a"] == "disabled"
        # again: idempotent
        assert (await http.post("/admin/v1/peers/node-a/disable")).json()["state"] == "disabled"

        assert (await http.post("/admin/v1/peers/node-b/disable")).status_code == 200
        refused = await http.post("/v1/chat/completions", json=chat())
        assert refused.status_code == 503, refused.text
        models = (await http.get("/v1/models")).json()
        assert models["data"] == []  # no node may serve it now

        enabled = await http.post("/admin/v1/peers/node-a/enable")
        assert enabled.status_code == 200 and enabled.json()["state"] == "live"
        assert enabled.json()["disabled"] is False
        assert set(await served_by(http, 3)) == {"node-a"}
        assert (await http.get("/admin/v1/peers")).json()["disabled"] == ["node-b"]
    assert states(events, "node-a") == ["disabled", "live"]
    assert states(events, "node-b") == ["disabled"]


async def test_the_events_snapshot_shows_a_disabled_node(network: Network) -> None:
    await start_node(network, "node-a", [network.tunnel_url])
    async with admin(network) as http:
        await http.post("/admin/v1/peers/node-a/disable")
        async with http.stream("GET", "/admin/v1/events") as response:
            lines = response.aiter_lines()
            assert await anext(lines) == "event: snapshot"
            snapshot = json.loads((await anext(lines)).removeprefix("data: "))
    assert [(p["id"], p["state"]) for p in snapshot["peers"]] == [("node-a", "disabled")]


async def test_a_disabled_node_stays_disabled_when_it_rejoins(network: Network) -> None:
    identity = Identity.generate()
    await start_node(network, "node-a", [network.tunnel_url], identity=identity)
    await start_node(network, "node-b", [network.tunnel_url])
    registry = network.gateway.registry
    events = record(network.gateway)
    async with admin(network) as http:
        assert (await http.post("/admin/v1/peers/node-a/disable")).status_code == 200
        network.kill_node("node-a")  # its process dies
        await until(network, lambda: "node-a" not in registry.peers)
        # A disabled id with no tunnel can still be looked at and enabled later.
        assert (await http.get("/admin/v1/peers")).json()["disabled"] == ["node-a"]
        # A new process of the same node joins again: still disabled, at once.
        await start_node(network, "node-a", [network.tunnel_url], identity=identity)
        assert registry.peers["node-a"].state() == "disabled"
        assert set(await served_by(http, 4)) == {"node-b"}
        joined = [e for e in events if e.kind == "peer.joined"]
        assert [e.data["peer"]["state"] for e in joined] == ["disabled"]
        # and after its tunnel is cut and it re-dials (the same process)
        first = registry.peers["node-a"]
        first.session.abort("test: the tunnel broke")
        await until(network, lambda: registry.peers.get("node-a") not in (None, first)
                    and bool(registry.peers["node-a"].models))
        assert registry.peers["node-a"].state() == "disabled"
        assert set(await served_by(http, 4)) == {"node-b"}
        assert (await http.post("/admin/v1/peers/node-a/enable")).json()["state"] == "live"
        assert "node-a" in await served_by(http, 6)


async def test_a_node_enabled_while_away_is_routed_when_it_rejoins(network: Network) -> None:
    identity = Identity.generate()
    await start_node(network, "node-a", [network.tunnel_url], identity=identity)
    registry = network.gateway.registry
    async with admin(network) as http:
        assert (await http.post("/admin/v1/peers/node-a/disable")).status_code == 200
        network.kill_node("node-a")
        await until(network, lambda: "node-a" not in registry.peers)
        enabled = await http.post("/admin/v1/peers/node-a/enable")
        assert enabled.status_code == 200, enabled.text
        assert enabled.json() == {"id": "node-a", "state": "gone", "disabled": False,
                                  "connected": False}
        assert (await http.get("/admin/v1/peers")).json()["disabled"] == []
        assert_error(await http.post("/admin/v1/peers/node-a/enable"), 404, "peer_not_found")
        await start_node(network, "node-a", [network.tunnel_url], identity=identity)
        assert await served_by(http, 2) == ["node-a", "node-a"]


async def held_stream(http: httpx.AsyncClient, nursery: trio.Nursery,
                      held: Held) -> list[str]:
    """Start a streamed chat completion in ``nursery`` and return once ``held`` (its node's
    backend) holds it: the list returned gets the response's non-empty lines when it ends."""
    lines: list[str] = []

    async def stream() -> None:
        async with http.stream("POST", "/v1/chat/completions",
                               json=chat(stream=True)) as response:
            lines.extend([line async for line in response.aiter_lines() if line])

    nursery.start_soon(stream)
    with trio.fail_after(LIMIT):
        await held.started.wait()
    return lines


async def test_disable_lets_a_request_in_flight_finish(network: Network) -> None:
    held = Held()
    await start_node(network, "node-a", [network.tunnel_url], backends=[held])
    async with admin(network) as http, trio.open_nursery() as nursery:
        lines = await held_stream(http, nursery, held)
        assert (await http.post("/admin/v1/peers/node-a/disable")).status_code == 200
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 503
        held.go.set()
    assert lines[-1] == "data: [DONE]"
    assert network.gateway.registry.peers["node-a"].state() == "disabled"  # tunnel kept


async def test_the_disabled_ids_are_bounded(network: Network,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "DISABLED_LIMIT", 1)
    await start_node(network, "node-a", [network.tunnel_url])
    await start_node(network, "node-b", [network.tunnel_url])
    async with admin(network) as http:
        assert (await http.post("/admin/v1/peers/node-a/disable")).status_code == 200
        full = await http.post("/admin/v1/peers/node-b/disable")
        assert_error(full, 409, "too_many_disabled")
        assert network.gateway.registry.peers["node-b"].state() == "live"  # refused whole
        assert (await http.post("/admin/v1/peers/node-a/enable")).status_code == 200
        assert (await http.post("/admin/v1/peers/node-b/disable")).status_code == 200
    assert list(network.gateway.registry.disabled_ids) == ["node-b"]


# ------------------------------------------------------------ drain


def goaways(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The GOAWAY frames tunnel ends in this process received (the node's logs them)."""
    return [r.getMessage().partition(": ")[2] for r in caplog.records
            if r.name == "tooti.tunnel" and ": GOAWAY " in r.getMessage()]


async def test_drain_lets_the_stream_finish_then_closes_the_tunnel(
        network: Network, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tooti.tunnel")
    held = Held()
    await start_node(network, "node-a", [network.tunnel_url], backends=[held])
    registry = network.gateway.registry
    peer = registry.peers["node-a"]
    events = record(network.gateway)
    async with admin(network) as http, trio.open_nursery() as nursery:
        lines = await held_stream(http, nursery, held)
        answer = await http.post("/admin/v1/peers/node-a/drain")
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == "draining" and answer.json()["in_flight"] == 1
        # nothing new reaches it, and its tunnel stays up while its stream runs
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 503
        assert not peer.session.closed.is_set()
        assert goaways(caplog) == []  # not told yet
        again = await http.post("/admin/v1/peers/node-a/drain")  # idempotent
        assert again.json()["state"] == "draining"
        held.go.set()
    assert lines[-1] == "data: [DONE]"  # the client got the whole answer
    assert sum(line.startswith("data: {") for line in lines) >= 3
    await until(network, lambda: registry.peers.get("node-a") is not peer)
    assert peer.session.close_reason == "drained by an admin"
    assert goaways(caplog) == ["GOAWAY draining drained by an admin"]  # the node was told
    kinds = [e.kind for e in events]
    assert kinds.index("peer.drained") < kinds.index("peer.left")
    left = next(e for e in events if e.kind == "peer.left")
    assert left.data == {"peer_id": "node-a", "reason": "drained by an admin"}
    assert states(events, "node-a")[0] == "draining"
    # The node dials again after its backoff and is routed again (disable keeps it out).
    await until(network, lambda: registry.peers.get("node-a") not in (None, peer)
                and bool(registry.peers["node-a"].models))
    assert registry.peers["node-a"].state() == "live"
    assert not registry.closing


async def test_drain_of_an_idle_node_closes_its_tunnel_at_once(
        network: Network, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tooti.tunnel")
    await start_node(network, "node-a", [network.tunnel_url])
    registry = network.gateway.registry
    peer = registry.peers["node-a"]
    async with admin(network) as http:
        answer = await http.post("/admin/v1/peers/node-a/drain")
    assert answer.status_code == 200 and answer.json()["state"] in ("draining", "gone")
    await until(network, lambda: registry.peers.get("node-a") is not peer)
    assert peer.session.close_reason == "drained by an admin"
    assert goaways(caplog) == ["GOAWAY draining drained by an admin"]


async def test_a_relayed_node_can_be_disabled_but_not_drained(network: Network) -> None:
    relay = await start_relay(network, "relay-1")
    await until(network, lambda: "relay-1" in network.gateway.registry.peers)
    await start_node(network, "behind", [relay.tunnel_url])
    registry = network.gateway.registry
    async with admin(network) as http:
        refused = await http.post("/admin/v1/peers/behind/drain")
        assert_error(refused, 409, "relayed_node")
        assert "relay-1" in refused.json()["error"]["message"]
        assert registry.peers["behind"].state() == "live"  # nothing changed
        assert await served_by(http, 2) == ["behind", "behind"]
        disabled = await http.post("/admin/v1/peers/behind/disable")
        assert disabled.status_code == 200 and disabled.json()["state"] == "disabled"
        assert disabled.json()["via"] == "relay-1"
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 503
        assert (await http.post("/admin/v1/peers/behind/enable")).json()["state"] == "live"
        assert await served_by(http, 1) == ["behind"]
    relay.scope.cancel()


# ------------------------------------------------------------ refusals


async def test_unknown_ids_wrong_methods_and_missing_key(network: Network) -> None:
    await start_node(network, "node-a", [network.tunnel_url])
    async with admin(network) as http:
        for action in ("disable", "enable", "drain"):
            assert_error(await http.post(f"/admin/v1/peers/nobody/{action}"), 404,
                         "peer_not_found")
            assert_error(await http.get(f"/admin/v1/peers/node-a/{action}"), 405,
                         "method_not_allowed")
        assert_error(await http.post("/admin/v1/peers/node-a/explode"), 404, "not_found")
        assert_error(await http.post("/admin/v1/peers/node-a"), 404, "not_found")
    async with network.client() as anonymous:
        for action in ("disable", "enable", "drain"):
            assert_error(await anonymous.post(f"/admin/v1/peers/node-a/{action}"), 401,
                         "invalid_admin_key")
        wrong = await anonymous.post("/admin/v1/peers/node-a/disable",
                                     headers={"authorization": "Bearer not-the-key"})
        assert_error(wrong, 401, "invalid_admin_key")
    assert network.gateway.registry.peers["node-a"].state() == "live"  # nothing changed
    assert not network.gateway.registry.disabled_ids


# ------------------------------------------------------------ the command line


async def test_cli_disable_enable_drain_round_trip(
        network: Network, capsys: pytest.CaptureFixture[str]) -> None:
    await start_node(network, "node-a", [network.tunnel_url])
    registry = network.gateway.registry
    peer = registry.peers["node-a"]

    async def tooti(*argv: str) -> int:
        code: int = await trio.to_thread.run_sync(
            main, [*argv, "--gateway", network.url, "--admin-key", KEY])
        return code

    assert await tooti("nodes", "disable", "node-a") == 0
    assert capsys.readouterr().out == "node node-a: disabled (0 requests in flight)\n"
    assert peer.state() == "disabled"
    assert await tooti("nodes", "enable", "node-a", "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "live"
    assert peer.state() == "live"
    assert await tooti("nodes", "drain", "node-a") == 0
    assert capsys.readouterr().out.startswith("node node-a: ")
    with trio.fail_after(LIMIT):
        await peer.session.closed.wait()
    assert await tooti("nodes", "disable", "nobody") == 1
    err = capsys.readouterr().err
    assert "404" in err and "nobody" in err and KEY not in err
    code = await trio.to_thread.run_sync(
        main, ["nodes", "enable", "node-a", "--gateway", network.url, "--admin-key", "bad"])
    assert code == 1 and "401" in capsys.readouterr().err


def test_bash_completes_the_nodes_subcommands(tmp_path: Path) -> None:
    completion = tmp_path / "tooti.bash"
    completion.write_text(script("bash", _parser()))
    assert complete_bash(completion, ["tooti", "nodes", ""]) == ["disable", "enable", "drain"]
    assert complete_bash(completion, ["tooti", "nodes", "d"]) == ["disable", "drain"]
