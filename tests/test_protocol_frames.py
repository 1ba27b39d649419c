"""Tunnel v1 frames: byte layout, every decode rejection, and fuzzing.

The fuzz tests feed arbitrary bytes to the frame decoder and arbitrary frame
sequences to :meth:`Connection.receive_message` after a valid handshake: the
only acceptable outcomes are a frame / an event / ``None`` or the module's own
error (:class:`FrameError` / :class:`ProtocolError`), never any other exception.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooti.protocol import frames
from tooti.protocol.connection import (
    Connection,
    HelloReceived,
    Limits,
    ProtocolError,
    Side,
    WelcomeReceived,
)
from tooti.protocol.frames import (
    FLAG_ACK,
    FLAG_FIN,
    HEADER,
    U32,
    Frame,
    FrameError,
    FrameType,
)

MAX = 4096
FUZZ = settings(
    max_examples=250, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CONNECTION_TYPES = [
    FrameType.HELLO, FrameType.WELCOME, FrameType.MODELS, FrameType.HEARTBEAT, FrameType.GOAWAY,
    FrameType.PROOF, FrameType.ROUTES,
]
STREAM_TYPES = [t for t in FrameType if t not in CONNECTION_TYPES]
ALLOWED_FLAGS = {FrameType.OPEN: FLAG_FIN, FrameType.DATA: FLAG_FIN, FrameType.HEARTBEAT: FLAG_ACK}


def decode_error(message: bytes, max_frame_bytes: int = MAX) -> str:
    """Decode ``message`` expecting a FrameError; return its code."""
    with pytest.raises(FrameError) as info:
        frames.decode(message, max_frame_bytes)
    return info.value.code


def stream_frame(ftype: FrameType, payload: bytes, stream_id: int = 3) -> Frame:
    return Frame(ftype, 0, stream_id, payload)


# ------------------------------------------------------------------ layout


def test_header_layout_is_type_flags_stream_id_big_endian() -> None:
    data = frames.encode(FrameType.DATA, 0x01020304, b"xy", FLAG_FIN)
    assert data == b"\x07\x01\x01\x02\x03\x04xy"
    assert frames.HEADER_SIZE == 6


def test_frame_type_codes() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0x01, "WELCOME": 0x02, "MODELS": 0x03, "HEARTBEAT": 0x04, "OPEN": 0x05,
        "RESPONSE": 0x06, "DATA": 0x07, "END": 0x08, "CANCEL": 0x09, "WINDOW": 0x0A,
        "GOAWAY": 0x0B, "PROOF": 0x0C, "ROUTES": 0x0D,
    }
    assert (FLAG_FIN, FLAG_ACK) == (0x01, 0x02)


JSON_CASES: list[tuple[FrameType, int, dict[str, Any], int]] = [
    (FrameType.HELLO, 0, {"versions": [1], "peer_id": "n1", "role": "node", "software": "t",
                          "labels": {"region": "eu"},
                          "limits": {"max_frame_bytes": 4096, "max_streams": 1,
                                     "initial_window": 1024}}, 0),
    (FrameType.WELCOME, 0, {"version": 1, "session_id": "s", "heartbeat_interval": 3.0,
                            "limits": {}, "peers": []}, 0),
    (FrameType.MODELS, 0, {"models": [{"id": "m"}]}, 0),
    (FrameType.ROUTES, 0, {"nodes": [{"id": "n1", "hops": 1}], "removed": ["n2"],
                           "full": False}, 0),
    (FrameType.HEARTBEAT, 0, {"in_flight": 0, "t": 1.5}, 0),
    (FrameType.HEARTBEAT, 0, {"t": 1.5}, FLAG_ACK),
    (FrameType.RESPONSE, 2, {"status": 200, "headers": {"content-type": "text/event-stream"}}, 0),
    (FrameType.END, 2, {"usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                  "total_tokens": 3}, "finish_reason": "stop"}, 0),
    (FrameType.CANCEL, 2, {"reason": "client gone"}, 0),
    (FrameType.GOAWAY, 0, {"code": "draining", "reason": "bye"}, 0),
]


@pytest.mark.parametrize(("ftype", "sid", "obj", "flags"), JSON_CASES,
                         ids=[f"{c[0].name}-{c[3]}" for c in JSON_CASES])
def test_json_frames_round_trip(ftype: FrameType, sid: int, obj: dict[str, Any],
                                flags: int) -> None:
    data = frames.encode_json(ftype, sid, obj, flags)
    frame = frames.decode(data, MAX)
    assert (frame.type, frame.flags, frame.stream_id) == (ftype, flags, sid)
    assert frames.decode_json(frame, MAX) == obj
    assert msgspec.json.decode(data[frames.HEADER_SIZE:]) == obj


@pytest.mark.parametrize("fin", [True, False])
@pytest.mark.parametrize("body", [b"", b"{\"model\": \"m\"}", bytes(range(256))])
def test_open_round_trip(fin: bool, body: bytes) -> None:
    meta = {"request_id": "r1", "endpoint": "chat/completions", "model": "m", "stream": True}
    data = frames.encode_open(6, meta, body, fin)
    meta_bytes = msgspec.json.encode(meta)
    assert data[:6] == HEADER.pack(FrameType.OPEN, FLAG_FIN if fin else 0, 6)
    assert data[6:10] == U32.pack(len(meta_bytes))
    assert data[10:10 + len(meta_bytes)] == meta_bytes
    frame = frames.decode(data, MAX)
    assert frame.flags == (FLAG_FIN if fin else 0)
    assert frames.decode_open(frame, MAX) == (meta, body)


@pytest.mark.parametrize("fin", [True, False])
def test_data_round_trip(fin: bool) -> None:
    payload = bytes(range(256)) * 3
    frame = frames.decode(frames.encode(FrameType.DATA, 9, payload, FLAG_FIN if fin else 0), MAX)
    assert frame == Frame(FrameType.DATA, FLAG_FIN if fin else 0, 9, payload)


@pytest.mark.parametrize("increment", [1, 4096, 2**31 - 1])
def test_window_round_trip(increment: int) -> None:
    data = frames.encode_window(5, increment)
    assert data == HEADER.pack(FrameType.WINDOW, 0, 5) + increment.to_bytes(4, "big")
    assert frames.decode_window(frames.decode(data, MAX)) == increment


def test_largest_stream_id_round_trips() -> None:
    frame = frames.decode(frames.encode(FrameType.DATA, frames.MAX_STREAM_ID, b"x"), MAX)
    assert frame.stream_id == 0xFFFFFFFF


# ------------------------------------------------------------------ decode rejections


def test_frame_at_the_limit_is_accepted_one_byte_more_is_too_large() -> None:
    exact = frames.encode(FrameType.DATA, 1, b"x" * (MAX - frames.HEADER_SIZE))
    assert frames.decode(exact, MAX).payload == b"x" * (MAX - 6)
    assert decode_error(exact + b"x") == "frame_too_large"


def test_size_is_checked_before_anything_else() -> None:
    assert decode_error(b"\xff" * (MAX + 1)) == "frame_too_large"


@pytest.mark.parametrize("size", range(6))
def test_shorter_than_the_header_is_truncated(size: int) -> None:
    assert decode_error(frames.encode(FrameType.DATA, 1)[:size]) == "frame_truncated"


@pytest.mark.parametrize("raw_type", [0x00, 0x0E, 0x7F, 0xFF])
def test_unknown_frame_type(raw_type: int) -> None:
    assert decode_error(HEADER.pack(raw_type, 0, 1) + b"{}") == "unknown_frame_type"


@pytest.mark.parametrize("flags", [0x04, 0x08, 0x80, 0xFF])
def test_unknown_flag_bits(flags: int) -> None:
    assert decode_error(HEADER.pack(FrameType.DATA, flags, 1) + b"x") == "unknown_flags"


DISALLOWED_FLAGS = [
    (t, FLAG_FIN) for t in FrameType if t not in (FrameType.OPEN, FrameType.DATA)
] + [(t, FLAG_ACK) for t in FrameType if t is not FrameType.HEARTBEAT]


@pytest.mark.parametrize(("ftype", "flags"), DISALLOWED_FLAGS,
                         ids=[f"{t.name}-{'FIN' if f == FLAG_FIN else 'ACK'}"
                              for t, f in DISALLOWED_FLAGS])
def test_flags_not_allowed_on_the_type(ftype: FrameType, flags: int) -> None:
    sid = 0 if ftype in CONNECTION_TYPES else 1
    assert decode_error(HEADER.pack(ftype, flags, sid) + b"{}") == "unknown_flags"


@pytest.mark.parametrize("ftype", CONNECTION_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("sid", [1, 2, 0xFFFFFFFF])
def test_connection_frames_need_stream_zero(ftype: FrameType, sid: int) -> None:
    assert decode_error(frames.encode_json(ftype, sid, {})) == "bad_stream_id"


@pytest.mark.parametrize("ftype", STREAM_TYPES, ids=lambda t: t.name)
def test_stream_frames_need_a_stream_id(ftype: FrameType) -> None:
    assert decode_error(frames.encode(ftype, 0, b"{}")) == "bad_stream_id"


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"{\"a\":}", b"nul", b"\xff\xfe", b"{} {}", b"{\"a\": 1e999}", b"[" * 5000,
     b"{\"a\":" * 3000],
    ids=["empty", "open-brace", "bad-value", "bad-literal", "not-utf8", "two-values",
         "float-overflow", "deep-array", "deep-object"],
)
def test_bad_json(payload: bytes) -> None:
    with pytest.raises(FrameError) as info:
        frames.decode_json(stream_frame(FrameType.END, payload), 65_536)
    assert info.value.code == "bad_json"


@pytest.mark.parametrize("payload", [b"[]", b"1", b"\"s\"", b"null", b"true"])
def test_json_must_be_an_object(payload: bytes) -> None:
    with pytest.raises(FrameError) as info:
        frames.decode_json(stream_frame(FrameType.END, payload), MAX)
    assert info.value.code == "bad_json"


def test_control_payload_size_limit() -> None:
    payload = msgspec.json.encode({"pad": "x" * 100})
    assert frames.decode_json(stream_frame(FrameType.END, payload), len(payload))
    with pytest.raises(FrameError) as info:
        frames.decode_json(stream_frame(FrameType.END, payload), len(payload) - 1)
    assert info.value.code == "control_too_large"


def open_error(payload: bytes, max_meta: int = MAX) -> str:
    with pytest.raises(FrameError) as info:
        frames.decode_open(stream_frame(FrameType.OPEN, payload, 1), max_meta)
    return info.value.code


@pytest.mark.parametrize("size", range(4))
def test_open_without_a_metadata_length(size: int) -> None:
    assert open_error(b"\x00" * size) == "frame_truncated"


def test_open_metadata_length_longer_than_the_frame() -> None:
    assert open_error(U32.pack(3) + b"{}") == "frame_truncated"
    assert open_error(U32.pack(0xFFFFFFFF) + b"{}", max_meta=2**33) == "frame_truncated"


def test_open_metadata_length_over_the_control_limit() -> None:
    assert open_error(U32.pack(MAX + 1) + b"{}") == "control_too_large"


def test_open_metadata_length_shorter_than_the_json() -> None:
    # The length points inside the JSON: the metadata is cut and does not parse.
    assert open_error(U32.pack(3) + b"{\"a\":1}body") == "bad_json"
    assert open_error(U32.pack(0) + b"{}") == "bad_json"


@pytest.mark.parametrize("meta", [b"[]", b"1", b"null", b"[" * 3000])
def test_open_metadata_must_be_a_json_object(meta: bytes) -> None:
    assert open_error(U32.pack(len(meta)) + meta) == "bad_json"


def test_open_body_follows_the_metadata_exactly() -> None:
    frame = stream_frame(FrameType.OPEN, U32.pack(2) + b"{}" + b"{}rest", 1)
    assert frames.decode_open(frame, MAX) == ({}, b"{}rest")


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_window_payload_must_be_four_bytes(payload: bytes) -> None:
    with pytest.raises(FrameError) as info:
        frames.decode_window(stream_frame(FrameType.WINDOW, payload))
    assert info.value.code == "bad_window"


@pytest.mark.parametrize("increment", [0, 2**31, 2**32 - 1])
def test_window_increment_range(increment: int) -> None:
    with pytest.raises(FrameError) as info:
        frames.decode_window(stream_frame(FrameType.WINDOW, U32.pack(increment)))
    assert info.value.code == "bad_window"


# ------------------------------------------------------------------ fuzz: frame decoder


@FUZZ
@given(st.binary(max_size=64) | st.binary(min_size=6, max_size=12).map(lambda b: b"\x07\x00" + b))
def test_fuzz_decode_round_trips_or_raises_frame_error(message: bytes) -> None:
    try:
        frame = frames.decode(message, 48)
    except FrameError as exc:
        assert exc.code in {"frame_too_large", "frame_truncated", "unknown_frame_type",
                            "unknown_flags", "bad_stream_id"}
        return
    assert frames.encode(frame.type, frame.stream_id, frame.payload, frame.flags) == message


@FUZZ
@given(st.sampled_from(list(FrameType)), st.binary(max_size=80))
def test_fuzz_payload_decoders_raise_only_frame_error(ftype: FrameType, payload: bytes) -> None:
    frame = stream_frame(ftype, payload)
    for decode in (
        lambda: frames.decode_json(frame, 64),
        lambda: frames.decode_open(frame, 64),
        lambda: frames.decode_window(frame),
    ):
        try:
            decode()
        except FrameError:
            pass


# ------------------------------------------------------------------ fuzz: Connection

FUZZ_LIMITS = Limits(max_frame_bytes=8192, max_streams=3, initial_window=2048)
KEYS = ["t", "models", "id", "status", "headers", "code", "reason", "version", "versions",
        "peer_id", "labels", "limits", "heartbeat_interval", "peers", "usage", "error"]
json_scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), json_values,
                               max_size=4)
deep_json = st.integers(900, 1500).map(lambda n: b"[" * n) | st.just(b'{"a":' * 1200)
HUGE = 10**400
PLAUSIBLE: dict[FrameType, list[dict[str, Any]]] = {
    FrameType.HELLO: [{"versions": [1], "peer_id": "x"}],
    FrameType.WELCOME: [{"version": 1, "heartbeat_interval": 1}],
    FrameType.MODELS: [{"models": [{"id": "m"}]}, {"models": []}, {"models": "m"},
                       {"models": [{"id": 1}]}],
    FrameType.HEARTBEAT: [{"t": 1.5}, {"t": HUGE}, {"t": "x"}, {"in_flight": 1}, {}],
    FrameType.RESPONSE: [{"status": 200, "headers": {}}, {"status": 200},
                         {"status": 99}, {"status": HUGE}, {"status": 200, "headers": []}],
    FrameType.END: [{"usage": {"total_tokens": 1}}, {}],
    FrameType.CANCEL: [{"reason": "gone"}, {}, {"reason": 1}],
    FrameType.GOAWAY: [{"code": "draining", "reason": "bye"}, {}, {"code": 1}],
    FrameType.PROOF: [{"signature": "c2ln"}, {}, {"signature": 5}],
    FrameType.ROUTES: [{"nodes": [{"id": "n"}], "removed": []}, {}, {"nodes": "n"},
                       {"nodes": [{"id": 1}]}, {"removed": [1]}, {"full": True}],
}
COMMON_TYPES = [t for t in FrameType if t not in (FrameType.HELLO, FrameType.WELCOME)]
LIVE_IDS = [1, 2, 3, 4]
OTHER_IDS = [5, 6, 7, 8, 101, 0xFFFFFFFF]


def weighted(draw: st.DrawFn, common: st.SearchStrategy[Any],
             rare: st.SearchStrategy[Any]) -> Any:
    """Draw mostly from ``common``, sometimes from ``rare``.

    (Hypothesis favours small and boundary integers, so "rare" is a middle value.)
    """
    return draw(rare if draw(st.integers(0, 8)) == 4 else common)


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """A frame, usually well-formed enough to get deep into the state machine."""
    if draw(st.integers(0, 16)) == 8:
        return draw(st.binary(max_size=32))
    ftype = weighted(draw, st.sampled_from(COMMON_TYPES), st.sampled_from(list(FrameType)))
    flags = weighted(draw, st.sampled_from([0, ALLOWED_FLAGS.get(ftype, 0)]),
                     st.integers(0, 255))
    connection = ftype in CONNECTION_TYPES
    sid = weighted(draw, st.just(0) if connection else st.sampled_from(LIVE_IDS),
                   st.sampled_from(OTHER_IDS) | st.integers(0, 2**32 - 1))
    if ftype == FrameType.OPEN:
        meta = weighted(draw, st.just(b'{"m":1}'), json_objects.map(msgspec.json.encode)
                        | deep_json)
        lie = weighted(draw, st.just(0), st.sampled_from([1, -1, 1000]))
        body = weighted(draw, st.binary(max_size=16),
                        st.integers(0, 2100).map(lambda n: b"b" * n))
        payload = U32.pack(max(0, len(meta) + lie)) + meta + body
    elif ftype == FrameType.DATA:
        payload = weighted(draw, st.binary(max_size=16),
                           st.integers(0, 2100).map(lambda n: b"d" * n))
    elif ftype == FrameType.WINDOW:
        payload = weighted(draw, st.integers(1, 4096).map(U32.pack),
                           st.integers(0, 2**32 - 1).map(U32.pack) | st.binary(max_size=6))
    else:
        payload = weighted(
            draw, st.sampled_from(PLAUSIBLE[ftype]).map(msgspec.json.encode),
            json_objects.map(msgspec.json.encode) | st.binary(max_size=24) | deep_json,
        )
    return HEADER.pack(ftype, flags, sid) + payload


def handshaken(open_streams: int) -> tuple[Connection, Connection]:
    """A dialer and an acceptor after HELLO / WELCOME.

    Each side then opens ``open_streams`` streams on the other (so ids 1-4 are
    live on both ends), and the first stream of each side has its RESPONSE.
    """
    dialer = Connection(Side.DIALER, FUZZ_LIMITS)
    acceptor = Connection(Side.ACCEPTOR, FUZZ_LIMITS)
    hello = acceptor.receive_message(dialer.send_hello("n", "node", "t", {}))
    assert isinstance(hello, HelloReceived)
    welcome = acceptor.send_welcome(acceptor.choose_version(hello.versions), "s", 1.0)
    assert isinstance(dialer.receive_message(welcome), WelcomeReceived)
    for i in range(open_streams):
        for opener, responder in ((dialer, acceptor), (acceptor, dialer)):
            sid, frame, rest = opener.open_stream({"m": 1}, b"x" * 10)
            assert not rest
            assert responder.receive_message(frame) is not None
            if i == 0:
                assert opener.receive_message(responder.send_response(sid, 200, {}))
    return dialer, acceptor


def feed(conn: Connection, messages: list[bytes]) -> None:
    """Feed messages until the first ProtocolError; anything else fails the test."""
    for message in messages:
        try:
            conn.receive_message(message)
        except ProtocolError as exc:
            assert exc.code and isinstance(exc.message, str)
            assert conn.send_goaway(exc.code, exc.message)
            return
        assert conn.active_streams >= 0
        for sid in range(1, 10):
            assert conn.send_credit(sid) >= 0


@FUZZ
@given(st.sampled_from([Side.DIALER, Side.ACCEPTOR]), st.sampled_from([2, 1, 0]),
       st.lists(st.binary(max_size=48), max_size=6))
def test_fuzz_receive_arbitrary_bytes(side: Side, open_streams: int,
                                      messages: list[bytes]) -> None:
    dialer, acceptor = handshaken(open_streams)
    feed(dialer if side is Side.DIALER else acceptor, messages)


@FUZZ
@given(st.sampled_from([Side.DIALER, Side.ACCEPTOR]), st.sampled_from([2, 1, 0]),
       st.lists(raw_frames(), max_size=10))
def test_fuzz_receive_frame_sequences(side: Side, open_streams: int,
                                      messages: list[bytes]) -> None:
    dialer, acceptor = handshaken(open_streams)
    feed(dialer if side is Side.DIALER else acceptor, messages)


@FUZZ
@given(st.sampled_from([Side.DIALER, Side.ACCEPTOR]), st.lists(raw_frames(), max_size=4))
def test_fuzz_receive_during_handshake(side: Side, messages: list[bytes]) -> None:
    feed(Connection(side, FUZZ_LIMITS), messages)


# ------------------------------------------------------------------ merging DATA frames


def _data(sid: int, payload: bytes, fin: bool = False) -> bytes:
    return frames.encode(FrameType.DATA, sid, payload, FLAG_FIN if fin else 0)


def test_merge_data_joins_a_stream_run_and_keeps_everything_else_in_place() -> None:
    heartbeat = frames.encode_json(FrameType.HEARTBEAT, 0, {"in_flight": 1})
    end = frames.encode_json(FrameType.END, 3, {})
    batch = [_data(3, b"a"), _data(3, b"bc"), heartbeat, _data(3, b"d"), _data(5, b"e"),
             _data(5, b"f", fin=True), _data(5, b"g"), end]
    assert frames.merge_data(batch, 1000) == [
        _data(3, b"abc"), heartbeat, _data(3, b"d"), _data(5, b"ef", fin=True),
        _data(5, b"g"), end]


def test_merge_data_respects_the_payload_limit_and_leaves_single_frames_alone() -> None:
    batch = [_data(1, b"x" * 4), _data(1, b"y" * 4), _data(1, b"z" * 4)]
    assert frames.merge_data(batch, 8) == [_data(1, b"x" * 4 + b"y" * 4), _data(1, b"z" * 4)]
    assert frames.merge_data(batch[:1], 8) == batch[:1]
    fin_first = [_data(1, b"a", fin=True), _data(1, b"b")]
    assert frames.merge_data(fin_first, 8) == fin_first  # nothing may follow a FIN


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([1, 3]), st.binary(max_size=40), st.booleans(),
                          st.booleans()), max_size=20),
       st.integers(min_value=40, max_value=200))
def test_merge_data_keeps_each_streams_bytes_and_fins(
        parts: list[tuple[int, bytes, bool, bool]], limit: int) -> None:
    """Per stream, the merged frames decode to the same bytes, cut at the same FINs, and
    none exceeds the limit; the non-DATA frames keep their order."""
    batch = [_data(sid, payload, fin) if data else frames.encode_json(FrameType.END, sid, {})
             for sid, payload, fin, data in parts]
    merged = frames.merge_data(batch, limit)

    def view(items: list[bytes]) -> dict[int, list[Any]]:
        seen: dict[int, list[Any]] = {1: [], 3: []}
        for item in items:
            frame = frames.decode(item, 10_000)
            if frame.type is FrameType.DATA:
                assert len(frame.payload) <= max(limit, 40)
                seen[frame.stream_id].append((frame.payload, bool(frame.flags & FLAG_FIN)))
            else:
                seen[frame.stream_id].append("END")
        return seen

    def flatten(events: list[Any]) -> list[Any]:
        out: list[Any] = []
        pending = b""
        for event in events:
            if event == "END":
                out += [pending, "END"] if pending else ["END"]
                pending = b""
            else:
                pending += event[0]
                if event[1]:
                    out += [pending, "FIN"]
                    pending = b""
        return [*out, pending] if pending else out

    before, after = view(batch), view(merged)
    for sid in (1, 3):
        assert flatten(before[sid]) == flatten(after[sid])
    assert len(merged) <= len(batch)
