"""The event bus, the admin events stream, /admin/v1/requests and /metrics."""

from __future__ import annotations

from typing import Any

import trio

from tests.conftest import Network
from tests.console_support import read_events
from tooti.mesh.events import EventBus

CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_slow_subscriber_is_dropped_not_waited_for() -> None:
    bus = EventBus(buffer=4)
    slow = bus.subscribe()
    for i in range(10):
        bus.publish("request.received", request_id=f"r{i}")
    assert slow.dropped and bus.subscribers == 0
    received = []
    while True:
        try:
            received.append(slow.receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    assert [e.seq for e in received] == [1, 2, 3, 4]
    assert len(bus.recent) == 10  # publishing went on regardless


def test_recent_requests_keep_a_timeline_and_a_bound() -> None:
    bus = EventBus(recent_limit=3)
    for i in range(5):
        bus.publish("request.received", request_id=f"r{i}", model="m")
        bus.publish("request.routed", request_id=f"r{i}", node="n1", attempt=1)
    bus.publish("request.finished", request_id="r4", status="ok", completion_tokens=7)
    newest = bus.recent_requests(10)
    assert [r["request_id"] for r in newest] == ["r4", "r3", "r2"]
    assert newest[0]["state"] == "finished" and newest[0]["completion_tokens"] == 7
    assert [step["kind"] for step in newest[0]["timeline"]] == ["received", "routed", "finished"]
    assert newest[0]["timeline"][1]["node"] == "n1"


async def test_events_stream_snapshot_then_deltas(network: Network) -> None:
    await network.add_node(node_id="first")
    seen: list[tuple[str, dict[str, Any]]] = []
    async with network.client() as http:
        async with http.stream("GET", "/admin/v1/events") as response:
            assert response.status_code == 200
            events = response.aiter_lines()
            with trio.fail_after(10):
                await read_events(events, "snapshot", seen)
                assert [p["id"] for p in seen[0][1]["peers"]] == ["first"]
                await network.add_node(node_id="second")
                await read_events(events, "peer.joined", seen)
                assert seen[-1][1]["data"]["peer"]["id"] == "second"
                response = await http.post("/v1/chat/completions", json=CHAT)
                await read_events(events, "request.finished", seen)
    kinds = [kind for kind, _ in seen]
    for step in ("request.received", "request.routed", "request.first_token"):
        assert step in kinds
    finished = seen[-1][1]["data"]
    assert finished["request_id"] == response.headers["x-request-id"]
    assert finished["status"] == "ok" and finished["completion_tokens"] == 3
    assert finished["node"] == response.headers["x-tooti-node"]


async def test_node_leaving_is_an_event(network: Network) -> None:
    await network.add_node(node_id="brief")
    seen: list[tuple[str, dict[str, Any]]] = []
    async with network.client() as http:
        async with http.stream("GET", "/admin/v1/events") as response:
            events = response.aiter_lines()
            with trio.fail_after(10):
                await read_events(events, "snapshot", seen)
                network.kill_node("brief")
                await read_events(events, "peer.left", seen)
    assert seen[-1][1]["data"]["peer_id"] == "brief"


async def test_requests_and_metrics_endpoints(network: Network) -> None:
    await network.add_node(node_id="metered")
    async with network.client() as http:
        for _ in range(2):
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        recent = (await http.get("/admin/v1/requests", params={"limit": 1})).json()
        bad = await http.get("/admin/v1/requests", params={"limit": "many"})
        metrics = await http.get("/metrics")
    assert len(recent["data"]) == 1 and recent["data"][0]["status"] == "ok"
    assert bad.status_code == 400
    assert metrics.status_code == 200
    text = metrics.text
    assert 'tooti_requests_total{model="tooti-sim",node="metered",status="ok"} 2.0' in text
    assert 'tooti_tokens_total{kind="completion",model="tooti-sim",node="metered"} 6.0' in text
    assert 'tooti_peers{state="live"} 1.0' in text
    assert "tooti_ttft_seconds_bucket" in text


async def test_admin_endpoints_need_the_admin_key_when_set(network: Network) -> None:
    network.gateway.station.admin_auth = type(network.gateway.station.admin_auth)("s3cret-admin")
    async with network.client() as http:
        for path in ("/admin/v1/events", "/admin/v1/requests", "/metrics"):
            assert (await http.get(path)).status_code == 401
            wrong = await http.get(path, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401
        ok = await http.get("/metrics", headers={"authorization": "Bearer s3cret-admin"})
    assert ok.status_code == 200


async def test_rejected_requests_and_shutdown_are_events(network: Network) -> None:
    await network.add_node(node_id="solo")
    seen: list[tuple[str, dict[str, Any]]] = []
    async with network.client() as http:
        async with http.stream("GET", "/admin/v1/events") as response:
            events = response.aiter_lines()
            with trio.fail_after(10):
                await read_events(events, "snapshot", seen)
                assert isinstance(seen[0][1]["ts"], float)
                missing = await http.post("/v1/chat/completions",
                                          json={**CHAT, "model": "no-such-model"})
                await read_events(events, "request.finished", seen)
                finished = seen[-1][1]["data"]
                assert finished["status"] == "rejected" and finished["http_status"] == 404
                assert finished["request_id"] == missing.headers["x-request-id"]
                network.gateway.shutdown()
                await read_events(events, "dropped", seen)
    assert seen[-1][1] == {"reason": "gateway shutting down"}
