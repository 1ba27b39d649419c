"""The TUI's events client: SSE parsing, status codes and the reconnect loop.

The gateway is faked with ``httpx.MockTransport``; the real one is exercised in
``test_tui.py``. Plain ``def`` tests running ``asyncio.run`` (the client runs on
Textual's asyncio loop).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tooti.backoff import Backoff
from tooti.tui.client import (
    AuthError,
    EventsClient,
    Status,
    StreamDropped,
    follow,
    normalize_gateway,
    parse_sse,
    reconnect_backoff,
)


def sse(kind: str, data: Any, seq: int | None = None) -> bytes:
    """One server-sent event as the gateway writes it."""
    head = f"event: {kind}\n" + (f"id: {seq}\n" if seq is not None else "")
    return (head + "data: " + json.dumps(data) + "\n\n").encode()


SNAPSHOT = sse("snapshot", {"seq": 3, "peers": [], "requests": [], "queued": 0})
JOINED = sse("peer.joined", {"seq": 4, "kind": "peer.joined", "ts": 1.0,
                             "data": {"peer": {"id": "n1"}}}, 4)


def test_parse_sse_skips_comments_and_joins_data_lines() -> None:
    stream = (b": keepalive\r\n\r\nevent: a\r\ndata: 1\r\ndata: 2\r\n\r\n"
              b"data: x\r\n\r\nevent: tail\r\ndata:no-space")

    async def collect(cut: int) -> list[tuple[str, str]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield stream[:cut]
            yield stream[cut:]

        return [item async for item in parse_sse(chunks())]

    for cut in range(len(stream) + 1):  # also between each \r and its \n
        assert asyncio.run(collect(cut)) == [("a", "1\n2"), ("message", "x"),
                                             ("tail", "no-space")], cut


def test_normalize_gateway() -> None:
    assert normalize_gateway("gw:8080") == "http://gw:8080"
    assert normalize_gateway("https://gw.example/") == "https://gw.example"
    assert normalize_gateway("") == "http://127.0.0.1:8080"


def _client(handler: Any, key: str = "") -> EventsClient:
    return EventsClient("http://gw.test", key, transport=httpx.MockTransport(handler))


async def _drain(client: EventsClient) -> list[tuple[str, dict[str, Any]]]:
    try:
        return [item async for item in client.messages()]
    finally:
        await client.aclose()


def test_messages_snapshot_deltas_and_a_drop() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = SNAPSHOT + b": keepalive\n\n" + JOINED + sse("dropped", {"reason": "behind"})
        return httpx.Response(200, content=body,
                              headers={"content-type": "text/event-stream"})

    received: list[tuple[str, dict[str, Any]]] = []

    async def run() -> None:
        client = _client(handler, key="k1")
        try:
            async for item in client.messages():
                received.append(item)
        finally:
            await client.aclose()

    with pytest.raises(StreamDropped, match="behind"):
        asyncio.run(run())
    assert [kind for kind, _ in received] == ["snapshot", "peer.joined"]
    assert received[1][1]["data"]["peer"]["id"] == "n1"
    assert seen[0].url.path == "/admin/v1/events"
    assert seen[0].headers["authorization"] == "Bearer k1"


def test_a_refused_key_is_an_auth_error_with_the_gateways_reason() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {
            "message": "a valid admin key is required", "type": "invalid_request_error",
            "param": None, "code": "invalid_admin_key"}})

    with pytest.raises(AuthError) as caught:
        asyncio.run(_drain(_client(handler, key="wrong")))
    assert caught.value.status == 401
    assert caught.value.message == "a valid admin key is required (invalid_admin_key)"


def test_follow_reconnects_with_backoff_and_waits_slowly_on_a_refused_key() -> None:
    answers = iter(["down", "stream", "401", "403", "stream"])

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if answer == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if answer in ("401", "403"):
            return httpx.Response(int(answer), json={"error": {"message": "no", "code": "c"}})
        return httpx.Response(200, content=SNAPSHOT + JOINED)

    statuses: list[Status] = []
    messages: list[str] = []
    sleeps: list[float] = []

    class Done(Exception):
        pass

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 5:
            raise Done

    backoff = Backoff(1.0, 3.0)

    async def run() -> None:
        client = _client(handler, key="k")
        try:
            await follow(client, lambda kind, data: messages.append(kind), statuses.append,
                         backoff, sleep, auth_retry=30.0)
        finally:
            await client.aclose()

    with pytest.raises(Done):
        asyncio.run(run())
    assert [s.state for s in statuses] == [
        "connecting", "reconnecting",                # refused: wait 1 s
        "connecting", "live", "reconnecting",        # stream ended: attempt reset, 1 s
        "connecting", "unauthorized",                # 401: wait auth_retry
        "connecting", "unauthorized",                # 403: loopback only
        "connecting", "live", "reconnecting",
    ]
    assert sleeps == [1.0, 1.0, 30.0, 30.0, 1.0]
    assert statuses[1].message == "cannot connect to http://gw.test"
    assert "admin key rejected" in statuses[6].message
    assert "loopback only" in statuses[8].message
    assert messages == ["snapshot", "peer.joined", "snapshot", "peer.joined"]


def test_reconnect_backoff_grows_to_ten_seconds_with_a_fifth_of_jitter() -> None:
    backoff = reconnect_backoff()
    delays = [backoff.next() for _ in range(8)]
    for delay, plain in zip(delays, [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0], strict=True):
        assert 0.8 * plain <= delay <= 1.2 * plain
