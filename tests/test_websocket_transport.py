"""WebSocket over real loopback sockets: the transport, the client handshake, the listener.

* :class:`WebSocketTransport` on both sides of a real TCP connection, against
  another transport or against a peer that writes frames by hand (a
  :class:`RawPeer`): round trips, ping/pong, closing handshakes, protocol
  violations and vanished peers.
* :func:`connect` against small trio servers written here, which answer the
  upgrade correctly or in every wrong way.
* The gateway's listener with a real gateway: HTTP and keep-alive go to
  hypercorn, tunnel upgrades are answered on the socket (also when they trickle
  in byte by byte), refusals come back as plain HTTP with a reason, and garbage
  neither hangs nor hurts the listener.
* The ASGI fallback: a tunnel upgrade on a kept-alive connection that already
  carried an HTTP request is served by hypercorn.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio_websocket import open_websocket_url

from tests.conftest import Network
from tooti.gateway.app import Gateway
from tooti.protocol.websocket import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameDecoder,
    Message,
    Pong,
    WebSocketEvent,
    accept_key,
    encode_close,
    encode_frame,
)
from tooti.settings import GatewaySettings, TunnelSettings
from tooti.transport import TransportClosed
from tooti.transport.websocket import (
    SUBPROTOCOL,
    TUNNEL_PATH,
    HandshakeFailed,
    WebSocketTransport,
    connect,
    upgrade_response,
)

TIMEOUT = 10.0
"""Hang guard around every exchange on a socket."""
BIG = 2 * 1024 * 1024
"""max_message large enough for the biggest round trip."""
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
"""The RFC 6455 example key (its accept value is checked by the codec tests)."""
JOIN_TOKEN = "join-secret"
SIDES = ["client", "server"]


# ---------------------------------------------------------------- helpers


class RawPeer:
    """The far end of a connection, writing and reading frames by hand with the codec.

    ``client=True``: it plays the client (masks what it sends, expects unmasked
    frames); ``client=False``: it plays the server."""

    def __init__(self, stream: trio.abc.Stream, *, client: bool,
                 max_message: int = BIG, buffered: bytes = b"") -> None:
        self.stream = stream
        self.client = client
        self.decoder = FrameDecoder(max_message=max_message, client=client)
        self.decoder.feed(buffered)

    async def send(self, opcode: int, payload: bytes = b"", *, mask: bool | None = None,
                   fin: bool = True) -> None:
        """Send one frame (masked as this side should, unless ``mask`` says otherwise)."""
        masked = self.client if mask is None else mask
        await self.stream.send_all(encode_frame(opcode, payload, mask=masked, fin=fin))

    async def event(self) -> WebSocketEvent | None:
        """The next event from the other side; None once the connection ended."""
        while True:
            event = self.decoder.next_event()
            if event is not None:
                return event
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.feed(data)

    async def message(self) -> bytes:
        """The next data message (failing on anything else)."""
        event = await self.event()
        assert type(event) is Message, event
        return event.data

    async def eof(self) -> None:
        """Wait for the other side to close the connection (a FIN, not a reset), with
        nothing more sent."""
        event = await self.event()
        assert event is None, event

    async def answer_close(self) -> None:
        """Expect the other side's close frame and answer it (the closing handshake)."""
        event = await self.event()
        assert type(event) is Close, event
        await self.stream.send_all(encode_close(event.code, "", mask=self.client))


def reset_on_close(stream: trio.abc.Stream) -> None:
    """Make closing ``stream`` send a TCP reset instead of a FIN (SO_LINGER 0)."""
    assert isinstance(stream, trio.SocketStream)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected (client, server) pair of loopback TCP streams."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        client = await trio.testing.open_stream_to_socket_listener(listeners[0])
        server = await listeners[0].accept()
    finally:
        for listener in listeners:
            await listener.aclose()
    try:
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


@asynccontextmanager
async def transport_and_peer(side: str, max_message: int = BIG
                             ) -> AsyncIterator[tuple[WebSocketTransport, RawPeer]]:
    """A transport on ``side`` of a real connection, and a raw peer on the other side.
    Afterwards the peer hangs up and the transport is closed."""
    async with tcp_pair() as (client, server):
        if side == "client":
            transport = WebSocketTransport(client, "server", client=True,
                                           max_message=max_message)
            peer = RawPeer(server, client=False)
        else:
            transport = WebSocketTransport(server, "client", client=False,
                                           max_message=max_message)
            peer = RawPeer(client, client=True)
        try:
            yield transport, peer
        finally:
            await trio.aclose_forcefully(peer.stream)
            with trio.move_on_after(TIMEOUT), trio.CancelScope(shield=True):
                await transport.aclose()


@asynccontextmanager
async def transports(max_message: int = BIG
                     ) -> AsyncIterator[tuple[WebSocketTransport, WebSocketTransport]]:
    """Two transports (client, server) talking over a real connection; afterwards both
    close at once (each answers the other's close frame)."""
    async with tcp_pair() as (client_stream, server_stream):
        client = WebSocketTransport(client_stream, "server", client=True,
                                    max_message=max_message)
        server = WebSocketTransport(server_stream, "client", client=False,
                                    max_message=max_message)
        try:
            yield client, server
        finally:
            with trio.move_on_after(TIMEOUT), trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.aclose)
                    nursery.start_soon(server.aclose)


