"""A client that disconnects cancels the backend's upstream request (hypercorn trio backend)."""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.conftest import Network
from tests.upstream import SlowUpstream, backend_call_cancelled, start_upstream
from tooti.backends.openai import OpenAIBackend
from tooti.settings import BackendSettings


async def walk_away(network: Network, upstream: SlowUpstream, stream: bool) -> None:
    """Ask the slow upstream's model through the gateway and walk away: a stream after
    its first token, a whole answer before any byte (once the upstream has the request)."""
    body = {"model": "slow", "stream": stream, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(base_url=network.url, timeout=30) as http:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        break  # the first token arrived: now walk away
        else:
            async with trio.open_nursery() as inner:
                inner.start_soon(lambda: http.post("/v1/chat/completions", json=body))
                with trio.fail_after(10):
                    await upstream.started.wait()
                inner.cancel_scope.cancel()  # the client gives up before any byte


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_reaches_upstream(
    network: Network, nursery: trio.Nursery, stream: bool
) -> None:
    upstream = SlowUpstream()
    url = await start_upstream(nursery, upstream)
    await network.add_node([OpenAIBackend(BackendSettings(type="openai", url=url))])
    await walk_away(network, upstream, stream)
    await backend_call_cancelled(network, upstream)
