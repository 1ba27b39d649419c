"""Bug 5 of issue 14: an open admin events stream (``tooti tui``) must not hold a
gateway's drain for its whole grace. The stream ends when the drain starts (with a
``dropped`` event naming the shutdown), one opened during the drain ends at once, and
the drain returns as soon as the ``/v1`` requests are done."""

from __future__ import annotations

import json

import httpx
import trio

from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, TunnelSettings

GRACE = 30.0
"""The drain's grace: far longer than the test may take (``trio.fail_after(5)``)."""


def events_of(lines: list[str]) -> list[tuple[str, dict[str, object]]]:
    """The (event kind, data) pairs of an SSE transcript."""
    found: list[tuple[str, dict[str, object]]] = []
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            found.append((kind, json.loads(line.removeprefix("data: "))))
    return found


async def test_an_open_events_stream_ends_at_drain_and_the_gateway_stops_early() -> None:
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), TunnelSettings())
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await gateway.serve(task_status=task_status, grace=GRACE)
            finally:
                stopped.set()

        url = (await nursery.start(serve))[0]
        with trio.fail_after(5):  # well before the 30 s grace
            async with httpx.AsyncClient(base_url=url, timeout=GRACE) as http, \
                    http.stream("GET", "/admin/v1/events") as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                received = [await anext(lines)]  # the snapshot is under way
                async with trio.open_nursery() as drains:
                    drains.start_soon(gateway.drain, GRACE)
                    received += [line async for line in lines]  # ends: not at the grace
                    # A stream opened during the drain (the TUI reconnecting) ends at once.
                    late = await http.get("/admin/v1/events")
            await stopped.wait()  # the drain returned and the gateway stopped
    kinds = [kind for kind, _ in events_of(received)]
    assert kinds[0] == "snapshot" and kinds[-1] == "dropped"
    assert events_of(received)[-1][1] == {"reason": "gateway shutting down"}
    assert late.status_code == 200
    late_events = events_of(late.text.splitlines())
    assert [kind for kind, _ in late_events] == ["snapshot", "dropped"]
