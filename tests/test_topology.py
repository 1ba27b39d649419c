"""A small network of real ``tooti run`` processes on loopback: two gateways (A, B), one
relay dialling both, two nodes dialling both gateways directly and two nodes behind the
relay (simulated backends).

Conditions are waited for by polling the gateways' admin API (another process's state),
each wait bounded by ``trio.fail_after``; the children's logs are printed on failure.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.processes import (
    START_TIMEOUT,
    Cluster,
    Tooti,
    open_cluster,
    spawn,
    toml_table,
    toml_value_lines,
)

MODEL = "tooti-sim"
HEARTBEAT = 0.5
"""``tunnel.heartbeat_interval`` of every process: a silent peer is dropped after 1.5 s."""
RECONNECT_MAX = 0.5
NODE_OPTIONS: dict[str, Any] = {"tokens": 400, "tokens_per_second": 50.0}
"""Uncapped, an answer streams for 8 s (time to walk away mid-stream); the other
requests cap ``max_tokens``."""
DIRECT = ("direct-1", "direct-2")
BEHIND = ("behind-1", "behind-2")
RELAY = "relay"
POLL = 0.05
GUARD = 20.0
"""Hang guard for one request or one wait."""


@dataclass
class Topology:
    """The processes of one test (started, killed and logged through ``cluster``)."""

    cluster: Cluster
    urls: dict[str, str] = field(default_factory=dict)
    """Gateway or relay name → ``http://127.0.0.1:PORT``."""
    processes: dict[str, Tooti] = field(default_factory=dict)

    def tunnel(self, name: str) -> str:
        """The tunnel URL of gateway or relay ``name`` (the tunnel path is implied)."""
        return self.urls[name].replace("http://", "ws://")

    async def _spawn(self, name: str, config: str, peers: Sequence[str] = ()) -> Tooti:
        root = self.cluster.root
        path = root / f"{name}-{len(self.cluster.children)}.toml"
        path.write_text(config)
        args = [arg for url in peers for arg in ("--peer", url)]
        tooti = await spawn(self.cluster.nursery, path, root / f"{name}-data", name, args)
        self.cluster.children.append(tooti)
        self.processes[name] = tooti
        return tooti

    async def _listening(self, name: str, tooti: Tooti) -> None:
        with trio.fail_after(START_TIMEOUT):
            match = await tooti.wait_for(r"(?:gateway|relay) listening on (http://127\.0\.0\.1:\d+)")
        self.urls[name] = match.group(1)

    async def start_gateway(self, name: str) -> None:
        """A gateway on a free port; returns once it listens."""
        config = (toml_value_lines({"roles": ["gateway"], "log_level": "info",
                                    "drain_grace": 1.0})
                  + toml_table("gateway", {"listen": "127.0.0.1:0"})
                  + toml_table("tunnel", {"heartbeat_interval": HEARTBEAT}))
        await self._listening(name, await self._spawn(name, config))

    async def start_relay(self, upstream: Sequence[str], port: int = 0) -> None:
        """The relay, dialling every gateway in ``upstream``; returns once it listens."""
        config = (toml_value_lines({"roles": ["relay"], "log_level": "info",
                                    "drain_grace": 1.0})
                  + toml_table("gateway", {"listen": f"127.0.0.1:{port}"})
                  + toml_table("relay", {"id": RELAY, "reconnect_initial": 0.1,
                                         "reconnect_max": RECONNECT_MAX})
                  + toml_table("tunnel", {"heartbeat_interval": HEARTBEAT}))
        tooti = await self._spawn(RELAY, config, [self.tunnel(name) for name in upstream])
        await self._listening(RELAY, tooti)

    async def start_node(self, node_id: str, upstream: Sequence[str]) -> None:
        """Node ``node_id`` (simulated backend) dialling every peer in ``upstream``."""
        config = (toml_value_lines({"roles": ["node"], "log_level": "info",
                                    "drain_grace": 0.0})
                  + toml_table("node", {"id": node_id, "reconnect_initial": 0.1,
                                        "reconnect_max": RECONNECT_MAX})
                  + toml_table("[[node.backends]]", {"type": "simulated"})
                  + toml_table("node.backends.options", NODE_OPTIONS)
                  + toml_table("tunnel", {"heartbeat_interval": HEARTBEAT}))
        await self._spawn(node_id, config, [self.tunnel(name) for name in upstream])

    async def peers(self, name: str) -> dict[str, dict[str, Any]]:
        """``GET /admin/v1/peers`` of gateway or relay ``name``, by peer id."""
        async with httpx.AsyncClient(base_url=self.urls[name], timeout=GUARD) as http:
            response = await http.get("/admin/v1/peers")
        response.raise_for_status()
        return {peer["id"]: peer for peer in response.json()["data"]}

    async def wait_peers(self, name: str, condition: Callable[[dict[str, Any]], bool],
                         limit: float = GUARD) -> dict[str, dict[str, Any]]:
        """Poll ``name``'s peers until ``condition(peers)`` holds (bounded)."""
        with trio.fail_after(limit):
            while True:
                peers = await self.peers(name)
                if condition(peers):
                    return peers
                await trio.sleep(POLL)

    async def request(self, name: str, http: httpx.AsyncClient, node_id: str,
                      stream: bool = False) -> tuple[httpx.Response, list[str]]:
        """A short chat completion at gateway ``name`` that only ``node_id`` may serve;
        the response and, for a stream, its ``data:`` payloads."""
        body = {"model": MODEL, "stream": stream, "max_tokens": 3,
                "messages": [{"role": "user", "content": "hello there"}],
                "provider": {"only": [node_id]}}
        if stream:
            body["stream_options"] = {"include_usage": True}
        with trio.fail_after(GUARD):
            async with http.stream("POST", self.urls[name] + "/v1/chat/completions",
                                   json=body) as response:
                events = [line[len("data: "):] async for line in response.aiter_lines()
                          if line.startswith("data: ")]
        return response, events


