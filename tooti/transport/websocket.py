"""WebSocket transports: the dialing side (trio-websocket) and the accepting side (ASGI)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from trio_websocket import ConnectionClosed, WebSocketConnection

from tooti.transport import TransportClosed

SUBPROTOCOL = "tooti.v1"
TUNNEL_PATH = "/tooti/v1/tunnel"


class ClientWebSocketTransport:
    """A dialed WebSocket (trio-websocket) carrying tunnel frames."""

    def __init__(self, ws: WebSocketConnection, remote: str) -> None:
        self._ws = ws
        self.remote = remote

    async def send(self, message: bytes) -> None:
        """Send one binary message."""
        try:
            await self._ws.send_message(message)
        except ConnectionClosed:
            raise TransportClosed("websocket closed") from None

    async def receive(self) -> bytes:
        """Receive one message; a text message is returned encoded (and rejected upstream)."""
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise TransportClosed(f"websocket closed: {exc.reason}") from None
        return message if isinstance(message, bytes) else b"\xff" + message.encode()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket with a close code and reason."""
        await self._ws.aclose(code, reason[:120])


ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


class ASGIWebSocketTransport:
    """The accepting side: an ASGI websocket connection served by hypercorn."""

    def __init__(self, receive: ASGIReceive, send: ASGISend, remote: str) -> None:
        self._receive = receive
        self._send = send
        self.remote = remote
        self._closed = False

    async def send(self, message: bytes) -> None:
        """Send one binary message."""
        if self._closed:
            raise TransportClosed("websocket closed")
        try:
            await self._send({"type": "websocket.send", "bytes": message})
        except Exception as exc:  # hypercorn raises various errors once closed
            self._closed = True
            raise TransportClosed(f"websocket closed: {exc!r}") from None

    async def receive(self) -> bytes:
        """Receive one message (text frames come back prefixed so they fail to decode)."""
        if self._closed:
            raise TransportClosed("websocket closed")
        event = await self._receive()
        kind = event["type"]
        if kind == "websocket.receive":
            data = event.get("bytes")
            if data is not None:
                return bytes(data)
            return b"\xff" + str(event.get("text") or "").encode()
        self._closed = True
        raise TransportClosed(f"websocket closed ({event.get('code', 1005)})")

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason[:120]})
        except Exception:  # already gone: nothing left to close
            return
