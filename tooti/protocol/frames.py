"""Tunnel v1 frames: the byte layout, with no state and no I/O.

Every binary WebSocket message is exactly one frame::

    0        1        2                    6
    +--------+--------+--------------------+----------------------+
    | type   | flags  | stream id (u32 BE) | payload ...          |
    +--------+--------+--------------------+----------------------+

Control payloads are JSON objects; DATA carries raw bytes; WINDOW carries a
u32 credit increment; OPEN carries a u32 metadata length, the JSON metadata,
then the first bytes of the request body. ``docs/protocol.md`` is the
normative description.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgspec

HEADER = struct.Struct("!BBI")
HEADER_SIZE = HEADER.size
U32 = struct.Struct("!I")
MAX_STREAM_ID = 0xFFFFFFFF


class FrameType(IntEnum):
    """The frame types of tunnel v1."""

    HELLO = 0x01
    WELCOME = 0x02
    MODELS = 0x03
    HEARTBEAT = 0x04
    OPEN = 0x05
    RESPONSE = 0x06
    DATA = 0x07
    END = 0x08
    CANCEL = 0x09
    WINDOW = 0x0A
    GOAWAY = 0x0B
    PROOF = 0x0C
    ROUTES = 0x0D


CONNECTION_FRAMES = frozenset(
    {FrameType.HELLO, FrameType.WELCOME, FrameType.MODELS, FrameType.HEARTBEAT,
     FrameType.GOAWAY, FrameType.PROOF, FrameType.ROUTES}
)

FLAG_FIN = 0x01
"""On OPEN or DATA from the opener: the request body is complete."""
FLAG_ACK = 0x02
"""On HEARTBEAT: this is the echo of the peer's heartbeat (for RTT)."""
ALLOWED_FLAGS = {FrameType.OPEN: FLAG_FIN, FrameType.DATA: FLAG_FIN, FrameType.HEARTBEAT: FLAG_ACK}
"""The flags each frame type may carry; every other type carries none."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class FrameError(Exception):
    """A frame that cannot be decoded; ``code`` names the violation."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``payload`` is raw bytes (undecoded) for every type."""

    type: FrameType
    flags: int
    stream_id: int
    payload: bytes


