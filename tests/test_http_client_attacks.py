"""A hostile backend against the node's HTTP/1.1 client (:mod:`tooti.backends.http_client`).

The backend a node talks to is a peer too. Scripted servers on real loopback sockets
answer garbage, heads and bodies that never end, huge chunk sizes, conflicting
framing, more bytes than the Content-Length (in the same write: a second answer
smuggled behind the first must not join it; later, on an idle pooled connection: it
must not be read as the next request's answer), interim and 101 answers, a body cut
off mid-way, and a normal answer dripped one byte at a time. Every failure is a
:class:`ProtocolFailed` (which the backend turns into a ``BackendError``), within a
bounded amount of buffered data, and the pool's accounting is left clean.
"""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.test_http_client import answer, read_request, serve
from tooti.backends.http_client import MAX_HEAD_BYTES, HttpClient, ProtocolFailed

TIMEOUT = 10.0


async def forever(stream: trio.abc.Stream, start: bytes, piece: bytes) -> None:
    """After the request: send ``start``, then ``piece`` until the client goes."""
    await read_request(stream, bytearray())
    try:
        await stream.send_all(start)
        while True:
            await stream.send_all(piece)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def clean(client: HttpClient) -> None:
    assert client._active == 0 and client._idle_count == 0


ENDLESS_HEADS = {
    "header-lines": (b"HTTP/1.1 200 OK\r\n", b"x-a: b\r\n" * 100),
    "one-header-value": (b"HTTP/1.1 200 OK\r\nx-a: ", b"b" * 8192),
    "status-reason": (b"HTTP/1.1 200 ", b"O" * 8192),
    "interim-answers": (b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 100),
}


@pytest.mark.parametrize("start,piece", ENDLESS_HEADS.values(), ids=ENDLESS_HEADS.keys())
async def test_a_head_that_never_ends_fails_within_its_bound(
        nursery: trio.Nursery, start: bytes, piece: bytes) -> None:
    url = await serve(nursery, lambda stream: forever(stream, start, piece))
    client = HttpClient()
    with trio.fail_after(TIMEOUT), pytest.raises(ProtocolFailed):
        await client.send("POST", url, b"x")
    clean(client)


ENDLESS_BODIES = {
    "trailer-fields": (b"0\r\n", b"x-t: " + b"a" * 100 + b"\r\n"),
    "one-trailer-value": (b"0\r\nx-t: ", b"a" * 8192),
    "chunk-extension": (b"5;ext=", b"a" * 8192),
}


@pytest.mark.parametrize("start,piece", ENDLESS_BODIES.values(), ids=ENDLESS_BODIES.keys())
async def test_a_chunk_header_or_trailer_that_never_ends_fails_within_its_bound(
        nursery: trio.Nursery, start: bytes, piece: bytes) -> None:
    """llhttp keeps one header value (and so a trailer's) however long it grows, and
    skips a chunk extension: past the head's bound the answer is broken."""
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
    url = await serve(nursery, lambda stream: forever(stream, head + start, piece))
    client = HttpClient()
    response = await client.send("POST", url, b"x")
    chunks = []
    with trio.fail_after(TIMEOUT), pytest.raises(ProtocolFailed):
        async for chunk in response:
            chunks.append(chunk)
            assert len(chunks) < 10_000  # no endless trickle of body either
    assert b"".join(chunks) == b"hello"
    assert response.headers == [(b"transfer-encoding", b"chunked")]  # no trailer joined
    response.close()
    clean(client)


BROKEN = {
    "garbage": b"garbage\r\n\r\n",
    "http-0.9-ish": b"<html>hello</html>",
    "huge-chunk-size": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                       b"FFFFFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
    "length-and-chunked": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n"
                          b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    "nul-in-header": b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\ncontent-length: 0\r\n\r\n",
    "bare-cr-in-header": b"HTTP/1.1 200 OK\r\nx-a: a\rb\r\ncontent-length: 0\r\n\r\n",
    "switching-protocols": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n"
                           b"connection: upgrade\r\n\r\n",
    "cut-mid-body": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten!!",
    "cut-mid-chunk": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n64\r\nshort",
}


@pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
async def test_a_broken_answer_is_a_protocol_failure(nursery: trio.Nursery,
                                                     data: bytes) -> None:
    async def handler(stream: trio.abc.Stream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(data)  # then the connection closes

    url = await serve(nursery, handler)
    client = HttpClient()
    with trio.fail_after(TIMEOUT), pytest.raises(ProtocolFailed):
        response = await client.send("POST", url, b"x")
        try:
            async for _ in response:
                pass
        finally:
            response.close()
    clean(client)


async def test_a_second_answer_behind_the_first_never_joins_it(nursery: trio.Nursery) -> None:
    """More bytes than the Content-Length in the same write: a complete answer stands;
    what follows is neither its body nor its headers, and the connection is not reused
    (the extra answer's body used to be appended to the first's)."""
    served = 0

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal served
        buffer = bytearray()
        try:
            while await read_request(stream, buffer) is not None:
                served += 1
                await stream.send_all(answer(b"hello") + b"HTTP/1.1 200 OK\r\n"
                                      b"x-evil: 1\r\ncontent-length: 4\r\n\r\nEVIL")
        except trio.BrokenResourceError:
            pass  # the client closed with the extra answer unread: a reset

    url = await serve(nursery, handler)
    client = HttpClient()
    with trio.fail_after(TIMEOUT):
        for _ in range(2):
            response = await client.send("POST", url, b"x")
            assert b"".join([chunk async for chunk in response]) == b"hello"
            assert response.header(b"x-evil") == ""
            response.close()
    assert client.opened == 2 and served == 2  # each on a fresh connection
    clean(client)


async def test_junk_after_a_body_in_the_same_write_keeps_the_answer(
        nursery: trio.Nursery) -> None:
    async def handler(stream: trio.abc.Stream) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(answer(b"hello") + b"\x00\x01junk that is no answer")
        try:
            await stream.receive_some(1)
        except trio.BrokenResourceError:
            pass

    url = await serve(nursery, handler)
    client = HttpClient()
    with trio.fail_after(TIMEOUT):
        response = await client.send("POST", url, b"x")
        assert b"".join([chunk async for chunk in response]) == b"hello"
        response.close()
    clean(client)  # not pooled


async def test_junk_on_an_idle_pooled_connection_is_never_the_next_answer(
        nursery: trio.Nursery) -> None:
    """The server answers, then writes an unsolicited answer while the connection is
    idle in the pool: the next request goes on a fresh connection and gets its own."""
    junk_sent = trio.Event()
    count = 0

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal count
        count += 1
        mine = count
        buffer = bytearray()
        try:
            while await read_request(stream, buffer) is not None:
                await stream.send_all(answer(b"answer %d" % mine))
                if mine == 1:
                    await stream.send_all(answer(b"UNSOLICITED"))
                    junk_sent.set()
        except trio.BrokenResourceError:
            pass  # the client dropped this connection with the junk unread: a reset

    url = await serve(nursery, handler)
    client = HttpClient()
    with trio.fail_after(TIMEOUT):
        response = await client.send("POST", url, b"x")
        assert b"".join([chunk async for chunk in response]) == b"answer 1"
        response.close()
        await junk_sent.wait()
        await trio.testing.wait_all_tasks_blocked()
        response = await client.send("POST", url, b"x")
        assert b"".join([chunk async for chunk in response]) == b"answer 2"
        response.close()
    assert client.opened == 2


async def test_an_answer_dripped_byte_by_byte_is_read_whole(nursery: trio.Nursery) -> None:
    data = (b"HTTP/1.1 200 OK\r\nx-a: b\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5;e=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n")

    async def handler(stream: trio.abc.Stream) -> None:
        await read_request(stream, bytearray())
        for byte in data:
            await stream.send_all(bytes([byte]))
            await trio.lowlevel.checkpoint()  # each byte its own segment
        await stream.receive_some(1)

    url = await serve(nursery, handler)
    client = HttpClient()
    with trio.fail_after(TIMEOUT):
        response = await client.send("POST", url, b"x")
        body = b"".join([chunk async for chunk in response])
        response.close()
    assert body == b"hello world"
    assert response.headers == [(b"x-a", b"b"), (b"transfer-encoding", b"chunked")]
    assert client._idle_count == 1  # read to its end: pooled


def test_the_head_bound_is_the_documented_one() -> None:
    assert MAX_HEAD_BYTES == 64 * 1024
