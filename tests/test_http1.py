"""tooti's own HTTP/1.1 server (:mod:`tooti.mesh.http1`) on real loopback sockets.

The hostile tests (``tests/hostile/test_http_*.py``, ``test_tls.py``) pin the limits
and error answers; these pin what an ordinary client relies on: pipelined requests
answered in order, ``Expect: 100-continue``, HEAD, chunked request bodies, HTTP/1.0,
``connection: close`` either way, the request limit per connection, the response
framing the server chooses (Content-Length for one body message, chunked for a
stream, close-delimited for HTTP/1.0), the ``date`` header, ``http.disconnect`` when
the client goes, graceful shutdown of a request in flight, and HTTP/2 with prior
knowledge still served (by hypercorn). Most run the listener with a small ASGI app
of their own, so each behaviour is seen at the server, not through the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import httpx
import msgspec
import pytest
import trio
import trio.testing
from hypercorn.config import Config

from tests.conftest import Network, simulated
from tests.hostile.client import (
    TIMEOUT,
    Answer,
    assert_error_object,
    connect,
    read_response,
    read_to_eof,
)
from tooti.mesh import http1
from tooti.mesh.listener import Limits, serve
from tooti.settings import GatewaySettings

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
CHAT = {"model": "tooti-sim", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


class Served:
    """A listener serving one test app; :meth:`shutdown` stops it gracefully."""

    def __init__(self, url: str, stop: trio.Event, stopped: trio.Event) -> None:
        self.url = url
        self._stop = stop
        self.stopped = stopped

    def shutdown(self) -> None:
        self._stop.set()


async def serve_app(nursery: trio.Nursery, app: App, grace: float = 30.0,
                    **limits: float) -> Served:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = grace
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        async def no_tunnels(_: object) -> None:
            raise AssertionError("no tunnel expected")

        await serve(app, config, no_tunnels, stop.wait,
                    limits=Limits.of(GatewaySettings(**limits)),  # type: ignore[arg-type]
                    task_status=task_status)
        stopped.set()

    urls = await nursery.start(run)
    return Served(urls[0], stop, stopped)


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body += message["body"]
        if not message.get("more_body", False):
            return body


async def answer(send: Send, body: bytes, status: int = 200,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers if headers is not None else
                [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers ``<method> <path> <body>``."""
    body = await read_body(receive)
    await answer(send, f"{scope['method']} {scope['path']} ".encode() + body)


@pytest.fixture
async def echoing(nursery: trio.Nursery) -> AsyncIterator[Served]:
    served = await serve_app(nursery, echo)
    yield served
    served.shutdown()


def raw(method: str, target: str, body: bytes = b"", *extra: tuple[str, str],
        version: str = "1.1") -> bytes:
    headers = [("host", "x"), *extra]
    if body and not any(name == "transfer-encoding" for name, _ in extra):
        headers.append(("content-length", str(len(body))))
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode() + b"\r\n" + body


# ---------------------------------------------------------------- keep-alive, pipelining


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
        echoing: Served) -> None:
    stream = await connect(echoing.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"".join(raw("POST", f"/{i}", b"body%d" % i)
                                           for i in range(20)))
            reader = b""
            for i in range(20):
                answer_ = await read_response_from(stream, reader)
                reader = answer_[1]
                assert answer_[0].status == 200
                assert answer_[0].body == b"POST /%d body%d" % (i, i)
            await stream.send_all(raw("GET", "/after"))  # and still serving
            assert (await read_response(stream)).body == b"GET /after "


