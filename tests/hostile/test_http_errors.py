"""Finding 6: every error path a client can reach is answered with the OpenAI error
object, never an empty body, an empty 500 or a traceback in the log.

Raw requests on real sockets to a real gateway: JSON nested far too deep, request heads
h11 refuses (bad Content-Length, bad request line, bad headers, bad chunks), oversized
heads and bodies, and a genuine bug (a routing policy that raises), which is a 500 error
object naming the request id, logged as one line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import msgspec
import pytest
import trio

from tests.conftest import Network, simulated
from tests.hostile.client import (
    TIMEOUT,
    assert_error_object,
    assert_no_tracebacks,
    connect,
    exchange,
    read_response,
    request_bytes,
    start_network,
)
from tooti.gateway.app import Gateway
from tooti.mesh.peer import Peer
from tooti.routing.base import RouteRequest
from tooti.settings import GatewaySettings, TunnelSettings

MODEL = "tooti-sim"
CHAT = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
CHAT_PATH = "/v1/chat/completions"


def chat_request(body: bytes) -> bytes:
    return request_bytes("POST", CHAT_PATH, body)


@pytest.fixture
async def served(network: Network) -> AsyncIterator[Network]:
    """The shared gateway with one simulated node."""
    await network.add_node(backends=[simulated(ttft=0.0, tokens_per_second=1000.0)])
    yield network


async def assert_serves(network: Network) -> None:
    """A normal chat request still succeeds."""
    with trio.fail_after(TIMEOUT):
        async with network.client() as http:
            response = await http.post(CHAT_PATH, json=CHAT)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- nested JSON


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "tooti-sim", "messages": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
    b'{"model": "tooti-sim", "messages": ' + b"[" * 100_000,  # not even closed
], ids=["arrays", "objects", "unclosed"])
async def test_json_nested_100k_levels_is_a_400_error_object(
        served: Network, body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    answer = await exchange(served.url, chat_request(body))
    error = assert_error_object(answer, 400)
    assert error["code"] == "invalid_json"
    assert answer.headers["x-request-id"].startswith("req_")
    assert_no_tracebacks(caplog)
    await assert_serves(served)


def nested(depth: int) -> object:
    """A value whose arrays/objects nest ``depth`` deep."""
    value: object = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


async def test_json_deeper_than_max_json_depth_is_refused_and_at_it_served(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    network = await start_network(nursery, max_json_depth=8)
    await network.add_node()
    # The body object is level 1, so the value of "tools" may nest 7 deep.
    at_limit = msgspec.json.encode({**CHAT, "tools": nested(7)})
    too_deep = msgspec.json.encode({**CHAT, "tools": nested(8)})
    error = assert_error_object(await exchange(network.url, chat_request(too_deep)), 400)
    assert error["code"] == "invalid_json"
    assert "8" in str(error["message"])  # names the limit
    answer = await exchange(network.url, chat_request(at_limit))
    assert answer.status == 200, answer
    assert_no_tracebacks(caplog)


# ---------------------------------------------------------------- heads h11 refuses


BAD_HEADS = {
    "content-length-not-a-number": request_bytes("POST", CHAT_PATH, b"{}", [
        ("host", "x"), ("content-length", "nope")]),
    "content-length-negative": request_bytes("POST", CHAT_PATH, b"{}", [
        ("host", "x"), ("content-length", "-2")]),
    "content-length-twice-differing": request_bytes("POST", CHAT_PATH, b"{}", [
        ("host", "x"), ("content-length", "2"), ("content-length", "3")]),
    "bad-request-line": b"POST /v1/chat/completions HTTP/1.1 extra\r\nhost: x\r\n\r\n",
    "binary-request-line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "non-ascii-target": b"GET /v1/mod\xe9ls HTTP/1.1\r\nhost: x\r\n\r\n",
    "header-without-colon": b"GET /healthz HTTP/1.1\r\nhost: x\r\nno colon\r\n\r\n",
    "space-before-colon": b"GET /healthz HTTP/1.1\r\nhost : x\r\n\r\n",
    "control-byte-in-value": b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: b\x00c\r\n\r\n",
    "no-host": b"GET /healthz HTTP/1.1\r\n\r\n",
    "content-length-with-spaces-inside": b"POST /v1/chat/completions HTTP/1.1\r\n"
                                         b"host: x\r\ncontent-length: 1 2\r\n\r\n",
    "bad-chunk-size": request_bytes("POST", CHAT_PATH, b"zz\r\n{}\r\n0\r\n\r\n", [
        ("host", "x"), ("transfer-encoding", "chunked")]),
    "chunk-longer-than-said": request_bytes("POST", CHAT_PATH, b"1\r\n{}\r\n0\r\n\r\n", [
        ("host", "x"), ("transfer-encoding", "chunked")]),
}


@pytest.mark.parametrize("data", BAD_HEADS.values(), ids=BAD_HEADS.keys())
async def test_request_h11_refuses_gets_a_400_error_object(
        served: Network, data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    answer = await exchange(served.url, data)
    error = assert_error_object(answer, 400)
    assert error["code"] == "invalid_http_request"
    assert answer.headers["connection"] == "close"
    assert_no_tracebacks(caplog)
    await assert_serves(served)


async def test_unknown_transfer_coding_is_a_501_error_object(
        served: Network, caplog: pytest.LogCaptureFixture) -> None:
    answer = await exchange(served.url, request_bytes("POST", CHAT_PATH, b"{}", [
        ("host", "x"), ("transfer-encoding", "gzip")]))
    assert assert_error_object(answer, 501)["code"] == "invalid_http_request"
    assert_no_tracebacks(caplog)


async def test_bad_request_after_a_good_one_on_a_kept_alive_connection(
        served: Network) -> None:
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(request_bytes("GET", "/healthz"))
            assert (await read_response(stream)).status == 200
            await stream.send_all(BAD_HEADS["content-length-not-a-number"])
            assert_error_object(await read_response(stream), 400)


async def test_oversized_head_is_a_431_error_object(
        served: Network, caplog: pytest.LogCaptureFixture) -> None:
    # (h11 measures a head only while it is incomplete: this one spans several reads)
    data = request_bytes("GET", "/healthz", headers=[("host", "x"), ("x-big", "a" * 200_000)])
    answer = await exchange(served.url, data)
    error = assert_error_object(answer, 431)
    assert error["code"] == "headers_too_large"
    assert_no_tracebacks(caplog)
    await assert_serves(served)


# ---------------------------------------------------------------- huge bodies


async def test_huge_declared_body_is_a_413_before_any_body_byte(
        served: Network, caplog: pytest.LogCaptureFixture) -> None:
    """The refusal comes from the head alone: the client has sent no body byte (so
    nothing was buffered) when it reads the answer."""
    data = request_bytes("POST", CHAT_PATH, headers=[
        ("host", "x"), ("content-type", "application/json"),
        ("content-length", str(10**15))])
    answer = await exchange(served.url, data)
    error = assert_error_object(answer, 413)
    assert error["code"] == "request_too_large"
    assert_no_tracebacks(caplog)
    await assert_serves(served)


async def test_chunked_body_over_the_limit_is_a_413_while_it_streams(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    limit = 256 * 1024
    network = await start_network(nursery, max_body_bytes=limit)
    stream = await connect(network.url)
    sent = 0
    chunk = b"x" * 16384
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(request_bytes("POST", CHAT_PATH, headers=[
                ("host", "x"), ("transfer-encoding", "chunked")]))
            answered = trio.Event()

            async def flood() -> None:
                nonlocal sent
                try:
                    while not answered.is_set():  # a client that never stops sending
                        await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        sent += len(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as inner:
                inner.start_soon(flood)
                answer = await read_response(stream)
                answered.set()
                inner.cancel_scope.cancel()
    assert_error_object(answer, 413)
    assert_no_tracebacks(caplog)


# ---------------------------------------------------------------- a genuine bug


class BrokenPolicy:
    """A routing policy with a bug: every request it ranks raises."""

    def rank(self, request: RouteRequest, candidates: Sequence[Peer]) -> Sequence[Peer]:
        raise KeyError("a bug in a routing plugin")


async def test_unexpected_exception_is_a_500_error_object_logged_as_one_line(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), tunnel, policy=BrokenPolicy())
    network = Network(nursery, gateway, (await nursery.start(gateway.serve))[0], tunnel)
    await network.add_node()
    caplog.set_level(logging.INFO)
    ids = []
    for _ in range(3):
        answer = await exchange(network.url, chat_request(msgspec.json.encode(CHAT)))
        error = assert_error_object(answer, 500)
        assert error["code"] == "internal_error"
        request_id = answer.headers["x-request-id"]
        assert request_id in str(error["message"])
        ids.append(request_id)
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in lines] == [
        f"request {rid} failed: KeyError (an internal error)" for rid in ids]
    # The first occurrence carries its traceback; repeats within a minute do not.
    assert lines[0].exc_info is not None
    assert all(r.exc_info is None for r in lines[1:])
    assert not [r for r in caplog.records if r.name.startswith("hypercorn")]


async def test_an_error_answer_survives_the_bytes_the_client_still_sends(
        served: Network, caplog: pytest.LogCaptureFixture) -> None:
    """A malformed head followed by far more bytes than the server reads at once: it
    answers, half-closes and drops what still comes (a lingering close), so the client
    reads the whole 400 instead of a connection reset (closing with unread bytes makes
    the kernel send RST, which destroys an answer not yet read)."""
    head = request_bytes("POST", CHAT_PATH, b"", [
        ("host", "x"), ("content-length", "4"), ("content-length", "1")])
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(head + b"x" * 300_000)  # taken in while it lingers
            answer = await read_response(stream)
    assert assert_error_object(answer, 400)["code"] == "invalid_http_request"
    assert_no_tracebacks(caplog)
    await assert_serves(served)