def payload(size: int) -> bytes:
    """``size`` bytes that are not all alike (so a masking slip would show)."""
    return (os.urandom(64) * (size // 64 + 1))[:size]


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line of an HTTP head and its headers (names lower-cased)."""
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, headers


async def read_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """Read an HTTP head; returns it (without the blank line) and the bytes after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection ended inside the head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the peer closes (a reset counts as the end too)."""
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return data
        if not chunk:
            return data
        data += chunk


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class HTTPClient:
    """HTTP/1.1 by hand over one raw connection (h11 on the client side)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, target: str, headers: list[tuple[str, str]] | None = None
                      ) -> Reply:
        """Send a GET and read the reply (a 101 ends at its head)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        request = h11.Request(method="GET", target=target,
                              headers=[("host", "127.0.0.1"), *(headers or [])])
        await self.stream.send_all(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        return await self.reply()

    async def reply(self) -> Reply:
        head = await self._next()
        assert isinstance(head, h11.InformationalResponse | h11.Response), head
        headers = {name.decode().lower(): value.decode() for name, value in head.headers}
        body = b""
        if head.status_code != 101:
            while True:
                event = await self._next()
                if isinstance(event, h11.EndOfMessage):
                    break
                assert isinstance(event, h11.Data), event
                body += event.data
        return Reply(head.status_code, headers, body)

    async def _next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    @property
    def trailing(self) -> bytes:
        """Bytes that followed a 101 head."""
        return bytes(self.conn.trailing_data[0])


def upgrade_headers(*, key: str | None = KEY, version: str | None = "13",
                    subprotocol: str | None = SUBPROTOCOL,
                    token: str | None = None) -> list[tuple[str, str]]:
    """Headers of a WebSocket upgrade; None leaves a header out."""
    headers = [("upgrade", "websocket"), ("connection", "Upgrade")]
    if key is not None:
        headers.append(("sec-websocket-key", key))
    if version is not None:
        headers.append(("sec-websocket-version", version))
    if subprotocol is not None:
        headers.append(("sec-websocket-protocol", subprotocol))
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    return headers


def upgrade_bytes(target: str = TUNNEL_PATH, headers: list[tuple[str, str]] | None = None
                  ) -> bytes:
    """The whole request head of a tunnel upgrade (by default as a dialer sends it)."""
    conn = h11.Connection(h11.CLIENT)
    return conn.send(h11.Request(method="GET", target=target, headers=[
        ("host", "127.0.0.1"), *(upgrade_headers() if headers is None else headers)]))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def open_gateway(network: Network) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port_of(network.url))


async def assert_healthy(network: Network) -> None:
    """The gateway still answers HTTP."""
    with trio.fail_after(TIMEOUT):
        async with network.client() as http:
            response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


# ---------------------------------------------------------------- transport


@pytest.mark.parametrize("size", [0, 1, 125, 126, 200, 65535, 65536, 70_000, 1024 * 1024])
async def test_binary_round_trip_both_ways(size: int) -> None:
    data = payload(size)
    async with transports() as (client, server):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, data)
                assert await server.receive() == data
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send, data[::-1])
                assert await client.receive() == data[::-1]


async def test_send_many_delivers_in_order() -> None:
    batch = [b"", b"a", payload(300), payload(70_000), b"last"]
    async with transports() as (client, server):
        with trio.fail_after(TIMEOUT):
            for sender, receiver in ((client, server), (server, client)):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender.send_many, batch)
                    assert [await receiver.receive() for _ in batch] == batch
                await sender.send_many([])  # nothing to send is fine
                await sender.send(b"after")
                assert await receiver.receive() == b"after"


async def test_concurrent_senders_never_interleave_frames() -> None:
    """Two tasks sending big messages at once (one with send, one with send_many): the
    send lock keeps every frame whole, and each task's messages stay in order."""
    first = [bytes([1, i]) + payload(100_000) for i in range(10)]
    second = [bytes([2, i]) + payload(100_000) for i in range(10)]
    async with transports() as (client, server):

        async def send_each() -> None:
            for message in first:
                await client.send(message)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_each)
                nursery.start_soon(client.send_many, second)
                received = [await server.receive() for _ in range(20)]
    assert [m for m in received if m[0] == 1] == first
    assert [m for m in received if m[0] == 2] == second


@pytest.mark.parametrize("side", SIDES)
async def test_frames_on_the_wire_follow_the_side(side: str) -> None:
    """The client masks what it sends, the server does not: the raw peer's decoder (which
    enforces this) accepts them."""
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await transport.send(b"hello")
            await transport.send_many([b"one", b"two"])
            assert [await peer.message() for _ in range(3)] == [b"hello", b"one", b"two"]
            await peer.send(OP_BINARY, b"back")
            assert await transport.receive() == b"back"


