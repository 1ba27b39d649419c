"""What a pass-through request changes on the one proxy path
(:meth:`tooti.gateway.proxy.Proxy.forward`): how its body reaches a node, and how the
node's answer reaches the client. Everything else (admission, billing, attempts,
failover, tiers, timeouts, settle order, events) is the chat endpoints'.

* **The body.** A JSON body is sent whole, as for chat. A multipart upload
  (:class:`Upload`) is its read-ahead, then pieces as the client sends them: the
  client's messages are read by the request's disconnect watcher (:meth:`Upload.receive`
  stands in for the ASGI ``receive``), which hands each piece to the attempt pumping
  it into the node's stream. An upload may fail over only while nothing beyond its
  read-ahead went to a node (:meth:`AsIs.may_fail_over`). Each piece must come within
  ``gateway.body_timeout`` of the last one (408 ``body_timeout``): a client trickling
  its upload cannot hold a node's slot for the whole ``request_timeout``. A second
  ``model`` field anywhere in the form is 400 (:class:`~tooti.protocol.multipart.FormFields`).
* **The answer.** Relayed as it comes, with its content type (:func:`media_type`), at
  most ``gateway.max_response_bytes`` (cut past it, 502 ``response_too_large`` if
  nothing was sent yet cannot happen: the head went first). Its last piece is held until
  the node's END is in and billing has settled (SSE excepted: its events are sent as
  they come, and the close waits for the settle), and an answer the node breaks midway
  is cut, never completed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import trio

from tooti import clock
from tooti.billing.base import Outcome
from tooti.errors import APIError, from_end_info
from tooti.gateway.response_headers import content_type
from tooti.mesh.http import Headers, Receive, Send
from tooti.mesh.peer import Peer
from tooti.protocol.connection import ResponseStarted
from tooti.protocol.multipart import DuplicateField, FormFields, PartHeadTooLarge
from tooti.protocol.usage import UsageLimits
from tooti.tunnel import OutboundStream

PIECE = 64 * 1024
"""Most bytes of an answer joined into one piece sent to the client."""


def too_large(limit: int) -> APIError:
    """413 for an upload past ``gateway.max_upload_bytes``."""
    return APIError(413, f"upload over the {limit}-byte limit (gateway.max_upload_bytes)",
                    code="request_too_large", headers={"connection": "close"})


def form_error(exc: ValueError) -> APIError:
    """400 for a form :class:`FormFields` refused."""
    return APIError(400, str(exc), code="invalid_request", param="model")


class Upload:
    """A multipart body being streamed: its read-ahead, then pieces from the client."""

    def __init__(self, receive: Receive, prefix: bytes, complete: bool, content_type: str,
                 limit: int, fields: FormFields, idle: float) -> None:
        self.prefix, self.complete, self.content_type = prefix, complete, content_type
        self.limit, self.fields, self.idle = limit, fields, idle
        self.started = False
        """More than the read-ahead went to a node: no other node can be tried."""
        self.send_pieces, self.pieces = trio.open_memory_channel[bytes](0)
        self.size = len(prefix)
        """Bytes of the form received so far (all of it once the body is complete)."""
        self._receive = receive
        self._more = not complete
        if complete:
            self.send_pieces.close()

    def prefix_for(self, model: str) -> bytes:
        """The read-ahead with its ``model`` field set to ``model`` (an alias's id)."""
        span = self.fields.span
        if span is None or self.fields.value == model:
            return self.prefix
        return self.prefix[:span[0]] + model.encode() + self.prefix[span[1]:]

    async def receive(self) -> dict[str, Any]:
        """The ASGI ``receive`` of the request's disconnect watcher: reads the rest of
        the body, handing each piece to the attempt pumping it (waiting for it), then
        returns the next message that is not the body's (a disconnect)."""
        while self._more:
            with trio.move_on_after(self.idle) as idle:
                message = await self._receive()
            if idle.cancelled_caught:
                raise APIError(408, f"the upload sent nothing for {self.idle:g}s",
                               code="body_timeout")
            if message["type"] == "http.disconnect":
                return message
            piece = message.get("body", b"")
            self._more = message.get("more_body", False)
            self.size += len(piece)
            if self.size > self.limit:
                raise too_large(self.limit)
            try:
                self.fields.feed(piece)
            except (DuplicateField, PartHeadTooLarge) as exc:
                raise form_error(exc) from None
            if piece:
                await self.send_pieces.send(piece)
            if not self._more:
                await self.send_pieces.aclose()
        return await self._receive()

    async def pump(self, out: OutboundStream, timer: trio.CancelScope, seconds: float
                   ) -> None:
        """Send the upload's pieces into ``out`` as they come; once the body is all
        sent, the head must come within ``seconds``."""
        async for piece in self.pieces:  # not closed here: a next attempt may read on
            self.started = True
            await out.send_body(piece, False)
        await out.send_body(b"", True)
        timer.deadline = clock.now() + seconds


@dataclasses.dataclass
class AsIs:
    """A pass-through request's part on the proxy path: its body (``upload``, or the
    raw JSON body the proxy holds) and the answer relayed as is."""

    max_response_bytes: int
    upload: Upload | None = None
    prompt_allowance: int = 0

    def may_fail_over(self) -> bool:
        """False once more than the upload's read-ahead went to a node."""
        return self.upload is None or not self.upload.started

    def body_bytes(self, raw: bytes) -> int:
        """The request body's size so far (the upload's, as counted)."""
        return len(raw) if self.upload is None else self.upload.size

    async def open(self, peer: Peer, meta: dict[str, Any], body: bytes, model: str
                   ) -> OutboundStream:
        """Open the attempt's stream on ``peer`` (an upload: with its read-ahead)."""
        upload = self.upload
        if upload is None:
            return await peer.open_stream(meta, body)
        meta = {**meta, "content_type": upload.content_type}
        return await peer.open_stream(meta, upload.prefix_for(model), fin=upload.complete)

    async def head(self, out: OutboundStream, timer: trio.CancelScope, seconds: float
                   ) -> ResponseStarted | None:
        """The node's head; an upload's rest is pumped meanwhile, and the head's
        deadline (``timer``) counted from its last byte."""
        upload = self.upload
        if upload is None or upload.complete:
            return await out.head()
        timer.deadline = math.inf
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload.pump, out, timer, seconds)
                head = await out.head()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the pump's own error (TunnelLost, ...)
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        return head

    async def relay(self, out: OutboundStream, status: int, media: bytes, send: Send,
                    headers: Headers, outcome: Outcome, settle: Any) -> None:
        """Relay the answer as it comes; hold its last piece (SSE: its close) until the
        node's END is in and ``settle`` ran. An answer the node breaks, or one past
        ``max_response_bytes``, ends ``failed_midstream`` without its last piece (the
        caller cuts it)."""
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media), *headers]})
        outcome.served = True
        hold = not media.startswith(b"text/event-stream")
        held = b""
        limit = self.max_response_bytes
        while (piece := await out.next_data(PIECE)) is not None:
            outcome.relayed_bytes += len(piece)
            if outcome.relayed_bytes > limit:
                outcome.status = "failed_midstream"
                outcome.error = f"answer over {limit} bytes (gateway.max_response_bytes)"
                await out.cancel("too large")
                break
            if hold:
                piece, held = held, piece
                if not piece:
                    continue
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        end = out.end_info or {}
        if outcome.status == "pending":
            if "error" in end:
                outcome.status = "failed_midstream"
                outcome.error = from_end_info(end).message
            else:
                outcome.status = "ok" if status < 400 else "error"
        upload = self.upload
        if upload is not None and outcome.limits is not None:  # bounded by its real size
            outcome.limits = UsageLimits(upload.size + self.prompt_allowance,
                                         outcome.limits.completion)
        await settle()
        if outcome.status == "failed_midstream":
            return  # cut, not completed: a truncated audio file must not look whole
        await send({"type": "http.response.body", "body": held, "more_body": False})


