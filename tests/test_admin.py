"""The admin API ``/admin/v1/peers``: who may call it, and what it lists."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
import trio

from tests.conftest import Network
from tooti.backends.simulated import SimulatedBackend
from tooti.gateway.app import Gateway
from tooti.settings import BackendSettings, GatewaySettings, TunnelSettings

KEY = "adm-7f3c-secret"
PEERS = "/admin/v1/peers"
MODEL = "tooti-sim"


@pytest.fixture
async def keyed(nursery: trio.Nursery) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway configured with an admin key, and its URL."""
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", admin_key=KEY), TunnelSettings())
    urls = await nursery.start(gateway.serve)
    yield gateway, urls[0]
    gateway.shutdown()


def bearer(token: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"authorization": f"{scheme} {token}"}


def remote_client(app: Gateway, **kwargs: Any) -> httpx.AsyncClient:
    """A client that reaches ``app`` as if from a non-loopback address."""
    transport = httpx.ASGITransport(app=cast(Any, app), client=("203.0.113.7", 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway", **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert response.headers["x-request-id"].startswith("req_")


async def test_admin_key_required_when_configured(keyed: tuple[Gateway, str]) -> None:
    _gateway, url = keyed
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        missing = await http.get(PEERS)
        wrong = await http.get(PEERS, headers=bearer("not-the-key"))
        basic = await http.get(PEERS, headers=bearer(KEY, scheme="Basic"))
        empty = await http.get(PEERS, headers={"authorization": "Bearer"})
        right = await http.get(PEERS, headers=bearer(KEY))
        lower = await http.get(PEERS, headers=bearer(KEY, scheme="bearer"))
        unknown_unauthorized = await http.get("/admin/v1/nope")
        # The admin key guards the admin API only.
        models = await http.get("/v1/models")
    for refused in (missing, wrong, basic, empty, unknown_unauthorized):
        assert_error(refused, 401, "invalid_admin_key")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert KEY not in refused.text
    for allowed in (right, lower):
        assert allowed.status_code == 200
        assert allowed.json() == {"object": "list", "data": [], "queued": 0,
                                  "disabled": []}
    assert models.status_code == 200


async def test_admin_key_admits_remote_clients(keyed: tuple[Gateway, str]) -> None:
    gateway, _url = keyed
    async with remote_client(gateway) as http:
        refused = await http.get(PEERS)
        allowed = await http.get(PEERS, headers=bearer(KEY))
    assert_error(refused, 401, "invalid_admin_key")
    assert allowed.status_code == 200


async def test_without_key_loopback_only(network: Network) -> None:
    async with network.client() as http:
        local = await http.get(PEERS)
        # A key sent to a gateway without one changes nothing on loopback.
        local_with_token = await http.get(PEERS, headers=bearer("anything"))
    assert local.status_code == 200 and local_with_token.status_code == 200
    async with remote_client(network.gateway) as http:
        remote = await http.get(PEERS)
        remote_with_token = await http.get(PEERS, headers=bearer("anything"))
        api = await http.get("/v1/models")
    for refused in (remote, remote_with_token):
        assert_error(refused, 403, "admin_loopback_only")
    assert api.status_code == 200


async def test_methods_and_unknown_routes(keyed: tuple[Gateway, str]) -> None:
    _gateway, url = keyed
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(KEY)) as http:
        post = await http.post(PEERS, json={})
        delete = await http.delete(PEERS)
        unknown = await http.get("/admin/v1/nope")
        nested = await http.get("/admin/v1/peers/node-a")
        other_version = await http.get("/admin/v2/peers")
    for response in (post, delete):
        assert_error(response, 405, "method_not_allowed")
    for response in (unknown, nested, other_version):
        assert_error(response, 404, "not_found")


def priced(price: tuple[float, float], max_concurrency: int) -> SimulatedBackend:
    return SimulatedBackend(BackendSettings(
        type="simulated", price_input=price[0], price_output=price[1],
        max_concurrency=max_concurrency))


async def test_peers_list_models_state_capacity_prices_and_health(network: Network) -> None:
    await network.add_node([priced((1.5, 3.0), 2)], node_id="node-a", labels={"region": "eu"})
    await network.add_node([priced((0.0, 0.0), 8)], node_id="node-b")
    async with network.client() as http:
        before = (await http.get(PEERS)).json()
        response, lines = await _stream(http, {"provider": {"order": ["node-a"]}})
        assert response.headers["x-tooti-node"] == "node-a" and lines[-1] == "data: [DONE]"
        with trio.fail_after(10):
            await network.gateway.station.wait_idle()
        after = (await http.get(PEERS)).json()
    assert before["object"] == "list" and before["queued"] == 0
    peers = {p["id"]: p for p in before["data"]}
    assert set(peers) == {"node-a", "node-b"}
    a = peers["node-a"]
    assert a["role"] == "node" and a["labels"] == {"region": "eu"}
    assert a["state"] == "live" and a["draining"] is False and a["failures"] == 0
    assert a["models"] == [MODEL] and a["in_flight"] == 0
    assert a["address"].startswith("127.0.0.1:")
    assert a["software"].startswith("tooti/")
    assert a["per_model"] == {MODEL: {
        "in_flight": 0, "capacity": 2, "price": {"input": 1.5, "output": 3.0},
        "ttft_ms": None, "tokens_per_s": None, "samples": 0, "state": "ok"}}
    assert peers["node-b"]["per_model"][MODEL]["capacity"] == 8
    assert peers["node-b"]["per_model"][MODEL]["price"] == {"input": 0.0, "output": 0.0}
    measured = {p["id"]: p for p in after["data"]}["node-a"]["per_model"][MODEL]
    assert measured["samples"] == 1 and measured["state"] == "ok"
    assert measured["ttft_ms"] is not None and measured["ttft_ms"] > 0
    assert {p["id"]: p for p in after["data"]}["node-b"]["per_model"][MODEL]["samples"] == 0


async def _stream(http: httpx.AsyncClient, extra: dict[str, Any]
                  ) -> tuple[httpx.Response, list[str]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True, **extra}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    return response, lines


async def test_peers_show_in_flight_and_leaving_nodes(network: Network) -> None:
    await network.add_node(node_id="node-a")
    registry = network.gateway.registry
    async with network.client() as http:
        registry.peers["node-a"].in_flight[MODEL] = 1  # as if a stream were open
        busy = (await http.get(PEERS)).json()["data"][0]
        registry.peers["node-a"].in_flight[MODEL] = 0
        network.kill_node("node-a")
        with trio.fail_after(10):
            await registry.wait_until(lambda: "node-a" not in registry.peers)
        gone = (await http.get(PEERS)).json()
    assert busy["in_flight"] == 1 and busy["per_model"][MODEL]["in_flight"] == 1
    assert gone == {"object": "list", "data": [], "queued": 0, "disabled": []}