@pytest.mark.parametrize("side", SIDES)
async def test_ping_is_answered_with_a_pong_carrying_its_payload(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                received: list[bytes] = []

                async def receive() -> None:
                    received.append(await transport.receive())

                nursery.start_soon(receive)
                await peer.send(OP_PING, b"are you there?")
                assert await peer.event() == Pong(b"are you there?")
                await peer.send(OP_PING)  # an empty ping too
                assert await peer.event() == Pong(b"")
                await peer.send(OP_BINARY, b"data after pings")
            assert received == [b"data after pings"]


@pytest.mark.parametrize("side", SIDES)
async def test_ping_between_fragments_is_answered_and_the_message_joined(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await peer.send(OP_BINARY, b"frag", fin=False)
            await peer.send(OP_PING, b"p")
            await peer.send(OP_CONTINUATION, b"mented")
            assert await transport.receive() == b"fragmented"
            assert await peer.event() == Pong(b"p")


@pytest.mark.parametrize("side", SIDES)
async def test_unsolicited_pong_is_ignored(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await peer.send(OP_PONG, b"unasked")
            await peer.send(OP_BINARY, b"next")
            assert await transport.receive() == b"next"


@pytest.mark.parametrize("code", [4001, 1000, None])
@pytest.mark.parametrize("side", SIDES)
async def test_peer_close_is_answered_with_the_same_code(side: str, code: int | None) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await peer.stream.send_all(encode_close(code, "bye", mask=peer.client))
            with pytest.raises(TransportClosed):
                await transport.receive()
            assert transport.close_code == code
            answer = await peer.event()
            assert type(answer) is Close
            assert answer.code == (code or 1000)
            await peer.eof()
            with pytest.raises(TransportClosed):
                await transport.receive()
            with pytest.raises(TransportClosed):
                await transport.send(b"too late")
            await transport.aclose()  # already closed: returns at once


@pytest.mark.parametrize("side", SIDES)
async def test_wrongly_masked_frame_closes_with_1002(side: str) -> None:
    """A server must get masked frames and a client unmasked ones."""
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await peer.send(OP_BINARY, b"wrong mask", mask=not peer.client)
            with pytest.raises(TransportClosed):
                await transport.receive()
            answer = await peer.event()
            assert type(answer) is Close and answer.code == 1002
            await peer.eof()
            with pytest.raises(TransportClosed):
                await transport.send(b"x")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT])
async def test_message_over_max_message_closes_with_1009(side: str, opcode: int) -> None:
    async with transport_and_peer(side, max_message=1000) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await peer.send(opcode, b"a" * 1000)  # exactly the limit is fine
            assert await transport.receive() == (b"" if opcode == OP_BINARY else b"\xff") + (
                b"a" * 1000)
            await peer.send(opcode, b"a" * 1001)
            with pytest.raises(TransportClosed):
                await transport.receive()
            answer = await peer.event()
            assert type(answer) is Close and answer.code == 1009
            await peer.eof()


@pytest.mark.parametrize("side", SIDES)
async def test_invalid_utf8_text_closes_with_1007(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await peer.send(OP_TEXT, b"\xc3\x28")
            with pytest.raises(TransportClosed):
                await transport.receive()
            answer = await peer.event()
            assert type(answer) is Close and answer.code == 1007
            await peer.eof()


@pytest.mark.parametrize("side", SIDES)
async def test_text_message_comes_back_prefixed_with_0xff(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            await peer.send(OP_TEXT, "héllo".encode())
            await peer.send(OP_TEXT, b"")
            assert await transport.receive() == b"\xff" + "héllo".encode()
            assert await transport.receive() == b"\xff"


@pytest.mark.parametrize("side", SIDES)
async def test_aclose_sends_its_code_and_waits_for_the_peers_close(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            closed = trio.Event()

            async def close() -> None:
                await transport.aclose(4000, "done here")
                closed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close)
                answer = await peer.event()
                assert answer == Close(4000, "done here")
                await peer.send(OP_BINARY, b"dropped")  # still arriving: dropped
                await peer.send(OP_PING, b"ignored")
                await trio.testing.wait_all_tasks_blocked()
                assert not closed.is_set()  # still waiting for the peer's close frame
                await peer.stream.send_all(encode_close(4000, "", mask=peer.client))
            await peer.eof()  # aclose returned after closing the socket
            with pytest.raises(TransportClosed):
                await transport.send(b"after close")
            with pytest.raises(TransportClosed):
                await transport.send_many([b"after close"])
            with pytest.raises(TransportClosed):
                await transport.receive()
            await transport.aclose()  # idempotent


@pytest.mark.parametrize("side", SIDES)
async def test_aclose_returns_when_the_peer_just_hangs_up(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.aclose)
                answer = await peer.event()
                assert answer == Close(1000, "")
                await peer.stream.aclose()


async def test_aclose_with_a_long_reason_still_fits_a_control_frame() -> None:
    async with transport_and_peer("server") as (transport, peer):
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.aclose, 1011, "x" * 500)
                answer = await peer.event()
                assert type(answer) is Close and answer.code == 1011
                assert answer.reason == "x" * 123
                await peer.stream.aclose()


@pytest.mark.parametrize("how", ["close", "reset", "mid-frame"])
@pytest.mark.parametrize("side", SIDES)
async def test_peer_vanishing_raises_transport_closed(side: str, how: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        with trio.fail_after(TIMEOUT):
            if how == "reset":
                reset_on_close(peer.stream)
            elif how == "mid-frame":
                frame = encode_frame(OP_BINARY, b"cut short", mask=peer.client)
                await peer.stream.send_all(frame[:5])
            await peer.stream.aclose()
            with pytest.raises(TransportClosed):
                await transport.receive()
            with pytest.raises(TransportClosed):
                await transport.receive()


@pytest.mark.parametrize("side", SIDES)
async def test_sending_to_a_vanished_peer_raises_transport_closed(side: str) -> None:
    async with transport_and_peer(side) as (transport, peer):
        reset_on_close(peer.stream)
        await peer.stream.aclose()
        with trio.fail_after(TIMEOUT):
            with pytest.raises(TransportClosed):
                while True:  # the first writes may still fit the kernel's buffer
                    await transport.send(payload(65536))
            with pytest.raises(TransportClosed):
                await transport.send_many([b"x"])
            with pytest.raises(TransportClosed):
                await transport.receive()


async def test_transport_closes_its_side_after_the_peer_half_closes() -> None:
    async with transport_and_peer("server") as (transport, peer):
        assert isinstance(peer.stream, trio.SocketStream)
        await peer.stream.send_eof()
        with trio.fail_after(TIMEOUT), pytest.raises(TransportClosed):
            await transport.receive()
        await transport.aclose()
        with trio.fail_after(1):  # a close reaches a loopback peer at once
            await peer.eof()


async def test_buffered_bytes_from_the_handshake_come_first() -> None:
    async with tcp_pair() as (client, server):
        early = encode_frame(OP_BINARY, b"early", mask=True)
        transport = WebSocketTransport(server, "client", client=False, max_message=BIG,
                                       buffered=early + early[:3])
        peer = RawPeer(client, client=True)
        with trio.fail_after(TIMEOUT):
            assert await transport.receive() == b"early"
            await client.send_all(early[3:])
            assert await transport.receive() == b"early"
            await peer.send(OP_BINARY, b"later")
            assert await transport.receive() == b"later"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transport.aclose)
                await peer.answer_close()
            await peer.eof()


# ---------------------------------------------------------------- connect()


Handler = Callable[[trio.SocketStream, str, dict[str, str], bytes], Awaitable[None]]


@asynccontextmanager
async def ws_server(handler: Handler) -> AsyncIterator[int]:
    """A one-connection server on loopback; yields its port. ``handler`` gets the stream,
    the request line, the headers and any bytes after the head."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]

    async def serve_one() -> None:
        stream = await listener.accept()
        async with stream:
            head, rest = await read_head(stream)
            line, headers = parse_head(head)
            await handler(stream, line, headers, rest)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            yield port
            nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()


async def _wait_for_eof(stream: trio.SocketStream) -> None:
    await read_to_eof(stream)


def answer_with(response: bytes | Callable[[str], bytes]) -> Handler:
    """A handler that sends ``response`` (or ``response(key)``), ends its side and waits
    for the client to hang up."""

    async def handler(stream: trio.SocketStream, line: str, headers: dict[str, str],
                      rest: bytes) -> None:
        data = response(headers["sec-websocket-key"]) if callable(response) else response
        try:
            await stream.send_all(data)
            await stream.send_eof()  # a body without a length ends here
        except trio.BrokenResourceError:
            return  # the client hung up before reading it all
        await _wait_for_eof(stream)

    return handler


async def dial(port: int, path: str = "/t", headers: list[tuple[bytes, bytes]] | None = None
               ) -> WebSocketTransport:
    with trio.fail_after(TIMEOUT):
        return await connect(f"ws://127.0.0.1:{port}{path}", subprotocol=SUBPROTOCOL,
                             max_message=BIG, headers=headers or [])


@pytest.mark.parametrize(("suffix", "target"), [
    ("/tooti/v1/tunnel?token=abc&x=1", "/tooti/v1/tunnel?token=abc&x=1"),
    ("", "/"),
    ("/a%20b/c", "/a%20b/c"),
    ("?only=query", "/?only=query"),
])
async def test_connect_sends_the_urls_target_and_completes(suffix: str, target: str) -> None:
    seen: list[tuple[str, dict[str, str]]] = []

    async def handler(stream: trio.SocketStream, line: str, headers: dict[str, str],
                      rest: bytes) -> None:
        seen.append((line, headers))
        await stream.send_all(upgrade_response(headers["sec-websocket-key"], SUBPROTOCOL))
        peer = RawPeer(stream, client=False, buffered=rest)
        assert await peer.message() == b"from client"
        await peer.send(OP_BINARY, b"from server")
        await peer.answer_close()
        await peer.eof()

    async with ws_server(handler) as port:
        transport = await dial(port, suffix, headers=[(b"authorization", b"Bearer t0k")])
        with trio.fail_after(TIMEOUT):
            await transport.send(b"from client")
            assert await transport.receive() == b"from server"
            await transport.aclose()
    ((line, headers),) = seen
    assert line == f"GET {target} HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{port}"
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-version"] == "13"
    assert headers["sec-websocket-protocol"] == SUBPROTOCOL
    assert headers["authorization"] == "Bearer t0k"
    assert len(base64.b64decode(headers["sec-websocket-key"], validate=True)) == 16
    assert transport.remote == f"ws://127.0.0.1:{port}{suffix}"


async def test_connect_delivers_frames_sent_with_the_101() -> None:
    """The server's first frames in the same packet as its 101: the first receive()
    returns them, and a ping among them is answered."""

    async def handler(stream: trio.SocketStream, line: str, headers: dict[str, str],
                      rest: bytes) -> None:
        await stream.send_all(
            upgrade_response(headers["sec-websocket-key"], SUBPROTOCOL)
            + encode_frame(OP_BINARY, b"first", mask=False)
            + encode_frame(OP_PING, b"ping!", mask=False)
            + encode_frame(OP_BINARY, b"second", mask=False)[:4])
        peer = RawPeer(stream, client=False)
        assert await peer.event() == Pong(b"ping!")
        await stream.send_all(encode_frame(OP_BINARY, b"second", mask=False)[4:])
        await peer.answer_close()

    async with ws_server(handler) as port:
        transport = await dial(port)
        with trio.fail_after(TIMEOUT):
            assert await transport.receive() == b"first"
            assert await transport.receive() == b"second"
            await transport.aclose()


def _bad_101(key: str, *, accept: str | None, protocol: str | None) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade"]
    if accept is not None:
        lines.append(f"Sec-WebSocket-Accept: {accept}")
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize(("response", "needle"), [
    (lambda key: _bad_101(key, accept=accept_key(KEY), protocol=SUBPROTOCOL),
     "Sec-WebSocket-Accept"),
    (lambda key: _bad_101(key, accept=None, protocol=SUBPROTOCOL), "Sec-WebSocket-Accept"),
    (lambda key: _bad_101(key, accept=accept_key(key), protocol="other.v2"), "other.v2"),
    (lambda key: _bad_101(key, accept=accept_key(key), protocol=None), "subprotocol"),
], ids=["wrong-accept", "no-accept", "other-subprotocol", "no-subprotocol"])
async def test_connect_rejects_a_bad_101(response: Callable[[str], bytes], needle: str
                                         ) -> None:
    async with ws_server(answer_with(response)) as port:
        with pytest.raises(HandshakeFailed) as failed:
            await dial(port)
    assert failed.value.status == 101
    assert needle in failed.value.reason


@pytest.mark.parametrize(("response", "status", "reason"), [
    (b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n"
     b"connection: close\r\n\r\nnope", 403, "nope"),
    (b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n  until the end\n", 400,
     "until the end"),
    (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", 503,
     "(no reason given)"),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nnot\r\n2\r\n a\r\n"
     b"a\r\n websocket\r\n0\r\n\r\n", 200, "not a websocket"),
], ids=["403", "400-until-eof", "503-empty", "200-chunked"])
async def test_connect_reports_a_refusal_with_its_status_and_body(
        response: bytes, status: int, reason: str) -> None:
    async with ws_server(answer_with(response)) as port:
        with pytest.raises(HandshakeFailed) as failed:
            await dial(port)
    assert (failed.value.status, failed.value.reason) == (status, reason)
    assert str(status) in str(failed.value)


async def test_connect_keeps_only_the_start_of_a_huge_refusal_body() -> None:
    body = b"r" * 100_000
    response = b"HTTP/1.1 403 Forbidden\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    async with ws_server(answer_with(response)) as port:
        with pytest.raises(HandshakeFailed) as failed:
            await dial(port)
    assert failed.value.status == 403
    assert 4096 <= len(failed.value.reason) < 100_000


@pytest.mark.parametrize("response", [
    b"garbage\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nX-Pad: " + b"a" * 20_000,
], ids=["garbage-head", "ssh-banner", "tls-bytes", "silent-close", "cut-101",
        "endless-head"])
async def test_connect_reports_a_non_http_answer_as_status_0(response: bytes) -> None:
    async def handler(stream: trio.SocketStream, line: str, headers: dict[str, str],
                      rest: bytes) -> None:
        await stream.send_all(response)
        await stream.send_eof()  # the answer is all there is
        await _wait_for_eof(stream)

    async with ws_server(handler) as port:
        with pytest.raises(HandshakeFailed) as failed:
            await dial(port)
    assert failed.value.status == 0


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:1/tooti/v1/tunnel",
    "https://example.com/",
    "ftp://127.0.0.1/",
    "ws:///no-host",
    "not a url",
    "",
])
async def test_connect_refuses_a_non_ws_url(url: str) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(HandshakeFailed) as failed:
        await connect(url, subprotocol=SUBPROTOCOL, max_message=BIG)
    assert failed.value.status == 0


async def test_connect_to_a_closed_port_raises_oserror() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    with trio.fail_after(TIMEOUT), pytest.raises(OSError):
        await connect(f"ws://127.0.0.1:{port}/", subprotocol=SUBPROTOCOL, max_message=BIG)


def _self_signed() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and its key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate, and a client context trusting it."""
    cert, key = _self_signed()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, ssl.create_default_context(cadata=cert.decode())


async def test_connect_over_tls(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve_one() -> None:  # upgrade, send a frame, expect one back, close
        raw = await listeners[0].accept()
        stream = trio.SSLStream(raw, server_context, server_side=True, https_compatible=True)
        async with stream:
            head, _ = await read_head(stream)
            _, headers = parse_head(head)
            await stream.send_all(upgrade_response(headers["sec-websocket-key"], SUBPROTOCOL)
                                  + encode_frame(OP_BINARY, b"over tls", mask=False))
            peer = RawPeer(stream, client=False)
            assert await peer.message() == b"reply"
            await peer.answer_close()

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_one)
                transport = await connect(f"wss://127.0.0.1:{port}/tunnel",
                                          subprotocol=SUBPROTOCOL, max_message=BIG,
                                          ssl_context=client_context)
                assert await transport.receive() == b"over tls"
                await transport.send(b"reply")
                await transport.aclose()
    finally:
        await listeners[0].aclose()


async def test_connect_over_tls_refuses_an_untrusted_certificate(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Without ssl_context the system's trust store is used: a self-signed certificate
    fails the handshake."""
    server_context, _ = tls
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def accept_and_drop() -> None:
        stream = await listeners[0].accept()
        with pytest.raises(trio.BrokenResourceError):  # the client gave up
            await trio.SSLStream(stream, server_context, server_side=True).do_handshake()
        await trio.aclose_forcefully(stream)

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_and_drop)
                with pytest.raises(HandshakeFailed) as failed:
                    await connect(f"wss://127.0.0.1:{port}/tunnel", subprotocol=SUBPROTOCOL,
                                  max_message=BIG)
        assert failed.value.status == 0
        assert "certificate" in failed.value.reason.lower()  # the cause is not lost
    finally:
        await listeners[0].aclose()


# ---------------------------------------------------------------- the gateway's listener


@pytest.fixture
async def guarded(nursery: trio.Nursery) -> AsyncIterator[Network]:
    """A gateway that requires a join token of every dialer."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", join_token=JOIN_TOKEN), tunnel)
    urls = await nursery.start(gateway.serve)
    yield Network(nursery, gateway, urls[0], tunnel)
    gateway.shutdown()


async def test_http_requests_and_keep_alive_go_to_hypercorn(network: Network) -> None:
    with trio.fail_after(TIMEOUT):
        async with network.client() as http:
            responses = [await http.get(path) for path in
                         ("/healthz", "/v1/models", "/healthz", "/nowhere", "/healthz")]
            ports = {r.extensions["network_stream"].get_extra_info("client_addr")
                     for r in responses}
    assert [r.status_code for r in responses] == [200, 200, 200, 404, 200]
    assert responses[1].json() == {"object": "list", "data": []}
    assert len(ports) == 1  # one kept-alive connection carried them all


async def test_raw_keep_alive_serves_pipelined_requests(network: Network) -> None:
    stream = await open_gateway(network)
    async with stream:
        http = HTTPClient(stream)
        request = h11.Request(method="GET", target="/healthz", headers=[("host", "x")])
        with trio.fail_after(TIMEOUT):
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 3)
            for _ in range(3):  # three requests in one packet: three replies in order
                http.conn.send(request)  # (keeps h11's client state in step)
                http.conn.send(h11.EndOfMessage())
                reply = await http.reply()
                assert reply.status == 200 and b'"ok"' in reply.body
                http.conn.start_next_cycle()


