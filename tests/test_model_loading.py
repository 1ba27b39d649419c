"""A model still loading (issue 14, bug 4): the node announces it as loading from its
first second, the gateway answers requests for it with 503 ``model_loading`` and
``Retry-After`` (not 404), ``/healthz`` stays liveness and ``/readyz`` says whether the
process can serve; with real tunnels and real sockets."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.backend_fixtures import have_local_extra
from tests.conftest import Network, simulated
from tests.hostile.peers import hostile_peer
from tests.test_routing_index import make_peer, registry_of
from tooti.backends.base import ModelInfo
from tooti.backends.llamacpp import LOCAL_EXTRA_HINT, LlamaCppBackend, LlamaCppStartError
from tooti.backends.simulated import SimulatedBackend
from tooti.gateway.app import Gateway
from tooti.gateway.node_picker import LOADING_RETRY_AFTER
from tooti.identity import Identity
from tooti.mesh.events import BusEvent
from tooti.mesh.registry import Registry
from tooti.mesh.serves_log import ServesLog
from tooti.node.admin import NodeAdmin
from tooti.node.node import Node
from tooti.protocol import schemas
from tooti.protocol.errors import ProtocolError
from tooti.relay.role import RelayRole
from tooti.settings import (
    BackendSettings,
    GatewaySettings,
    GroupSettings,
    NodeSettings,
    RelaySettings,
    Settings,
    TunnelSettings,
)

LIMIT = 10.0
"""Seconds any wait in these tests may take."""
CHAT = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2}


class SlowToLoad(SimulatedBackend):
    """A simulated backend that loads until :attr:`loaded` is set: it knows its model
    from the start (``loading_models``, as the embedded llama.cpp backend does) and
    either its :meth:`start` waits for the event (``mode="start"``) or its
    :meth:`health` fails until then (``mode="health"``, a server loading its model)."""

    def __init__(self, mode: str = "start", **options: Any) -> None:
        super().__init__(BackendSettings(type="simulated", max_concurrency=1,
                                         options=options))
        self.mode = mode
        self.loaded = trio.Event()
        self.reloading = False
        """Set to fail health and name the model as loading again (a restart)."""

    async def start(self) -> None:
        if self.mode == "start":
            await self.loaded.wait()

    async def health(self) -> bool:
        return self.loaded.is_set() and self.healthy and not self.reloading

    def loading_models(self) -> list[ModelInfo]:
        if self.loaded.is_set() and not self.reloading:
            return []
        return [ModelInfo(id="tooti-sim")]


async def until(registry: Registry, condition: Callable[[], bool]) -> None:
    with trio.fail_after(LIMIT):
        await registry.wait_until(condition)


def loading_here(registry: Registry, node_id: str) -> bool:
    peer = registry.peers.get(node_id)
    return peer is not None and "tooti-sim" in peer.models and not peer.models[
        "tooti-sim"].ready


def ready_here(registry: Registry, node_id: str) -> bool:
    peer = registry.peers.get(node_id)
    return peer is not None and "tooti-sim" in peer.models and peer.models["tooti-sim"].ready


async def hold_a_stream(network: Network, client: httpx.AsyncClient,
                        nursery: trio.Nursery) -> None:
    """Start a streamed chat request in ``nursery`` (held until the nursery is
    cancelled); return once the gateway has routed it to a node."""
    routed = trio.Event()
    network.gateway.registry.bus.listeners.append(
        lambda event: routed.set() if event.kind == "request.routed" else None)

    async def held() -> None:
        try:
            await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        except httpx.HTTPError:
            pass

    nursery.start_soon(held)
    with trio.fail_after(LIMIT):
        await routed.wait()


async def add_loading_node(network: Network, backend: SlowToLoad, node_id: str = "node-a"
                           ) -> Node:
    """A node with ``backend``; returns once the gateway has its model as loading."""
    with trio.fail_after(LIMIT):
        node = await network.add_node([backend], node_id, wait=False, health_interval=0.05)
    await until(network.gateway.registry, lambda: loading_here(network.gateway.registry,
                                                               node_id))
    return node


@pytest.mark.parametrize("mode", ["start", "health"])
async def test_a_loading_model_is_503_model_loading_until_it_is_ready(
        network: Network, mode: str) -> None:
    backend = SlowToLoad(mode)
    await add_loading_node(network, backend)
    registry = network.gateway.registry
    async with network.client() as client:
        loading = await client.post("/v1/chat/completions", json=CHAT)
        assert loading.status_code == 503, loading.text
        error = loading.json()["error"]
        assert error["code"] == "model_loading"
        assert error["type"] == "service_unavailable"
        assert "tooti-sim" in error["message"] and "loading" in error["message"]
        assert loading.headers["retry-after"] == str(LOADING_RETRY_AFTER)
        # Streamed the same: refused before any byte of a stream.
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert streamed.status_code == 503 and streamed.json()["error"]["code"] == \
            "model_loading"
        # A model nobody announces is still unknown.
        unknown = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        # Liveness says the process runs; readiness says it cannot serve yet.
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        ready = await client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "not ready"
        assert "loading" in ready.json()["reason"]
        # Clients are not offered a model they cannot use yet.
        listed = await client.get("/v1/models")
        assert [m["id"] for m in listed.json()["data"]] == []
        # The admin snapshot shows the state.
        shown = (await client.get("/admin/v1/peers")).json()["data"]
        assert shown[0]["per_model"]["tooti-sim"]["state"] == "loading"

        backend.loaded.set()
        await until(registry, lambda: ready_here(registry, "node-a"))
        answer = await client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ready", "peers": 1, "models": 1}
        listed = await client.get("/v1/models")
        assert [m["id"] for m in listed.json()["data"]] == ["tooti-sim"]


async def test_requests_go_to_the_ready_nodes_while_others_load(network: Network) -> None:
    await network.add_node([simulated()], "node-ready")
    await add_loading_node(network, SlowToLoad(), "node-loading")
    routed: list[str] = []

    def note(event: BusEvent) -> None:
        if event.kind == "request.routed":
            routed.append(event.data["node"])

    network.gateway.registry.bus.listeners.append(note)
    async with network.client() as client:
        for _ in range(6):
            answer = await client.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200, answer.text
        ready = await client.get("/readyz")
    assert routed == ["node-ready"] * 6
    assert ready.status_code == 200 and ready.json()["peers"] == 1


async def test_a_node_that_stops_loading_without_being_ready_is_not_loading(
        network: Network) -> None:
    """A backend that gave up (its launch failed: not loading any more) takes its model
    off: the gateway answers no_capacity for the model it knew, never model_loading."""
    backend = SlowToLoad("health")
    await add_loading_node(network, backend)
    registry = network.gateway.registry
    backend.loading_models = lambda: []  # type: ignore[method-assign]
    await until(registry, lambda: not registry.peers["node-a"].models)
    async with network.client() as client:
        answer = await client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_capacity"


async def test_a_model_loading_in_another_group_is_no_capacity_here(
        nursery: trio.Nursery) -> None:
    """Node groups ``blue`` and ``red``: ``blue`` once had ``tooti-sim`` (its node left),
    ``red`` has it loading. A ``blue`` caller is told no_capacity (its nodes have none),
    never model_loading: how another group's nodes are doing is not its business."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10, groups={
        "blue": GroupSettings(join_token="join-blue", api_keys=["key-blue"]),
        "red": GroupSettings(join_token="join-red", api_keys=["key-red"])}), tunnel)
    network = Network(nursery, gateway, (await nursery.start(gateway.serve))[0], tunnel)
    registry = gateway.registry
    await network.add_node([simulated()], "node-blue", join_token="join-blue")
    with trio.fail_after(LIMIT):
        await network.add_node([SlowToLoad()], "node-red", wait=False,
                               join_token="join-red", health_interval=0.05)
    await until(registry, lambda: loading_here(registry, "node-red"))
    network.kill_node("node-blue")
    await until(registry, lambda: "node-blue" not in registry.peers)
    async with network.client() as client:
        blue, red = [await client.post("/v1/chat/completions", json=CHAT, headers={
            "authorization": f"Bearer {key}"}) for key in ("key-blue", "key-red")]
    assert blue.status_code == 503 and blue.json()["error"]["code"] == "no_capacity", \
        blue.text
    assert red.status_code == 503 and red.json()["error"]["code"] == "model_loading"
    gateway.shutdown()


