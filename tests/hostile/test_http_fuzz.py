"""Fuzzing the gateway's HTTP request parsing, against a real gateway and a real node.

hypothesis writes whole requests: JSON bodies of random shape and depth (down to
100,000 levels), random bytes, huge and odd numbers, a wrong type for every field the
gateway reads, and heads with Content-Length wrong, negative, huge or repeated,
``Transfer-Encoding: chunked`` with bad chunks, random methods, paths and headers. The
examples run in a worker thread with blocking sockets while the gateway and node run
on the test's trio loop. Every answer must be a well-formed OpenAI error object or a
success; never a 500, an empty body, a hang, or a traceback in the log; the gateway
still serves a normal request afterwards.

A client either waits for its answer (an incomplete head or body then gets 408, after
header and body timeouts shortened to keep the run short), or half-closes right after
sending: the gateway takes that as the client leaving, like a reverse proxy does, so
an answer is optional then, but must still be well-formed when it comes. A client that
sends nothing at all is closed after the keep-alive timeout, without an answer.
"""

from __future__ import annotations

import socket
from typing import Any

import h11
import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Network, simulated
from tests.hostile.client import (
    TIMEOUT,
    Answer,
    ResponseReader,
    assert_error_object,
    assert_no_tracebacks,
)
from tests.test_websocket_transport import port_of
from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, TunnelSettings

MODEL = "tooti-sim"
EXAMPLES = 1500
PATIENCE = 0.2
"""The fuzzed gateway's header, body and keep-alive timeouts (an incomplete request
waits for them)."""
CHAT = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}

# ---------------------------------------------------------------- bodies

scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=20),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
odd_numbers = st.sampled_from([
    b"1e999", b"-1e999", b"1" * 5000, b"-0", b"0.0000000000000000000000001", b"1E+2",
    b"123456789012345678901234567890123456789", b"NaN", b"Infinity", b"0x10", b"01",
])


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([2, 127, 128, 129, 1000, 5000, 100_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    closed = draw(st.booleans())
    return opener * depth + b"1" + (closer * depth if closed else b"")


FIELDS = ["model", "messages", "stream", "stream_options", "temperature", "top_p",
          "presence_penalty", "frequency_penalty", "max_tokens", "max_completion_tokens",
          "n", "seed", "top_logprobs", "stop", "provider", "tooti", "models", "tools",
          "prompt", "input", "response_format", "logprobs", "user"]


@st.composite
def mistyped_chat(draw: st.DrawFn) -> bytes:
    """A valid request with one or more known fields given a random value."""
    body: dict[str, Any] = dict(CHAT)
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
        body[field] = draw(json_values)
    if body.get("stream") is True:
        body["max_tokens"] = 3
    raw = msgspec.json.encode(body)
    if draw(st.booleans()):  # and a number no JSON library would write
        number = draw(odd_numbers)
        raw = raw.replace(b'"max_tokens":3', b'"max_tokens":' + number, 1)
    return raw


bodies = st.one_of(
    st.just(msgspec.json.encode(CHAT)),
    mistyped_chat(), mistyped_chat(), mistyped_chat(),
    json_values.map(msgspec.json.encode),
    deep_json(),
    st.binary(max_size=200),
    odd_numbers,
)

# ---------------------------------------------------------------- heads

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
         "/healthz", "/metrics", "/admin/v1/peers", "/admin/v1/identities/x", "/nope",
         "/v1/chat/completions?x=%ff%00", "/%2e%2e/v1/models", "/tooti/v1/tunnel", "*"]
METHODS = ["POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "POST ", "P\x00ST", "CONNECT"]
token_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyz-_0123456789")
header_names = st.one_of(
    st.sampled_from(["x-a", "authorization", "content-type", "accept", "expect",
                     "connection", "host", "upgrade", "x-tooti-node"]),
    st.text(token_chars, min_size=1, max_size=12),
    st.sampled_from(["x-a", "accept"]),
    st.sampled_from(["user-agent", "x-request-id"]),
    st.text(min_size=1, max_size=6),  # anything at all, even invalid
)
header_values = st.one_of(
    st.sampled_from(["Bearer x", "application/json", "100-continue", "close",
                     "keep-alive", "websocket", "", " "]),
    st.text(token_chars, max_size=30),
    st.text(token_chars, max_size=30),
    st.text(max_size=30),  # anything at all, even invalid
)


@st.composite
def framing(draw: st.DrawFn, body: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """How the body is framed: right or wrong Content-Length, chunked (good or bad)."""
    kind = draw(st.sampled_from(["length"] * 12 + ["chunked"] * 3 + [
        "wrong-length", "negative", "huge", "text", "twice", "bad-chunks", "none"]))
    n = len(body)
    if kind == "length":
        return [("content-length", str(n))], body
    if kind == "wrong-length":
        return [("content-length", str(max(0, n + draw(st.integers(-50, 50)))))], body
    if kind == "negative":
        return [("content-length", str(-draw(st.integers(1, 10**6))))], body
    if kind == "huge":
        return [("content-length", str(draw(st.integers(4 * 2**20, 10**40))))], body
    if kind == "text":
        return [("content-length", draw(st.sampled_from(["x", "1.5", "0x10", "", "1 2"])))], body
    if kind == "twice":
        again = str(draw(st.integers(0, n + 5)))
        return [("content-length", str(n)), ("content-length", again)], body
    if kind == "chunked":
        cut = draw(st.integers(0, n))
        parts = [p for p in (body[:cut], body[cut:]) if p]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        return [("transfer-encoding", "chunked")], chunks
    if kind == "bad-chunks":
        bad = draw(st.sampled_from([
            b"zz\r\n" + body + b"\r\n0\r\n\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) + 3, body),
            b"-1\r\n\r\n",
            b"%x;ext=1\r\n%s\r\n0\r\n" % (len(body), body),
            b"ffffffffffffffffffff\r\n" + body,
            body,
        ]))
        return [("transfer-encoding", draw(st.sampled_from(["chunked", "chunked, gzip",
                                                             "identity"])))], bad
    return [], body


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Request bytes, and whether the client half-closes after them."""
    return draw(request_bytes()), draw(st.sampled_from([True] * 2 + [False] * 3))


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.sampled_from([True] + [False] * 19)):  # now and then, not HTTP at all
        return draw(st.binary(max_size=300))
    method = draw(st.sampled_from(["POST"] * len(METHODS) + METHODS))
    path = draw(st.sampled_from(["/v1/chat/completions"] * len(PATHS) + PATHS))
    body = draw(bodies)
    framed, payload = draw(framing(body))
    headers = [("host", "127.0.0.1")] if draw(st.sampled_from([True] * 19 + [False])) else []
    headers += framed
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=3)):
        if name.lower() == "upgrade" and path.startswith("/tooti/"):
            continue  # opening tunnels is not this fuzzer's business
        headers.append((name, value))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + payload


# ---------------------------------------------------------------- the check


def exchange_blocking(port: int, data: bytes, half_close: bool) -> Answer | None:
    """Send ``data`` (then half-close, if so), read one answer (None: the gateway closed
    without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway answered and closed before taking it all
        reader = ResponseReader()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            try:
                answer = reader.feed(chunk)
            except (AssertionError, h11.RemoteProtocolError):
                return None  # closed without an answer, or in the middle of one
            if answer is not None:
                return answer


def check(answer: Answer | None, data: bytes, half_closed: bool) -> None:
    if answer is None:
        # Only a client that left (its answer may be cut), or sent nothing, goes
        # without a whole answer.
        assert half_closed or not data.strip(b"\r\n"), data[:300]
        return
    assert answer.status != 500, (answer, data[:300])
    if answer.status >= 400:
        if answer.headers.get("content-type", "").startswith("text/plain"):
            # A WebSocket upgrade refused on a kept-alive path: a plain reason.
            assert b"websocket" in data.lower() and answer.body, (answer, data[:300])
        else:
            assert_error_object(answer)
    else:
        assert answer.status in (200, 101), (answer, data[:300])
        assert answer.body or answer.status == 101, (answer, data[:300])


async def test_fuzzed_requests_get_an_error_object_or_a_success(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", header_timeout=PATIENCE,
                                      body_timeout=PATIENCE, keep_alive_timeout=PATIENCE),
                      tunnel)
    network = Network(nursery, gateway, (await nursery.start(gateway.serve))[0], tunnel)
    await network.add_node(backends=[simulated(ttft=0.0, tokens_per_second=0.0)])
    port = port_of(network.url)
    seen: dict[int, int] = {}
    codes: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def fuzz(request: tuple[bytes, bool]) -> None:
        data, half_close = request
        answer = exchange_blocking(port, data, half_close)
        check(answer, data, half_close)
        status = answer.status if answer is not None else 0
        seen[status] = seen.get(status, 0) + 1
        if answer is not None and answer.status >= 400 and answer.body[:1] == b"{":
            code = str(msgspec.json.decode(answer.body)["error"]["code"])
            codes[code] = codes.get(code, 0) + 1

    await trio.to_thread.run_sync(fuzz)
    print("statuses seen:", dict(sorted(seen.items())), "error codes:", codes)
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0  # both ways were exercised
    assert_no_tracebacks(caplog)
    with trio.fail_after(TIMEOUT):
        async with network.client() as http:
            response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
