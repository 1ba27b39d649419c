"""Reconnects, same-process roles, half-open peers and a rogue node, over real sockets."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.conftest import Network, simulated
from tests.hostile.peers import handshake
from tests.upstream import SlowUpstream, start_upstream
from tooti.backends.openai import OpenAIBackend
from tooti.gateway.app import Gateway
from tooti.identity import Identity, b64, derive_id
from tooti.node.node import Node
from tooti.protocol.connection import Connection, Limits, Side
from tooti.runner import Process, serve
from tooti.settings import (
    BackendSettings,
    GatewaySettings,
    NodeSettings,
    Settings,
    TunnelSettings,
)
from tooti.transport.websocket import SUBPROTOCOL


async def raw_handshake(
    ws: WebSocketConnection, peer_id: str, identity: Identity | None = None,
    sign_as: str | None = None,
) -> Connection:
    """Do a node's side of the handshake by hand (HELLO with key, WELCOME, PROOF)."""
    conn = Connection(Side.DIALER, Limits())
    await handshake(ws.send_message, ws.get_message, conn, peer_id,
                    identity or Identity.generate(), sign_as=sign_as)
    return conn


CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def test_node_reconnects_after_gateway_restart(nursery: trio.Nursery) -> None:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    first = Gateway(GatewaySettings(listen="127.0.0.1:0"), tunnel)
    first_done = trio.Event()

    async def run_first(task_status: trio.TaskStatus[list[str]]) -> None:
        await first.serve(task_status=task_status)
        first_done.set()

    url = (await nursery.start(run_first))[0]
    port = url.rsplit(":", 1)[1]
    node_settings = NodeSettings(
        peers=[f"ws://127.0.0.1:{port}/tooti/v1/tunnel"], id="node-r",
        reconnect_initial=0.05, reconnect_max=0.2,
    )
    node = Node(node_settings, tunnel, [simulated()], "node-r")
    await nursery.start(node.run)
    await first.registry.wait_until(lambda: "node-r" in first.registry.peers)

    first.shutdown()
    with trio.fail_after(10):
        await first_done.wait()
    second = Gateway(GatewaySettings(listen=f"127.0.0.1:{port}"), tunnel)
    await nursery.start(second.serve)
    with trio.fail_after(10):
        await second.registry.wait_until(
            lambda: bool(second.registry.candidates("tooti-sim")))
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    second.shutdown()


async def test_gateway_and_node_in_one_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    settings = Settings(
        roles=["gateway", "node"], data_dir=str(tmp_path),
        gateway=GatewaySettings(listen="127.0.0.1:0"),
        node=NodeSettings(id="local", backends=[BackendSettings(type="simulated")]),
    )
    process = await nursery.start(serve, Process(settings))
    assert process.gateway is not None
    registry = process.gateway.registry
    with trio.fail_after(10):
        await registry.wait_until(lambda: bool(registry.candidates("tooti-sim")))
    assert registry.peers["local"].address == "memory"
    async with httpx.AsyncClient(base_url=process.urls[0]) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
        models = await http.get("/v1/models")
    assert response.status_code == 200
    assert response.headers["x-tooti-node"] == "local"
    assert [m["id"] for m in models.json()["data"]] == ["tooti-sim"]
    nursery.cancel_scope.cancel()


async def test_half_open_node_leaves_within_heartbeat_timeout(
    network: Network, autojump_clock: trio.testing.MockClock,
) -> None:
    """A node that completes the handshake and then falls silent is dropped (waited out
    on the autojump clock)."""
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        conn = await raw_handshake(ws, "silent")
        await ws.send_message(conn.send_models([{"id": "quiet-model"}]))
        registry = network.gateway.registry
        await registry.wait_until(lambda: bool(registry.candidates("quiet-model")))
        started = trio.current_time()
        with trio.fail_after(10 * network.tunnel.heartbeat_interval):
            await registry.wait_until(lambda: "silent" not in registry.peers)
        # Never earlier than the 3-interval timeout: it was silence that removed it.
        assert trio.current_time() - started >= 2 * network.tunnel.heartbeat_interval


async def test_rogue_node_garbage_closes_only_its_tunnel(network: Network) -> None:
    await network.add_node(node_id="good")
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        await raw_handshake(ws, "rogue")
        await ws.send_message(b"\x77garbage frame")
        goaway = await ws.get_message()
        assert goaway[0] == 0x0B and b"unknown_frame_type" in goaway
    registry = network.gateway.registry
    await registry.wait_until(lambda: "rogue" not in registry.peers)
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200


async def test_tunnel_needs_token_when_configured(nursery: trio.Nursery) -> None:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", join_token="s3cret"), tunnel)
    url = (await nursery.start(gateway.serve))[0]
    tunnel_url = url.replace("http://", "ws://") + "/tooti/v1/tunnel"
    bad = Node(NodeSettings(peers=[tunnel_url], join_token="wrong", reconnect_initial=0.05),
               tunnel, [simulated()], "bad")
    good = Node(NodeSettings(peers=[tunnel_url], join_token="s3cret"), tunnel, [simulated()],
                "good")
    await nursery.start(bad.run)
    await nursery.start(good.run)
    registry = gateway.registry
    with trio.fail_after(10):
        await registry.wait_until(lambda: "good" in registry.peers)
    assert "bad" not in registry.peers
    gateway.shutdown()