async def test_tunnel_upgrade_from_an_independent_client(network: Network) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(network.tunnel_url, subprotocols=[SUBPROTOCOL]) as ws:
            assert ws.subprotocol == SUBPROTOCOL
    await assert_healthy(network)


async def test_real_node_tunnels_run_on_the_socket_not_through_asgi(network: Network
                                                                     ) -> None:
    with trio.fail_after(TIMEOUT):
        await network.add_node(node_id="direct")
        async with network.client() as http:
            response = await http.post("/v1/chat/completions", json={
                "model": "tooti-sim", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    assert response.headers["x-tooti-node"] == "direct"
    assert network.gateway.station.admission.sessions
    sessions = network.gateway.station.admission.sessions
    assert {type(s.transport) for s in sessions} == {WebSocketTransport}


async def _refusal(network: Network, request: bytes) -> Reply:
    """Send a raw upgrade request; read the refusal and check the connection ends."""
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(request)
            head, rest = await read_head(stream)
            rest += await read_to_eof(stream)
    line, headers = parse_head(head)
    status = int(line.split()[1])
    assert line.startswith("HTTP/1.1 ")
    return Reply(status, headers, rest)


@pytest.mark.parametrize(("options", "status", "reason"), [
    ({"subprotocol": None}, 400, "subprotocol tooti.v1 required"),
    ({"subprotocol": "other.v1"}, 400, "subprotocol tooti.v1 required"),
    ({"version": None}, 426, "WebSocket version 13 with a key is required"),
    ({"version": "8"}, 426, "WebSocket version 13 with a key is required"),
    ({"key": None}, 426, "WebSocket version 13 with a key is required"),
], ids=["no-subprotocol", "other-subprotocol", "no-version", "version-8", "no-key"])
async def test_raw_tunnel_refusals(network: Network, options: dict[str, str | None],
                                   status: int, reason: str) -> None:
    reply = await _refusal(network, upgrade_bytes(headers=upgrade_headers(**options)))
    assert reply.status == status
    assert reply.body.decode() == reason
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.headers["connection"] == "close"
    assert int(reply.headers["content-length"]) == len(reply.body)
    await assert_healthy(network)


async def test_subprotocol_among_several_is_accepted(network: Network) -> None:
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            offered = upgrade_headers(subprotocol=f"chat, {SUBPROTOCOL}")
            await stream.send_all(upgrade_bytes(headers=offered))
            head, _ = await read_head(stream)
    line, headers = parse_head(head)
    assert line.startswith("HTTP/1.1 101")
    assert headers["sec-websocket-protocol"] == SUBPROTOCOL


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_missing_or_wrong_join_token_is_refused_on_the_raw_path(
        guarded: Network, token: str | None) -> None:
    reply = await _refusal(guarded, upgrade_bytes(headers=upgrade_headers(token=token)))
    assert (reply.status, reply.body) == (403, b"invalid token")
    assert reply.headers["content-type"].startswith("text/plain")


async def test_right_join_token_is_accepted_on_the_raw_path(guarded: Network) -> None:
    stream = await open_gateway(guarded)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(upgrade_bytes(headers=upgrade_headers(token=JOIN_TOKEN)))
            head, rest = await read_head(stream)
            line, headers = parse_head(head)
            assert line.startswith("HTTP/1.1 101")
            assert headers["sec-websocket-accept"] == accept_key(KEY)
            await _expect_pong(stream, rest, b"admitted")


async def test_draining_gateway_refuses_tunnels(network: Network) -> None:
    network.gateway.station.admission.closed = True
    reply = await _refusal(network, upgrade_bytes())
    assert (reply.status, reply.body) == (403, b"gateway is shutting down")


async def _expect_pong(stream: trio.SocketStream, buffered: bytes, payload: bytes) -> None:
    """The gateway's tunnel transport answers a ping: proof the tunnel runs."""
    peer = RawPeer(stream, client=True, buffered=buffered)
    await peer.send(OP_PING, payload)
    assert await peer.event() == Pong(payload)


@pytest.mark.parametrize("target", [TUNNEL_PATH, TUNNEL_PATH + "?token=x"])
async def test_upgrade_sent_byte_by_byte_is_still_a_tunnel(network: Network, target: str
                                                           ) -> None:
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            for byte in upgrade_bytes(target):
                await stream.send_all(bytes([byte]))
                await trio.testing.wait_all_tasks_blocked()  # the gateway read it
            head, rest = await read_head(stream)
            line, headers = parse_head(head)
            assert line.startswith("HTTP/1.1 101")
            assert headers["sec-websocket-accept"] == accept_key(KEY)
            assert headers["sec-websocket-protocol"] == SUBPROTOCOL
            await _expect_pong(stream, rest, b"slow")


async def test_http_request_sent_byte_by_byte_reaches_hypercorn(network: Network) -> None:
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            for byte in b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n":
                await stream.send_all(bytes([byte]))
                await trio.testing.wait_all_tasks_blocked()
            data = await read_to_eof(stream)
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"status":"ok"' in data.replace(b" ", b"")


async def test_first_frames_sent_with_the_upgrade_are_not_lost(network: Network) -> None:
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(upgrade_bytes() + encode_frame(OP_PING, b"early", mask=True))
            head, rest = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101")
            peer = RawPeer(stream, client=True, buffered=rest)
            assert await peer.event() == Pong(b"early")


async def test_protocol_violation_on_a_tunnel_closes_it_with_1002(network: Network) -> None:
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(upgrade_bytes())
            head, rest = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101")
            peer = RawPeer(stream, client=True, buffered=rest)
            await peer.send(OP_BINARY, b"unmasked", mask=False)
            answer = await peer.event()
            assert type(answer) is Close and answer.code == 1002
            await peer.eof()
    await assert_healthy(network)


async def test_close_frame_on_the_raw_path_is_answered(network: Network) -> None:
    """A dialer that closes right after the upgrade gets the gateway's close frame."""
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(upgrade_bytes() + encode_close(1000, "bye", mask=True))
            head, rest = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101")
            peer = RawPeer(stream, client=True, buffered=rest)
            answer = await peer.event()
            assert type(answer) is Close and answer.code == 1000
            await peer.eof()
    await assert_healthy(network)


@pytest.mark.parametrize("data", [
    b"GET /tooti/v1/tunnel \x00\x01\x02 garbage\r\n\r\n",
    b"GET /tooti/v1/tunnel HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /tooti/v1/tunnel HTTP/1.1\r\nupgrade: websocket\r\n\r\n",  # no host
    b"GET /tooti/v1/tunnel HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
], ids=["bad-request-line", "bad-header", "no-host", "bad-length"])
async def test_garbage_after_the_tunnel_prefix_gets_an_error_not_a_hang(
        network: Network, data: bytes) -> None:
    """Not valid HTTP: the listener hands the bytes to hypercorn, which refuses them."""
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(data)
            answer = await read_to_eof(stream)
    assert answer.startswith(b"HTTP/1.1 400"), answer  # hypercorn's answer, then a close
    await assert_healthy(network)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /tooti/v1/tunnel HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", 404),
    (b"GET /tooti/v1/tunnels HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", 404),
    (b"GET /tooti/v1/tunnel HTTP/1.0\r\n\r\n", 404),
], ids=["plain-get", "longer-path", "http-1.0"])
async def test_non_upgrade_requests_to_tunnel_like_paths_go_to_hypercorn(
        network: Network, request_bytes: bytes, status: int) -> None:
    stream = await open_gateway(network)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(request_bytes)
            answer = await read_to_eof(stream)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer
    assert b"not_found" in answer


