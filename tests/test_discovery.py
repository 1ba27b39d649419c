"""Peer exchange and discovery: WELCOME's public peers, opt-in dialing of discovered
peers up to a limit, bootstrap peers, and ``tooti peers`` (real gateways and sockets)."""

from __future__ import annotations

import re

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.conftest import simulated
from tests.test_relay import LogEvent
from tooti import cli
from tooti.admin import network_report
from tooti.gateway.app import Gateway
from tooti.identity import Identity, b64, proof_message, unb64
from tooti.node.admin import NodeAdmin
from tooti.node.node import Node
from tooti.protocol.connection import Connection, Limits, Side, WelcomeReceived
from tooti.settings import GatewaySettings, NetworkSettings, NodeSettings, TunnelSettings
from tooti.transport.websocket import SUBPROTOCOL

TUNNEL = TunnelSettings(heartbeat_interval=0.5)


async def start_gateway(nursery: trio.Nursery, **network: object) -> tuple[Gateway, str]:
    """A gateway on an ephemeral port; returns it and its tunnel URL."""
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), TUNNEL,
                      network=NetworkSettings(**network))  # type: ignore[arg-type]
    urls = await nursery.start(gateway.serve)
    return gateway, urls[0].replace("http://", "ws://") + "/tooti/v1/tunnel"


async def start_node(nursery: trio.Nursery, node_id: str, peers: list[str],
                     **network: object) -> Node:
    """A simulated node dialing ``peers`` with the given network settings."""
    node = Node(NodeSettings(peers=peers, reconnect_initial=0.05, reconnect_max=0.2), TUNNEL,
                [simulated()], node_id, network=NetworkSettings(**network))  # type: ignore[arg-type]
    await nursery.start(node.run)
    return node


async def registered(gateway: Gateway, node_id: str) -> None:
    """Wait until ``node_id`` is registered with models at ``gateway``."""
    registry = gateway.registry
    with trio.fail_after(10):
        await registry.wait_until(
            lambda: node_id in registry.peers and bool(registry.peers[node_id].models))


async def hello(ws: WebSocketConnection, identity: Identity, role: str,
                public_url: str = "") -> tuple[Connection, WelcomeReceived]:
    """Send HELLO by hand (as ``role``) and return the WELCOME."""
    conn = Connection(Side.DIALER, Limits())
    extra = {"public_key": b64(identity.public_key)}
    if public_url:
        extra["public_url"] = public_url
    await ws.send_message(conn.send_hello(identity.id, role, "test", {}, extra=extra))
    welcome = conn.receive_message(await ws.get_message())
    assert isinstance(welcome, WelcomeReceived)
    return conn, welcome


async def welcome_of(url: str) -> WelcomeReceived:
    """The WELCOME a new node dialing ``url`` receives."""
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as ws:
        return (await hello(ws, Identity.generate(), "node"))[1]


async def test_welcome_lists_configured_public_peers_and_never_nodes(
        nursery: trio.Nursery) -> None:
    gateway, url = await start_gateway(
        nursery, public_url="ws://gw-a.example:8080/tooti/v1/tunnel",
        advertise=["wss://gw-b.example/tooti/v1/tunnel"])
    await start_node(nursery, "plain-node", [url])
    await registered(gateway, "plain-node")
    welcome = await welcome_of(url)
    assert welcome.peers == ["ws://gw-a.example:8080/tooti/v1/tunnel",
                             "wss://gw-b.example/tooti/v1/tunnel"]
    assert not any("127.0.0.1" in peer for peer in welcome.peers)  # no node addresses


async def join_by_hand(gateway: Gateway, url: str, ws: WebSocketConnection, role: str,
                       public_url: str) -> str:
    """Handshake by hand as ``role`` claiming ``public_url``; returns the registered id."""
    identity = Identity.generate()
    conn, welcome = await hello(ws, identity, role, public_url)
    challenge = unb64(welcome.extra["challenge"])
    assert challenge is not None
    await ws.send_message(conn.send_proof(b64(identity.sign(
        proof_message(challenge, welcome.session_id, identity.id)))))
    registry = gateway.registry
    with trio.fail_after(5):
        await registry.wait_until(lambda: identity.id in registry.peers)
    return identity.id


async def test_a_relays_claimed_public_url_is_passed_on(nursery: trio.Nursery) -> None:
    gateway, url = await start_gateway(nursery)
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as relay_ws:
        await join_by_hand(gateway, url, relay_ws, "relay", "ws://relay.example:9000")
        later = await welcome_of(url)
        assert later.peers == ["ws://relay.example:9000/tooti/v1/tunnel"]


async def test_a_nodes_claimed_public_url_is_ignored(nursery: trio.Nursery) -> None:
    gateway, url = await start_gateway(nursery)
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as node_ws:
        node_id = await join_by_hand(gateway, url, node_ws, "node", "ws://node.example:9000")
        assert gateway.registry.peers[node_id].public_url == ""
        assert (await welcome_of(url)).peers == []


