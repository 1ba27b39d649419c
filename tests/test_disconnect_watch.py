"""The gateway's :class:`~tooti.mesh.http.DisconnectWatch`: on tooti's own HTTP/1.1
connections (plain TCP) a client that walks away is seen without a watcher task per
request, and its cancellation still reaches the backend; a client that stays is served
without any task spawned for its request."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.conftest import Network
from tests.test_e2e_cancellation import walk_away
from tests.upstream import SlowUpstream, backend_call_cancelled, start_upstream
from tooti.backends.openai import OpenAIBackend
from tooti.settings import BackendSettings


class Spawns(trio.abc.Instrument):
    """Names of the tasks spawned while installed."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)

    def watchers(self) -> list[str]:
        """The watcher tasks of :func:`~tooti.mesh.http.cancel_on_disconnect`."""
        return [name for name in self.names if "cancel_on_disconnect" in name]


@pytest.mark.parametrize("stream", [True, False])
async def test_walk_away_is_seen_by_the_watch_and_reaches_the_upstream(
    network: Network, nursery: trio.Nursery, stream: bool
) -> None:
    upstream = SlowUpstream()
    url = await start_upstream(nursery, upstream)
    await network.add_node([OpenAIBackend(BackendSettings(type="openai", url=url))])
    assert network.gateway.disconnects.running
    spawns = Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        await walk_away(network, upstream, stream)
        await backend_call_cancelled(network, upstream)
    finally:
        trio.lowlevel.remove_instrument(spawns)
    # The fake upstream (tests/upstream.py, on hypercorn) watches its own request with
    # cancel_on_disconnect's task: that one task only; none for the gateway's request.
    assert len(spawns.watchers()) == 1, spawns.names


async def test_a_served_request_spawns_no_gateway_task(network: Network) -> None:
    await network.add_node()
    body: dict[str, Any] = {"model": "tooti-sim",
                            "messages": [{"role": "user", "content": "hi"}]}
    async with network.client() as http:
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        spawns = Spawns()
        trio.lowlevel.add_instrument(spawns)
        try:
            for _ in range(3):
                answer = await http.post("/v1/chat/completions", json=body)
                assert answer.status_code == 200
        finally:
            trio.lowlevel.remove_instrument(spawns)
    # Tasks of the node side (its stream handler) and of httpx may appear; none of the
    # gateway's request path (the watcher task before DisconnectWatch).
    assert not [name for name in spawns.names if "tooti.mesh.http" in name], spawns.names