BINARY_MEDIA_TYPES = frozenset({
    "audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav", "audio/wave", "audio/opus",
    "audio/ogg", "audio/aac", "audio/flac", "audio/pcm", "audio/l16", "audio/webm",
    "image/png", "image/jpeg", "image/webp", "image/gif", "application/octet-stream",
})
"""Media types a pass-through answer keeps beside the chat endpoints' safe ones (audio
and raster images; never ``image/svg+xml`` or HTML, which a browser could run)."""

SAFE_PARAMETERS = frozenset({"rate", "channels", "codecs", "bitrate", "endianness",
                             "charset"})
"""Parameters of a binary media type passed on (``audio/pcm; rate=24000``), each a
plain token value."""


def media_type(headers: dict[str, Any]) -> bytes:
    """The content type to send for a pass-through answer: the node's, checked and
    rebuilt as for any answer (:func:`~tooti.gateway.response_headers.content_type`),
    with :data:`BINARY_MEDIA_TYPES` passed on with their :data:`SAFE_PARAMETERS`."""
    checked = content_type(headers)
    if checked.startswith(b"text/plain"):
        value = headers.get("content-type")
        if not isinstance(value, str):
            return checked
        media, *params = value.split(";")
        media = media.strip().lower()
        if media in BINARY_MEDIA_TYPES:
            kept = [media]
            for param in params:
                name, _, arg = param.strip().partition("=")
                name, arg = name.strip().lower(), arg.strip()
                if (name in SAFE_PARAMETERS and 0 < len(arg) <= 32
                        and all(c.isalnum() or c in "-._" for c in arg)):
                    kept.append(f"{name}={arg}")
            return "; ".join(kept).encode()
    return checked

