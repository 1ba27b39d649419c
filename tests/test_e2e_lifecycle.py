"""Reconnects, same-process roles, half-open peers and a rogue node, over real sockets."""

from __future__ import annotations

import logging

import httpx
import trio
from trio_websocket import open_websocket_url

from tests.conftest import Network, simulated
from tests.upstream import SlowUpstream, start_upstream
from tooti.backends.openai import OpenAIBackend
from tooti.gateway.app import Gateway
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


async def test_gateway_and_node_in_one_process(nursery: trio.Nursery) -> None:
    settings = Settings(
        roles=["gateway", "node"],
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


async def test_half_open_node_leaves_within_heartbeat_timeout(network: Network) -> None:
    """A node that completes the handshake and then falls silent is dropped."""
    conn = Connection(Side.DIALER, Limits())
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        await ws.send_message(conn.send_hello("silent", "node", "test", {}))
        conn.receive_message(await ws.get_message())
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
    conn = Connection(Side.DIALER, Limits())
    async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
        await ws.send_message(conn.send_hello("rogue", "node", "test", {}))
        conn.receive_message(await ws.get_message())
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
    network: Network, nursery: trio.Nursery
) -> None:
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
    """A second process with the same node id replaces the first, which is told why and
    backs off instead of flapping back and forth."""
    watcher = _LogEvent("is the same node running twice")
    logging.getLogger("tooti.node").addHandler(watcher)
    try:
        await network.add_node(node_id="dup", labels={"who": "first"},
                               reconnect_initial=0.05, reconnect_max=30)
        registry = network.gateway.registry
        # The same id again, in another node (a second process in real life).
        await network.add_node(node_id="dup", labels={"who": "second"}, wait=False)
        with trio.fail_after(10):
            await registry.wait_until(
                lambda: registry.peers.get("dup") is not None
                and registry.peers["dup"].labels == {"who": "second"})
            await watcher.seen.wait()
        assert registry.peers["dup"].labels == {"who": "second"}
    finally:
        logging.getLogger("tooti.node").removeHandler(watcher)