def encode(ftype: FrameType, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """Return the bytes of one frame."""
    return HEADER.pack(ftype, flags, stream_id) + payload


def encode_json(ftype: FrameType, stream_id: int, obj: Any, flags: int = 0) -> bytes:
    """Return one frame whose payload is ``obj`` encoded as JSON."""
    return HEADER.pack(ftype, flags, stream_id) + _encoder.encode(obj)


def encode_open(stream_id: int, meta: dict[str, Any], body: bytes, fin: bool) -> bytes:
    """Return an OPEN frame: u32 metadata length, JSON metadata, body bytes."""
    meta_bytes = _encoder.encode(meta)
    return b"".join(
        (
            HEADER.pack(FrameType.OPEN, FLAG_FIN if fin else 0, stream_id),
            U32.pack(len(meta_bytes)),
            meta_bytes,
            body,
        )
    )


def encode_window(stream_id: int, increment: int) -> bytes:
    """Return a WINDOW frame granting ``increment`` more DATA bytes."""
    return HEADER.pack(FrameType.WINDOW, 0, stream_id) + U32.pack(increment)


def merge_data(frames: list[bytes], max_payload: int) -> list[bytes]:
    """Join each run of consecutive DATA frames of one stream into as few frames as
    ``max_payload`` allows (a FIN ends a run and carries over): the same bytes in the
    same order, in fewer messages. Other frames are left as they are."""
    if len(frames) < 2:
        return frames
    merged: list[bytes] = []
    i, count = 0, len(frames)
    while i < count:
        frame = frames[i]
        i += 1
        if frame[0] != FrameType.DATA or frame[1] & FLAG_FIN:
            merged.append(frame)
            continue
        sid = frame[2:HEADER_SIZE]
        parts = [frame[HEADER_SIZE:]]
        size, flags = len(frame) - HEADER_SIZE, 0
        while i < count:
            after = frames[i]
            if (after[0] != FrameType.DATA or after[2:HEADER_SIZE] != sid
                    or size + len(after) - HEADER_SIZE > max_payload):
                break
            parts.append(after[HEADER_SIZE:])
            size += len(after) - HEADER_SIZE
            i += 1
            if after[1] & FLAG_FIN:
                flags = FLAG_FIN
                break
        if len(parts) == 1:
            merged.append(frame)
        else:
            merged.append(HEADER.pack(FrameType.DATA, flags, U32.unpack(sid)[0])
                          + b"".join(parts))
    return merged


def decode(message: bytes, max_frame_bytes: int) -> Frame:
    """Decode one WebSocket message into a :class:`Frame`.

    Checks size, type and flags before touching the payload. Raises
    :class:`FrameError` on any violation.
    """
    if len(message) > max_frame_bytes:
        raise FrameError("frame_too_large", f"{len(message)} bytes > {max_frame_bytes}")
    if len(message) < HEADER_SIZE:
        raise FrameError("frame_truncated", f"{len(message)} bytes < header {HEADER_SIZE}")
    raw_type, flags, stream_id = HEADER.unpack_from(message)
    try:
        ftype = FrameType(raw_type)
    except ValueError:
        raise FrameError("unknown_frame_type", f"type 0x{raw_type:02x}") from None
    if flags & ~ALLOWED_FLAGS.get(ftype, 0):
        raise FrameError("unknown_flags", f"flags 0x{flags:02x} on {ftype.name}")
    if ftype in CONNECTION_FRAMES:
        if stream_id != 0:
            raise FrameError("bad_stream_id", f"{ftype.name} must use stream 0")
    elif stream_id == 0:
        raise FrameError("bad_stream_id", f"{ftype.name} needs a stream id")
    return Frame(ftype, flags, stream_id, message[HEADER_SIZE:])


def decode_json(frame: Frame, max_bytes: int) -> dict[str, Any]:
    """Decode a control frame's JSON object payload (size-checked first)."""
    if len(frame.payload) > max_bytes:
        raise FrameError("control_too_large", f"{frame.type.name} payload > {max_bytes}")
    try:
        obj = _decoder.decode(frame.payload)
    except (msgspec.DecodeError, RecursionError) as exc:  # too deep nesting: RecursionError
        raise FrameError("bad_json", f"{frame.type.name}: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("bad_json", f"{frame.type.name} payload must be an object")
    return obj


def decode_open(frame: Frame, max_meta_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Split an OPEN payload into (metadata object, first body bytes)."""
    payload = frame.payload
    if len(payload) < 4:
        raise FrameError("frame_truncated", "OPEN without metadata length")
    (meta_len,) = U32.unpack_from(payload)
    if meta_len > max_meta_bytes:
        raise FrameError("control_too_large", f"OPEN metadata {meta_len} > {max_meta_bytes}")
    if 4 + meta_len > len(payload):
        raise FrameError("frame_truncated", "OPEN metadata longer than frame")
    try:
        meta = _decoder.decode(payload[4 : 4 + meta_len])
    except (msgspec.DecodeError, RecursionError) as exc:
        raise FrameError("bad_json", f"OPEN: {exc}") from None
    if not isinstance(meta, dict):
        raise FrameError("bad_json", "OPEN metadata must be an object")
    return meta, payload[4 + meta_len :]


def decode_window(frame: Frame) -> int:
    """Return the credit increment of a WINDOW frame (1 .. 2**31-1)."""
    if len(frame.payload) != 4:
        raise FrameError("bad_window", "WINDOW payload must be 4 bytes")
    (increment,) = U32.unpack(frame.payload)
    if not 0 < increment < 2**31:
        raise FrameError("bad_window", f"increment {increment} out of range")
    return increment
