"""RFC 6455 WebSocket codec: handshake keys, round trips, every decoder rejection, fuzzing.

Round trips run both ways (the client masks what it sends, the server does not)
and feed the decoder whole, byte by byte and in random splits. Invalid frames
are built by hand with :func:`raw_frame`. The fuzz tests feed arbitrary bytes
and mangled frame sequences to a decoder on either side: the only acceptable
outcomes are events, ``None`` or a :class:`WebSocketError`, never any other
exception. The interop tests check the codec against wsproto's frame parser.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode
from wsproto.handshake import generate_accept_token

from tooti.protocol import websocket
from tooti.protocol.websocket import (
    GUID,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameDecoder,
    Message,
    Ping,
    Pong,
    WebSocketError,
    WebSocketEvent,
    accept_key,
    encode_close,
    encode_frame,
    new_key,
)

MAX = 1 << 20
SIZES = [0, 1, 125, 126, 65535, 65536, 300000]
FUZZ = settings(
    max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FIN = 0x80
KEY = b"\x37\xfa\x21\x3d"
VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
INVALID_CODES = [0, 1, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2000, 2999, 5000,
                 65535]
EVENT_TYPES = (Message, Ping, Pong, Close)
SIDES = pytest.mark.parametrize("client", [True, False], ids=["client", "server"])
"""Parametrize over the receiving side (``client`` as given to FrameDecoder)."""


# ------------------------------------------------------------------ helpers


def naive_mask(data: bytes, key: bytes) -> bytes:
    """Masking as the RFC describes it, one byte at a time."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def length_field(n: int) -> bytes:
    """The shortest length encoding of ``n`` (7-bit field, then extended bytes)."""
    if n < 126:
        return bytes([n])
    if n < 65536:
        return b"\x7e" + n.to_bytes(2, "big")
    return b"\x7f" + n.to_bytes(8, "big")


def raw_frame(first: int, payload: bytes = b"", *, masked: bool,
              length: bytes | None = None) -> bytes:
    """A frame built by hand, valid or not.

    ``first`` is the first byte (FIN, RSV bits, opcode); ``length`` replaces the
    length field (7-bit value then extended bytes, without the mask bit).
    """
    field = length_field(len(payload)) if length is None else length
    second = field[0] | (0x80 if masked else 0)
    if masked:
        return bytes([first, second]) + field[1:] + KEY + naive_mask(payload, KEY)
    return bytes([first, second]) + field[1:] + payload


def drain(decoder: FrameDecoder) -> list[WebSocketEvent]:
    """Every event the decoder can produce from what it has been fed."""
    events: list[WebSocketEvent] = []
    while (event := decoder.next_event()) is not None:
        events.append(event)
    return events


