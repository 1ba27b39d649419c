"""No background task can end the gateway: each long-lived task is fed poison (a ledger
row SQLite cannot store, a failing disk, a raising event listener, negative figures
for the Prometheus counters, a probe that raises, a billing plugin whose ``run``
raises) and the gateway must log, keep the bad record (quarantined, never lost) and
go on serving requests."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import simulated
from tests.hostile.ledgered import CHAT, LIMIT, LedgeredNetwork, start_ledgered
from tooti.billing import pipeline
from tooti.billing.base import RequestContext, Usage
from tooti.billing.ledger import FILENAME, QUARANTINE_FILE
from tooti.gateway import probe
from tooti.gateway.app import Gateway
from tooti.mesh.events import BusEvent
from tooti.settings import GatewaySettings, TunnelSettings

POISON = 10**20


def usage(prompt_tokens: int = 10, node_id: str = "node-a") -> Usage:
    """A usage record of ``prompt_tokens`` (which may be beyond what SQLite stores)."""
    return Usage(node_id=node_id, model="tooti-sim", prompt_tokens=prompt_tokens,
                 completion_tokens=2, status="ok")


def context(request_id: str) -> RequestContext:
    """A request context for a direct call to the ledger."""
    return RequestContext(request_id, "key-test", "tooti-sim", "chat/completions", False)


async def served(net: LedgeredNetwork) -> str:
    """A normal request through a node (started if needed) is answered; its request id."""
    with trio.fail_after(LIMIT):
        if "node-a" not in net.gateway.registry.peers:
            await net.add_node([simulated()], node_id="node-a")
        async with net.client() as http:
            response = await http.post(CHAT, json={
                "model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def quarantined(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The ledger's quarantine table by request id (the row decoded)."""
    db = sqlite3.connect(f"file:{data_dir / FILENAME}?mode=ro", uri=True)
    try:
        return {request_id: {"error": error, **json.loads(row)} for request_id, error, row
                in db.execute("SELECT request_id, error, row_json FROM usage_quarantine")}
    finally:
        db.close()


