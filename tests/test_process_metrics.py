"""The process figures every ``/metrics`` carries: ``tooti_tasks`` (trio tasks counted
at scrape time), ``process_open_fds`` and the memory gauges, on a gateway's ``/metrics``
and on a node's admin ``/metrics`` (what ``bench/soak.py`` samples to find leaks)."""

from __future__ import annotations

import re

import httpx
import trio
import trio.testing

from tests.conftest import Network
from tooti.admin.metrics import count_tasks, process_metrics
from tooti.node.admin import NodeAdmin


def _gauge(text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in a Prometheus text exposition."""
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from:\n{text}"
    return float(match.group(1))


def test_tasks_are_only_counted_inside_a_trio_run() -> None:
    assert count_tasks() is None
    assert "tooti_tasks" not in process_metrics().decode()
    assert "process_open_fds" in process_metrics().decode()


async def test_tasks_count_every_live_task() -> None:
    before = count_tasks()
    assert before is not None and before >= 2  # trio's init task and this one
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(release.wait)
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == before + 5
        text = process_metrics().decode()
        assert _gauge(text, "tooti_tasks") == before + 5
        release.set()
    assert count_tasks() == before


async def test_gateway_metrics_carry_tasks_and_open_fds(network: Network) -> None:
    async with network.client() as http:
        text = (await http.get("/metrics")).text
        await network.add_node(node_id="counted")
        more = (await http.get("/metrics")).text
    assert _gauge(text, "process_open_fds") > 0
    assert _gauge(text, "process_resident_memory_bytes") > 0
    # the gateway and the node share this test's trio run: the node's tasks add up
    assert _gauge(more, "tooti_tasks") > _gauge(text, "tooti_tasks") > 0
    assert 'tooti_peers{state="live"} 1.0' in more


async def test_node_admin_serves_process_metrics(network: Network) -> None:
    node = await network.add_node(node_id="node-m")
    admin = NodeAdmin(node, "127.0.0.1:0")
    urls = await network.nursery.start(admin.serve)
    try:
        async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
            answer = await client.get("/metrics")
            refused = await client.post("/metrics")
    finally:
        admin.shutdown()
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert _gauge(answer.text, "tooti_tasks") > 0
    assert _gauge(answer.text, "process_open_fds") > 0
    assert "tooti_requests_total" not in answer.text  # a node has no request counters
    assert refused.status_code == 405
