"""Finding 5: model-list amplification. With 100 nodes at the model cap (256 each),
``/v1/models`` and the admin snapshot stay cheap: the list is built once per change of
the live models, not per request, and the "peer X serves ..." log line names a few
models and a count. Prints the figures (time and size)."""

from __future__ import annotations

import logging
import time

import pytest
import trio

from tests.conftest import Network
from tooti.backends.simulated import SimulatedBackend
from tooti.node.node import Node
from tooti.protocol.schemas import ENDPOINTS
from tooti.settings import BackendSettings, NodeSettings
from tooti.transport.memory import memory_pair

NODES = 100
MODELS = 256


async def attach_nodes(network: Network, shared: bool) -> None:
    """``NODES`` in-process nodes of ``MODELS`` models each, joined in memory: the same
    model ids on every node (``shared``) or ids of their own."""
    gateway = network.gateway
    for n in range(NODES):
        ids = [f"model-{i:03d}" if shared else f"n{n:03d}-model-{i:03d}"
               for i in range(MODELS)]
        # the usual three endpoints (not every one the simulated backend can serve):
        # 256 long ids with all eight names each would not fit tunnel.max_control_bytes
        backend = SimulatedBackend(BackendSettings(type="simulated", models=ids,
                                                   endpoints=list(ENDPOINTS)))
        node = Node(NodeSettings(), network.tunnel, [backend], f"bulk-{n:03d}", dial=False)
        await network.nursery.start(node.run)
        dialer, acceptor = memory_pair()
        network.nursery.start_soon(gateway.station.admission.admit, acceptor)
        network.nursery.start_soon(node.serve_transport, dialer)
    registry = gateway.registry
    with trio.fail_after(60):
        await registry.wait_until(lambda: sum(len(p.models) for p in registry.peers.values())
                                  == NODES * MODELS)


@pytest.mark.parametrize("shared", [True, False], ids=["same-ids", "own-ids"])
async def test_models_list_is_cheap_at_100_nodes_at_the_model_cap(
        network: Network, shared: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tooti.gateway")
    await attach_nodes(network, shared)
    serves = [r.getMessage() for r in caplog.records if " serves " in r.getMessage()]
    assert len(serves) == NODES
    assert max(len(line) for line in serves) < 200, serves[0]  # a few models and a count
    gateway = network.gateway
    async with network.client() as http:
        started = time.perf_counter()
        first = await http.get("/v1/models")
        cold = time.perf_counter() - started
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            response = await http.get("/v1/models")
            timings.append(time.perf_counter() - started)
        assert response.status_code == 200
        started = time.perf_counter()
        peers = await http.get("/admin/v1/peers")
        admin = time.perf_counter() - started
    assert len(first.json()["data"]) == (MODELS if shared else NODES * MODELS)
    assert gateway.models.body() is gateway.models.body()  # built once, not per request
    started = time.perf_counter()
    snapshot = gateway.admin.snapshot()
    snap = time.perf_counter() - started
    assert len(snapshot["peers"]) == NODES
    warm = sorted(timings)[len(timings) // 2]
    print(f"\n/v1/models, {NODES} nodes x {MODELS} models ({'same' if shared else 'own'} "
          f"ids): {len(first.content) / 1e6:.2f} MB, first {cold * 1000:.1f} ms, then "
          f"{warm * 1000:.1f} ms (median of 20); /admin/v1/peers {len(peers.content) / 1e6:.2f}"
          f" MB in {admin * 1000:.1f} ms; snapshot() {snap * 1000:.1f} ms")