async def test_discovered_peers_are_not_dialed_unless_allowed(nursery: trio.Nursery) -> None:
    gateway_b, url_b = await start_gateway(nursery)
    gateway_a, url_a = await start_gateway(nursery, advertise=[url_b])
    node = await start_node(nursery, "cautious", [url_a], discover=False)
    await registered(gateway_a, "cautious")
    # The WELCOME from A named B; the node learned it but did not dial it.
    assert [link.url for link in node.dialer.links.values()] == [url_a]
    assert node.dialer.links[url_a].learned_peers == [url_b]
    assert "cautious" not in gateway_b.registry.peers


async def test_discovery_dials_learned_peers_up_to_the_limit(nursery: trio.Nursery) -> None:
    gateway_b, url_b = await start_gateway(nursery)
    gateway_c, url_c = await start_gateway(nursery)
    gateway_a, url_a = await start_gateway(
        nursery, advertise=[url_b, url_c, "http://not-a-tunnel.example", "ws://"])
    node = await start_node(nursery, "explorer", [url_a], discover=True, max_peers=2)
    await registered(gateway_a, "explorer")
    await registered(gateway_b, "explorer")  # the first discovered peer, within the limit
    links = node.dialer.links
    assert set(links) == {url_a, url_b}
    assert links[url_b].source == "discovered"
    assert "explorer" not in gateway_c.registry.peers
    # Losing gateway A loses no capacity on B.
    gateway_a.shutdown()
    with trio.fail_after(10):
        await gateway_a.registry.wait_until(lambda: not gateway_a.registry.peers)
    response_b = gateway_b.registry.peers["explorer"]
    assert response_b.live


async def test_bootstrap_peers_are_dialed_and_host_names_resolved_at_dial(
        nursery: trio.Nursery) -> None:
    gateway, url = await start_gateway(nursery)
    by_name = url.replace("127.0.0.1", "localhost")
    node = await start_node(nursery, "booted", [], bootstrap_peers=[by_name])
    await registered(gateway, "booted")
    assert node.dialer.links[by_name].source == "bootstrap"
    assert node.dialer.links[by_name].state == "connected"


async def test_admin_network_view_and_tooti_peers(nursery: trio.Nursery,
                                                  capsys: object) -> None:
    gateway, url = await start_gateway(nursery, public_url="ws://gw.example:1/tooti/v1/tunnel")
    node = await start_node(nursery, "listed", [url])
    gateway.station.show_dialer(node.dialer)  # as when node and gateway share a process
    await registered(gateway, "listed")
    base = url.removesuffix("/tooti/v1/tunnel").replace("ws://", "http://")
    code = await trio.to_thread.run_sync(cli.main, ["peers", "--url", base])
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert code == 0
    assert re.search(r"^  listed +node +live +direct +tooti-sim$", out, re.MULTILINE), out
    assert "ws://gw.example:1/tooti/v1/tunnel" in out
    assert re.search(rf"^  connected +configured +{re.escape(url)} +\d+s ago$", out,
                     re.MULTILINE), out
    code = await trio.to_thread.run_sync(cli.main, ["peers", "--url", base, "--json"])
    assert code == 0
    assert '"id": "listed"' in capsys.readouterr().out  # type: ignore[attr-defined]


async def test_tooti_peers_reports_an_unreachable_process(capsys: object) -> None:
    code = await trio.to_thread.run_sync(cli.main, ["peers", "--url", "http://127.0.0.1:9"])
    assert code == 1
    assert "cannot reach http://127.0.0.1:9/admin/v1/network" in (
        capsys.readouterr().err)  # type: ignore[attr-defined]


async def test_max_peers_keeps_the_rest_on_standby_until_a_session_fails(
        nursery: trio.Nursery) -> None:
    gateways = dict([await start_gateway(nursery), await start_gateway(nursery)])
    urls = {url: gateway for gateway, url in gateways.items()}
    node = await start_node(nursery, "frugal", list(urls), max_peers=1)
    with trio.fail_after(10):
        await node.connected.wait()
    links = node.dialer.links
    (first,) = [url for url, link in links.items() if link.state == "connected"]
    (second,) = [url for url, link in links.items() if link.state == "standby"]
    await registered(urls[first], "frugal")
    assert "frugal" not in urls[second].registry.peers
    urls[first].shutdown()  # the session fails: the standby peer takes the slot
    await registered(urls[second], "frugal")
    assert links[second].state == "connected"


async def test_a_node_only_process_answers_tooti_peers(nursery: trio.Nursery,
                                                       capsys: object) -> None:
    gateway, url = await start_gateway(nursery)
    node = await start_node(nursery, "solo", [url])
    admin = NodeAdmin(node, "127.0.0.1:0", admin_key="k-admin")
    base = (await nursery.start(admin.serve))[0]
    await registered(gateway, "solo")
    async with httpx.AsyncClient(base_url=base) as http:
        refused = await http.get("/admin/v1/network")
        assert refused.status_code == 401  # the same refusal as a gateway's admin API
        assert refused.json()["error"]["code"] == "invalid_admin_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/healthz")).json()["sessions"] == 1
    code = await trio.to_thread.run_sync(
        cli.main, ["peers", "--url", base, "--admin-key", "k-admin"])
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert code == 0, out
    assert "dialing as node solo (1 peer):" in out
    assert re.search(rf"^  connected +configured +{re.escape(url)} ", out, re.MULTILINE), out
    admin.shutdown()


