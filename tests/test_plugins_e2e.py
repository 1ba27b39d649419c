"""Plugins end to end over real sockets: the ``region-affinity`` policy and the
``spend-cap`` + ``usage-ledger`` billing plugins, built through the plugin manager
exactly as ``tooti run`` builds them, and ``tooti usage`` over the resulting ledger."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import trio.testing
from tooti_spend_cap import SpendCap

from tests.conftest import Network
from tooti import plugins
from tooti.accounts.money import cost_micros, parse_credits, price_micros
from tooti.backends.simulated import SimulatedBackend
from tooti.billing.base import Billing, RequestContext, Usage
from tooti.billing.ledger import FILENAME, UsageLedger
from tooti.cli import main
from tooti.gateway.app import Gateway
from tooti.groups import key_id_of
from tooti.runner import build_gateway_plugins
from tooti.settings import (
    BackendSettings,
    BillingSettings,
    GatewaySettings,
    RoutingSettings,
    Settings,
    TunnelSettings,
)

TIMEOUT = 10
ALICE, BOB = "sk-alice-secret", "sk-bob-secret"


class Recorder:
    """A billing plugin listed after the real ones: once it has seen a request, every
    plugin before it has settled or refunded that request too (they run in order)."""

    def __init__(self) -> None:
        self.settled: dict[str, Usage] = {}
        self.refunded: dict[str, str] = {}
        self._changed = trio.Event()

    async def run(self) -> None:
        """Nothing in the background."""
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        """Admit everything."""

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        """Remember the usage and wake waiters."""
        self.settled[ctx.request_id] = usage
        self._wake()

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        """Remember the refund and wake waiters."""
        self.refunded[ctx.request_id] = reason
        self._wake()

    async def close(self) -> None:
        """Nothing to release."""

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, request_id: str) -> None:
        """Wait until billing is finished with ``request_id``."""
        with trio.fail_after(TIMEOUT):
            while request_id not in self.settled and request_id not in self.refunded:
                await self._changed.wait()


@dataclass
class Stack:
    """A gateway built from settings through the plugin manager, plus its nodes."""

    network: Network
    billing: list[Billing]
    recorder: Recorder = field(default_factory=Recorder)

    def plugin(self, kind: type[Any]) -> Any:
        """The billing plugin of class ``kind``."""
        return next(b for b in self.billing if isinstance(b, kind))


MakeStack = Callable[[Settings], Awaitable[Stack]]


@pytest.fixture
async def make_stack(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[MakeStack]:
    """Factory: a gateway on a loopback port with the policy and billing the settings
    name (loaded from entry points like ``tooti run``), ready for ``add_node``."""
    monkeypatch.delenv(plugins.AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(plugins.PLUGINS_DIR_ENV, raising=False)
    plugins.reset()
    gateways: list[Gateway] = []

    async def make(settings: Settings) -> Stack:
        policy, billing = build_gateway_plugins(settings)
        recorder = Recorder()
        tunnel = TunnelSettings(heartbeat_interval=0.5)
        gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10),
                          tunnel, policy, [*billing, recorder])
        urls = await nursery.start(gateway.serve)
        gateways.append(gateway)
        return Stack(Network(nursery, gateway, urls[0], tunnel), billing, recorder)

    yield make
    for gateway in gateways:
        gateway.shutdown()
    plugins.reset()


def sim(model: str, price_input: float = 0.0, price_output: float = 0.0,
        **options: Any) -> SimulatedBackend:
    """A simulated backend serving ``model`` at the given advertised prices."""
    return SimulatedBackend(BackendSettings(
        type="simulated", models=[model], price_input=price_input, price_output=price_output,
        options=options))


def chat(model: str, stream: bool = False, max_tokens: int = 5) -> dict[str, Any]:
    """A chat request body (prompt: two words)."""
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens, "stream": stream}


def auth(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"authorization": f"Bearer {key}"}


async def flush_ledger(ledger: UsageLedger) -> None:
    """Flush the SQLite ledger.

    ``UsageLedger.flush`` alone may return while ``run()`` still holds a row it has
    received but not yet written (core bug, see the report); once every task is
    blocked, ``run()`` is either idle or inside the write whose lock ``flush`` waits for.
    """
    await trio.testing.wait_all_tasks_blocked()
    await ledger.flush()


def ledger_rows(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Every ledger row by request id."""
    db = sqlite3.connect(f"file:{data_dir / FILENAME}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute("SELECT * FROM usage").fetchall()
    finally:
        db.close()
    assert len(rows) == len({row["request_id"] for row in rows})
    return {row["request_id"]: dict(row) for row in rows}


def cap_lines(path: Path) -> list[dict[str, Any]]:
    """The spend-cap JSON-lines log."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- (a) region-affinity


async def test_region_affinity_routes_by_region_header(make_stack: MakeStack,
                                                       tmp_path: Path) -> None:
    stack = await make_stack(Settings(
        data_dir=str(tmp_path),
        routing=RoutingSettings(policy="region-affinity", options={"default_region": "eu"}),
        billing=BillingSettings(plugins=[])))
    network = stack.network
    assert type(network.gateway.policy).__name__ == "RegionAffinity"
    with trio.fail_after(TIMEOUT):
        await network.add_node(node_id="node-eu", labels={"region": "eu"})
        await network.add_node(node_id="node-us", labels={"region": "us"})
    registry = network.gateway.registry
    assert registry.peers["node-us"].labels == {"region": "us"}

    async with network.client() as http:

        async def served_by(headers: dict[str, str], stream: bool = False) -> str:
            response = await http.post("/v1/chat/completions", json=chat("tooti-sim", stream),
                                       headers=headers)
            assert response.status_code == 200, response.text
            return response.headers["x-tooti-node"]

        with trio.fail_after(TIMEOUT):
            assert {await served_by({"x-tooti-region": "us"}) for _ in range(10)} == {"node-us"}
            assert await served_by({"x-tooti-region": "us"}, stream=True) == "node-us"
            assert await served_by({"X-Tooti-Region": "US"}) == "node-us"
            # No header: the default region.
            assert {await served_by({}) for _ in range(10)} == {"node-eu"}
            assert await served_by({}, stream=True) == "node-eu"
            # Several requests at once for us all stay in us (load only orders within a group).
            nodes: list[str] = []
            async with trio.open_nursery() as burst:
                for _ in range(6):
                    burst.start_soon(
                        lambda: _append(nodes, served_by({"x-tooti-region": "us"})))
            assert set(nodes) == {"node-us"}

            # A region with no node falls back to the others; so does one whose nodes left.
            assert await served_by({"x-tooti-region": "ap"}) in {"node-eu", "node-us"}
            network.kill_node("node-us")
            await registry.wait_until(lambda: "node-us" not in registry.peers)
            assert await served_by({"x-tooti-region": "us"}) == "node-eu"


async def _append(out: list[str], value: Awaitable[str]) -> None:
    out.append(await value)


# ---------------------------------------------------------------- (b) spend-cap + ledger

PRICES = {"node-a": (2.0, 6.0), "node-b": (1.0, 3.0)}
"""Advertised (input, output) prices per 1M tokens of each node's backends."""


async def add_billing_nodes(network: Network) -> None:
    """node-a serves a fast, a slow and a breaking model; node-b the fast one, cheaper."""
    with trio.fail_after(TIMEOUT):
        await network.add_node([
            sim("sim-fast", *PRICES["node-a"]),
            sim("sim-slow", *PRICES["node-a"], tokens=500, tokens_per_second=20),
            sim("sim-cut", *PRICES["node-a"], tokens=10, cut_after=3),
        ], node_id="node-a")
        await network.add_node([sim("sim-fast", *PRICES["node-b"])], node_id="node-b")


async def serve_every_kind(http: httpx.AsyncClient, recorder: Recorder) -> dict[str, str]:
    """A non-streamed, a streamed, a cancelled and a failed-mid-stream request; returns
    request id → kind once billing is done with all four."""
    served: dict[str, str] = {}
    with trio.fail_after(TIMEOUT):
        response = await http.post("/v1/chat/completions", json=chat("sim-fast"))
        assert response.status_code == 200
        served[response.headers["x-request-id"]] = "non-stream"

        async with http.stream("POST", "/v1/chat/completions",
                               json=chat("sim-fast", stream=True)) as response:
            assert response.status_code == 200
            body = (await response.aread()).decode()
        assert body.rstrip().endswith("data: [DONE]") and '"error"' not in body
        served[response.headers["x-request-id"]] = "stream"

        # The client leaves a slow stream after its first event.
        async with http.stream("POST", "/v1/chat/completions",
                               json=chat("sim-slow", stream=True, max_tokens=500)) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
        served[response.headers["x-request-id"]] = "cancelled"

        # The backend breaks after three chunks: an in-band error, then [DONE].
        async with http.stream("POST", "/v1/chat/completions",
                               json=chat("sim-cut", stream=True, max_tokens=10)) as response:
            assert response.status_code == 200
            body = (await response.aread()).decode()
        assert '"error"' in body and body.rstrip().endswith("data: [DONE]")
        served[response.headers["x-request-id"]] = "failed"

        for request_id in served:
            await recorder.wait_for(request_id)
    assert recorder.refunded == {}
    return served


async def test_spend_cap_and_usage_ledger_together(make_stack: MakeStack,
                                                   tmp_path: Path) -> None:
    cap = 60
    stack = await make_stack(Settings(
        data_dir=str(tmp_path),
        billing=BillingSettings(plugins=["spend-cap", "usage-ledger"],
                                options={"spend_cap_tokens": cap})))
    assert [type(b).__name__ for b in stack.billing] == ["SpendCap", "Credits"]
    spend_cap, ledger = stack.plugin(SpendCap), stack.plugin(UsageLedger)
    recorder, network = stack.recorder, stack.network
    await add_billing_nodes(network)

    alice = key_id_of(f"Bearer {ALICE}".encode())
    async with network.client(headers=auth(ALICE)) as http:
        served = await serve_every_kind(http, recorder)
        # Then non-streamed requests until the cap refuses.
        refused: httpx.Response | None = None
        with trio.fail_after(TIMEOUT):
            for _ in range(30):
                month_total = spend_cap.used(alice, spend_cap_month())
                response = await http.post("/v1/chat/completions", json=chat("sim-fast"))
                if response.status_code != 200:
                    refused = response
                    assert month_total >= cap
                    break
                assert month_total < cap
                served[response.headers["x-request-id"]] = "non-stream"
                await recorder.wait_for(response.headers["x-request-id"])
        assert refused is not None, "the spend cap never refused"

    assert refused.status_code == 429
    assert refused.json() == {"error": {
        "message": refused.json()["error"]["message"], "type": "insufficient_quota",
        "param": None, "code": "spend_cap_reached"}}
    assert "monthly token cap reached" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) > 0
    refused_id = refused.headers["x-request-id"]
    assert refused_id not in recorder.settled and refused_id not in recorder.refunded

    # The official client sees an OpenAI rate-limit error with the code.
    client = openai.AsyncOpenAI(base_url=network.url + "/v1", api_key=ALICE, max_retries=0)
    with trio.fail_after(TIMEOUT), pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(**chat("sim-fast"))
    assert info.value.code == "spend_cap_reached"
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "insufficient_quota"
    # Another key still has its own budget.
    async with network.client(headers=auth(BOB)) as http:
        with trio.fail_after(TIMEOUT):
            response = await http.post("/v1/chat/completions", json=chat("sim-fast"))
            assert response.status_code == 200
            served[response.headers["x-request-id"]] = "non-stream"
            await recorder.wait_for(response.headers["x-request-id"])

    with trio.fail_after(TIMEOUT):
        await spend_cap.flush()
        await flush_ledger(ledger)

    # Exactly one record per served request id, in both.
    lines = cap_lines(tmp_path / "spend-cap.jsonl")
    assert sorted(line["request_id"] for line in lines) == sorted(served)
    rows = ledger_rows(tmp_path)
    assert set(rows) == set(served)
    assert {row["key_id"] for row in rows.values()} == {alice, key_id_of(f"Bearer {BOB}".encode())}
    for row in rows.values():
        assert (row["price_input"], row["price_output"]) == tuple(
            price_micros(price) for price in PRICES[row["node_id"]])  # integer micro-units
        assert row["cost"] == cost_micros(row["prompt_tokens"], row["completion_tokens"],
                                          row["price_input"], row["price_output"])
        line = next(line for line in lines if line["request_id"] == row["request_id"])
        assert (line["prompt_tokens"], line["completion_tokens"], line["status"]) == (
            row["prompt_tokens"], row["completion_tokens"], row["status"])
        assert line["tokens"] == row["prompt_tokens"] + row["completion_tokens"]

    kinds = {kind: [rows[rid] for rid, k in served.items() if k == kind]
             for kind in ("non-stream", "stream", "cancelled", "failed")}
    for row in kinds["non-stream"]:
        assert (row["model"], row["stream"], row["estimated"]) == ("sim-fast", 0, 0)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (2, 5)
    [stream] = kinds["stream"]
    assert (stream["model"], stream["stream"], stream["estimated"]) == ("sim-fast", 1, 0)
    assert (stream["prompt_tokens"], stream["completion_tokens"]) == (2, 5)
    [cancelled] = kinds["cancelled"]
    assert (cancelled["status"], cancelled["model"], cancelled["node_id"]) == (
        "cancelled", "sim-slow", "node-a")
    assert (cancelled["stream"], cancelled["estimated"]) == (1, 1)
    assert cancelled["prompt_tokens"] > 0  # estimated from the body size
    assert 1 <= cancelled["completion_tokens"] < 500
    [failed] = kinds["failed"]
    assert (failed["model"], failed["node_id"]) == ("sim-cut", "node-a")
    assert (failed["stream"], failed["estimated"], failed["completion_tokens"]) == (1, 1, 3)


