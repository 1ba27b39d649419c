"""``GET /admin/v1/events``: a snapshot, then every bus event, as server-sent events.

The stream (what ``tooti tui`` follows) is a watcher, not work: it never holds a
drain. It ends with a ``dropped`` event whose ``reason`` says why: the subscriber fell
behind (its bounded buffer overflowed), or the bus was closed, which
:meth:`~tooti.mesh.station.Station.drain` does when a drain starts ("gateway shutting
down"); a stream opened after that (a TUI reconnecting) gets its snapshot and the
``dropped`` event at once. So an open TUI no longer makes a gateway wait out its drain
grace. A keepalive comment goes out after :data:`KEEPALIVE` seconds of silence.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import trio

from tooti.mesh.events import EventBus
from tooti.mesh.http import Headers, Send
from tooti.protocol.sse import encode_event

KEEPALIVE = 15.0
"""Seconds of silence after which a comment line is sent (keeps proxies and clients sure
the stream is alive)."""


def sse(kind: str, data: Any, seq: int | None = None) -> bytes:
    """One server-sent event."""
    return encode_event(kind, data, seq)


Snapshot = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]
"""What makes a new subscriber's snapshot: a plain function, or a coroutine function
that builds a large one in batches with checkpoints between them (the admin API's
:meth:`~tooti.admin.api.AdminAPI.snapshot_async`: 10,000 peers described at once
would block the gateway's loop for a good part of a second)."""


async def event_frames(snapshot: Snapshot, bus: EventBus) -> AsyncGenerator[bytes, None]:
    """The stream's frames: subscribed before the snapshot is taken (so nothing is
    missed; events up to ``snapshot["seq"]`` are in it), then every event, a keepalive
    comment after :data:`KEEPALIVE` seconds of silence, and a ``dropped`` event naming
    the reason when the subscriber fell behind or the bus was closed. The subscription
    is released however the iteration ends (close the iterator: ``aclosing``). A
    snapshot built over several checkpoints (``snapshot`` returns an awaitable) is
    current at least up to its ``seq``; events after it reach the subscriber in order
    and describe whole peers, so applying them on top is right either way."""
    sub = bus.subscribe()
    try:
        taken = snapshot()
        if inspect.isawaitable(taken):
            taken = await taken
        yield sse("snapshot", taken)
        while True:
            with trio.move_on_after(KEEPALIVE) as idle:  # never yield inside the scope
                try:
                    event = await sub.receive.receive()
                except trio.EndOfChannel:
                    break
            if idle.cancelled_caught:
                yield b": keepalive\n\n"
                continue
            yield sse(event.kind, event.to_dict(), event.seq)
        yield sse("dropped", {"reason": sub.reason or "bus closed"})
    finally:
        bus.unsubscribe(sub)


async def stream_events(snapshot: Snapshot, bus: EventBus, send: Send, headers: Headers,
                        ) -> None:
    """:func:`event_frames` as an ASGI answer: until the client leaves, falls behind or
    the bus is closed (a drain or shutdown), which ends it with the ``dropped`` event
    (at once on a bus already closed)."""
    async with aclosing(event_frames(snapshot, bus)) as frames:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), *headers]})
        async for frame in frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