@pytest.mark.parametrize("data", [b"", b"G", b"GET /tooti/v1/tu", b"GET /tooti/v1/tunnel HT",
                                  b"GET /he"])
async def test_client_that_hangs_up_early_does_not_break_the_listener(
        network: Network, data: bytes) -> None:
    for _ in range(3):
        stream = await open_gateway(network)
        with trio.fail_after(TIMEOUT):
            if data:
                await stream.send_all(data)
            await stream.send_eof()
            await read_to_eof(stream)  # the gateway closes its side too
            await stream.aclose()
    await assert_healthy(network)


async def test_client_that_resets_does_not_break_the_listener(network: Network) -> None:
    for data in (b"", b"GET /tooti/v1/", upgrade_bytes()[:-2]):
        stream = await open_gateway(network)
        if data:
            await stream.send_all(data)
        reset_on_close(stream)
        await stream.aclose()
    await assert_healthy(network)


# ---------------------------------------------------------------- the ASGI fallback


async def test_tunnel_upgrade_on_a_kept_alive_connection_goes_through_asgi(
        network: Network) -> None:
    stream = await open_gateway(network)
    async with stream:
        http = HTTPClient(stream)
        with trio.fail_after(TIMEOUT):
            first = await http.request("/healthz")
            assert first.status == 200 and b'"ok"' in first.body
            upgrade = await http.request(TUNNEL_PATH, upgrade_headers())
            assert upgrade.status == 101
            assert upgrade.headers["sec-websocket-protocol"] == SUBPROTOCOL
            assert upgrade.headers["sec-websocket-accept"] == accept_key(KEY)
            await _expect_pong(stream, http.trailing, b"via asgi")
    await assert_healthy(network)