def full_view(peers: dict[str, dict[str, Any]]) -> bool:
    """Every node registered with its models, the direct ones direct, the others via
    the relay."""
    return (all(n in peers and peers[n]["via"] is None and peers[n]["models"] == [MODEL]
                for n in DIRECT)
            and all(n in peers and peers[n]["via"] == RELAY and peers[n]["hops"] == 1
                    and peers[n]["models"] == [MODEL] for n in BEHIND))


@pytest.fixture
async def topology(tmp_path: Path) -> AsyncIterator[Topology]:
    """Processes killed when the test ends, however it ends (their logs printed)."""
    async with open_cluster(tmp_path / "topology", heartbeat_interval=HEARTBEAT) as cluster:
        try:
            yield Topology(cluster)
        finally:
            print(cluster.logs())


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "freeze"])
async def test_two_gateways_a_relay_and_four_nodes(
    topology: Topology, fault: signal.Signals,
) -> None:
    """Both gateways route to all four nodes; a cancel crosses the relay; B serves every
    node once A is killed; the relay's nodes leave B when it is killed (its sockets
    close) or frozen (half-open: heartbeats time out), and come back with a new relay
    process on its address."""
    # ---- start: A and B, the relay dialling both, two direct and two relayed nodes
    async with trio.open_nursery() as starting:
        starting.start_soon(topology.start_gateway, "A")
        starting.start_soon(topology.start_gateway, "B")
    await topology.start_relay(["A", "B"])
    relay_port = int(topology.urls[RELAY].rsplit(":", 1)[1])
    async with trio.open_nursery() as starting:
        for node_id in DIRECT:
            starting.start_soon(topology.start_node, node_id, ["A", "B"])
        for node_id in BEHIND:
            starting.start_soon(topology.start_node, node_id, [RELAY])
    for gateway in ("A", "B"):
        peers = await topology.wait_peers(gateway, full_view, START_TIMEOUT)
        assert peers[RELAY]["role"] == "relay"
        assert {p["id"] for p in peers.values() if p["via"] == RELAY} == set(BEHIND)
    relay_peers = await topology.peers(RELAY)
    assert all(relay_peers[n]["via"] is None for n in BEHIND)  # direct at the relay

    async with httpx.AsyncClient(timeout=GUARD) as http:
        for gateway in ("A", "B"):
            models = (await http.get(topology.urls[gateway] + "/v1/models")).json()["data"]
            assert [(m["id"], m["meta"]["nodes"]) for m in models] == [(MODEL, 4)]

        # ---- a stream at A served through the relay, with usage
        response, events = await topology.request("A", http, BEHIND[0], stream=True)
        assert response.status_code == 200
        assert response.headers["x-tooti-node"] == BEHIND[0]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 3

        # ---- the client walks away mid-stream: cancelled at A, and on the node
        body = {"model": MODEL, "stream": True, "provider": {"only": [BEHIND[1]]},
                "messages": [{"role": "user", "content": "a long story"}]}
        with trio.fail_after(GUARD):
            async with http.stream("POST", topology.urls["A"] + "/v1/chat/completions",
                                   json=body) as response:
                assert response.status_code == 200
                assert response.headers["x-tooti-node"] == BEHIND[1]
                request_id = response.headers["x-request-id"]
                seen = 0
                async for line in response.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:
                        # The node's own load (its heartbeat, passed on by the relay)
                        # shows the stream before the client walks away.
                        await topology.wait_peers("A", lambda peers: peers[BEHIND[1]][
                            "stats"].get("in_flight") == 1, limit=4.0)
                        break
        walked_away = trio.current_time()
        with trio.fail_after(GUARD):
            while True:
                recent = (await http.get(topology.urls["A"] + "/admin/v1/requests")).json()
                entry = next(r for r in recent["data"] if r["request_id"] == request_id)
                if entry["state"] == "finished":
                    break
                await trio.sleep(POLL)
        assert entry["status"] == "cancelled" and entry["node"] == BEHIND[1]
        # The node stops generating (its load drops to zero) long before the 8 s its
        # answer would have taken, and the relay forwards nothing any more.
        await topology.wait_peers("A", lambda peers: peers[BEHIND[1]]["stats"].get(
            "in_flight") == 0 and peers[BEHIND[1]]["in_flight"] == 0
            and peers[RELAY]["stats"].get("in_flight") == 0, limit=4.0)
        assert trio.current_time() - walked_away < 4.0

        # ---- A dies: B serves every node
        await topology.processes["A"].kill()
        for node_id in (*DIRECT, *BEHIND):
            for stream in (False, True):
                response, events = await topology.request("B", http, node_id, stream)
                assert response.status_code == 200, events
                assert response.headers["x-tooti-node"] == node_id
        assert full_view(await topology.peers("B"))

        # ---- the relay dies: its nodes leave B within the liveness timeout
        relay = topology.processes[RELAY]
        relay.signal(fault)
        struck_at = trio.current_time()
        peers = await topology.wait_peers(
            "B", lambda peers: not any(n in peers for n in (*BEHIND, RELAY)),
            limit=3 * HEARTBEAT + 3.0)
        gone_after = trio.current_time() - struck_at
        print(f"relay's nodes left B {gone_after:.2f}s after {fault.name}")
        if fault == signal.SIGSTOP:  # only silence gave it away
            assert gone_after >= 2 * HEARTBEAT
        assert all(n in peers for n in DIRECT)
        response, _ = await topology.request("B", http, BEHIND[0])
        assert response.status_code == 503
        assert await relay.kill() == -signal.SIGKILL

        # ---- the relay comes back on its address: its nodes re-dial and are routable
        await topology.start_relay(["A", "B"], port=relay_port)
        restarted_at = trio.current_time()
        await topology.wait_peers("B", full_view)
        print(f"relay's nodes back at B {trio.current_time() - restarted_at:.2f}s after "
              "the relay listened")
        for node_id in BEHIND:
            response, _ = await topology.request("B", http, node_id)
            assert response.status_code == 200
            assert response.headers["x-tooti-node"] == node_id
    for node_id in BEHIND:  # the same node processes, re-dialled
        node = topology.processes[node_id]
        assert node.alive
        assert len(re.findall(r"connected to ws://127\.0\.0\.1:\d+", node.text)) >= 2