async def test_a_queued_request_gets_model_loading_when_its_nodes_reload(
        network: Network) -> None:
    """A request waiting for a slot when its only node goes back to loading (a restarted
    model server) is answered 503 model_loading, not left waiting nor told no_capacity."""
    backend = SlowToLoad("health", ttft=30.0)
    backend.loaded.set()
    await network.add_node([backend], "node-a", health_interval=0.05)
    registry = network.gateway.registry
    await until(registry, lambda: ready_here(registry, "node-a"))
    async with network.client() as client, trio.open_nursery() as nursery:
        await hold_a_stream(network, client, nursery)  # takes the node's one slot
        answers: list[httpx.Response] = []
        answered = trio.Event()

        async def queued() -> None:
            async with network.client() as other:
                answers.append(await other.post("/v1/chat/completions", json=CHAT))
            answered.set()

        nursery.start_soon(queued)
        with trio.fail_after(LIMIT):
            while network.gateway.proxy.queued == 0:
                await trio.testing.wait_all_tasks_blocked()
        backend.reloading = True
        await until(registry, lambda: loading_here(registry, "node-a"))
        with trio.fail_after(LIMIT):
            await answered.wait()
        nursery.cancel_scope.cancel()
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["error"]["code"] == "model_loading"
    assert answers[0].headers["retry-after"] == str(LOADING_RETRY_AFTER)