async def test_a_row_sqlite_cannot_store_is_quarantined_and_the_ledger_writes_on(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """Finding 1's last link: a batch holding a 10**20 count used to raise
    OverflowError out of ``UsageLedger.run``, ending the gateway and losing the batch."""
    net = await start_ledgered(nursery, tmp_path)
    assert net.ledger is not None
    async with trio.open_nursery() as settling:  # one batch: the poison and a good row
        settling.start_soon(net.ledger.settle, context("req_poison"), usage(POISON))
        settling.start_soon(net.ledger.settle, context("req_good"), usage(10))
    rows = await net.rows()
    assert rows["req_good"]["prompt_tokens"] == 10
    assert "req_poison" not in rows
    kept = quarantined(tmp_path)["req_poison"]
    assert kept["prompt_tokens"] == POISON and "OverflowError" in kept["error"]
    request_id = await served(net)
    assert request_id in await net.rows()


async def test_rows_the_database_refuses_entirely_go_to_a_file(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """A database that takes no row at all (here both tables are gone) loses nothing:
    the rows go to usage-quarantine.jsonl beside it, and the ledger keeps running."""
    net = await start_ledgered(nursery, tmp_path)
    assert net.ledger is not None
    db = sqlite3.connect(tmp_path / FILENAME)
    db.execute("DROP TABLE usage")
    db.execute("DROP TABLE IF EXISTS usage_quarantine")
    db.commit()
    db.close()
    await net.ledger.settle(context("req_lost"), usage(10))
    lines = (tmp_path / QUARANTINE_FILE).read_text().splitlines()
    [line] = [json.loads(text) for text in lines]
    assert json.loads(line["row"])["request_id"] == "req_lost"
    assert "no such table" in line["error"]
    await served(net)  # billing failed, the request did not


async def test_a_raising_event_listener_stops_neither_the_request_nor_other_listeners(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 3's second half: an exception in one synchronous listener used to stop
    the listeners after it and fail the request that published the event."""
    net = await start_ledgered(nursery, tmp_path)
    calls = 0

    def broken(event: BusEvent) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("listener bug")

    net.gateway.registry.bus.listeners.insert(0, broken)
    for _ in range(3):
        await served(net)
    await trio.testing.wait_all_tasks_blocked()  # the last request.finished is out
    assert calls > 3
    metrics = net.gateway.admin.metrics.render().decode()
    assert 'tooti_requests_total{model="tooti-sim",node="node-a",status="ok"} 3.0' in metrics
    reports = [r for r in caplog.records if "event listener" in r.getMessage()]
    assert len(reports) == 1  # rate-limited: once per listener and minute


async def test_negative_and_absurd_figures_do_not_break_the_metrics_listener(
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """Prometheus counters raise ValueError on a negative increment; the listener counts
    such figures (and NaN, infinities, 10**20) as zero, and later listeners still run."""
    net = await start_ledgered(nursery, tmp_path)
    seen: list[str] = []
    bus = net.gateway.registry.bus
    bus.listeners.append(lambda event: seen.append(event.kind))
    for bad in (-10**6, POISON, float("nan"), float("-inf")):
        bus.publish("request.finished", request_id="req_bad", status="ok", model="m",
                    node="n", prompt_tokens=bad, completion_tokens=bad, ttft_ms=bad,
                    latency_ms=bad)
    assert seen.count("request.finished") == 4
    metrics = net.gateway.admin.metrics.render().decode()
    assert 'tooti_tokens_total{kind="prompt",model="m",node="n"} 0.0' in metrics
    await served(net)


async def test_a_probe_that_raises_is_a_failed_probe_not_the_end_of_the_gateway(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probe tasks run in the gateway's nursery: one that raised used to end it."""
    raised = trio.Event()
    probes = 0

    async def raising_probe(*args: Any) -> str | None:
        nonlocal probes
        probes += 1
        if probes >= 2:  # the task lived on after the first exception
            raised.set()
        raise RuntimeError("probe bug")

    monkeypatch.setattr(probe, "probe_once", raising_probe)
    net = await start_ledgered(nursery, tmp_path, cooldown_seconds=0.01,
                               cooldown_max_seconds=0.05)
    await served(net)
    peer = net.gateway.registry.peers["node-a"]
    for _ in range(3):
        net.gateway.proxy.node_failed(peer, "tooti-sim", "injected failure")
    assert peer.health_of("tooti-sim").in_cooldown
    with trio.fail_after(LIMIT):
        await raised.wait()
    assert peer.health_of("tooti-sim").in_cooldown  # a raising probe is a failed probe
    await net.add_node([simulated()], node_id="node-b")
    async with net.client() as http:
        response = await http.post(CHAT, json={
            "model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.headers["x-tooti-node"] == "node-b"


class CrashingPlugin:
    """A billing plugin whose ``run`` raises the first time it is started."""

    def __init__(self) -> None:
        self.runs = 0
        self.restarted = trio.Event()

    async def run(self) -> None:
        """Raise on the first start; on the next, say so and idle."""
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("plugin bug")
        self.restarted.set()
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        """Admit everything."""

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        """Nothing to record."""

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        """Nothing to release."""

    async def close(self) -> None:
        """Nothing to release."""


async def test_a_billing_plugin_whose_run_raises_is_restarted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The billing nursery used to end (and the gateway with it) when a plugin's run
    raised; now the plugin is logged and started again."""
    monkeypatch.setattr(pipeline, "RESTART_DELAY", 0.01, raising=False)
    plugin = CrashingPlugin()
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"),
                      TunnelSettings(heartbeat_interval=0.5), billing=[plugin])
    urls = await nursery.start(gateway.serve)
    with trio.fail_after(LIMIT):
        await plugin.restarted.wait()
    assert any(r.levelno == logging.ERROR and "plugin bug" in (r.exc_text or "")
               for r in caplog.records)
    net = LedgeredNetwork(nursery, gateway, urls[0], gateway.station.tunnel_settings)
    await served(net)
    gateway.shutdown()
