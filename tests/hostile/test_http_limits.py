"""Finding 7, continued: how many connections and tunnel handshakes a client may hold.

* Past ``max_connections`` a new connection is answered 503 (the OpenAI error object,
  with Retry-After) and closed, and is served again once a connection goes.
* Tunnel upgrades from one client IP are rate-limited (a token bucket) and capped in
  how many may be unfinished (upgraded, not yet proven) at once: the next one gets a
  plain 429 with the reason, while another IP (``127.0.0.2``) still gets through, and
  tunnels that completed their handshake no longer count.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.conftest import Network
from tests.hostile.client import (
    TIMEOUT,
    assert_error_object,
    assert_no_tracebacks,
    connect,
    exchange,
    read_head,
    read_response,
    read_to_eof,
    request_bytes,
    start_network,
    upgrade_bytes,
)

OTHER_IP = "127.0.0.2"


@asynccontextmanager
async def served_connections(url: str, count: int) -> AsyncIterator[list[trio.SocketStream]]:
    """``count`` connections to ``url``, each answered once (so each is surely open),
    closed on leaving."""
    held: list[trio.SocketStream] = []
    try:
        for _ in range(count):
            stream = await connect(url)
            held.append(stream)
            await stream.send_all(request_bytes("GET", "/healthz"))
            assert (await read_response(stream)).status == 200
        yield held
    finally:
        for stream in held:
            await trio.aclose_forcefully(stream)


# ---------------------------------------------------------------- connection cap


async def test_connection_past_the_limit_gets_503_and_is_served_once_one_goes(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    limit = 20
    network = await start_network(nursery, max_connections=limit)
    with trio.fail_after(TIMEOUT):
        async with served_connections(network.url, limit) as held:
            refused = await exchange(network.url, request_bytes("GET", "/healthz"))
            error = assert_error_object(refused, 503)
            assert error["code"] == "too_many_connections"
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"

            # One goes (the gateway closes its side too); then a newcomer is served.
            await held[0].send_eof()
            assert await read_to_eof(held[0]) == b""
            await trio.testing.wait_all_tasks_blocked()
            served = await exchange(network.url, request_bytes("GET", "/healthz"))
            assert served.status == 200
    warnings = [r.getMessage() for r in caplog.records if "max_connections" in r.getMessage()]
    assert warnings == [f"{limit} connections open (gateway.max_connections): refusing new ones"]
    assert_no_tracebacks(caplog)


# ---------------------------------------------------------------- per address


async def test_one_address_over_its_connection_cap_gets_429_while_another_is_served(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    """One address cannot take every connection slot: past ``max_connections_per_ip``
    it is refused (OpenAI error object, then close) while a second address is served,
    and it is served again once one of its connections goes."""
    cap = 5
    network = await start_network(nursery, max_connections_per_ip=cap)
    with trio.fail_after(TIMEOUT):
        async with served_connections(network.url, cap) as held:
            refused = await exchange(network.url, request_bytes("GET", "/healthz"))
            error = assert_error_object(refused, 429)
            assert error["code"] == "too_many_connections_per_ip"
            assert error["message"].startswith("too many open connections from 127.0.0.1")
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            other = await exchange(network.url, request_bytes("GET", "/healthz"), OTHER_IP)
            assert other.status == 200

            await held[0].send_eof()
            assert await read_to_eof(held[0]) == b""
            await trio.testing.wait_all_tasks_blocked()
            served = await exchange(network.url, request_bytes("GET", "/healthz"))
            assert served.status == 200
    warnings = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("connection from 127.0.0.1 refused")]
    assert len(warnings) == 1, warnings  # once a minute per address
    assert_no_tracebacks(caplog)


async def test_new_connections_from_one_address_are_rate_limited(
        nursery: trio.Nursery) -> None:
    burst = 4
    network = await start_network(nursery, connection_burst=burst, connection_rate=0.01)
    with trio.fail_after(TIMEOUT):
        for _ in range(burst):  # each closed after its answer: only the rate is at stake
            assert (await exchange(network.url, request_bytes("GET", "/healthz"))).status \
                == 200
        refused = await exchange(network.url, request_bytes("GET", "/healthz"))
        error = assert_error_object(refused, 429)
        assert error["code"] == "connection_rate_limited"
        assert error["message"].startswith("too many new connections from 127.0.0.1")
        assert int(refused.headers["retry-after"]) >= 1
        other = await exchange(network.url, request_bytes("GET", "/healthz"), OTHER_IP)
        assert other.status == 200


async def test_proven_tunnels_do_not_count_against_their_address_cap(
        nursery: trio.Nursery) -> None:
    """Many nodes behind one address (a NAT) can all join and stay, and the address
    can still open its ``max_connections_per_ip`` client connections beside them."""
    cap = 2
    network = await start_network(nursery, max_connections_per_ip=cap)
    with trio.fail_after(TIMEOUT):
        for name in ("node-a", "node-b", "node-c", "node-d"):
            await network.add_node(node_id=name)
    with trio.fail_after(TIMEOUT):
        async with served_connections(network.url, cap):
            refused = await exchange(network.url, request_bytes("GET", "/healthz"))
            assert assert_error_object(refused, 429)["code"] == "too_many_connections_per_ip"
    assert set(network.gateway.registry.peers) == {"node-a", "node-b", "node-c", "node-d"}


# ---------------------------------------------------------------- tunnel handshakes


async def upgrade(network: Network, source: str = "127.0.0.1"
                  ) -> tuple[trio.SocketStream, int, bytes]:
    """A raw tunnel upgrade from ``source``: the open stream, the status and what
    followed the head (for a refusal: its body)."""
    stream = await connect(network.url, source)
    with trio.fail_after(TIMEOUT):
        await stream.send_all(upgrade_bytes())
        head, rest = await read_head(stream)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            rest += await read_to_eof(stream)
    return stream, status, rest


async def fill_to_refusal(network: Network, allowed: int, reason_start: bytes,
                          streams: list[trio.SocketStream]) -> None:
    """``allowed`` upgrades from 127.0.0.1 succeed, the next is refused (429) with a
    reason starting ``reason_start``, and one from another address still succeeds; every
    stream opened is added to ``streams`` (the caller closes them)."""
    for _ in range(allowed):
        stream, status, _ = await upgrade(network)
        streams.append(stream)
        assert status == 101
    stream, status, reason = await upgrade(network)
    streams.append(stream)
    assert status == 429
    assert reason.startswith(reason_start), reason
    stream, status, _ = await upgrade(network, OTHER_IP)
    streams.append(stream)
    assert status == 101


async def test_handshake_flood_from_one_ip_is_limited_and_another_ip_is_not(
        nursery: trio.Nursery) -> None:
    burst = 5
    network = await start_network(nursery, tunnel_handshake_burst=burst,
                          tunnel_handshake_rate=0.001, tunnel_handshakes_per_ip=100)
    streams: list[trio.SocketStream] = []
    try:
        await fill_to_refusal(network, burst, b"too many tunnel handshakes from 127.0.0.1",
                              streams)
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def test_unfinished_handshakes_per_ip_are_capped_until_one_ends(
        nursery: trio.Nursery) -> None:
    cap = 3
    network = await start_network(nursery, tunnel_handshakes_per_ip=cap)
    streams: list[trio.SocketStream] = []
    try:  # upgraded, and then silent: no HELLO
        await fill_to_refusal(
            network, cap, b"too many unfinished tunnel handshakes from 127.0.0.1", streams)
        await trio.aclose_forcefully(streams[0])  # one half-open upgrade gives up
        await trio.testing.wait_all_tasks_blocked()
        stream, status, _ = await upgrade(network)
        streams.append(stream)
        assert status == 101
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def test_tunnels_that_finished_their_handshake_do_not_count(
        nursery: trio.Nursery) -> None:
    """Many nodes behind one address (a NAT) can all join: only unfinished handshakes
    count toward the per-IP cap."""
    network = await start_network(nursery, tunnel_handshakes_per_ip=2)
    with trio.fail_after(TIMEOUT):
        for name in ("node-a", "node-b", "node-c", "node-d"):
            await network.add_node(node_id=name)
    assert set(network.gateway.registry.peers) == {"node-a", "node-b", "node-c", "node-d"}


async def test_handshake_limit_applies_on_a_kept_alive_connection_too(
        nursery: trio.Nursery) -> None:
    """The ASGI way in (an upgrade after an HTTP request on the same connection)."""
    network = await start_network(nursery, tunnel_handshake_burst=1, tunnel_handshake_rate=0.001)
    first, status, _ = await upgrade(network)
    async with first:
        assert status == 101
        stream = await connect(network.url)
        async with stream:
            with trio.fail_after(TIMEOUT):
                await stream.send_all(request_bytes("GET", "/healthz"))
                assert (await read_response(stream)).status == 200
                await stream.send_all(upgrade_bytes())
                head, reason = await read_head(stream)
                reason += await read_to_eof(stream)
            assert head.startswith(b"HTTP/1.1 429 "), head
            assert b"too many tunnel handshakes from 127.0.0.1" in reason, reason  # chunked