async def test_readyz_is_503_during_drain(network: Network) -> None:
    await network.add_node([simulated(ttft=30.0)], "node-a")
    async with network.client() as client, trio.open_nursery() as nursery:
        assert (await client.get("/readyz")).status_code == 200
        await hold_a_stream(network, client, nursery)  # keeps the drain waiting
        nursery.start_soon(network.gateway.drain, 30.0)
        with trio.fail_after(LIMIT):
            await trio.testing.wait_all_tasks_blocked()
        assert network.gateway.station.draining
        async with network.client() as other:
            ready = await other.get("/readyz")
            health = await other.get("/healthz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "not ready", "reason": "draining"}
        assert health.status_code == 200 and health.json()["status"] == "draining"
        nursery.cancel_scope.cancel()


async def test_node_admin_readyz_follows_its_models(network: Network) -> None:
    backend = SlowToLoad()
    node = await add_loading_node(network, backend)
    admin = NodeAdmin(node, "127.0.0.1:0")
    urls = await network.nursery.start(admin.serve)
    try:
        async with httpx.AsyncClient(base_url=urls[0], timeout=LIMIT) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["reason"] == "still loading tooti-sim"
            assert (await client.get("/healthz")).status_code == 200
            backend.loaded.set()
            registry = network.gateway.registry
            await until(registry, lambda: ready_here(registry, "node-a"))
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["models"] == 1
            node.draining = True
            draining = await client.get("/readyz")
            assert draining.status_code == 503 and draining.json()["reason"] == "draining"
    finally:
        admin.shutdown()


async def _relay(network: Network, upstream: str) -> tuple[RelayRole, str]:
    settings = RelaySettings(peers=[upstream], id="relay-1", reconnect_initial=0.05,
                             reconnect_max=0.5)
    role = RelayRole(Settings(gateway=GatewaySettings(listen="127.0.0.1:0"),
                              tunnel=network.tunnel, relay=settings, drain_grace=0.5),
                     "relay-1", Identity.generate())
    urls = await network.nursery.start(role.serve)
    return role, urls[0]


async def test_relay_readyz_follows_its_upstream_link(network: Network) -> None:
    with trio.socket.socket() as unused:  # a port nobody listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    lonely, lonely_url = await _relay(network, f"ws://127.0.0.1:{port}/tooti/v1/tunnel")
    linked, linked_url = await _relay(network, network.tunnel_url)
    with trio.fail_after(LIMIT):
        while not linked.upstream.dialer.sessions:
            await linked.upstream.dialer.connected.wait()
    try:
        async with httpx.AsyncClient(timeout=LIMIT) as client:
            down = await client.get(f"{lonely_url}/readyz")
            up = await client.get(f"{linked_url}/readyz")
            health = await client.get(f"{lonely_url}/healthz")
    finally:
        lonely.station.shutdown()
        linked.station.shutdown()
    assert down.status_code == 503, down.text
    assert down.json()["reason"] == "no upstream link is up"
    assert up.status_code == 200 and up.json()["upstream"] == 1, up.text
    assert health.status_code == 200


async def test_a_relay_passes_the_loading_state_on(network: Network) -> None:
    relay, relay_url = await _relay(network, network.tunnel_url)
    backend = SlowToLoad()
    registry = network.gateway.registry
    try:
        with trio.fail_after(LIMIT):
            await network.add_node([backend], "node-far", wait=False, health_interval=0.05,
                                   peers=[relay_url.replace("http://", "ws://")
                                          + "/tooti/v1/tunnel"])
        await until(registry, lambda: loading_here(registry, "node-far"))
        assert registry.peers["node-far"].via == "relay-1"
        async with network.client() as client:
            loading = await client.post("/v1/chat/completions", json=CHAT)
            assert loading.status_code == 503
            assert loading.json()["error"]["code"] == "model_loading"
            backend.loaded.set()
            await until(registry, lambda: ready_here(registry, "node-far"))
            answer = await client.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200, answer.text
    finally:
        relay.station.shutdown()


# ------------------------------------------------------------ the wire


def test_an_entry_without_state_is_ready_and_a_loading_one_round_trips() -> None:
    old = schemas.model_entries([{"id": "m", "max_concurrency": 2}], 8)[0]
    assert old.state == "ready" and ModelInfo.from_wire(old).ready
    sent = ModelInfo(id="m", state="loading").to_wire()
    assert sent["state"] == "loading"
    back = ModelInfo.from_wire(schemas.model_entries([sent], 8)[0])
    assert back.state == "loading" and not back.ready


def test_a_gateway_ignores_members_it_does_not_know() -> None:
    """What makes the field compatible both ways: an entry's unknown members (as
    ``state`` is to a gateway older than it) are dropped, not refused."""
    entry = schemas.model_entries([{"id": "m", "future": {"x": 1}}], 8)[0]
    assert entry.id == "m"


@pytest.mark.parametrize("state", ["warming", "", 1, None, ["ready"]])
def test_an_unknown_state_is_refused(state: Any) -> None:
    with pytest.raises(ProtocolError) as refused:
        schemas.model_entries([{"id": "m", "state": state}], 8)
    assert refused.value.code == "bad_models" and "state" in str(refused.value)


async def test_a_peer_sending_an_unknown_state_is_cut_off(network: Network) -> None:
    registry = network.gateway.registry
    identity = Identity.generate()
    async with hostile_peer(network.tunnel_url, identity=identity) as peer:
        await peer.models([{"id": "m", "state": "bogus"}])
        with trio.fail_after(LIMIT):
            goaway = await peer.goaway()
    assert goaway is not None and goaway.code == "bad_models", goaway
    await until(registry, lambda: identity.id not in registry.peers)
    assert "m" not in registry.known_models


async def test_an_old_node_without_state_is_routable(network: Network) -> None:
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url) as peer:
        await peer.models([{"id": "m", "max_concurrency": 2}])
        await until(registry, lambda: bool(registry.serving("m")))
        assert not registry.loading("m")
        assert registry.ready_counts() == (1, 1)


