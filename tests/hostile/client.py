"""A scripted hostile HTTP client: raw loopback sockets speaking bad HTTP to a gateway.

Built on the raw-socket helpers of ``tests/test_websocket_transport.py`` (reading a
head, reading to EOF, the tunnel upgrade request). Any loopback address works as a
source (``127.0.0.2`` is "another client IP"). A response is parsed by an h11 client
that is told a request was sent, so a refusal written before any request (a
connection-limit 503) parses as well as an ordinary answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import msgspec
import pytest
import trio

from tests.conftest import Network
from tests.test_websocket_transport import (
    port_of,
    read_head,
    read_to_eof,
    upgrade_bytes,
    upgrade_headers,
)
from tooti.gateway.app import Gateway
from tooti.settings import GatewaySettings, TunnelSettings

__all__ = [
    "TIMEOUT",
    "Answer",
    "ResponseReader",
    "assert_error_object",
    "assert_no_tracebacks",
    "connect",
    "exchange",
    "read_head",
    "read_response",
    "read_to_eof",
    "request_bytes",
    "start_network",
    "upgrade_bytes",
    "upgrade_headers",
]

TIMEOUT = 10.0
"""Hang guard around every exchange (never reached when the gateway behaves)."""


@dataclass
class Answer:
    """One HTTP response as a client saw it."""

    status: int
    headers: dict[str, str]
    """Names lower-cased; a repeated header keeps its last value."""
    body: bytes

    def json(self) -> object:
        return msgspec.json.decode(self.body)


async def start_network(nursery: trio.Nursery, **settings: object) -> Network:
    """A gateway with ``settings`` on a loopback port (no nodes yet)."""
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", **settings), tunnel)  # type: ignore[arg-type]
    urls = await nursery.start(gateway.serve)
    return Network(nursery, gateway, urls[0], tunnel)


async def connect(url: str, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection to the gateway at ``url`` from loopback address ``source``."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port_of(url)))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def request_bytes(method: str, target: str, body: bytes = b"",
                  headers: Iterable[tuple[str, str]] | None = None) -> bytes:
    """A request written by hand: exactly these headers (a content-length is added for a
    body only when ``headers`` is None), so every header may be wrong."""
    if headers is None:
        headers = [("host", "127.0.0.1"), ("content-type", "application/json")]
        if body or method == "POST":
            headers.append(("content-length", str(len(body))))
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ResponseReader:
    """Parses one response (any framing) from bytes fed as they arrive."""

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.CLIENT)
        self._conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        self._conn.send(h11.EndOfMessage())
        self._head: h11.Response | None = None
        self._body = b""

    def feed(self, data: bytes) -> Answer | None:
        """Take ``data`` (``b""``: the connection ended); the answer once complete.
        AssertionError if the connection ended without one."""
        if not data and self._head is None:
            raise AssertionError("the connection ended without a response")
        self._conn.receive_data(data)
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                self._head = event
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                assert self._head is not None
                headers = {name.decode().lower(): value.decode("latin-1")
                           for name, value in self._head.headers}
                return Answer(self._head.status_code, headers, self._body)


async def read_response(stream: trio.abc.ReceiveStream) -> Answer:
    """Read one response (any framing); AssertionError if the connection ends first."""
    reader = ResponseReader()
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        answer = reader.feed(bytes(data))
        if answer is not None:
            return answer


async def exchange(url: str, data: bytes, source: str = "127.0.0.1") -> Answer:
    """Send ``data`` on a new connection and read one response."""
    stream = await connect(url, source)
    async with stream:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(data)
            return await read_response(stream)


def assert_error_object(answer: Answer, status: int | None = None) -> dict[str, object]:
    """The answer is an OpenAI error object (with ``status``, if given); returns it."""
    if status is not None:
        assert answer.status == status, answer
    assert answer.status >= 400, answer
    assert answer.headers.get("content-type", "").startswith("application/json"), answer
    body = answer.json()
    assert isinstance(body, dict) and set(body) == {"error"}, answer
    error = body["error"]
    assert isinstance(error, dict), answer
    assert {"message", "type", "param", "code"} <= set(error), answer
    assert isinstance(error["message"], str) and error["message"], answer
    assert isinstance(error["type"], str) and error["type"], answer
    return error


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing a client did put a traceback or an error line in the log."""
    bad = [r for r in caplog.records
           if r.exc_info or r.exc_text or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name} {r.levelname}: {r.getMessage()}" for r in bad]