async def test_sick_backend_models_stop_receiving_traffic(
    network: Network, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    """The node's health checks every 0.05 s run on the autojump clock."""
    upstream = SlowUpstream()
    url = await start_upstream(nursery, upstream)
    await network.add_node(
        [OpenAIBackend(BackendSettings(type="openai", url=url))], node_id="sickly",
        health_interval=0.05)
    registry = network.gateway.registry
    assert registry.candidates("slow")
    upstream.health_status = 503  # llama.cpp says this while (re)loading a model
    with trio.fail_after(10):
        await registry.wait_until(lambda: not registry.candidates("slow"))
    async with network.client() as http:
        response = await http.post("/v1/chat/completions", json={
            "model": "slow", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503
    upstream.health_status = 200
    with trio.fail_after(10):
        await registry.wait_until(lambda: bool(registry.candidates("slow")))


class _LogEvent(logging.Handler):
    """Sets a trio event when a log record contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_duplicate_node_id_is_told_and_backs_off(network: Network) -> None:
    """A second process of the same node (same key, e.g. a copied data dir) replaces the
    first, which is told why and backs off instead of flapping back and forth."""
    watcher = _LogEvent("is the same node running twice")
    logging.getLogger("tooti.node").addHandler(watcher)
    shared = Identity.generate()
    try:
        await network.add_node(node_id="dup", labels={"who": "first"}, identity=shared,
                               reconnect_initial=0.05, reconnect_max=30)
        registry = network.gateway.registry
        # The same node again, in another Node object (a second process in real life).
        await network.add_node(node_id="dup", labels={"who": "second"}, identity=shared,
                               wait=False)
        with trio.fail_after(10):
            await registry.wait_until(
                lambda: registry.peers.get("dup") is not None
                and registry.peers["dup"].labels == {"who": "second"})
            await watcher.seen.wait()
        assert registry.peers["dup"].labels == {"who": "second"}
    finally:
        logging.getLogger("tooti.node").removeHandler(watcher)


async def _refusal(network: Network, peer_id: str, identity: Identity,
                   sign_as: str | None = None) -> bytes:
    """Handshake by hand and return the gateway's next frame (a GOAWAY if refused)."""
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        await raw_handshake(ws, peer_id, identity, sign_as)
        message = await ws.get_message()
        assert isinstance(message, bytes)
        return message


async def test_a_node_cannot_claim_another_nodes_id(network: Network) -> None:
    """The forged-health bug of the seed project: impossible, the id is bound to a key."""
    owner = await network.add_node(node_id="gpu-7")
    registry = network.gateway.registry
    forger = Identity.generate()
    goaway = await _refusal(network, "gpu-7", forger)
    assert goaway[0] == 0x0B and b"identity_mismatch" in goaway
    # The real node is untouched: still registered, still the same session.
    assert registry.peers["gpu-7"].session in network.gateway.station.admission.sessions
    assert registry.identities["gpu-7"] == owner.identity.public_key


async def test_derived_ids_belong_to_their_key_only(network: Network) -> None:
    victim = Identity.generate()
    goaway = await _refusal(network, victim.id, Identity.generate())
    assert b"identity_mismatch" in goaway
    assert derive_id(victim.public_key) == victim.id


async def test_a_proof_must_be_for_this_id(network: Network) -> None:
    """A signature made for another id (replayed or confused) is refused."""
    goaway = await _refusal(network, "honest", Identity.generate(), sign_as="someone-else")
    assert b"bad_proof" in goaway
    assert "honest" not in network.gateway.registry.peers


async def test_frames_before_proof_are_refused(network: Network) -> None:
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        conn = Connection(Side.DIALER, Limits())
        await ws.send_message(conn.send_hello(
            "hasty", "node", "test", {},
            extra={"public_key": b64(Identity.generate().public_key)}))
        conn.receive_message(await ws.get_message())
        await ws.send_message(conn.send_models([{"id": "m"}]))
        goaway = await ws.get_message()
    assert isinstance(goaway, bytes) and b"proof_required" in goaway
    assert "hasty" not in network.gateway.registry.peers


async def test_node_identity_persists_in_the_data_dir(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    again = Identity.load_or_create(tmp_path)
    assert first.public_key == again.public_key and first.id.startswith("tooti-")
    assert (tmp_path / "node_key.pem").stat().st_mode & 0o777 == 0o600


async def test_node_serves_every_gateway_it_dials_and_survives_losing_one(
    nursery: trio.Nursery,
) -> None:
    """A node with two gateways keeps a session with each: both route to it, and losing
    one gateway costs the other nothing."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateways, scopes, urls = [], [], []
    for _ in range(2):
        gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), tunnel)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[list[str]], gateway: Gateway = gateway,
                      scope: trio.CancelScope = scope) -> None:
            with scope:
                await gateway.serve(task_status=task_status)

        urls.append((await nursery.start(run))[0])
        gateways.append(gateway)
        scopes.append(scope)
    peers = [u.replace("http://", "ws://") + "/tooti/v1/tunnel" for u in urls]
    node = Node(NodeSettings(peers=peers, reconnect_initial=0.05, reconnect_max=0.5),
                tunnel, [simulated()])
    await nursery.start(node.run)
    assert node.id.startswith("tooti-")  # no name configured: the id derived from the key
    with trio.fail_after(10):
        for gateway in gateways:
            await gateway.registry.wait_until(
                lambda g=gateway: bool(g.registry.candidates("tooti-sim")))
    async with httpx.AsyncClient() as http:
        for url in urls:
            response = await http.post(url + "/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
            assert response.headers["x-tooti-node"] == node.id
        scopes[0].cancel()  # gateway A dies
        response = await http.post(urls[1] + "/v1/chat/completions", json=CHAT)
        assert response.status_code == 200 and response.headers["x-tooti-node"] == node.id