async def read_response_from(stream: trio.SocketStream, pending: bytes
                             ) -> tuple[Answer, bytes]:
    """One response from ``pending`` bytes and the stream; the answer and what is left
    over (the next responses' bytes)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    if pending:
        conn.receive_data(pending)  # (b"" would say the connection ended)
    head, body = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers = {k.decode().lower(): v.decode() for k, v in head.headers}
            return Answer(head.status_code, headers, body), conn.trailing_data[0]


async def test_connection_close_from_the_client_is_honoured(echoing: Served) -> None:
    stream = await connect(echoing.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/", b"", ("connection", "close")))
            data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close\r\n" in data.lower()


async def test_http_1_0_gets_one_answer_and_the_connection_closes(echoing: Served) -> None:
    stream = await connect(echoing.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET /old HTTP/1.0\r\n\r\n")
            data = await read_to_eof(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b"GET /old "


async def test_a_connection_closes_after_its_request_limit(
        echoing: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "KEEP_ALIVE_MAX_REQUESTS", 3)
    stream = await connect(echoing.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            for _ in range(2):
                await stream.send_all(raw("GET", "/"))
                assert "connection" not in (await read_response(stream)).headers
            await stream.send_all(raw("GET", "/"))
            last = await read_response(stream)
            assert last.headers["connection"] == "close"
            assert await read_to_eof(stream) == b""


# ---------------------------------------------------------------- request bodies


async def test_chunked_request_body_is_read_whole(echoing: Served) -> None:
    body = b"5\r\nhello\r\n1;ext=x\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    stream = await connect(echoing.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("POST", "/c", body, ("transfer-encoding", "chunked")))
            assert (await read_response(stream)).body == b"POST /c hello world"


async def test_expect_100_continue_is_answered_when_the_app_reads_the_body(
        echoing: Served) -> None:
    stream = await connect(echoing.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("POST", "/e", b"", ("expect", "100-continue"),
                                      ("content-length", "4")))
            interim = await stream.receive_some(65536)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(b"data")
            assert (await read_response(stream)).body == b"POST /e data"


async def test_expect_100_continue_is_not_answered_when_the_app_refuses_first(
        nursery: trio.Nursery) -> None:
    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await answer(send, b"too big", 413, [(b"connection", b"close")])

    served = await serve_app(nursery, refuse)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("POST", "/", b"", ("expect", "100-continue"),
                                      ("content-length", "1000000")))
            data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 413 "), data  # no 100 Continue before it
    assert data.endswith(b"too big")


async def test_a_gateway_request_with_a_chunked_body_is_served(network: Network) -> None:
    await network.add_node(backends=[simulated(ttft=0.0, tokens_per_second=1000.0)])
    body = msgspec.json.encode(CHAT)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    stream = await connect(network.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("POST", "/v1/chat/completions", chunked,
                                      ("transfer-encoding", "chunked"),
                                      ("content-type", "application/json")))
            answer_ = await read_response(stream)
    assert answer_.status == 200, answer_
    assert answer_.headers["x-request-id"].startswith("req_")
    assert "date" in answer_.headers and "server" not in answer_.headers


async def test_a_body_the_app_did_not_read_is_dropped_and_the_connection_kept(
        nursery: trio.Nursery) -> None:
    """The app answers before the body has even arrived (a 404): the server reads the
    body past it, and the next request on the connection is served."""
    async def hasty(scope: Scope, receive: Receive, send: Send) -> None:
        await answer(send, scope["path"].encode(), 404)

    served = await serve_app(nursery, hasty)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("POST", "/nope", b"")[:-2]
                                  + b"content-length: 5\r\n\r\n")  # the head alone
            first = await read_response(stream)
            assert (first.status, first.body) == (404, b"/nope")
            assert "connection" not in first.headers
            await stream.send_all(b"12345" + raw("GET", "/next"))
            second = await read_response(stream)
    assert (second.status, second.body) == (404, b"/next")


# ---------------------------------------------------------------- responses


async def test_head_gets_the_headers_and_no_body(network: Network) -> None:
    stream = await connect(network.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("HEAD", "/healthz"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) > 0
            assert head.endswith(b"\r\n\r\n")  # nothing after the head
            await stream.send_all(raw("GET", "/healthz"))  # the connection still serves
            assert (await read_response(stream)).status == 200


async def stream_app(scope: Scope, receive: Receive, send: Send) -> None:
    await read_body(receive)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(3):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                    "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_a_streamed_answer_is_chunked_and_one_message_has_a_length(
        nursery: trio.Nursery) -> None:
    served = await serve_app(nursery, stream_app)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/"))
            streamed = await read_response(stream)
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert streamed.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    echoed = await serve_app(nursery, echo)  # its answer is one body message
    async with httpx.AsyncClient(base_url=echoed.url) as client:
        whole = await client.get("/whatever")
    assert whole.headers["content-length"] == str(len(whole.content))
    assert "transfer-encoding" not in whole.headers


async def test_a_streamed_answer_to_http_1_0_ends_with_the_connection(
        nursery: trio.Nursery) -> None:
    served = await serve_app(nursery, stream_app)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            data = await read_to_eof(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_an_empty_body_message_flushes_the_head_at_once(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def slow_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"late"})

    served = await serve_app(nursery, slow_stream)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/"))
            head = b""
            while b"\r\n\r\n" not in head:  # arrives before the app sends a body
                head += await stream.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding: chunked" in head
            release.set()
            rest = head.partition(b"\r\n\r\n")[2]
            while not rest.endswith(b"0\r\n\r\n"):
                rest += await stream.receive_some(65536)
    assert rest == b"4\r\nlate\r\n0\r\n\r\n"


async def test_an_answer_shorter_than_its_content_length_closes_the_connection(
        nursery: trio.Nursery) -> None:
    async def short(scope: Scope, receive: Receive, send: Send) -> None:
        await answer(send, b"abc", headers=[(b"content-length", b"10")])

    served = await serve_app(nursery, short)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/"))
            data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nabc")


async def test_a_header_value_with_a_line_break_is_never_written(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    async def injecting(scope: Scope, receive: Receive, send: Send) -> None:
        await answer(send, b"x", headers=[(b"x-a", b"1\r\nset-cookie: evil=1")])

    served = await serve_app(nursery, injecting)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/"))
            data = await read_to_eof(stream)
    assert b"evil" not in data
    assert any("failed in the app" in r.getMessage() for r in caplog.records)


async def test_an_app_that_fails_before_answering_gets_a_500_error_object(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyError("bug")

    served = await serve_app(nursery, broken)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/"))
            error = assert_error_object(await read_response(stream), 500)
    assert error["code"] == "internal_error"
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info is not None


# ---------------------------------------------------------------- disconnects


async def test_receive_says_disconnect_when_the_client_goes_mid_request(
        nursery: trio.Nursery) -> None:
    seen: list[str] = []
    gone = trio.Event()

    async def waiting(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        seen.append((await receive())["type"])  # blocks until the client leaves
        gone.set()

    served = await serve_app(nursery, waiting)
    stream = await connect(served.url)
    with trio.fail_after(TIMEOUT):
        await stream.send_all(raw("POST", "/", b"{}"))
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
        await gone.wait()
    assert seen == ["http.disconnect"]


async def test_receive_says_disconnect_once_the_answer_is_complete(
        nursery: trio.Nursery) -> None:
    seen: list[str] = []

    async def answered(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await answer(send, b"done")
        seen.append((await receive())["type"])

    served = await serve_app(nursery, answered)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/"))
            assert (await read_response(stream)).body == b"done"
            await stream.send_all(raw("GET", "/"))  # and the connection is still usable
            assert (await read_response(stream)).body == b"done"
    assert seen == ["http.disconnect", "http.disconnect"]


async def test_a_pipelined_request_waits_while_the_client_is_watched(
        nursery: trio.Nursery) -> None:
    """A request read while the app watches for a disconnect is not taken for one, and
    is served after the first answer."""
    release = trio.Event()
    order: list[str] = []

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        if scope["path"] == "/first":
            async with trio.open_nursery() as watch:
                async def watcher() -> None:
                    order.append("watch:" + (await receive())["type"])

                watch.start_soon(watcher)
                await release.wait()
                await answer(send, b"first")
        else:
            await answer(send, b"second")

    served = await serve_app(nursery, watched)
    stream = await connect(served.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/first"))
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_all(raw("GET", "/second"))
            await trio.testing.wait_all_tasks_blocked()
            assert order == []  # the pipelined bytes are no disconnect
            release.set()
            first, rest = await read_response_from(stream, b"")
            second, _ = await read_response_from(stream, rest)
    assert (first.body, second.body) == (b"first", b"second")
    assert order == ["watch:http.disconnect"]


async def test_a_disconnect_is_seen_on_the_request_after_a_pipelined_one(
        nursery: trio.Nursery) -> None:
    """The watch that read the second request early does not blind the second
    request's own watch: its client leaving is still seen."""
    seen: list[str] = []
    gone = trio.Event()

    async def watching(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        if scope["path"] == "/first":
            async with trio.open_nursery() as watch:
                async def watcher() -> None:
                    await receive()  # returns once the answer is complete

                watch.start_soon(watcher)
                await trio.testing.wait_all_tasks_blocked()
                await answer(send, b"first")
        else:
            seen.append((await receive())["type"])  # the client leaves
            gone.set()

    served = await serve_app(nursery, watching)
    stream = await connect(served.url)
    with trio.fail_after(TIMEOUT):
        await stream.send_all(raw("GET", "/first"))
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(raw("GET", "/second"))  # read by the first's watch
        first, _ = await read_response_from(stream, b"")
        assert first.body == b"first"
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
        await gone.wait()
    assert seen == ["http.disconnect"]


# ---------------------------------------------------------------- shutdown, HTTP/2


async def test_shutdown_lets_a_request_in_flight_finish_and_then_closes(
        nursery: trio.Nursery) -> None:
    started, release = trio.Event(), trio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        if scope["path"] == "/slow":
            started.set()
            await release.wait()
        await answer(send, b"finished")

    served = await serve_app(nursery, slow)
    busy = await connect(served.url)
    idle = await connect(served.url)
    async with busy, idle:
        with trio.fail_after(TIMEOUT):
            await idle.send_all(raw("GET", "/fast"))
            assert (await read_response(idle)).body == b"finished"  # kept alive, idle now
            await busy.send_all(raw("GET", "/slow"))
            await started.wait()
            served.shutdown()
            assert await read_to_eof(idle) == b""  # closed at once
            assert not served.stopped.is_set()  # the request in flight holds it
            release.set()
            data = await read_to_eof(busy)
            await served.stopped.wait()
    assert data.endswith(b"finished")
    assert b"connection: close" in data.lower()


async def test_http2_with_prior_knowledge_is_still_served(network: Network) -> None:
    async with httpx.AsyncClient(base_url=network.url, http1=False, http2=True) as client:
        with trio.fail_after(TIMEOUT):
            response = await client.get("/healthz")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_an_h2c_upgrade_is_ignored_and_served_as_http_1_1(network: Network) -> None:
    stream = await connect(network.url)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(raw("GET", "/healthz", b"",
                                      ("connection", "upgrade, http2-settings"),
                                      ("upgrade", "h2c"),
                                      ("http2-settings", "AAMAAABkAAQAAP__")))
            answer_ = await read_response(stream)
    assert answer_.status == 200
