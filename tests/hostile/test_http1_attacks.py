"""Hostile clients against tooti's own HTTP/1.1 server (:mod:`tooti.mesh.http1`).

Real loopback sockets, hand-written bytes, a recording echo app behind the real
listener (and the real gateway where the app matters). What is pinned:

* **Request smuggling** is refused, never served: Content-Length with
  Transfer-Encoding (either order), two Content-Lengths (equal or not, or a list), a
  Transfer-Encoding other than a lone ``chunked`` (``chunked, identity``, or
  ``gzip`` and ``chunked`` on two lines, which the server once read as ``chunked``),
  obs-fold, bare LF, NUL/CR/control bytes in a header, an overflowing or signed chunk
  size, a NUL in a chunk extension, two Host headers (RFC 9112 3.2). Each gets the
  OpenAI error object (400, or 501 for a transfer coding) and the connection closes:
  the bytes after the refused head are never served as a request.
* **Trailers and chunk headers** are bounded like a head (an endless trailer section,
  or one endless trailer value, was held in memory without limit) and trailer fields
  never reach the request's headers.
* **An ignored upgrade with a body** (``curl --http2 -d`` and Java's HttpClient send
  ``Upgrade: h2c`` on every cleartext POST) is served with its body, as hypercorn did;
  the server had answered 400.
* **Keep-alive**: bytes that begin no request (CRLFs) do not keep an idle connection
  past ``keep_alive_timeout``; an HTTP/1.0 keep-alive request is told
  ``connection: keep-alive``; a good-good-bad pipeline is answered in order; a 204
  carries no Content-Length; HEAD/304 carry no body and the connection carries on.
* **Disconnects**: a client that leaves mid-body gives the app ``http.disconnect``.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from tests.conftest import Network, simulated
from tests.hostile.client import (
    TIMEOUT,
    assert_error_object,
    connect,
    read_response,
    read_to_eof,
)
from tests.test_http1 import Receive, Scope, Send, Served, read_response_from, serve_app

CHAT = {"model": "tooti-sim", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
KEEP_ALIVE = 1.0
MARGIN = 5.0


class Recorder:
    """An ASGI app that reads the body (unless the path says ``/noread``), records
    ``(method, path, body, headers)`` and answers ``<method> <path> <body>``; ``/status/N``
    answers status N with a content-length of 4."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, list[tuple[bytes, bytes]]]] = []
        self.disconnects: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                self.disconnects.append(scope["path"])
                return
            body += message["body"]
            if not message.get("more_body", False):
                break
        self.seen.append((scope["method"], scope["path"], body, list(scope["headers"])))
        status, headers = 200, [(b"content-type", b"text/plain")]
        payload = b"%s %s %s" % (scope["method"].encode(), scope["path"].encode(), body)
        if scope["path"].startswith("/status/"):
            status = int(scope["path"].split("/")[2])
            headers, payload = [(b"content-length", b"4")], b"abcd"
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    @property
    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.seen]


@pytest.fixture
async def recorded(nursery: trio.Nursery) -> Any:
    app = Recorder()
    served = await serve_app(nursery, app, keep_alive_timeout=KEEP_ALIVE,
                             header_timeout=KEEP_ALIVE)
    yield served, app
    served.shutdown()


