"""The node's lean HTTP/1.1 client (:mod:`tooti.backends.http_client`) against scripted
servers on real loopback sockets: body framings, keep-alive and its limits, a stale
pooled connection retried once, the upstream's head bounded, the pool's bound, TLS
with a private certificate authority, connect timeout, cancellation and uploads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.hostile.test_tls import Authority
from tooti.backends.http_client import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    ConnectFailed,
    HttpClient,
    ProtocolFailed,
)
from tooti.backends.http_util import env_proxy

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


async def serve(nursery: trio.Nursery, handler: Handler) -> str:
    """Serve ``handler`` on a loopback port (one call per connection); its base URL."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    """Read one request with a content-length body (or none) from ``stream``; the
    request's bytes, None at EOF. ``buffer`` keeps what follows it."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffer[:end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(buffer) < end + length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    request = bytes(buffer[:end + length])
    del buffer[:end + length]
    return request


def answer(body: bytes, *headers: bytes) -> bytes:
    """A 200 answer with ``body`` and a content-length."""
    head = b"".join(h + b"\r\n" for h in headers)
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n" + head
            + b"content-length: %d\r\n\r\n" % len(body) + body)


async def body_of(client: HttpClient, url: str, body: bytes = b"x") -> bytes:
    response = await client.send("POST", url, body, "text/plain")
    try:
        return b"".join([chunk async for chunk in response])
    finally:
        response.close()


async def test_framings_and_keep_alive(nursery: trio.Nursery) -> None:
    """content-length and chunked answers keep the connection; an answer read until
    the server closes, and ``Connection: close``, do not."""
    seen: list[bytes] = []
    answers = [
        answer(b"hello"),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nchunk\r\n3\r\ned!\r\n0\r\n\r\n",
        answer(b"bye", b"connection: close"),
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
    ]

    async def handler(stream: trio.abc.Stream) -> None:
        buffer = bytearray()
        while answers and (request := await read_request(stream, buffer)) is not None:
            seen.append(request)
            reply = answers.pop(0)
            await stream.send_all(reply)
            if b"close" in reply or (b"content-length" not in reply
                                     and b"chunked" not in reply):
                return

    url = await serve(nursery, handler)
    client = HttpClient(headers={"Authorization": "Bearer k"})
    assert await body_of(client, f"{url}/a", b"one") == b"hello"
    assert await body_of(client, f"{url}/b") == b"chunked!"
    assert client.opened == 1  # both on one kept-alive connection
    assert await body_of(client, f"{url}/c") == b"bye"
    assert await body_of(client, f"{url}/d") == b"until the end"
    assert client.opened == 2  # 'connection: close' was honoured
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /a HTTP/1.1"
    assert b"host: 127.0.0.1:" + url.rsplit(":", 1)[1].encode() in lines
    assert b"authorization: Bearer k" in lines and b"content-type: text/plain" in lines
    assert b"content-length: 3" in lines and body == b"one"
    await client.aclose()


async def test_stale_connection_is_retried_once_on_a_fresh_one(nursery: trio.Nursery) -> None:
    """The server closes a kept-alive connection when the next request arrives on it
    (the keep-alive race): a bytes body is sent again on a fresh connection; a streamed
    body cannot be, and neither is a request that failed on a fresh connection."""
    connections = 0
    mute = False

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        buffer = bytearray()
        if mute or await read_request(stream, buffer) is None:
            await read_request(stream, buffer)
            return  # closed without an answer
        await stream.send_all(answer(b"first"))
        await read_request(stream, buffer)  # the next request: closed without answer

    url = await serve(nursery, handler)
    client = HttpClient()
    assert await body_of(client, url) == b"first"
    assert await body_of(client, url) == b"first"  # retried on connection 2
    assert (client.opened, connections) == (2, 2)

    async def pieces() -> AsyncIterator[bytes]:
        yield b"not replayable"

    with pytest.raises(ProtocolFailed):
        await client.send("POST", url, pieces(), "text/plain")
    mute = True
    with pytest.raises(ProtocolFailed):  # a fresh connection failing is not retried
        await client.send("POST", url, b"x")
    assert client.opened == 3
    await client.aclose()


async def test_idle_connection_closed_by_the_server_is_not_used(
    nursery: trio.Nursery,
) -> None:
    """A pooled connection that the server closed while idle is noticed (readable)
    and dropped before the next request: the request goes on a new connection."""
    closed = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        buffer = bytearray()
        await read_request(stream, buffer)
        await stream.send_all(answer(b"ok"))
        await stream.aclose()
        closed.set()

    url = await serve(nursery, handler)
    client = HttpClient()
    assert await body_of(client, url) == b"ok"
    [pooled] = [conn for conns in client._idle.values() for conn in conns]
    with trio.fail_after(5):
        await closed.wait()
        await trio.lowlevel.wait_readable(pooled.socket)  # the server's FIN arrived
    assert await body_of(client, url) == b"ok"
    assert client.opened == 2
    await client.aclose()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\n" + b"x-many: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n",
    b"HTTP/1.1 2OO nonsense\r\n\r\n",
], ids=["header-count", "head-size", "malformed"])
async def test_upstream_head_is_bounded_and_checked(nursery: trio.Nursery, head: bytes) -> None:
    async def handler(stream: trio.abc.Stream) -> None:
        await read_request(stream, bytearray())
        try:
            await stream.send_all(head)
            await stream.receive_some(1)
        except trio.BrokenResourceError:
            pass

    url = await serve(nursery, handler)
    client = HttpClient()
    with pytest.raises(ProtocolFailed):
        await client.send("POST", url, b"x")
    assert client._active == 0 and client._idle_count == 0