@pytest.mark.parametrize(("target", "options", "status", "reason"), [
    ("/tooti/v1/nope", {}, 404, b"unknown path"),
    (TUNNEL_PATH, {"subprotocol": None}, 400, b"subprotocol tooti.v1 required"),
], ids=["unknown-path", "no-subprotocol"])
async def test_refusals_on_a_kept_alive_connection(
        network: Network, target: str, options: dict[str, str | None], status: int,
        reason: bytes) -> None:
    stream = await open_gateway(network)
    async with stream:
        http = HTTPClient(stream)
        with trio.fail_after(TIMEOUT):
            assert (await http.request("/healthz")).status == 200
            refused = await http.request(target, upgrade_headers(**options))
    assert (refused.status, refused.body) == (status, reason)
    await assert_healthy(network)


async def test_upgrade_to_another_path_on_a_fresh_connection_gets_404(network: Network
                                                                        ) -> None:
    """Not the tunnel path: the listener hands it to hypercorn, whose ASGI app refuses."""
    stream = await open_gateway(network)
    async with stream:
        http = HTTPClient(stream)
        with trio.fail_after(TIMEOUT):
            refused = await http.request("/healthz", upgrade_headers())
    assert (refused.status, refused.body) == (404, b"unknown path")


async def test_join_token_is_checked_on_the_asgi_path(guarded: Network) -> None:
    for token, status in (("wrong", 403), (JOIN_TOKEN, 101)):
        stream = await open_gateway(guarded)
        async with stream:
            http = HTTPClient(stream)
            with trio.fail_after(TIMEOUT):
                assert (await http.request("/healthz")).status == 200
                reply = await http.request(TUNNEL_PATH, upgrade_headers(token=token))
        assert reply.status == status
        if status == 403:
            assert reply.body == b"invalid token"
