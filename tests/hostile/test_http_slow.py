"""Finding 7: slow and idle clients are not held.

Real sockets against a real gateway with short limits: a request head trickled in
byte by byte (slowloris) is answered 408 and closed ``header_timeout`` after its first
byte, whether it looks like API traffic, a tunnel upgrade or the second request of a
kept-alive connection; a body trickled in is answered 408 after ``body_timeout``;
2,000 connections that send nothing are all closed after ``keep_alive_timeout`` while
a normal request is served; a client that stops reading a long answer is disconnected
after ``send_timeout`` and the request ends.

The waits are guarded with generous margins over the configured limits (the old
behaviour held such connections for 75 s or forever); nothing sleeps to wait for a
condition: each test waits for the connection to close.
"""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
import trio

from tests.conftest import Network, simulated
from tests.hostile.client import (
    TIMEOUT,
    assert_error_object,
    assert_no_tracebacks,
    connect,
    read_response,
    read_to_eof,
    request_bytes,
    start_network,
)
from tooti.mesh.events import BusEvent

HEADER_TIMEOUT = 1.0
KEEP_ALIVE = 2.0
MARGIN = 5.0
"""How much later than its limit a connection may close before the test fails (the
old gateway held these connections 75 s or for ever)."""
CHAT = {"model": "tooti-sim", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def strict(nursery: trio.Nursery) -> AsyncIterator[Network]:
    """A gateway with short header and keep-alive limits, and a node."""
    network = await start_network(nursery, header_timeout=HEADER_TIMEOUT,
                                  keep_alive_timeout=KEEP_ALIVE, body_timeout=HEADER_TIMEOUT)
    await network.add_node()
    yield network
    network.gateway.shutdown()


async def trickle(stream: trio.SocketStream, data: bytes, interval: float = 0.05) -> None:
    """Send ``data`` one byte at a time, then keep sending header bytes forever."""
    try:
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.sleep(interval)  # pacing the attack, not waiting for anything
        while True:
            await stream.send_all(b"a")
            await trio.sleep(interval)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def slowloris(network: Network, head: bytes, before: bytes = b"") -> tuple[float, bytes]:
    """Trickle ``head`` (after ``before``, sent at once and answered); returns how long
    after the trickle started the gateway closed the connection, and what it sent."""
    stream = await connect(network.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            if before:
                await stream.send_all(before)
                assert (await read_response(stream)).status == 200
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            nursery.start_soon(trickle, stream, head)
            with trio.fail_after(HEADER_TIMEOUT + MARGIN):
                answer = await read_to_eof(stream)
            nursery.cancel_scope.cancel()
    return trio.current_time() - started, answer


SLOW_HEADS = {
    "api-request": b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ",
    "tunnel-upgrade": b"GET /tooti/v1/tunnel HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nx: ",
    "bare-prefix": b"GET /tooti/v1/tun",
}


@pytest.mark.parametrize("head", SLOW_HEADS.values(), ids=SLOW_HEADS.keys())
async def test_slowloris_head_is_answered_408_and_closed_within_the_header_timeout(
        strict: Network, head: bytes, caplog: pytest.LogCaptureFixture) -> None:
    elapsed, data = await slowloris(strict, head)
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    body = msgspec.json.decode(data.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "header_timeout"
    assert elapsed >= HEADER_TIMEOUT * 0.9  # not cut before its time either
    assert_no_tracebacks(caplog)


async def test_slowloris_on_a_kept_alive_connection_is_closed_too(strict: Network) -> None:
    elapsed, data = await slowloris(strict, SLOW_HEADS["api-request"],
                                    before=request_bytes("GET", "/healthz"))
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert elapsed >= HEADER_TIMEOUT * 0.9


async def test_body_trickled_in_is_answered_408_after_the_body_timeout(
        strict: Network, caplog: pytest.LogCaptureFixture) -> None:
    stream = await connect(strict.url)
    async with stream:
        head = request_bytes("POST", "/v1/chat/completions", headers=[
            ("host", "x"), ("content-type", "application/json"), ("content-length", "100000")])
        await stream.send_all(head + b'{"model": "tooti-sim", ')
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle, stream, b"")
            with trio.fail_after(HEADER_TIMEOUT + MARGIN):
                answer = await read_response(stream)
            nursery.cancel_scope.cancel()
    assert assert_error_object(answer, 408)["code"] == "body_timeout"
    assert_no_tracebacks(caplog)


IDLE_CONNECTIONS = 2000


@pytest.fixture
def descriptors() -> None:
    """Room for both ends of the idle connections in this one process: the soft limit
    on open files raised to the hard one (a common default of 1,024 is too few)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * IDLE_CONNECTIONS
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"needs {wanted} open files; the hard limit is {hard}")
SOURCES = 20
"""Client addresses the idle connections come from (``gateway.max_connections_per_ip``
and ``gateway.connection_burst`` bound what one address may open)."""


@pytest.mark.usefixtures("descriptors")
async def test_idle_connections_are_all_closed_while_requests_are_served(
        strict: Network) -> None:
    streams = []
    try:
        with trio.fail_after(TIMEOUT):
            for i in range(IDLE_CONNECTIONS):  # from many addresses, within each one's limits
                streams.append(await connect(strict.url, f"127.0.1.{i % SOURCES + 1}"))
            async with strict.client() as http:  # served while they are held
                response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
        closed = 0

        async def wait_closed(stream: trio.SocketStream) -> None:
            nonlocal closed
            assert await read_to_eof(stream) == b""  # closed without a word
            closed += 1

        with trio.fail_after(KEEP_ALIVE + MARGIN):
            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(wait_closed, stream)
        assert closed == IDLE_CONNECTIONS
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def test_kept_alive_connection_is_closed_after_the_idle_timeout(
        strict: Network) -> None:
    stream = await connect(strict.url)
    async with stream:
        await stream.send_all(request_bytes("GET", "/healthz"))
        with trio.fail_after(TIMEOUT):
            assert (await read_response(stream)).status == 200
        with trio.fail_after(KEEP_ALIVE + MARGIN):
            assert await read_to_eof(stream) == b""


async def test_client_that_stops_reading_is_disconnected_after_the_send_timeout(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    network = await start_network(nursery, send_timeout=1.0)
    await network.add_node(backends=[simulated(tokens=1_000_000)])
    finished = trio.Event()
    statuses: list[str] = []

    def on_event(event: BusEvent) -> None:
        if event.kind == "request.finished":
            statuses.append(event.data["status"])
            finished.set()

    network.gateway.registry.bus.listeners.append(on_event)
    body = msgspec.json.encode({**CHAT, "max_tokens": 1_000_000, "stream": True})
    stream = await connect(network.url)
    async with stream:
        await stream.send_all(request_bytes("POST", "/v1/chat/completions", body))
        with trio.fail_after(TIMEOUT):  # never reads: the answer fills the socket
            await finished.wait()
    assert statuses == ["cancelled"]
    assert_no_tracebacks(caplog)
    async with httpx.AsyncClient(base_url=network.url, timeout=TIMEOUT) as http:
        assert (await http.get("/healthz")).status_code == 200
