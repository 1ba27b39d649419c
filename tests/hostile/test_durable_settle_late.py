"""The exception to durable usage: a settle that does not finish within the pipeline's
timeout (a slow disk, a full ledger queue, a stuck plugin). The answer's last bytes go
to the client anyway (refusing a finished answer would be worse), and the gateway
counts it in ``tooti_usage_settle_late_total`` (it was only an error log)."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import Network, simulated
from tests.hostile.ledgered import LIMIT
from tooti.billing import pipeline
from tooti.billing.base import RequestContext, Usage
from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, TunnelSettings


class Stuck:
    """A billing plugin whose settle never returns."""

    async def run(self) -> None:
        await trio.sleep_forever()

    async def authorize(self, ctx: RequestContext) -> None:
        return None

    async def settle(self, ctx: RequestContext, usage: Usage) -> None:
        await trio.sleep_forever()

    async def refund(self, ctx: RequestContext, reason: str) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_late_settle_still_answers_and_is_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, stream: bool,
) -> None:
    monkeypatch.setattr(pipeline, "SETTLE_TIMEOUT", 0.05)
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", first_byte_timeout=10), tunnel,
                      billing=[Stuck()])
    urls = await nursery.start(gateway.serve)
    net = Network(nursery, gateway, urls[0], tunnel)
    await net.add_node([simulated()])
    with trio.fail_after(LIMIT):
        async with net.client() as http:
            response = await http.post("/v1/chat/completions", json={
                "model": "tooti-sim", "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 200
            if stream:
                assert response.text.endswith("data: [DONE]\n\n")
            metrics = (await http.get("/metrics")).text
    assert "tooti_usage_settle_late_total 1.0" in metrics
    gateway.shutdown()
