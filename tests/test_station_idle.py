"""Station.wait_idle: returns at once with no request in flight, else when the last one
ends (the drain waits on it), however many requests overlap."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from tooti.mesh.http import Headers, Receive, Scope, Send
from tooti.mesh.station import Station
from tooti.settings import GatewaySettings, TunnelSettings


async def test_wait_idle_follows_the_requests_in_flight() -> None:
    station = Station(GatewaySettings(), TunnelSettings())
    release = trio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send, request_id: str,
                   headers: Headers) -> None:
        await release.wait()

    station.mount("/slow/", slow)
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/slow/x",
                             "headers": []}

    async def nothing(message: dict[str, Any]) -> None:
        pass

    async def no_body() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    with trio.fail_after(1):
        await station.wait_idle()  # nothing in flight
    idle = False
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(station, scope, no_body, nothing)
        await trio.testing.wait_all_tasks_blocked()
        assert station.in_flight == 2

        async def waiter() -> None:
            nonlocal idle
            await station.wait_idle()
            idle = True

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not idle
        release.set()
    assert idle and station.in_flight == 0
    with trio.fail_after(1):
        await station.wait_idle()