async def test_bounded_read_closes_an_unfinished_answer(nursery: trio.Nursery) -> None:
    """``read(limit)`` stops at the limit; the unfinished connection is closed (the
    server sees EOF), never pooled."""
    eof = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 1000000\r\n\r\n"
                              + b"e" * 4096)
        while await stream.receive_some(65536):
            pass
        eof.set()

    url = await serve(nursery, handler)
    client = HttpClient()
    response = await client.send("POST", url, b"x")
    assert response.status == 500
    assert await response.read(100) == b"e" * 100
    response.close()
    with trio.fail_after(5):
        await eof.wait()
    assert client._idle_count == 0


async def test_interim_answer_is_skipped(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.abc.Stream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"real"))

    url = await serve(nursery, handler)
    client = HttpClient()
    response = await client.send("POST", url, b"x")
    assert (response.status, response.header(b"content-type")) == (200, "text/plain")
    assert b"".join([c async for c in response]) == b"real"
    response.close()


async def test_pool_bounds_requests_in_flight(nursery: trio.Nursery) -> None:
    """With ``max_connections=1`` a second request waits until the first answer is
    released, then reuses its connection."""
    requests = 0

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal requests
        buffer = bytearray()
        while await read_request(stream, buffer) is not None:
            requests += 1
            await stream.send_all(answer(b"%d" % requests))

    url = await serve(nursery, handler)
    client = HttpClient(max_connections=1)
    first = await client.send("POST", url, b"x")
    got: list[bytes] = []

    async def second() -> None:
        got.append(await body_of(client, url))

    nursery.start_soon(second)
    await trio.testing.wait_all_tasks_blocked()
    assert requests == 1 and not got  # the second waits for the first's connection
    assert b"".join([c async for c in first]) == b"1"
    first.close()
    with trio.fail_after(5):
        while not got:
            await trio.testing.wait_all_tasks_blocked()
    assert got == [b"2"] and client.opened == 1


async def test_cancel_while_waiting_for_the_head_closes_the_connection(
    nursery: trio.Nursery,
) -> None:
    eof = trio.Event()
    got_request = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        buffer = bytearray()
        await read_request(stream, buffer)
        got_request.set()
        while await stream.receive_some(65536):
            pass
        eof.set()

    url = await serve(nursery, handler)
    client = HttpClient()
    with trio.CancelScope() as scope:
        async def cancel_when_sent() -> None:
            await got_request.wait()
            scope.cancel()

        nursery.start_soon(cancel_when_sent)
        await client.send("POST", url, b"x")
    assert scope.cancelled_caught
    with trio.fail_after(5):
        await eof.wait()
    assert client._active == 0


async def test_streamed_upload_is_chunked(nursery: trio.Nursery) -> None:
    received = bytearray()

    async def handler(stream: trio.abc.Stream) -> None:
        while not received.endswith(b"0\r\n\r\n"):
            received.extend(await stream.receive_some(65536))
        await stream.send_all(answer(b"stored"))

    async def pieces() -> AsyncIterator[bytes]:
        yield b"--b\r\n"
        yield b""
        yield b"file bytes"

    url = await serve(nursery, handler)
    client = HttpClient()
    response = await client.send("POST", f"{url}/v1/audio/transcriptions", pieces(),
                                 "multipart/form-data; boundary=b")
    assert b"".join([c async for c in response]) == b"stored"
    response.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.split(b"\r\n")
    assert body == b"5\r\n--b\r\n\r\na\r\nfile bytes\r\n0\r\n\r\n"


async def test_connect_refused_and_connect_timeout(nursery: trio.Nursery) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectFailed, match="refused"):
        await HttpClient().send("POST", f"http://127.0.0.1:{port}/", b"x")
    # A TLS server that never answers the handshake: the connect timeout covers it.
    async def mute(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    url = await serve(nursery, mute)
    client = HttpClient(connect_timeout=0.2)
    with pytest.raises(ConnectFailed, match="timeout"):
        await client.send("POST", url.replace("http:", "https:"), b"x")


async def test_https_with_a_private_authority(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """https:// through trio.SSLStream: a client trusting the CA (given as a context, or
    through SSL_CERT_FILE as httpx reads it) is served and keeps the connection; the
    default trust store refuses the private CA's certificate."""
    authority = Authority.create(tmp_path)
    authority.issue()
    import ssl

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(authority.cert_path, authority.key_path)

    async def handler(stream: trio.abc.Stream) -> None:
        buffer = bytearray()
        try:
            while await read_request(stream, buffer) is not None:
                await stream.send_all(answer(b"secure"))
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, handler, 0,
                                            server_context, host="127.0.0.1"))
    url = f"https://127.0.0.1:{listeners[0].transport_listener.socket.getsockname()[1]}"
    client = HttpClient(ssl_context=authority.client_context())
    assert await body_of(client, url) == b"secure"
    assert await body_of(client, url) == b"secure"
    assert client.opened == 1
    await client.aclose()
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.ca_path))
    assert await body_of(HttpClient(), url) == b"secure"
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(ConnectFailed, match="TLS"):
        await HttpClient().send("POST", url, b"x")


def test_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend behind an environment proxy keeps using httpx (which honours it)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY",
                 "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert not env_proxy("https://api.example.com/v1/chat/completions")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert env_proxy("https://api.example.com/v1/chat/completions")
    assert not env_proxy("http://api.example.com/v1/chat/completions")
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert not env_proxy("https://api.example.com/v1/chat/completions")