AFTER = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
H = b"POST / HTTP/1.1\r\nHost: x\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
SMUGGLING: dict[str, tuple[bytes, int]] = {
    "cl-then-te": (H + b"Content-Length: 6\r\n" + CHUNKED + b"\r\n0\r\n\r\n" + AFTER, 400),
    "te-then-cl": (H + CHUNKED + b"Content-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n"
                   b"0\r\n\r\n", 400),
    "two-content-lengths": (H + b"Content-Length: 5\r\nContent-Length: 0\r\n\r\nhello"
                            + AFTER, 400),
    "equal-content-lengths": (H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    "content-length-list": (H + b"Content-Length: 5, 5\r\n\r\nhello", 400),
    "content-length-signed": (H + b"Content-Length: +5\r\n\r\nhello", 400),
    "content-length-overflow": (H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    "chunked-identity": (H + b"Transfer-Encoding: chunked, identity\r\n\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n", 501),
    "gzip-then-chunked-lines": (H + b"Transfer-Encoding: gzip\r\n" + CHUNKED
                                + b"\r\n5\r\nhello\r\n0\r\n\r\n" + AFTER, 501),
    "te-space-before-colon": (H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + AFTER, 400),
    "obs-fold": (H + b"X-A: 1\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                 b"hello", 400),
    "bare-lf": (b"GET /lf HTTP/1.1\nHost: x\n\n" + AFTER, 400),
    "bare-cr": (b"GET / HTTP/1.1\r\nHost: x\rX-B: 1\r\n\r\n" + AFTER, 400),
    "nul-in-value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + AFTER, 400),
    "control-in-value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n" + AFTER, 400),
    "chunk-size-overflow": (H + CHUNKED + b"\r\nFFFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"
                            + AFTER, 400),
    "chunk-size-negative": (H + CHUNKED + b"\r\n-5\r\nhello\r\n0\r\n\r\n" + AFTER, 400),
    "nul-in-chunk-extension": (H + CHUNKED + b"\r\n5;a\x00=b\r\nhello\r\n0\r\n\r\n"
                               + AFTER, 400),
    "chunk-without-crlf": (H + CHUNKED + b"\r\n5\r\nhelloXX0\r\n\r\n" + AFTER, 400),
    "framing-header-in-trailer": (H + CHUNKED + b"\r\n5\r\nhello\r\n0\r\n"
                                  b"Content-Length: 99\r\n\r\n" + AFTER, 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" + AFTER, 400),
    "no-host": (b"GET / HTTP/1.1\r\n\r\n" + AFTER, 400),
    "unknown-method": (b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n" + AFTER, 400),
    "lower-case-method": (b"get / HTTP/1.1\r\nHost: x\r\n\r\n" + AFTER, 400),
    "http-2.0-line": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n" + AFTER, 400),
}


@pytest.mark.parametrize("data,status", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_and_malformed_heads_are_refused_and_nothing_after_is_served(
        recorded: tuple[Served, Recorder], data: bytes, status: int) -> None:
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(data)
            error = assert_error_object(await read_response(stream), status)
            assert error["code"] == "invalid_http_request"
            assert await read_to_eof(stream) == b""  # and the connection is closed
    assert "/smuggled" not in app.paths
    assert all(body in (b"", b"hello") for _, _, body, _ in app.seen)  # nothing smuggled in
    assert app.seen == []  # none of these is served at all


async def test_a_good_pipeline_then_a_bad_request_is_answered_in_order(
        recorded: tuple[Served, Recorder]) -> None:
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                                           for i in range(3)) + b"BAD\x01 / HTTP/1.1\r\n\r\n")
            rest = b""
            for i in range(3):
                answer, rest = await read_response_from(stream, rest)
                assert (answer.status, answer.body) == (200, b"GET /%d " % i)
            data = rest + await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 400 ") and b'"invalid_http_request"' in data
    assert app.paths == ["/0", "/1", "/2"]


# ---------------------------------------------------------------- trailers


ENDLESS = {
    "many-trailer-fields": (b"0\r\n", b"x-trailer: " + b"a" * 1000 + b"\r\n"),
    "one-endless-trailer-value": (b"0\r\nx-trailer: ", b"a" * 4000),
    "endless-chunk-extension": (b"5;ext=", b"a" * 4000),
}


@pytest.mark.parametrize("start,piece", ENDLESS.values(), ids=ENDLESS.keys())
async def test_an_endless_trailer_or_chunk_header_is_cut_at_the_head_limit(
        recorded: tuple[Served, Recorder], start: bytes, piece: bytes) -> None:
    """Trailer fields used to be appended to the request's header list without bound
    for as long as the client sent them, and llhttp holds one header value (or skips a
    chunk extension) however long it gets: the head limit did not apply after the head."""
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(H + CHUNKED + b"\r\n5\r\nhello\r\n" + start)
            try:
                for _ in range(200):  # 800 KB, far past the 16 KiB limit
                    await stream.send_all(piece * 4)
            except trio.BrokenResourceError:
                pass  # the server refused and closed: what this test wants
            error = assert_error_object(await read_response(stream), 431)
    assert error["code"] == "headers_too_large"
    assert app.seen == [] and app.disconnects == ["/"]


async def test_trailer_fields_never_join_the_request_headers(
        recorded: tuple[Served, Recorder]) -> None:
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(H + CHUNKED + b"\r\n5\r\nhello\r\n0\r\n"
                                  b"X-Forwarded-For: 6.6.6.6\r\n\r\n"
                                  b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            first, rest = await read_response_from(stream, b"")
            second, _ = await read_response_from(stream, rest)
    assert (first.body, second.body) == (b"POST / hello", b"GET /next ")
    headers = app.seen[0][3]
    assert (b"x-forwarded-for", b"6.6.6.6") not in headers
    assert [name for name, _ in headers] == [b"host", b"transfer-encoding"]


# ---------------------------------------------------------------- ignored upgrades


H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"


@pytest.mark.parametrize("framing,body", [
    (b"Content-Length: 11\r\n", b"hello=world"),
    (CHUNKED, b"5\r\nhello\r\n6\r\n=world\r\n0\r\n\r\n"),
], ids=["content-length", "chunked"])
async def test_an_ignored_h2c_upgrade_with_a_body_is_served_with_it(
        recorded: tuple[Served, Recorder], framing: bytes, body: bytes) -> None:
    """What ``curl --http2 -d`` and Java's HttpClient send on cleartext: hypercorn served
    it as HTTP/1.1; llhttp stops at the head of an upgrade, so the server must go on
    parsing the body itself (it answered 400)."""
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(H + H2C + framing + b"\r\n" + body + AFTER)
            answer = await read_response(stream)
            assert await read_to_eof(stream) == b""
    assert (answer.status, answer.body) == (200, b"POST / hello=world")
    assert answer.headers["connection"] == "close"  # an upgrade request ends the connection
    assert app.paths == ["/"]


async def test_a_java_style_h2c_chat_request_is_served_by_the_gateway(
        network: Network) -> None:
    await network.add_node(backends=[simulated(ttft=0.0, tokens_per_second=1000.0)])
    body = msgspec.json.encode(CHAT)
    stream = await connect(network.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + H2C
                                  + b"Content-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
            answer = await read_response(stream)
    assert answer.status == 200, answer
    assert msgspec.json.decode(answer.body)["object"] == "chat.completion"


# ---------------------------------------------------------------- keep-alive


async def test_crlfs_trickled_between_requests_do_not_hold_the_connection(
        recorded: tuple[Served, Recorder]) -> None:
    """llhttp skips empty lines before a request; each used to restart the keep-alive
    timer, so a client could hold a connection for ever without a request."""
    served, _ = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_response(stream)).status == 200

        async def trickle() -> None:
            try:
                while True:
                    await stream.send_all(b"\r\n")
                    await trio.sleep(0.05)  # pacing the attack, not waiting for anything
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            nursery.start_soon(trickle)
            with trio.fail_after(KEEP_ALIVE + MARGIN):
                assert await read_to_eof(stream) == b""
            nursery.cancel_scope.cancel()
    assert trio.current_time() - started >= KEEP_ALIVE * 0.9


async def test_an_http_1_0_keep_alive_request_is_told_the_connection_stays(
        recorded: tuple[Served, Recorder]) -> None:
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            first, _ = await read_response_from(stream, b"")
            assert first.headers["connection"] == "keep-alive"
            await stream.send_all(b"GET /b HTTP/1.0\r\n\r\n")
            data = await read_to_eof(stream)
    assert b"connection: close" in data.lower() and data.endswith(b"GET /b ")
    assert app.paths == ["/a", "/b"]


@pytest.mark.parametrize("first", [
    b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /status/304 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /status/200 HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["204", "304", "HEAD"])
async def test_answers_without_a_body_send_none_and_the_connection_carries_on(
        recorded: tuple[Served, Recorder], first: bytes) -> None:
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(first + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"GET /after "):
                data += await stream.receive_some(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert rest.startswith(b"HTTP/1.1 200 ")  # nothing between the two answers
    if b" 204 " in head:
        assert b"content-length" not in head.lower()  # RFC 9110 8.6
    assert app.paths[-1] == "/after"


# ---------------------------------------------------------------- disconnects, unread bodies


async def test_a_client_leaving_mid_body_disconnects_the_app(
        recorded: tuple[Served, Recorder]) -> None:
    served, app = recorded
    stream = await connect(served.url)
    with trio.fail_after(TIMEOUT):
        await stream.send_all(H + b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
        while not app.disconnects:
            await trio.testing.wait_all_tasks_blocked()
    assert app.disconnects == ["/"] and app.seen == []


async def test_an_unread_body_past_the_discard_bound_closes_the_connection(
        nursery: trio.Nursery) -> None:
    async def hasty(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"nope"})

    served = await serve_app(nursery, hasty)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(H + b"Content-Length: 100000000\r\n\r\n")
            answer = await read_response(stream)
            assert (answer.status, answer.body) == (404, b"nope")
            try:
                for _ in range(100):  # 6.4 MB, past what the server drops to keep it
                    await stream.send_all(b"x" * 65536)
            except trio.BrokenResourceError:
                pass
            await read_to_eof(stream)  # the server closes: the rest is never a request


async def test_an_ignored_upgrade_whose_body_comes_later_is_served_with_it(
        recorded: tuple[Served, Recorder]) -> None:
    served, app = recorded
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(H + H2C + CHUNKED + b"\r\n")  # the head alone
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(b"5\r\nhello\r\n")
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(b"0\r\n\r\n")
            answer = await read_response(stream)
    assert (answer.status, answer.body) == (200, b"POST / hello")
    assert app.paths == ["/"]
