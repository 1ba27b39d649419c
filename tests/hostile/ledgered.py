"""A gateway with the built-in ``usage-ledger`` on a real port, for tests of what
reaches billing, and helpers to read its ledger and wait for bus events."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio.testing

from tests.conftest import Network, simulated
from tooti.billing.base import BillingSetup
from tooti.billing.ledger import FILENAME, UsageLedger
from tooti.gateway.app import Gateway
from tooti.mesh.events import BusEvent, Subscription
from tooti.settings import GatewaySettings, TunnelSettings

CHAT = "/v1/chat/completions"
LIMIT = 15.0
"""Seconds any wait here may take before it counts as a hang."""


@dataclass
class LedgeredNetwork(Network):
    """A :class:`Network` whose gateway bills into :attr:`ledger`."""

    ledger: UsageLedger | None = None
    data_dir: Path | None = None

    async def rows(self) -> dict[str, dict[str, Any]]:
        """Every ledger row by request id, once everything settled so far is written."""
        assert self.ledger is not None and self.data_dir is not None
        await trio.testing.wait_all_tasks_blocked()
        await self.ledger.flush()
        return ledger_rows(self.data_dir)


async def start_ledgered(nursery: trio.Nursery, data_dir: Path, **gateway: Any
                         ) -> LedgeredNetwork:
    """Start a gateway with a usage ledger in ``data_dir`` (extra ``gateway`` settings)."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    ledger = UsageLedger(BillingSetup(data_dir))
    settings = GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10, **gateway)
    gw = Gateway(settings, tunnel, billing=[ledger])
    urls = await nursery.start(gw.serve)
    return LedgeredNetwork(nursery, gw, urls[0], tunnel, ledger=ledger, data_dir=data_dir)


async def still_serves(net: Network) -> None:
    """An honest node joins and a normal chat request is answered."""
    await net.add_node([simulated()], node_id="honest")
    async with net.client() as http:
        response = await http.post(CHAT, json={
            "model": "tooti-sim", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text


def ledger_rows(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Every row of ``data_dir``'s usage ledger by request id (read-only)."""
    db = sqlite3.connect(f"file:{data_dir / FILENAME}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return {row["request_id"]: dict(row) for row in db.execute("SELECT * FROM usage")}
    finally:
        db.close()


async def next_event(sub: Subscription, kind: str, about: str | None = None) -> BusEvent:
    """The next event of ``kind`` on ``sub`` (one of whose values is ``about``, if given)."""
    with trio.fail_after(LIMIT):
        async for event in sub.receive:
            if event.kind == kind and (about is None or about in event.data.values()):
                return event
    raise AssertionError(f"the event stream ended before a {kind} event")
