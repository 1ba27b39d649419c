"""Bug 6 of issue 14: a client that received its whole answer was served in full.

The race: the gateway holds a stream's ``data: [DONE]`` until the node's END has
arrived and the request has settled (:mod:`tooti.gateway.streamed_answer`). A node
whose END comes a moment after its ``[DONE]`` (an upstream server that closes its
response late; the embedded model under three parallel streams), or a settle that
takes a moment, leaves the client with every token and the finish reason but no
``[DONE]`` yet; a client that stops reading there and closes was taken for one that
left mid-answer: the work was cancelled before the settle, and the request recorded
``cancelled`` with estimated counts. Now it is recorded ``ok`` with the node's real
counts (:attr:`tooti.mesh.http.ResponseSend.answered`).

Both tests use raw sockets, so nothing between the test and the gateway reads on or
holds the connection open after the client stops.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import msgspec
import trio

from tests.conftest import Network, simulated
from tests.upstream import SlowUpstream, start_upstream
from tooti.backends.openai import OpenAIBackend
from tooti.settings import BackendSettings

STREAMS = 8
"""Parallel streams per round."""
ROUNDS = 5
TOKENS = 24


async def read_until_done_then_close(host: str, port: int, prompt: str,
                                     model: str = "tooti-sim",
                                     until: bytes = b"data: [DONE]",
                                     max_tokens: int = TOKENS) -> str:
    """POST a streamed chat completion over a raw socket, read until ``until``, then
    close at once; return the request id."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n")
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(head.encode() + body)
        received = b""
        while until not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed before {until!r}: {received!r}"
            received += chunk
    finally:
        await stream.aclose()  # at once: no reading on after [DONE]
    head_bytes = received.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head_bytes.startswith("http/1.1 200"), head_bytes
    return next(line.split(":", 1)[1].strip() for line in head_bytes.split("\r\n")
                if line.startswith("x-request-id:"))


async def test_a_client_closing_right_after_done_is_recorded_ok_with_real_usage(
    network: Network,
) -> None:
    await network.add_node([simulated(tokens=TOKENS)])
    finished: dict[str, dict[str, Any]] = {}
    all_in = trio.Event()
    expected: set[str] = set()

    def note(event: Any) -> None:
        if event.kind == "request.finished":
            finished[event.data["request_id"]] = event.data
            if expected and expected <= finished.keys():
                all_in.set()

    network.gateway.registry.bus.listeners.append(note)
    url = urlsplit(network.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    for round_ in range(ROUNDS):
        ids: list[str] = []

        async def one(index: int, round_: int = round_, ids: list[str] = ids) -> None:
            ids.append(await read_until_done_then_close(host, port, f"hi {round_}.{index}"))

        async with trio.open_nursery() as nursery:
            for index in range(STREAMS):
                nursery.start_soon(one, index)
        expected.update(ids)
        all_in = trio.Event()
        if expected <= finished.keys():
            all_in.set()
        with trio.fail_after(10):
            await all_in.wait()
    assert len(expected) == ROUNDS * STREAMS
    for request_id in expected:
        event = finished[request_id]
        assert event["status"] == "ok", event
        assert event["estimated"] is False, event
        assert event["completion_tokens"] == TOKENS, event
        assert event["error"] is None, event


PROMPT_TOKENS, COMPLETION_TOKENS = 13, 60
"""What the late upstream reports (the figures of the issue)."""


class LateEnd(SlowUpstream):
    """Streams its whole answer (tokens, finish reason, usage, ``[DONE]``) at once, then
    keeps the response open until :attr:`release` is set, as a server that closes its
    response a moment after ``[DONE]``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def _generate(self, send: Any, stream: bool) -> None:
        assert stream
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        def event(choices: list[Any], **extra: Any) -> bytes:
            return b"data: " + msgspec.json.encode({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                "model": "slow", "choices": choices, **extra}) + b"\n\n"

        body = b"".join(event([{"index": 0, "delta": {"content": f" t{i}"},
                                "finish_reason": None}]) for i in range(COMPLETION_TOKENS))
        body += event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        body += event([], usage={"prompt_tokens": PROMPT_TOKENS,
                                 "completion_tokens": COMPLETION_TOKENS,
                                 "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS})
        await send({"type": "http.response.body", "body": body + b"data: [DONE]\n\n",
                    "more_body": True})
        await self.release.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_a_client_leaving_after_the_finish_reason_while_done_is_held_is_ok(
    network: Network, nursery: trio.Nursery,
) -> None:
    """The client has every token and the finish reason; ``[DONE]`` is held for the
    node's END, which comes after the client has closed: recorded ok, real counts."""
    upstream = LateEnd()
    url = await start_upstream(nursery, upstream)
    await network.add_node([OpenAIBackend(BackendSettings(type="openai", url=url))])
    station = network.gateway.station
    serve_http = station._http
    left = trio.Event()

    async def watched(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # The gateway sees the client leave either as ``http.disconnect`` (its watcher
        # task) or, on tooti's HTTP/1.1 connections, through its disconnect watch,
        # which tells the connection (``client_left``).
        connection = scope.get("extensions", {}).get("tooti.http1")
        if connection is not None:
            told = connection.client_left

            def client_left() -> None:
                told()
                left.set()

            connection.client_left = client_left

        async def receive_watched() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect":
                left.set()  # the gateway has seen the client leave
            return message
        await serve_http(scope, receive_watched, send)

    station._http = watched  # type: ignore[method-assign]
    finished: dict[str, dict[str, Any]] = {}
    recorded = trio.Event()

    def note(event: Any) -> None:
        if event.kind == "request.finished":
            finished[event.data["request_id"]] = event.data
            recorded.set()

    network.gateway.registry.bus.listeners.append(note)
    target = urlsplit(network.url)
    with trio.fail_after(10):
        request_id = await read_until_done_then_close(
            target.hostname or "127.0.0.1", target.port or 80, "hi", model="slow",
            until=b'"finish_reason":"stop"', max_tokens=100)
        await left.wait()
        upstream.release.set()  # the node's END now follows its [DONE]
        await recorded.wait()
    event = finished[request_id]
    assert event["status"] == "ok", event
    assert event["estimated"] is False, event
    assert (event["prompt_tokens"], event["completion_tokens"]) == (
        PROMPT_TOKENS, COMPLETION_TOKENS), event
