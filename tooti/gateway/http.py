"""Small ASGI helpers: reading bounded bodies and sending whole responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from tooti.errors import APIError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
_encoder = msgspec.json.Encoder()


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def header(scope: Scope, name: bytes) -> bytes | None:
    """Return the first value of request header ``name`` (lower-case), if any."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI server's lifespan startup and shutdown (nothing to set up)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Read the whole request body; APIError(413) past ``limit`` bytes."""
    declared = header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise APIError(413, f"request body over the {limit}-byte limit",
                               code="request_too_large")
        except ValueError:
            raise APIError(400, "bad content-length header", code="invalid_header") from None
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body over the {limit}-byte limit",
                               code="request_too_large")
            parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Headers, content_type: bytes = JSON
) -> None:
    """Send a complete response with a content-length."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any, headers: Headers) -> None:
    """Send ``obj`` as a JSON response."""
    await send_bytes(send, status, _encoder.encode(obj), headers)


async def send_error(send: Send, error: APIError, headers: Headers) -> None:
    """Send an OpenAI error object with its status (and extra headers)."""
    extra = [(k.encode(), v.encode()) for k, v in error.headers.items()]
    await send_bytes(send, error.status, error.to_json(), headers + extra)


async def cancel_on_disconnect(
    receive: Receive, send: Send, work: Callable[[Send], Awaitable[None]]
) -> bool:
    """Run ``work(send)`` until it finishes or the client disconnects.

    Returns True if the response was completed (its last body part handed to
    the server), False if the client left first. Hypercorn reports a client's
    disconnect only as an ``http.disconnect`` message; it does not cancel the
    app. A watcher task waits for that message (after the body has been read,
    so nothing else is received) and cancels ``work``, which propagates the
    cancellation down the tunnel to the backend. Hypercorn also sends
    ``http.disconnect`` once a response is complete; the watcher ignores it
    then, so a finished response is never taken for a cancelled one.
    """
    complete = False

    async def tracking_send(message: dict[str, Any]) -> None:
        nonlocal complete
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete = True
        await send(message)

    try:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not complete:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await work(tracking_send)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The watcher never raises, so the group holds ``work``'s own exception.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return complete