def decode_chunks(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[WebSocketEvent]:
    """Feed ``chunks`` one at a time, collecting events after each."""
    events: list[WebSocketEvent] = []
    for chunk in chunks:
        decoder.feed(chunk)
        events += drain(decoder)
    return events


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut into pieces of mixed sizes (single bytes up to 64 KiB)."""
    chunks = []
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 5, 13, 127, 1000, 4096, 65536])
        chunks.append(data[pos : pos + step])
        pos += step
    return chunks


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled; every size at least 1)."""
    chunks = []
    pos = 0
    i = 0
    while pos < len(data):
        chunks.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return chunks


def text_payload(size: int) -> bytes:
    """Valid UTF-8 of exactly ``size`` bytes, with 2-, 3- and 4-byte characters."""
    raw = ("tooti é € 😀 " * (size // 8 + 1)).encode()[:size]
    while raw:
        try:
            raw.decode()
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return raw + b"a" * (size - len(raw))


def error_code(data: bytes, *, client: bool, max_message: int = MAX) -> int:
    """Feed ``data`` expecting a WebSocketError; return its code (checking it sticks)."""
    decoder = FrameDecoder(max_message=max_message, client=client)
    decoder.feed(data)
    with pytest.raises(WebSocketError) as info:
        drain(decoder)
    decoder.feed(raw_frame(FIN | OP_PING, masked=not client))
    with pytest.raises(WebSocketError) as again:
        decoder.next_event()
    assert again.value.code == info.value.code
    assert isinstance(info.value.message, str) and info.value.message
    return info.value.code


# ------------------------------------------------------------------ handshake keys


def test_accept_key_matches_rfc_example() -> None:
    """RFC 6455 section 1.3 (and wsproto agrees)."""
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert GUID == "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    for key in ("dGhlIHNhbXBsZSBub25jZQ==", new_key(), new_key()):
        assert accept_key(key) == generate_accept_token(key.encode()).decode()


def test_new_key_is_base64_of_16_random_bytes() -> None:
    keys = {new_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert len(base64.b64decode(key, validate=True)) == 16


# ------------------------------------------------------------------ encoder


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mask", [True, False])
def test_encode_frame_layout(size: int, mask: bool) -> None:
    payload = random.Random(size).randbytes(size)
    wire = encode_frame(OP_BINARY, payload, mask=mask)
    field = length_field(size)
    assert wire[0] == FIN | OP_BINARY
    assert wire[1] == field[0] | (0x80 if mask else 0)
    assert wire[2 : 1 + len(field)] == field[1:]
    body = wire[1 + len(field) :]
    if mask:
        assert naive_mask(body[4:], body[:4]) == payload
    else:
        assert body == payload


def test_encode_frame_fin_and_random_keys() -> None:
    assert encode_frame(OP_TEXT, b"ab", mask=False, fin=False) == b"\x01\x02ab"
    assert encode_frame(OP_CONTINUATION, b"", mask=False) == b"\x80\x00"
    keys = {encode_frame(OP_BINARY, b"x", mask=True)[2:6] for _ in range(20)}
    assert len(keys) > 1


def test_masking_keys_are_never_reused_across_pool_refills(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are 4-byte slices of pooled os.urandom output, each handed out once: with a
    source whose every 4-byte word differs, 3,000 frames (the pool refills twice) get
    3,000 distinct keys, taken from fresh urandom calls, and each frame still unmasks to
    its payload."""
    calls: list[int] = []

    def counting_urandom(n: int) -> bytes:
        calls.append(n)
        base = len(calls) << 20
        return b"".join((base + i).to_bytes(4, "big") for i in range(n // 4))

    monkeypatch.setattr(websocket.os, "urandom", counting_urandom)
    monkeypatch.setattr(websocket, "_mask_keys", websocket._MaskKeys())
    frames = [encode_frame(OP_BINARY, b"token", mask=True) for _ in range(3000)]
    assert len({frame[2:6] for frame in frames}) == 3000
    assert len(calls) == 3  # 1,024 keys per os.urandom call
    decoder = FrameDecoder(max_message=1 << 16, client=False)
    for frame in frames:
        decoder.feed(frame)
        event = decoder.next_event()
        assert isinstance(event, Message) and event.data == b"token"


@pytest.mark.parametrize(
    ("opcode", "payload", "fin"),
    [(OP_PING, b"x" * 126, True), (OP_CLOSE, b"", False), (OP_PONG, b"", False), (0x3, b"", True),
     (0xB, b"", True), (0x10, b"", True)],
)
def test_encode_frame_refuses_invalid_frames(opcode: int, payload: bytes, fin: bool) -> None:
    with pytest.raises(ValueError):
        encode_frame(opcode, payload, mask=False, fin=fin)


def test_encode_close() -> None:
    assert encode_close(None, mask=False) == b"\x88\x00"
    assert encode_close(None, "not sent", mask=False) == b"\x88\x00"
    assert encode_close(1000, mask=False) == b"\x88\x02\x03\xe8"
    assert encode_close(4001, "bye", mask=False) == b"\x88\x05\x0f\xa1bye"
    masked = encode_close(1001, "away", mask=True)
    assert masked[:2] == b"\x88\x86"
    assert naive_mask(masked[6:], masked[2:6]) == b"\x03\xe9away"


@pytest.mark.parametrize(
    ("reason", "kept"),
    [("a" * 200, "a" * 123), ("€" * 60, "€" * 41), ("😀" * 40, "😀" * 30),
     ("a" + "€" * 60, "a" + "€" * 40), ("ab" + "😀" * 40, "ab" + "😀" * 30),
     ("é" * 61 + "x", "é" * 61 + "x"), ("é" * 62, "é" * 61)],
)
def test_encode_close_truncates_reason_on_a_character_boundary(reason: str, kept: str) -> None:
    wire = encode_close(1000, reason, mask=False)
    assert wire[1] <= 125
    assert wire[4:].decode() == kept
    decoder = FrameDecoder(max_message=MAX, client=True)
    decoder.feed(wire)
    assert drain(decoder) == [Close(1000, kept)]


@pytest.mark.parametrize("code", INVALID_CODES)
def test_encode_close_refuses_codes_that_may_not_be_sent(code: int) -> None:
    with pytest.raises(ValueError):
        encode_close(code, mask=False)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("feeding", ["whole", "bytewise", "random"])
@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
@pytest.mark.parametrize("from_client", [True, False],
                         ids=["client_to_server", "server_to_client"])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip(size: int, from_client: bool, text: bool, feeding: str) -> None:
    payload = text_payload(size) if text else random.Random(size).randbytes(size)
    assert len(payload) == size
    opcode = OP_TEXT if text else OP_BINARY
    wire = (encode_frame(opcode, payload, mask=from_client)
            + encode_frame(opcode, b"next", mask=from_client))
    decoder = FrameDecoder(max_message=MAX, client=not from_client)
    if feeding == "whole":
        chunks = [wire]
    elif feeding == "bytewise":
        chunks = [wire[i : i + 1] for i in range(len(wire))]
    else:
        chunks = random_chunks(wire, random.Random(size * 4 + from_client * 2 + text))
    assert decode_chunks(decoder, chunks) == [Message(payload, text), Message(b"next", text)]
    assert decoder.buffered == 0


@SIDES
def test_control_frames_round_trip(client: bool) -> None:
    mask = not client
    wire = b"".join([
        encode_frame(OP_PING, b"", mask=mask),
        encode_frame(OP_PING, b"p" * 125, mask=mask),
        encode_frame(OP_PONG, b"\x00\xff", mask=mask),
        encode_close(1000, "done", mask=mask),
    ])
    decoder = FrameDecoder(max_message=MAX, client=client)
    assert decode_chunks(decoder, [wire]) == [
        Ping(b""), Ping(b"p" * 125), Pong(b"\x00\xff"), Close(1000, "done")]


@SIDES
@pytest.mark.parametrize("code", VALID_CODES)
def test_valid_close_codes_are_accepted(client: bool, code: int) -> None:
    decoder = FrameDecoder(max_message=MAX, client=client)
    decoder.feed(encode_close(code, "r", mask=not client))
    assert drain(decoder) == [Close(code, "r")]


@SIDES
def test_close_without_payload(client: bool) -> None:
    decoder = FrameDecoder(max_message=MAX, client=client)
    decoder.feed(encode_close(None, mask=not client))
    assert drain(decoder) == [Close(None, "")]


@SIDES
def test_nothing_after_close_is_parsed(client: bool) -> None:
    mask = not client
    decoder = FrameDecoder(max_message=MAX, client=client)
    decoder.feed(encode_frame(OP_BINARY, b"a", mask=mask) + encode_close(1000, mask=mask)
                 + encode_frame(OP_BINARY, b"b", mask=mask) + b"\xff\xff garbage")
    assert drain(decoder) == [Message(b"a", False), Close(1000, "")]
    assert decoder.next_event() is None
    decoder.feed(b"\x70\x00 more garbage")
    assert decoder.next_event() is None
    assert decoder.buffered == 0


@SIDES
def test_fragments_are_joined_with_control_frames_returned_first(client: bool) -> None:
    mask = not client
    text = "Hello, wörld 😀".encode()
    cut_in_char = text.index("ö".encode()) + 1  # a character split across fragments
    wire = b"".join([
        encode_frame(OP_TEXT, text[:3], mask=mask, fin=False),
        encode_frame(OP_PING, b"p", mask=mask),
        encode_frame(OP_CONTINUATION, text[3:cut_in_char], mask=mask, fin=False),
        encode_frame(OP_PONG, b"", mask=mask),
        encode_frame(OP_CONTINUATION, b"", mask=mask, fin=False),
        encode_frame(OP_CONTINUATION, text[cut_in_char:], mask=mask),
        encode_frame(OP_BINARY, b"b1", mask=mask, fin=False),
        encode_frame(OP_CONTINUATION, b"b2", mask=mask),
    ])
    expected = [Ping(b"p"), Pong(b""), Message(text, True), Message(b"b1b2", False)]
    assert decode_chunks(FrameDecoder(max_message=MAX, client=client), [wire]) == expected
    bytewise = [wire[i : i + 1] for i in range(len(wire))]
    assert decode_chunks(FrameDecoder(max_message=MAX, client=client), bytewise) == expected


@SIDES
def test_close_between_fragments_ends_the_stream(client: bool) -> None:
    mask = not client
    decoder = FrameDecoder(max_message=MAX, client=client)
    decoder.feed(encode_frame(OP_BINARY, b"part", mask=mask, fin=False)
                 + encode_close(1001, mask=mask)
                 + encode_frame(OP_CONTINUATION, b"rest", mask=mask))
    assert drain(decoder) == [Close(1001, "")]
    assert decoder.buffered == 0


@SIDES
def test_non_minimal_lengths_are_accepted(client: bool) -> None:
    masked = not client
    wire = (raw_frame(FIN | OP_BINARY, b"abcde", masked=masked, length=b"\x7e\x00\x05")
            + raw_frame(FIN | OP_TEXT, b"xy", masked=masked,
                        length=b"\x7f" + (2).to_bytes(8, "big"))
            + raw_frame(FIN | OP_BINARY, b"z" * 200,
                        masked=masked, length=b"\x7f" + (200).to_bytes(8, "big")))
    decoder = FrameDecoder(max_message=MAX, client=client)
    decoder.feed(wire)
    assert drain(decoder) == [Message(b"abcde", False), Message(b"xy", True),
                              Message(b"z" * 200, False)]


def test_buffered_counts_unparsed_bytes_and_pending_fragments() -> None:
    decoder = FrameDecoder(max_message=MAX, client=True)
    assert decoder.buffered == 0
    frame = encode_frame(OP_BINARY, b"0123456789", mask=False)
    decoder.feed(frame[:5])
    assert decoder.next_event() is None
    assert decoder.buffered == 5
    decoder.feed(frame[5:] + encode_frame(OP_TEXT, b"abc", mask=False, fin=False))
    assert decoder.next_event() == Message(b"0123456789", False)
    assert decoder.buffered == 5
    assert decoder.next_event() is None
    assert decoder.buffered == 3  # the pending fragment's payload
    decoder.feed(encode_frame(OP_CONTINUATION, b"de", mask=False))
    assert decoder.next_event() == Message(b"abcde", True)
    assert decoder.buffered == 0


@SIDES
def test_many_small_frames_across_chunk_boundaries(client: bool) -> None:
    """Enough traffic that the buffer's consumed prefix is compacted several times."""
    mask = not client
    payloads = [random.Random(i).randbytes(i % 300) for i in range(2000)]
    wire = b"".join(encode_frame(OP_BINARY, p, mask=mask) for p in payloads)
    assert len(wire) > 4 * 65536
    decoder = FrameDecoder(max_message=MAX, client=client)
    events = decode_chunks(decoder, cut(wire, [997, 1, 4093, 65537]))
    assert events == [Message(p, False) for p in payloads]
    assert decoder.buffered == 0


# ------------------------------------------------------------------ rejections


CONTROL_OPS = [OP_CLOSE, OP_PING, OP_PONG]
REJECTIONS: list[tuple[str, Callable[[bool], bytes], int]] = [
    *[(f"rsv_{bit:#x}", lambda m, bit=bit: raw_frame(FIN | bit | OP_BINARY, b"x", masked=m), 1002)
      for bit in (0x40, 0x20, 0x10)],
    ("rsv_on_control", lambda m: raw_frame(FIN | 0x40 | OP_PING, masked=m), 1002),
    *[(f"opcode_{op:#x}", lambda m, op=op: raw_frame(FIN | op, b"x", masked=m), 1002)
      for op in (0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF)],
    *[(f"unfinished_control_{op:#x}", lambda m, op=op: raw_frame(op, masked=m), 1002)
      for op in CONTROL_OPS],
    *[(f"long_control_{op:#x}", lambda m, op=op: raw_frame(FIN | op, b"x" * 126, masked=m), 1002)
      for op in CONTROL_OPS],
    ("long_control_64bit", lambda m: raw_frame(
        FIN | OP_PONG, b"x", masked=m, length=b"\x7f" + (1).to_bytes(8, "big")), 1002),
    ("continuation_first", lambda m: raw_frame(FIN | OP_CONTINUATION, b"x", masked=m), 1002),
    ("unfinished_continuation_first", lambda m: raw_frame(OP_CONTINUATION, masked=m), 1002),
    ("continuation_after_end", lambda m: raw_frame(OP_TEXT, b"a", masked=m)
     + raw_frame(FIN | OP_CONTINUATION, b"b", masked=m)
     + raw_frame(FIN | OP_CONTINUATION, b"c", masked=m), 1002),
    ("binary_during_text", lambda m: raw_frame(OP_TEXT, b"a", masked=m)
     + raw_frame(FIN | OP_BINARY, b"b", masked=m), 1002),
    ("text_during_binary", lambda m: raw_frame(OP_BINARY, b"a", masked=m)
     + raw_frame(OP_TEXT, b"b", masked=m), 1002),
    ("text_during_text_after_ping", lambda m: raw_frame(OP_TEXT, b"a", masked=m)
     + raw_frame(FIN | OP_PING, masked=m) + raw_frame(FIN | OP_TEXT, b"b", masked=m), 1002),
    ("length_top_bit", lambda m: raw_frame(
        FIN | OP_BINARY, masked=m, length=b"\x7f" + (1 << 63 | 5).to_bytes(8, "big")), 1002),
    ("length_all_ones", lambda m: raw_frame(
        FIN | OP_BINARY, masked=m, length=b"\x7f" + b"\xff" * 8), 1002),
    ("close_one_byte", lambda m: raw_frame(FIN | OP_CLOSE, b"\x03", masked=m), 1002),
    *[(f"close_code_{code}",
       lambda m, code=code: raw_frame(FIN | OP_CLOSE, code.to_bytes(2, "big"), masked=m), 1002)
      for code in INVALID_CODES],
    *[(f"text_{name}", lambda m, bad=bad: raw_frame(FIN | OP_TEXT, b"ok" + bad, masked=m), 1007)
      for name, bad in [("byte_ff", b"\xff"), ("overlong", b"\xc0\xaf"),
                        ("surrogate", b"\xed\xa0\x80"), ("above_max", b"\xf4\x90\x80\x80"),
                        ("truncated", b"\xe2\x82"), ("lone_continuation", b"\x80")]],
    ("fragmented_text_truncated", lambda m: raw_frame(OP_TEXT, b"ok", masked=m)
     + raw_frame(FIN | OP_CONTINUATION, "€".encode()[:2], masked=m), 1007),
    ("close_reason", lambda m: raw_frame(FIN | OP_CLOSE, b"\x03\xe8bad\xff", masked=m), 1007),
]


@SIDES
@pytest.mark.parametrize(("build", "code"), [(b, c) for _, b, c in REJECTIONS],
                         ids=[name for name, _, _ in REJECTIONS])
def test_rejections(client: bool, build: Callable[[bool], bytes], code: int) -> None:
    assert error_code(build(not client), client=client) == code


def test_server_rejects_unmasked_frames() -> None:
    assert error_code(raw_frame(FIN | OP_BINARY, b"x", masked=False), client=False) == 1002
    assert error_code(raw_frame(FIN | OP_PING, masked=False), client=False) == 1002
    assert error_code(raw_frame(OP_TEXT, b"a", masked=True)
                      + raw_frame(FIN | OP_CONTINUATION, b"b", masked=False), client=False) == 1002


def test_client_rejects_masked_frames() -> None:
    assert error_code(raw_frame(FIN | OP_BINARY, b"x", masked=True), client=True) == 1002
    assert error_code(raw_frame(FIN | OP_CLOSE, masked=True), client=True) == 1002
    assert error_code(raw_frame(OP_TEXT, b"a", masked=False)
                      + raw_frame(FIN | OP_CONTINUATION, b"b", masked=True), client=True) == 1002


@SIDES
def test_violations_are_detected_from_the_first_two_bytes(client: bool) -> None:
    for first in (FIN | 0x40 | OP_BINARY, FIN | 0x3, OP_PING, FIN | OP_CONTINUATION):
        decoder = FrameDecoder(max_message=MAX, client=client)
        decoder.feed(raw_frame(first, b"x" * 100, masked=not client)[:2])
        with pytest.raises(WebSocketError) as info:
            decoder.next_event()
        assert info.value.code == 1002


@SIDES
def test_data_after_an_error_is_dropped(client: bool) -> None:
    decoder = FrameDecoder(max_message=MAX, client=client)
    decoder.feed(raw_frame(FIN | 0x3, masked=not client))
    with pytest.raises(WebSocketError):
        decoder.next_event()
    buffered = decoder.buffered
    decoder.feed(b"x" * 100)
    assert decoder.buffered == buffered
    with pytest.raises(WebSocketError):
        decoder.next_event()


# ------------------------------------------------------------------ max_message


@SIDES
@pytest.mark.parametrize("limit", [10, 125, 200, 65535, 65536, 70000])
def test_frame_over_the_limit_fails_from_its_header(client: bool, limit: int) -> None:
    wire = encode_frame(OP_BINARY, b"x" * (limit + 1), mask=not client)
    header = len(length_field(limit + 1)) + 1  # not even the masking key is needed
    decoder = FrameDecoder(max_message=limit, client=client)
    decoder.feed(wire[: header - 1])
    assert decoder.next_event() is None
    decoder.feed(wire[header - 1 : header])
    with pytest.raises(WebSocketError) as info:
        decoder.next_event()
    assert info.value.code == 1009


@SIDES
def test_huge_declared_length_fails_without_buffering(client: bool) -> None:
    decoder = FrameDecoder(max_message=MAX, client=client)
    decoder.feed(raw_frame(FIN | OP_BINARY, masked=not client,
                           length=b"\x7f" + (2**62).to_bytes(8, "big")))
    with pytest.raises(WebSocketError) as info:
        decoder.next_event()
    assert info.value.code == 1009


@SIDES
@pytest.mark.parametrize("text", [False, True])
def test_message_of_exactly_the_limit_is_accepted(client: bool, text: bool) -> None:
    mask = not client
    opcode = OP_TEXT if text else OP_BINARY
    decoder = FrameDecoder(max_message=300, client=client)
    decoder.feed(encode_frame(opcode, b"a" * 300, mask=mask)
                 + encode_frame(opcode, b"b" * 100, mask=mask, fin=False)
                 + encode_frame(OP_CONTINUATION, b"c" * 200, mask=mask))
    assert drain(decoder) == [Message(b"a" * 300, text), Message(b"b" * 100 + b"c" * 200, text)]


@SIDES
def test_fragments_over_the_limit_fail_from_the_header(client: bool) -> None:
    mask = not client
    decoder = FrameDecoder(max_message=300, client=client)
    decoder.feed(encode_frame(OP_BINARY, b"b" * 200, mask=mask, fin=False)
                 + encode_frame(OP_PING, b"p" * 125, mask=mask)
                 + encode_frame(OP_CONTINUATION, b"c" * 100, mask=mask, fin=False))
    assert drain(decoder) == [Ping(b"p" * 125)]
    decoder.feed(encode_frame(OP_CONTINUATION, b"d", mask=mask)[:2])
    with pytest.raises(WebSocketError) as info:
        decoder.next_event()
    assert info.value.code == 1009


@SIDES
def test_control_frames_are_bounded_by_125_not_max_message(client: bool) -> None:
    decoder = FrameDecoder(max_message=10, client=client)
    decoder.feed(encode_frame(OP_PING, b"p" * 125, mask=not client))
    assert drain(decoder) == [Ping(b"p" * 125)]


# ------------------------------------------------------------------ properties and fuzzing


message_specs = st.lists(
    st.tuples(
        st.binary(max_size=300).map(lambda b: (b, False))
        | st.text(max_size=80).map(lambda s: (s.encode(), True)),
        st.lists(st.integers(0, 90), max_size=4),
        st.booleans(),
    ),
    max_size=6,
)


@FUZZ
@given(st.booleans(), message_specs, st.lists(st.integers(1, 97), min_size=1, max_size=12))
def test_fragmented_messages_survive_any_split(
    from_client: bool, specs: list[tuple[tuple[bytes, bool], list[int], bool]],
    chunk_sizes: list[int],
) -> None:
    wire = b""
    expected: list[WebSocketEvent] = []
    for (payload, text), fragment_sizes, with_pings in specs:
        fragments = []
        pos = 0
        for size in fragment_sizes:
            fragments.append(payload[pos : pos + size])
            pos += size
        fragments.append(payload[pos:])
        for i, fragment in enumerate(fragments):
            opcode = (OP_TEXT if text else OP_BINARY) if i == 0 else OP_CONTINUATION
            last = i == len(fragments) - 1
            wire += encode_frame(opcode, fragment, mask=from_client, fin=last)
            if with_pings and not last:
                wire += encode_frame(OP_PING, bytes([i]), mask=from_client)
                expected.append(Ping(bytes([i])))
        expected.append(Message(payload, text))
    decoder = FrameDecoder(max_message=MAX, client=not from_client)
    assert decode_chunks(decoder, cut(wire, chunk_sizes)) == expected
    assert decoder.buffered == 0


def fuzz_feed(decoder: FrameDecoder, chunks: list[bytes], max_message: int) -> None:
    """Feed ``chunks``; events must be well-formed, the only error a WebSocketError."""
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for event in drain(decoder):
                assert isinstance(event, EVENT_TYPES)
                if isinstance(event, Message):
                    assert len(event.data) <= max_message
                    if event.text:
                        event.data.decode()
                elif isinstance(event, (Ping, Pong)):
                    assert len(event.payload) <= 125
    except WebSocketError as exc:
        assert exc.code in (1002, 1007, 1009)
        with pytest.raises(WebSocketError):
            decoder.next_event()


@FUZZ
@given(st.booleans(), st.binary(max_size=400), st.lists(st.integers(1, 50), min_size=1,
                                                        max_size=8))
def test_fuzz_arbitrary_bytes(client: bool, data: bytes, chunk_sizes: list[int]) -> None:
    fuzz_feed(FrameDecoder(max_message=64, client=client), cut(data, chunk_sizes), 64)


FIRST_BYTES = [FIN | OP_BINARY, FIN | OP_TEXT, OP_BINARY, OP_TEXT, FIN | OP_CONTINUATION,
               OP_CONTINUATION, FIN | OP_PING, FIN | OP_PONG, FIN | OP_CLOSE]


@st.composite
def plausible_frame(draw: st.DrawFn, masked: bool) -> bytes:
    """A frame, usually well-formed enough to get past the first checks."""
    if draw(st.integers(0, 20)) == 10:
        return draw(st.binary(max_size=16))
    rare = draw(st.integers(0, 9)) == 5  # (hypothesis favours the ends of a range)
    first = draw(st.integers(0, 255) if rare else st.sampled_from(FIRST_BYTES))
    payload = draw(
        st.binary(max_size=80)
        | st.text(max_size=20).map(str.encode)
        | st.tuples(st.sampled_from(VALID_CODES + INVALID_CODES), st.text(max_size=10)).map(
            lambda c: c[0].to_bytes(2, "big") + c[1].encode())
        | st.sampled_from([b"\xff", b"\xe2\x82", b"\xc0\xaf"])
    )
    length = draw(st.sampled_from([
        b"\x7e" + len(payload).to_bytes(2, "big"), b"\x7f" + len(payload).to_bytes(8, "big"),
        b"\x7e\xff\xff", b"\x7f\x80" + bytes(7), bytes([len(payload) + 1]),
    ])) if draw(st.integers(0, 5)) == 3 else None
    wrong_mask = draw(st.integers(0, 20)) == 10
    return raw_frame(first, payload, masked=masked != wrong_mask, length=length)


@FUZZ
@given(st.booleans(), st.data(), st.lists(st.integers(1, 60), min_size=1, max_size=8))
def test_fuzz_frame_sequences(client: bool, data: st.DataObject,
                              chunk_sizes: list[int]) -> None:
    frames = data.draw(st.lists(plausible_frame(not client), max_size=8))
    fuzz_feed(FrameDecoder(max_message=100, client=client), cut(b"".join(frames),
                                                                 chunk_sizes), 100)


# ------------------------------------------------------------------ interop with wsproto


def wsproto_messages(parser: FrameProtocol, wire: bytes) -> list[tuple[Opcode, object]]:
    """Whole messages and control frames as wsproto's frame parser sees them."""
    parser.receive_bytes(wire)
    out: list[tuple[Opcode, object]] = []
    parts: list[bytes | str] = []
    opcode = None
    for frame in parser.received_frames():
        if frame.opcode in (Opcode.PING, Opcode.PONG, Opcode.CLOSE):
            out.append((frame.opcode, frame.payload))
            continue
        if frame.opcode != Opcode.CONTINUATION:
            opcode = frame.opcode
        payload = frame.payload
        parts.append(bytes(payload) if isinstance(payload, (bytes, bytearray)) else payload)
        if frame.message_finished:
            out.append((opcode, "".join(parts) if opcode == Opcode.TEXT else b"".join(parts)))
            parts = []
    return out


@pytest.mark.parametrize("from_client", [True, False],
                         ids=["client_to_server", "server_to_client"])
def test_wsproto_accepts_our_frames(from_client: bool) -> None:
    mask = from_client
    big = random.Random(1).randbytes(70000)
    wire = b"".join([
        encode_frame(OP_BINARY, big, mask=mask),
        encode_frame(OP_TEXT, "héllo ".encode(), mask=mask, fin=False),
        encode_frame(OP_PING, b"p", mask=mask),
        encode_frame(OP_CONTINUATION, "wörld".encode(), mask=mask),
        encode_frame(OP_BINARY, b"", mask=mask),
        encode_frame(OP_PONG, b"q", mask=mask),
        encode_close(1000, "bye", mask=mask),
    ])
    parser = FrameProtocol(client=not from_client, extensions=[])
    assert wsproto_messages(parser, wire) == [
        (Opcode.BINARY, big), (Opcode.PING, b"p"), (Opcode.TEXT, "héllo wörld"),
        (Opcode.BINARY, b""), (Opcode.PONG, b"q"), (Opcode.CLOSE, (1000, "bye")),
    ]


@pytest.mark.parametrize("from_client", [True, False],
                         ids=["client_to_server", "server_to_client"])
def test_we_accept_wsproto_frames(from_client: bool) -> None:
    sender = FrameProtocol(client=from_client, extensions=[])
    big = random.Random(2).randbytes(70000)
    wire = b"".join(bytes(chunk) for chunk in [
        sender.send_data(big),
        sender.send_data("héllo ", fin=False),
        sender.ping(b"p"),
        sender.send_data("wörld", fin=True),
        sender.pong(b"q"),
        sender.close(4000, "bye"),
    ])
    decoder = FrameDecoder(max_message=MAX, client=not from_client)
    assert decode_chunks(decoder, random_chunks(wire, random.Random(3))) == [
        Message(big, False), Ping(b"p"), Message("héllo wörld".encode(), True), Pong(b"q"),
        Close(4000, "bye"),
    ]