async def test_a_peer_flipping_its_model_state_logs_a_bounded_number_of_lines(
        network: Network, caplog: pytest.LogCaptureFixture) -> None:
    """The INFO line says a model is still loading, then that it serves it; a peer
    flipping the state 60 times (within its control-frame limit) logs the burst only."""
    caplog.set_level("INFO", logger="tooti")
    registry = network.gateway.registry
    async with hostile_peer(network.tunnel_url) as peer:
        await peer.models([{"id": "m", "state": "loading"}])
        await until(registry, lambda: registry.loading("m"))
        await peer.models([{"id": "m", "state": "ready"}])
        await until(registry, lambda: bool(registry.serving("m")))
        for flip in range(60):
            await peer.models([{"id": "m", "state": ("loading", "ready")[flip % 2]}])
        await peer.models([{"id": "m", "state": "loading"}, {"id": "z"}])
        await until(registry, lambda: "z" in registry.known_models)
    lines = [r.getMessage() for r in caplog.records if " serves " in r.getMessage()]
    assert lines[0].endswith(" serves m (loading)") and lines[1].endswith(" serves m")
    assert len(lines) == ServesLog().burst, lines


# ------------------------------------------------------------ the embedded backend


@pytest.mark.llamacpp
@pytest.mark.skipif(not have_local_extra(), reason=LOCAL_EXTRA_HINT)
async def test_llamacpp_is_loading_until_its_launch_ends_and_not_after_a_failed_one(
        tmp_path: Path) -> None:
    """The embedded backend names its model as loading from the first second (before its
    child is even started); a launch that failed leaves it not loading any more."""
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    backend = LlamaCppBackend(BackendSettings(type="llamacpp", options={
        "model_path": str(junk), "startup_timeout": 60}))
    assert [info.id for info in backend.loading_models()] == ["gemma-3-270m"]
    node = Node(NodeSettings(peers=[]), TunnelSettings(), [backend], "n", dial=False)
    await node.refresh_models()
    assert node.loading and not node.models
    assert node.models_wire()[0]["state"] == "loading"
    with pytest.raises(LlamaCppStartError):
        await backend.start()
    assert backend.loading_models() == []
    await node.refresh_models()
    assert not node.loading and not node.models
    await backend.close()