async def test_ledger_status_says_how_each_request_ended(make_stack: MakeStack,
                                                         tmp_path: Path) -> None:
    stack = await make_stack(Settings(data_dir=str(tmp_path)))
    await add_billing_nodes(stack.network)
    async with stack.network.client() as http:
        served = await serve_every_kind(http, stack.recorder)
    with trio.fail_after(TIMEOUT):
        await flush_ledger(stack.plugin(UsageLedger))
    rows = ledger_rows(tmp_path)
    statuses = {kind: rows[rid]["status"] for rid, kind in served.items()}
    assert statuses == {"non-stream": "ok", "stream": "ok", "cancelled": "cancelled",
                        "failed": "failed_midstream"}


async def test_failed_midstream_request_is_billed_for_its_prompt(make_stack: MakeStack,
                                                                 tmp_path: Path) -> None:
    stack = await make_stack(Settings(data_dir=str(tmp_path)))
    await add_billing_nodes(stack.network)
    async with stack.network.client() as http:
        with trio.fail_after(TIMEOUT):
            async with http.stream("POST", "/v1/chat/completions",
                                   json=chat("sim-cut", stream=True)) as response:
                await response.aread()
            request_id = response.headers["x-request-id"]
            await stack.recorder.wait_for(request_id)
    usage = stack.recorder.settled[request_id]
    assert (usage.completion_tokens, usage.estimated) == (3, True)
    assert usage.prompt_tokens > 0