async def test_welcome_never_passes_on_credentials_or_queries(nursery: trio.Nursery) -> None:
    _, url = await start_gateway(
        nursery, advertise=["wss://user:secret@gw-b.example/tooti/v1/tunnel?token=x#f"])
    assert (await welcome_of(url)).peers == ["wss://gw-b.example/tooti/v1/tunnel"]


def test_tooti_peers_output_cannot_drive_the_terminal() -> None:
    view = {"roles": ["gateway"], "peers": [
        {"id": "evil\x1b]0;owned\x07\nforged line", "role": "node", "state": "live",
         "models": ["m\x1b[2J"]}]}
    text = network_report.render(view)
    assert "\x1b" not in text and "\x07" not in text
    assert "forged line" in text and text.count("\n") == network_report.render(
        {"roles": ["gateway"], "peers": [{"id": "x", "role": "node", "state": "live",
                                          "models": ["m"]}]}).count("\n")


def test_tooti_peers_output_is_in_aligned_columns_in_plain_words() -> None:
    view = {"roles": ["gateway", "node"], "public_peers": [],
            "dialing": [{"role": "node", "id": "tooti-local", "links": []}],
            "peers": [{"id": "relay-eu", "role": "relay", "state": "live", "models": []},
                      {"id": "n1", "role": "node", "state": "live", "via": "relay-eu",
                       "hops": 1, "models": ["tooti-sim"]},
                      {"id": "a-long-node-name", "role": "node", "state": "draining",
                       "via": "relay-eu", "hops": 2, "models": ["m1", "m2"]}]}
    text = network_report.render(view)
    assert "addresses this gateway tells its dialers: none" in text
    assert "dialing as" not in text  # no heading over nothing (a node attached in memory)
    assert "(1 hop)" in text and "(2 hops)" in text and "hops)" not in text.replace(
        "(2 hops)", "")
    assert text.split("peers connected here (3):\n", 1)[1].splitlines() == [
        "  ID                ROLE   STATE     ROUTE                  MODELS",  # no empty column
        "  relay-eu          relay  live      direct                 -",
        "  a-long-node-name  node   draining  via relay-eu (2 hops)  m1, m2",
        "  n1                node   live      via relay-eu (1 hop)   tooti-sim"]
    public = network_report.render({"roles": ["relay"], "public_peers": ["wss://r.example"]})
    assert "addresses this relay tells its dialers (1):\n  wss://r.example" in public
    assert "peers connected here: none" in public


async def test_a_discovered_peer_never_gets_the_join_token(nursery: trio.Nursery) -> None:
    async def gateway_with_token(**network: object) -> tuple[Gateway, str]:
        gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", join_token="shared"), TUNNEL,
                          network=NetworkSettings(**network))  # type: ignore[arg-type]
        urls = await nursery.start(gateway.serve)
        return gateway, urls[0].replace("http://", "ws://") + "/tooti/v1/tunnel"

    gateway_b, url_b = await gateway_with_token()
    gateway_a, url_a = await gateway_with_token(advertise=[url_b])
    node = Node(NodeSettings(peers=[url_a], join_token="shared", reconnect_initial=0.05,
                             reconnect_max=0.2), TUNNEL, [simulated()], "careful",
                network=NetworkSettings(discover=True))
    with LogEvent("tooti.node", f"tunnel to {url_b}:") as refused:
        await nursery.start(node.run)
        await registered(gateway_a, "careful")
        with trio.fail_after(10):
            await refused.seen.wait()  # B refused a dialer without its token
    assert node.dialer.links[url_b].source == "discovered"
    assert "HTTP 403: invalid token" in refused.messages[0]  # refused at the handshake
    assert "careful" not in gateway_b.registry.peers


async def test_a_discovered_peer_that_keeps_failing_is_forgotten(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """Five failed dials (their backoff waited out on the autojump clock) and a
    discovered peer is forgotten."""
    dead = "ws://127.0.0.1:9/tooti/v1/tunnel"  # nothing listens on the discard port
    gateway, url = await start_gateway(nursery, advertise=[dead])
    with LogEvent("tooti.node", f"forgetting discovered peer {dead}") as forgotten:
        node = await start_node(nursery, "tidy", [url], discover=True)
        await registered(gateway, "tidy")
        with trio.fail_after(10):
            await forgotten.seen.wait()
    assert set(node.dialer.links) == {url}
    node.dialer.learn([dead])  # the next WELCOME lists it again: it stays forgotten
    assert set(node.dialer.links) == {url}