# ------------------------------------------------------------ the counts /readyz reads


def _scan_counts(registry: Registry) -> tuple[set[str], dict[str, int], dict[str, int]]:
    """Ready peers, ready models and loading models, from scratch (a full scan)."""
    peers: set[str] = set()
    ready: dict[str, int] = {}
    loading: dict[str, int] = {}
    for peer in registry.peers.values():
        if not peer.live:
            continue
        for model, served in peer.models.items():
            counts = ready if served.ready else loading
            counts[model] = counts.get(model, 0) + 1
            if served.ready:
                peers.add(peer.id)
    return peers, ready, loading


async def test_a_slot_released_after_its_peer_stopped_being_live_keeps_the_counts() -> None:
    """A tunnel dropping with streams in flight: the peer stops being live, a stream
    releases its slot before the registry re-files the peer, then the peer leaves. The
    release re-evaluates the peer; the counts /readyz reads must follow it."""
    peer = make_peer("n01")
    registry = registry_of(peer)
    assert registry.ready_counts() == (1, 1)
    assert registry.slots.reserve(peer, "m")
    peer.draining = True
    registry.slots.release(peer, "m")
    registry.peer_updated(peer)
    assert registry.ready_counts() == (0, 0)
    registry.remove(peer)
    assert registry.ready_counts() == (0, 0)
    assert not registry.index.ready_peers and not registry.index.ready_models


async def test_random_changes_keep_the_ready_counts_exact() -> None:
    """Models, states, health and membership changed at random, and slots reserved and
    released (some after their peer's state flipped and before the registry re-files
    it, as when a tunnel drops with streams in flight): the counts match a full scan."""
    rng = random.Random(14)
    held: list[tuple[Any, str]] = []
    models = ("a", "b", "c")

    def some_models() -> list[ModelInfo]:
        return [ModelInfo(id=m, state=rng.choice(("ready", "loading")))
                for m in models if rng.random() < 0.5]

    peers = [make_peer(f"n{i:02d}") for i in range(16)]
    for peer in peers:
        peer.group = rng.choice(("", "", "g"))
    registry = registry_of(*peers)
    for _ in range(800):
        peer = rng.choice(peers)
        action = rng.randrange(8)
        if action == 6:
            model = rng.choice(models)
            if model in peer.models and registry.slots.reserve(peer, model):
                held.append((peer, model))
        elif action == 7 and held:
            holder, model = held.pop(rng.randrange(len(held)))
            flip = rng.random() < 0.5
            if flip:  # its state changes before the registry hears of it
                holder.draining = not holder.draining
            registry.slots.release(holder, model)
            if flip:
                registry.peer_updated(holder)
        elif action <= 1 and peer.id in registry.peers:
            registry.set_models(peer, some_models())
        elif action == 2:
            peer.draining = not peer.draining
            registry.peer_updated(peer)
        elif action == 3:
            registry.heartbeat(peer, {"healthy": rng.random() < 0.7})
        elif action == 4:
            peer.stats = {"healthy": rng.random() < 0.7}
            registry.changed()
        elif peer.id in registry.peers and rng.random() < 0.5:
            registry.remove(peer)
        elif peer.id not in registry.peers:
            registry.add(peer)
            registry.set_models(peer, some_models())
        ready_peers, ready, loading = _scan_counts(registry)
        assert registry.ready_counts() == (len(ready_peers), len(ready))
        index = registry.index
        assert index.ready_models == ready and index.loading_models == loading
        assert {p.id for p in index.ready_peers} == ready_peers
        for model in models:
            assert registry.loading(model) == (model in loading)
            assert bool(registry.serving(model)) == (model in ready)
            for group in ("", "g"):
                assert registry.loading(model, group) == any(
                    p.live and p.group == group and model in p.models
                    and not p.models[model].ready for p in registry.peers.values())
