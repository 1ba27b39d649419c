"""Who gets in: finding 8a (identity bindings for chosen names are capped; derived ids
always work; admins free names) and join-token rotation (several named tokens valid
at once; each node's token name is shown, never the token)."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest
import trio

from tests.conftest import Network, simulated
from tests.hostile.peers import hostile_peer
from tooti.gateway.app import Gateway
from tooti.mesh import join_tokens
from tooti.mesh.join_tokens import Admission, BearerAuth
from tooti.node.node import Node
from tooti.settings import GatewaySettings, NodeSettings, TunnelSettings

GOOD = [{"id": "m"}]


async def joined(network: Network, peer_id: str) -> None:
    registry = network.gateway.registry
    with trio.fail_after(5):
        await registry.wait_until(lambda: peer_id in registry.peers
                                  and bool(registry.peers[peer_id].models))


async def test_chosen_names_are_capped_and_derived_ids_always_work(network: Network) -> None:
    registry = network.gateway.registry
    registry.bindings.limit = 2
    for name in ("name-a", "name-b"):
        async with hostile_peer(network.tunnel_url, peer_id=name) as peer:
            await peer.models(GOOD)
            await joined(network, name)
    async with hostile_peer(network.tunnel_url, peer_id="name-c") as peer:
        with trio.fail_after(5):
            refused = await peer.goaway()
    assert refused is not None and refused.code == "identity_limit"
    assert "name-c" not in registry.identities and len(registry.identities) == 2
    async with hostile_peer(network.tunnel_url) as peer:  # a derived id needs no binding
        await peer.models(GOOD)
        await joined(network, peer.id)
    async with network.client() as http:
        response = await http.delete("/admin/v1/identities/name-a")
    assert response.status_code == 200
    async with hostile_peer(network.tunnel_url, peer_id="name-c") as peer:
        await peer.models(GOOD)
        await joined(network, "name-c")


def test_the_cap_and_the_ban_are_settings() -> None:
    gateway = Gateway(GatewaySettings(max_identity_bindings=3, peer_ban_seconds=7),
                      TunnelSettings())
    assert gateway.registry.bindings.limit == 3 and gateway.registry.bans.seconds == 7


class WatchedAuth(BearerAuth):
    """Join tokens that tell the test when they refuse someone."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.refused = trio.Event()

    def identify(self, authorization: bytes | None, client_host: str | None
              ) -> tuple[str | None, Admission]:
        result = super().identify(authorization, client_host)
        if result[0] is not None:
            self.refused.set()
        return result


async def test_join_tokens_rotate_without_downtime(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    settings = GatewaySettings(listen="127.0.0.1:0", join_token="tok-first",
                               join_tokens={"spring": "tok-spring", "autumn": "tok-autumn"})
    gateway = Gateway(settings, tunnel)
    url = (await nursery.start(gateway.serve))[0]
    tunnel_url = url.replace("http://", "ws://") + "/tooti/v1/tunnel"
    registry = gateway.registry
    nodes = {}
    for node_id, token in (("on-first", "tok-first"), ("on-spring", "tok-spring"),
                           ("on-autumn", "tok-autumn")):
        nodes[node_id] = Node(NodeSettings(peers=[tunnel_url], join_token=token,
                                           reconnect_initial=0.05, reconnect_max=0.1),
                              tunnel, [simulated()], node_id)
        await nursery.start(nodes[node_id].run)
    with trio.fail_after(10):
        await registry.wait_until(lambda: len(registry.peers) == 3)
    assert {p.id: p.token for p in registry.peers.values()} == {
        "on-first": "default", "on-spring": "spring", "on-autumn": "autumn"}
    async with httpx_client(url) as http:
        view = (await http.get("/admin/v1/network")).json()
        peers = (await http.get("/admin/v1/peers")).json()
    assert {p["id"]: p["token"] for p in view["peers"]} == {
        "on-first": "default", "on-spring": "spring", "on-autumn": "autumn"}
    assert {p["id"]: p["token"] for p in peers["data"]} == {
        "on-first": "default", "on-spring": "spring", "on-autumn": "autumn"}
    assert "tok-" not in json.dumps(view) + json.dumps(peers)  # names only, never tokens
    # Retire "spring": the gateway now knows the other two only (the tokens it builds
    # tell the test when they refuse someone).
    monkeypatch.setattr(join_tokens, "BearerAuth", WatchedAuth)
    changes = gateway.station.reload_tokens(msgspec.structs.replace(settings, join_tokens={
        "autumn": "tok-autumn"}))
    assert (changes.added, changes.removed, changes.replaced) == ([], ["spring"], [])
    before = {p.id: p for p in registry.peers.values()}
    for peer in before.values():
        peer.session.abort("test: reconnect")
    with trio.fail_after(10):
        await registry.wait_until(lambda: all(
            registry.peers.get(i) not in (None, before[i]) for i in ("on-first", "on-autumn")))
        await gateway.station.admission.auth.refused.wait()  # type: ignore[attr-defined]
    assert "on-spring" not in registry.peers
    link = next(iter(nodes["on-spring"].dialer.links.values()))
    assert link.state != "connected"
    gateway.shutdown()


def httpx_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=10)
