"""RFC 6455 WebSocket framing: a codec with no sockets and no clock.

Both ends of a tunnel carry its binary messages over WebSocket. The *client*
(the side that dials) masks every frame it sends and must receive unmasked
frames; the *server* (the accepting side) sends unmasked frames and must
receive masked ones. :func:`encode_frame` and :func:`encode_close` return the
bytes to put on the wire; a :class:`FrameDecoder` is fed the bytes that arrive
and returns whole events (:class:`Message`, :class:`Ping`, :class:`Pong`,
:class:`Close`), joining fragmented messages.

No extension is ever negotiated, so the reserved bits must be clear. The
decoder enforces the rules of the RFC and raises :class:`WebSocketError`
carrying the close code to answer with: 1002 for a protocol error, 1007 for
invalid UTF-8 in a text message or close reason, 1009 for a message larger
than the limit. The limit is checked from each frame header before its payload
is buffered, so a peer cannot make the decoder hold more than one message plus
one frame header.

This sits on the path of every tunnel message, so it avoids per-byte Python
work: received bytes go into one buffer read at an offset (compacted now and
then, not per frame), and masking XORs the payload with the repeated key as
one big integer.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009

MAX_CONTROL_PAYLOAD = 125
"""Largest payload of a control frame (close, ping, pong)."""
_MAX_REASON = MAX_CONTROL_PAYLOAD - 2
_COMPACT_AT = 65536
"""Consumed bytes at the front of the buffer that trigger a compaction."""
_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})


class WebSocketError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (base64 of SHA-1 of key + GUID)."""
    digest = hashlib.sha1((key + GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def new_key() -> str:
    """A fresh random Sec-WebSocket-Key (base64 of 16 random bytes)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def valid_close_code(code: int) -> bool:
    """Whether ``code`` may be sent in a close frame (RFC 6455 section 7.4).

    Valid: 1000-1003, 1007-1011 and 3000-4999. 1004 is reserved, 1005, 1006 and
    1015 only ever describe a closure locally, and the rest below 3000 are
    unassigned.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999


def _mask(data: bytes | bytearray, key: bytes | bytearray) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated (masking and unmasking alike)."""
    n = len(data)
    if not n:
        return b""
    repeated = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


class _MaskKeys:
    """Masking keys for a client's frames: 4-byte slices of ``os.urandom`` output
    fetched :data:`MASK_KEY_POOL` bytes at a time. RFC 6455 asks for keys from a strong
    source of entropy that the application sending the payload cannot predict: these
    are the kernel's CSPRNG bytes, each used once, kept only in this process, so a
    frame costs a slice instead of a ``getrandom`` system call (a node masks one frame
    per streamed token)."""

    __slots__ = ("_at", "_pool")

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        """A fresh 4-byte key (never handed out twice)."""
        at = self._at
        if at + 4 > len(self._pool):
            self._pool, at = os.urandom(MASK_KEY_POOL), 0
        self._at = at + 4
        return self._pool[at : at + 4]


MASK_KEY_POOL = 4096
"""Bytes of ``os.urandom`` fetched at once for masking keys (1,024 frames' worth)."""
_mask_keys = _MaskKeys()


def encode_frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame; mask=True (client side) masks with a random 4-byte key (from
    ``os.urandom``, see :class:`_MaskKeys`).

    The length uses the shortest encoding. Raises ValueError for an unknown
    opcode, or for a control frame that is fragmented or longer than 125 bytes.
    """
    n = len(payload)
    if opcode not in _OPCODES or (opcode >= OP_CLOSE and (n > MAX_CONTROL_PAYLOAD or not fin)):
        raise ValueError(f"cannot encode opcode 0x{opcode:x} with fin={fin}, {n} bytes")
    first = opcode | 0x80 if fin else opcode
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = bytes((first, n | mask_bit))
    elif n < 65536:
        header = bytes((first, 126 | mask_bit, n >> 8, n & 0xFF))
    else:
        header = bytes((first, 127 | mask_bit)) + n.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = _mask_keys.next()
    return header + key + _mask(payload, key)


def encode_close(code: int | None, reason: str = "", *, mask: bool) -> bytes:
    """A close frame; code None gives an empty payload; the reason is truncated (on a UTF-8
    character boundary) so the payload fits 125 bytes.

    With code None the reason is not sent (the RFC carries a reason only after a
    code). Raises ValueError for a code that may not be sent (see
    :func:`valid_close_code`).
    """
    if code is None:
        return encode_frame(OP_CLOSE, b"", mask=mask)
    if not valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_REASON:
        end = _MAX_REASON
        while raw[end] & 0xC0 == 0x80:  # raw[end] continues a character cut at end
            end -= 1
        raw = raw[:end]
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw, mask=mask)


# --------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message (fragments joined); for text, ``data`` is the UTF-8 bytes
    (validated)."""

    data: bytes
    text: bool


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping; answer with a pong carrying the same payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A pong (an answer to our ping, or unsolicited)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame; ``code`` is None when the frame had no payload."""

    code: int | None
    reason: str


WebSocketEvent = Message | Ping | Pong | Close


# --------------------------------------------------------------------- decoder


class FrameDecoder:
    """Turns received bytes into events.

    ``client=True``: we are the client, so frames from the server must not be
    masked; ``client=False``: we are the server, so every frame from the client
    must be masked. ``max_message`` bounds a data message (all its fragments
    together); control frames are bounded by the RFC's 125 bytes instead.

    Call :meth:`feed` with whatever arrived, then :meth:`next_event` until it
    returns None. After a :class:`Close` nothing more is parsed (and later bytes
    are dropped); after a :class:`WebSocketError` every call raises it again.
    """

    __slots__ = (
        "_buf", "_closed", "_error", "_expect_mask", "_max", "_msg_opcode", "_msg_size",
        "_need", "_parts", "_pos",
    )

    def __init__(self, *, max_message: int, client: bool) -> None:
        self._max = max_message
        self._expect_mask = 0 if client else 0x80
        self._buf = bytearray()
        self._pos = 0
        self._need = 2
        """Unread bytes needed before parsing is worth trying again."""
        self._msg_opcode = 0
        """OP_TEXT or OP_BINARY while a fragmented message is in progress, else 0."""
        self._msg_size = 0
        self._parts: list[bytes] = []
        self._closed = False
        self._error: WebSocketError | None = None

    def feed(self, data: bytes | bytearray) -> None:
        """Add received bytes (dropped once a close frame or an error was seen)."""
        if self._closed or self._error is not None:
            return
        buf = self._buf
        pos = self._pos
        if pos:
            if pos == len(buf):
                buf.clear()
                self._pos = 0
            elif pos >= _COMPACT_AT:
                del buf[:pos]
                self._pos = 0
        buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events: unparsed bytes plus the
        payload of the fragments of a message still in progress."""
        return len(self._buf) - self._pos + self._msg_size

    def _fail(self, code: int, message: str) -> WebSocketError:
        self._error = WebSocketError(code, message)
        return self._error

    def next_event(self) -> WebSocketEvent | None:
        """The next complete event, or None if more bytes are needed. Raises
        WebSocketError on a protocol violation (and keeps raising it afterwards)."""
        if self._error is not None:
            raise self._error
        if self._closed:
            return None
        buf = self._buf
        while True:
            pos = self._pos
            avail = len(buf) - pos
            if avail < self._need:
                return None
            first = buf[pos]
            second = buf[pos + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            if first & 0x70:
                raise self._fail(PROTOCOL_ERROR, "reserved bits set (no extension negotiated)")
            if second & 0x80 != self._expect_mask:
                raise self._fail(PROTOCOL_ERROR, "unmasked frame from a client"
                                 if self._expect_mask else "masked frame from a server")
            if opcode >= OP_CLOSE:
                if opcode > OP_PONG:
                    raise self._fail(PROTOCOL_ERROR, f"unknown opcode 0x{opcode:x}")
                if not first & 0x80:
                    raise self._fail(PROTOCOL_ERROR, "fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise self._fail(PROTOCOL_ERROR, "control frame longer than 125 bytes")
            elif opcode == OP_CONTINUATION:
                if not self._msg_opcode:
                    raise self._fail(PROTOCOL_ERROR, "continuation frame without a message")
            elif opcode <= OP_BINARY:
                if self._msg_opcode:
                    raise self._fail(PROTOCOL_ERROR, "new message before the last one ended")
            else:
                raise self._fail(PROTOCOL_ERROR, f"unknown opcode 0x{opcode:x}")

            if length < 126:
                header = 2
            elif length == 126:
                if avail < 4:
                    self._need = 4
                    return None
                length = buf[pos + 2] << 8 | buf[pos + 3]
                header = 4
            else:
                if avail < 10:
                    self._need = 10
                    return None
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                if length >> 63:
                    raise self._fail(PROTOCOL_ERROR, "64-bit length with the top bit set")
                header = 10
            if opcode < OP_CLOSE and self._msg_size + length > self._max:
                raise self._fail(MESSAGE_TOO_BIG, f"message over {self._max} bytes")
            if self._expect_mask:
                header += 4
            total = header + length
            if avail < total:
                self._need = total
                return None

            # a whole frame is buffered: consume it
            self._need = 2
            start = pos + header
            end = start + length
            self._pos = end
            if self._expect_mask:
                payload = _mask(buf[start:end], buf[start - 4 : start])
            else:
                payload = bytes(buf[start:end])

            if opcode < OP_CLOSE:
                if opcode:  # the first (often the only) frame of a message
                    if first & 0x80:
                        if opcode == OP_TEXT:
                            self._check_utf8(payload, "text message")
                        return Message(payload, opcode == OP_TEXT)
                    self._msg_opcode = opcode
                    self._msg_size = length
                    self._parts.append(payload)
                    continue
                self._parts.append(payload)
                self._msg_size += length
                if not first & 0x80:
                    continue
                data = b"".join(self._parts)
                text = self._msg_opcode == OP_TEXT
                self._parts.clear()
                self._msg_opcode = 0
                self._msg_size = 0
                if text:
                    self._check_utf8(data, "text message")
                return Message(data, text)
            if opcode == OP_PING:
                return Ping(payload)
            if opcode == OP_PONG:
                return Pong(payload)
            return self._close(payload)

    def _check_utf8(self, data: bytes, what: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(INVALID_DATA, f"{what} is not valid UTF-8") from None

    def _close(self, payload: bytes) -> Close:
        if not payload:
            code = None
            reason = ""
        elif len(payload) == 1:
            raise self._fail(PROTOCOL_ERROR, "close payload of one byte")
        else:
            code = payload[0] << 8 | payload[1]
            if not valid_close_code(code):
                raise self._fail(PROTOCOL_ERROR, f"invalid close code {code}")
            reason = self._check_utf8(payload[2:], "close reason")
        self._closed = True
        self._buf.clear()  # nothing after a close frame is parsed
        self._pos = 0
        self._parts.clear()
        self._msg_opcode = 0
        self._msg_size = 0
        return Close(code, reason)
