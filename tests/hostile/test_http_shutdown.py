"""Shutdown does not wait for connections that have not sent a request yet.

A connection still waiting for its first request head (silent, or part of a head
sent) is closed as soon as the gateway shuts down, instead of holding the shutdown
for up to the whole grace period. Timeouts and grace are an hour here, so only the
shutdown can close them.
"""

from __future__ import annotations

import trio
import trio.testing

from tests.hostile.client import (
    TIMEOUT,
    connect,
    read_head,
    read_response,
    read_to_eof,
    request_bytes,
    upgrade_bytes,
)
from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, TunnelSettings

HOUR = 3600.0


async def serving(nursery: trio.Nursery, gateway: Gateway) -> tuple[str, trio.Event]:
    """``gateway`` serving with an hour's grace: its URL, and an event set once
    ``serve`` has returned."""
    returned = trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await gateway.serve(grace=HOUR, task_status=task_status)
        returned.set()

    return (await nursery.start(run))[0], returned


async def test_shutdown_closes_connections_that_sent_no_request_yet() -> None:
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", keep_alive_timeout=HOUR,
                                      header_timeout=HOUR), TunnelSettings())
    async with trio.open_nursery() as nursery:
        url, served = await serving(nursery, gateway)
        silent = await connect(url)
        partial_head = await connect(url)
        await partial_head.send_all(b"GET /hea")
        kept_alive = await connect(url)  # between requests: hypercorn's, woken already
        with trio.fail_after(TIMEOUT):
            await kept_alive.send_all(request_bytes("GET", "/healthz"))
            assert (await read_response(kept_alive)).status == 200
        await trio.testing.wait_all_tasks_blocked()  # the gateway holds all three

        gateway.shutdown()
        with trio.fail_after(TIMEOUT):
            await served.wait()
            for stream in (silent, partial_head, kept_alive):
                assert await read_to_eof(stream) == b""
        for stream in (silent, partial_head, kept_alive):
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_that_arrives_as_shutdown_starts_is_closed_too(
        nursery: trio.Nursery) -> None:
    """A handler that starts after shutdown began (accepted just before) does not wait
    for its client either."""
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", keep_alive_timeout=HOUR),
                      TunnelSettings())
    url, done = await serving(nursery, gateway)
    stream = await connect(url)
    gateway.shutdown()  # before the listener's handler for it has run
    with trio.fail_after(TIMEOUT):
        await done.wait()
        assert await read_to_eof(stream) == b""
    await stream.aclose()


async def test_shutdown_closes_tunnels_whose_peer_has_not_proven_itself() -> None:
    """An upgraded tunnel that never sends HELLO is closed by the shutdown, not left
    to its handshake timeout (which would say ``handshake_timeout`` as it closes)."""
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), TunnelSettings())
    async with trio.open_nursery() as nursery:
        url, served = await serving(nursery, gateway)
        stream = await connect(url)
        with trio.fail_after(TIMEOUT):
            await stream.send_all(upgrade_bytes())
            head, rest = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 101 "), head
        await trio.testing.wait_all_tasks_blocked()

        gateway.shutdown()
        with trio.fail_after(3 * TIMEOUT):  # beyond the handshake timeout: see the reason
            await served.wait()
            rest += await read_to_eof(stream)
        assert b"handshake_timeout" not in rest, rest
        await stream.aclose()
        nursery.cancel_scope.cancel()