def spend_cap_month() -> str:
    """The current month as the spend-cap plugin keys its totals."""
    return time.strftime("%Y-%m", time.gmtime())


# ---------------------------------------------------------------- (c) tooti usage


async def test_tooti_usage_summarises_the_ledger(
    make_stack: MakeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    stack = await make_stack(Settings(data_dir=str(tmp_path),
                                      routing=RoutingSettings(policy="round-robin")))
    assert [type(b).__name__ for b in stack.billing] == ["Credits"]  # the default
    network = stack.network
    with trio.fail_after(TIMEOUT):
        await network.add_node([sim("sim-a", 1.0, 2.0), sim("sim-b", 1.0, 2.0)],
                               node_id="node-a")
        await network.add_node([sim("sim-a", 10.0, 20.0)], node_id="node-b")
    plan = [(ALICE, "sim-a"), (ALICE, "sim-a"), (ALICE, "sim-b"), (BOB, "sim-a"),
            (BOB, "sim-b")]
    served: list[tuple[str, str, str]] = []
    async with network.client() as http:
        with trio.fail_after(TIMEOUT):
            for key, model in plan:
                response = await http.post("/v1/chat/completions", json=chat(model),
                                           headers=auth(key))
                assert response.status_code == 200
                served.append((key_id_of(f"Bearer {key}".encode()), model,
                               response.headers["x-tooti-node"]))
                await stack.recorder.wait_for(response.headers["x-request-id"])
            await flush_ledger(stack.plugin(UsageLedger))

    assert main(["usage", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sections = _sections(out)
    assert list(sections) == ["key", "model", "node"]
    for by, index in (("key", 0), ("model", 1), ("node", 2)):
        expected: dict[str, int] = {}
        for record in served:
            expected[record[index]] = expected.get(record[index], 0) + 1
        assert {group: row[0] for group, row in sections[by].items()} == expected, out
    # Every request: 2 prompt + 5 completion tokens, at the serving node's prices.
    for node, (requests, prompt, completion, cost) in sections["node"].items():
        price_in, price_out = (1, 2) if node == "node-a" else (10, 20)  # credits per 1M
        assert (prompt, completion) == (2 * requests, 5 * requests)
        assert cost == prompt * price_in + completion * price_out  # micro-units, exact


def _sections(out: str) -> dict[str, dict[str, tuple[int, int, int, int]]]:
    """Parse ``tooti usage`` output: section → group → (requests, prompt, completion,
    cost in micro-units)."""
    sections: dict[str, dict[str, tuple[int, int, int, int]]] = {}
    current: dict[str, tuple[int, int, int, int]] | None = None
    for line in out.splitlines():
        if line.startswith("by ") and line.endswith(":"):
            current = sections.setdefault(line[3:-1], {})
            continue
        fields = line.split()
        if current is None or len(fields) != 6 or not fields[1].isdigit():
            continue  # blank lines and column headings
        current[fields[0]] = (int(fields[1]), int(fields[2]), int(fields[3]),
                              parse_credits(fields[4]))
    return sections
