"""The sans-I/O tunnel state machine, driven purely in memory.

Two :class:`Connection` objects pass bytes to each other directly; no trio,
no transport. Raw frames built with :mod:`tooti.protocol.frames` play a peer
that breaks the rules.
"""

from __future__ import annotations

from typing import Any

import pytest

from tooti.protocol import frames
from tooti.protocol.connection import (
    SUPPORTED_VERSIONS,
    Connection,
    DataReceived,
    Event,
    FlowControlError,
    GoAwayReceived,
    HeartbeatAcked,
    HeartbeatReceived,
    HelloReceived,
    Limits,
    ModelsReceived,
    ProofReceived,
    ProtocolError,
    ResponseStarted,
    RoutesReceived,
    Side,
    State,
    StreamCancelled,
    StreamEnded,
    StreamOpened,
    WelcomeReceived,
    WindowUpdated,
)
from tooti.protocol.frames import FLAG_ACK, FLAG_FIN, FrameType

SMALL = Limits(max_frame_bytes=8192, max_streams=4, initial_window=4096)
WIRE_LIMITS = {"max_frame_bytes": 4096, "max_streams": 1, "initial_window": 1024}


def pair(
    dialer_limits: Limits = SMALL, acceptor_limits: Limits = SMALL,
) -> tuple[Connection, Connection]:
    """A dialer and an acceptor that completed HELLO / WELCOME."""
    dialer = Connection(Side.DIALER, dialer_limits)
    acceptor = Connection(Side.ACCEPTOR, acceptor_limits)
    hello = acceptor.receive_message(dialer.send_hello("node-1", "node", "tooti/t", {}))
    assert isinstance(hello, HelloReceived)
    welcome = dialer.receive_message(
        acceptor.send_welcome(acceptor.choose_version(hello.versions), "sess-1", 2.5)
    )
    assert isinstance(welcome, WelcomeReceived)
    return dialer, acceptor


def error_code(conn: Connection, message: bytes) -> str:
    """Feed ``message`` expecting a ProtocolError; return its code."""
    with pytest.raises(ProtocolError) as info:
        conn.receive_message(message)
    return info.value.code


def hello_bytes(**overrides: Any) -> bytes:
    obj: dict[str, Any] = {"versions": [1], "peer_id": "node-1", "role": "node",
                           "software": "t", "labels": {}, "limits": WIRE_LIMITS}
    obj.update(overrides)
    return frames.encode_json(FrameType.HELLO, 0, {k: v for k, v in obj.items() if v is not ...})


def welcome_bytes(**overrides: Any) -> bytes:
    obj: dict[str, Any] = {"version": 1, "session_id": "s", "heartbeat_interval": 3.0,
                           "limits": WIRE_LIMITS, "peers": []}
    obj.update(overrides)
    return frames.encode_json(
        FrameType.WELCOME, 0, {k: v for k, v in obj.items() if v is not ...}
    )


def open_and_deliver(
    opener: Connection, responder: Connection, body: bytes = b"{}",
    meta: dict[str, Any] | None = None,
) -> int:
    """Open a stream on ``opener`` and deliver its OPEN frame to ``responder``."""
    sid, frame, rest = opener.open_stream(meta or {"model": "m"}, body)
    assert not rest
    event = responder.receive_message(frame)
    assert isinstance(event, StreamOpened)
    return sid


def respond(opener: Connection, responder: Connection, sid: int, status: int = 200) -> None:
    event = opener.receive_message(responder.send_response(sid, status, {"x": "1"}))
    assert event == ResponseStarted(sid, status, {"x": "1"})


# ------------------------------------------------------------------ handshake


def test_handshake_carries_identity_limits_and_extras() -> None:
    dialer = Connection(Side.DIALER, Limits(max_frame_bytes=5000, max_streams=7,
                                            initial_window=2048))
    acceptor = Connection(Side.ACCEPTOR, Limits(max_frame_bytes=6000, max_streams=9,
                                                initial_window=3072))
    assert dialer.state is State.HANDSHAKE and acceptor.state is State.HANDSHAKE
    hello = acceptor.receive_message(dialer.send_hello(
        "node-1", "relay", "tooti/1.0", {"region": "eu"}, extra={"gpu": "none"}))
    assert hello == HelloReceived("node-1", "relay", [1], "tooti/1.0", {"region": "eu"},
                                  {"gpu": "none"})
    assert acceptor.peer_limits == Limits(5000, 7, 2048)
    assert acceptor.state is State.HANDSHAKE  # open only once WELCOME is sent
    welcome = dialer.receive_message(acceptor.send_welcome(
        1, "sess-9", 0.5, peers=["ws://other/tooti/v1/tunnel"], extra={"software": "gw"}))
    assert welcome == WelcomeReceived(1, "sess-9", 0.5, ["ws://other/tooti/v1/tunnel"],
                                      {"software": "gw"})
    assert dialer.peer_limits == Limits(6000, 9, 3072)
    assert dialer.state is State.OPEN and acceptor.state is State.OPEN
    assert dialer.version == acceptor.version == 1
    assert dialer.max_data_payload() == 6000 - frames.HEADER_SIZE


def test_handshake_roles_are_enforced_locally() -> None:
    dialer = Connection(Side.DIALER)
    acceptor = Connection(Side.ACCEPTOR)
    with pytest.raises(RuntimeError):
        acceptor.send_hello("a", "node", "t", {})
    with pytest.raises(RuntimeError):
        dialer.send_welcome(1, "s", 1.0)
    with pytest.raises(RuntimeError):
        acceptor.send_welcome(1, "s", 1.0)  # before HELLO
    with pytest.raises(RuntimeError):
        dialer.send_models([])  # before the handshake
    dialer.send_hello("a", "node", "t", {})
    with pytest.raises(RuntimeError):
        dialer.send_hello("a", "node", "t", {})
    assert not dialer.can_open_stream()


def test_streams_open_in_both_directions_with_their_parity() -> None:
    dialer, acceptor = pair()
    assert [open_and_deliver(acceptor, dialer) for _ in range(2)] == [2, 4]
    assert [open_and_deliver(dialer, acceptor) for _ in range(2)] == [1, 3]
    assert dialer.active_streams == acceptor.active_streams == 4


def test_version_negotiation_picks_the_highest_common_version() -> None:
    acceptor = Connection(Side.ACCEPTOR)
    assert acceptor.choose_version([0, 1, 7]) == max(SUPPORTED_VERSIONS)
    for offered in ([], [2, 3], [0]):
        with pytest.raises(ProtocolError) as info:
            acceptor.choose_version(offered)
        assert info.value.code == "unsupported_version"


def test_dialer_rejects_a_welcome_with_a_version_it_never_offered() -> None:
    dialer = Connection(Side.DIALER)
    dialer.send_hello("n", "node", "t", {})
    assert error_code(dialer, welcome_bytes(version=2)) == "unsupported_version"


def test_acceptor_refuses_with_goaway_during_the_handshake() -> None:
    dialer = Connection(Side.DIALER)
    acceptor = Connection(Side.ACCEPTOR)
    hello = acceptor.receive_message(dialer.send_hello("n", "node", "t", {}))
    assert isinstance(hello, HelloReceived)
    with pytest.raises(ProtocolError) as info:
        acceptor.choose_version([9])
    event = dialer.receive_message(acceptor.send_goaway(info.value.code, info.value.message))
    assert isinstance(event, GoAwayReceived) and event.code == "unsupported_version"
    assert dialer.state is State.HANDSHAKE and not dialer.can_open_stream()


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"peer_id": ...}, "bad_hello"),
        ({"peer_id": ""}, "bad_hello"),
        ({"peer_id": "x" * 129}, "bad_hello"),
        ({"peer_id": 7}, "bad_hello"),
        ({"versions": ...}, "bad_hello"),
        ({"versions": 1}, "bad_hello"),
        ({"versions": [True]}, "bad_hello"),
        ({"versions": ["1"]}, "bad_hello"),
        ({"labels": ["eu"]}, "bad_hello"),
        ({"labels": {"region": 1}}, "bad_hello"),
        ({"role": 1}, "bad_field"),
        ({"software": None}, "bad_field"),
        ({"limits": ...}, "bad_limits"),
        ({"limits": [1]}, "bad_limits"),
        ({"limits": {**WIRE_LIMITS, "max_frame_bytes": 4095}}, "bad_limits"),
        ({"limits": {**WIRE_LIMITS, "max_streams": 0}}, "bad_limits"),
        ({"limits": {**WIRE_LIMITS, "initial_window": 1023}}, "bad_limits"),
        ({"limits": {**WIRE_LIMITS, "initial_window": 2**31}}, "bad_limits"),
        ({"limits": {**WIRE_LIMITS, "max_streams": True}}, "bad_limits"),
        ({"limits": {**WIRE_LIMITS, "max_streams": 2.0}}, "bad_limits"),
    ],
)
def test_hello_validation(overrides: dict[str, Any], code: str) -> None:
    assert error_code(Connection(Side.ACCEPTOR), hello_bytes(**overrides)) == code


def test_hello_edge_values_are_accepted() -> None:
    event = Connection(Side.ACCEPTOR).receive_message(hello_bytes(
        peer_id="x" * 128, labels=..., role=..., software=...,
        limits={"max_frame_bytes": 4096, "max_streams": 1, "initial_window": 2**31 - 1}))
    assert isinstance(event, HelloReceived)
    assert (event.peer_id, event.role, event.software, event.labels) == ("x" * 128, "node",
                                                                         "", {})


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"heartbeat_interval": 0}, "bad_welcome"),
        ({"heartbeat_interval": -1.0}, "bad_welcome"),
        ({"heartbeat_interval": ...}, "bad_welcome"),
        ({"heartbeat_interval": "3"}, "bad_welcome"),
        ({"heartbeat_interval": 10**400}, "bad_welcome"),
        ({"peers": "ws://x"}, "bad_welcome"),
        ({"peers": [1]}, "bad_welcome"),
        ({"limits": ...}, "bad_limits"),
        ({"session_id": 5}, "bad_field"),
        ({"version": ...}, "unsupported_version"),
    ],
)
def test_welcome_validation(overrides: dict[str, Any], code: str) -> None:
    dialer = Connection(Side.DIALER)
    dialer.send_hello("n", "node", "t", {})
    assert error_code(dialer, welcome_bytes(**overrides)) == code
    assert dialer.state is State.HANDSHAKE


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (Side.ACCEPTOR, frames.encode_json(FrameType.MODELS, 0, {"models": []})),
        (Side.ACCEPTOR, welcome_bytes()),
        (Side.ACCEPTOR, frames.encode_open(1, {}, b"", True)),
        (Side.DIALER, hello_bytes()),
        (Side.DIALER, frames.encode_json(FrameType.HEARTBEAT, 0, {})),
        (Side.DIALER, frames.encode(FrameType.DATA, 2, b"x")),
    ],
)
def test_only_hello_then_welcome_during_the_handshake(side: Side, message: bytes) -> None:
    assert error_code(Connection(side), message) == "unexpected_frame"


def test_second_hello_before_welcome_is_rejected() -> None:
    acceptor = Connection(Side.ACCEPTOR)
    acceptor.receive_message(hello_bytes())
    assert error_code(acceptor, hello_bytes()) == "unexpected_frame"


@pytest.mark.parametrize("ftype", [FrameType.HELLO, FrameType.WELCOME])
def test_handshake_frames_after_the_handshake_are_rejected(ftype: FrameType) -> None:
    dialer, acceptor = pair()
    message = hello_bytes() if ftype is FrameType.HELLO else welcome_bytes()
    assert error_code(dialer, message) == "unexpected_frame"
    assert error_code(acceptor, message) == "unexpected_frame"


# ------------------------------------------------------------------ connection frames


def test_models_heartbeat_and_ack() -> None:
    dialer, acceptor = pair()
    models: list[dict[str, Any]] = [{"id": "m1", "endpoints": ["chat/completions"]},
                                    {"id": "m2"}]
    assert acceptor.receive_message(dialer.send_models(models)) == ModelsReceived(models)
    stats = {"in_flight": 2, "queued": 0, "healthy": True, "t": 12.25}
    assert acceptor.receive_message(dialer.send_heartbeat(stats)) == HeartbeatReceived(stats)
    ack = acceptor.send_heartbeat_ack(12.25)
    assert frames.decode(ack, 8192).flags == FLAG_ACK
    assert dialer.receive_message(ack) == HeartbeatAcked(12.25)


@pytest.mark.parametrize(
    ("payload", "flags", "code"),
    [
        ({"models": {"id": "m"}}, 0, "bad_models"),
        ({"models": [{"name": "m"}]}, 0, "bad_models"),
        ({"models": ["m"]}, 0, "bad_models"),
        ({}, FLAG_ACK, "bad_field"),
        ({"t": "now"}, FLAG_ACK, "bad_field"),
        ({"t": True}, FLAG_ACK, "bad_field"),
        ({"t": 10**400}, FLAG_ACK, "bad_field"),
    ],
)
def test_bad_models_and_heartbeat_acks(payload: dict[str, Any], flags: int, code: str) -> None:
    _, acceptor = pair()
    ftype = FrameType.HEARTBEAT if flags else FrameType.MODELS
    assert error_code(acceptor, frames.encode_json(ftype, 0, payload, flags)) == code


def test_routes_are_accepted_only_from_a_relay() -> None:
    dialer, acceptor = pair()
    frame = dialer.send_routes([{"id": "n1", "hops": 1}], ["n0"], full=True)
    assert error_code(acceptor, frame) == "unexpected_frame"
    dialer, acceptor = pair()
    acceptor.accepts_routes = True
    assert acceptor.receive_message(frame) == RoutesReceived(
        [{"id": "n1", "hops": 1}], ["n0"], True)


@pytest.mark.parametrize("payload", [
    {"nodes": {"id": "n"}}, {"nodes": [{"name": "n"}]}, {"nodes": ["n"]},
    {"nodes": [{"id": 5}]}, {"removed": "n"}, {"removed": [1]},
])
def test_bad_routes(payload: dict[str, Any]) -> None:
    _, acceptor = pair()
    acceptor.accepts_routes = True
    assert error_code(acceptor, frames.encode_json(FrameType.ROUTES, 0, payload)) == "bad_routes"


def test_an_open_whose_body_continues_leaves_the_request_open() -> None:
    dialer, acceptor = pair()
    sid, frame, rest = dialer.open_stream({"endpoint": "x"}, b"part-1", fin=False)
    assert rest == b""
    opened = acceptor.receive_message(frame)
    assert isinstance(opened, StreamOpened) and not opened.fin and opened.body == b"part-1"
    assert acceptor.receive_message(dialer.send_data(sid, b"part-2", fin=True)) == (
        DataReceived(sid, b"part-2", True))


def test_control_payload_over_the_local_limit() -> None:
    dialer, acceptor = pair(acceptor_limits=Limits(max_control_bytes=300))
    message = dialer.send_heartbeat({"pad": "x" * 300})
    assert error_code(acceptor, message) == "control_too_large"


def test_frame_over_the_local_limit() -> None:
    _, acceptor = pair()
    assert error_code(acceptor, frames.encode(FrameType.DATA, 1, b"x" * 8187)) == (
        "frame_too_large"
    )


# ------------------------------------------------------------------ streams and credit


def test_open_with_a_body_larger_than_the_window_returns_the_rest() -> None:
    dialer, acceptor = pair()
    body = bytes(range(256)) * 40  # 10240 bytes, window 4096
    sid, frame, rest = acceptor.open_stream({"model": "m"}, body)
    assert sid == 2 and frames.decode(frame, 8192).flags == 0
    assert acceptor.send_credit(sid) == 0
    opened = dialer.receive_message(frame)
    assert isinstance(opened, StreamOpened)
    assert (opened.meta, opened.fin) == ({"model": "m"}, False)
    assert opened.body + rest == body and len(opened.body) == 4096
    with pytest.raises(FlowControlError):
        acceptor.send_data(sid, rest[:1])

    received = opened.body
    offset = 0
    while offset < len(rest):
        window = dialer.consumed(sid, len(received))
        received = b""
        assert window, "consuming the whole window grants credit"
        event = acceptor.receive_message(window)
        assert isinstance(event, WindowUpdated) and event.stream_id == sid
        chunk = rest[offset : offset + acceptor.send_credit(sid)]
        offset += len(chunk)
        data = dialer.receive_message(acceptor.send_data(sid, chunk, fin=offset >= len(rest)))
        assert isinstance(data, DataReceived)
        assert data.data == chunk and data.fin == (offset >= len(rest))
        received = data.data
    assert acceptor.send_credit(sid) == 4096 - len(received)


def test_open_with_a_small_body_is_finished_in_one_frame() -> None:
    dialer, acceptor = pair()
    sid, frame, rest = acceptor.open_stream({}, b"hello")
    assert rest == b""
    assert frames.decode(frame, 8192).flags == FLAG_FIN
    assert dialer.receive_message(frame) == StreamOpened(sid, {}, b"hello", True)
    assert acceptor.send_credit(sid) == 4096 - 5
    # The request is complete: more request DATA is a protocol error.
    assert error_code(dialer, frames.encode(FrameType.DATA, sid, b"x")) == "unexpected_frame"


def test_open_fills_but_never_exceeds_the_peer_frame_size() -> None:
    big_window = Limits(max_frame_bytes=4096, initial_window=65_536)
    dialer, acceptor = pair(dialer_limits=big_window)
    for meta in ({"model": "m"}, {"model": "m" * 2000}):
        _, frame, rest = acceptor.open_stream(meta, b"b" * 10_000)
        assert len(frame) == 4096
        opened = dialer.receive_message(frame)
        assert isinstance(opened, StreamOpened)
        assert opened.meta == meta and len(opened.body) + len(rest) == 10_000


def test_open_with_metadata_larger_than_a_frame_fails_locally() -> None:
    dialer, acceptor = pair(dialer_limits=Limits(max_frame_bytes=4096))
    with pytest.raises(FlowControlError):
        acceptor.open_stream({"model": "m" * 5000}, b"")
    assert acceptor.active_streams == 0
    assert open_and_deliver(acceptor, dialer) == 2  # the id was not used up


def test_send_data_limits() -> None:
    _, acceptor = pair(dialer_limits=Limits(max_frame_bytes=4096, initial_window=8192))
    sid, _, _ = acceptor.open_stream({}, b"")
    with pytest.raises(FlowControlError):
        acceptor.send_data(sid, b"x" * 4091)  # over the peer's frame size
    acceptor.send_data(sid, b"x" * 4090)
    acceptor.send_data(sid, b"x" * 4090)
    with pytest.raises(FlowControlError):
        acceptor.send_data(sid, b"x" * 13)  # over the remaining credit (12)
    acceptor.send_data(sid, b"x" * 12)
    assert acceptor.send_credit(sid) == 0
    with pytest.raises(FlowControlError):
        acceptor.send_data(99, b"x")  # not open


def test_window_is_granted_after_half_the_window_is_consumed() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer, body=b"x" * 3000)
    assert dialer.consumed(sid, 2047) == b""
    window = dialer.consumed(sid, 1)
    assert frames.decode_window(frames.decode(window, 8192)) == 2048
    assert dialer.consumed(sid, 952) == b""  # 952 < 2048 since the last grant
    assert acceptor.receive_message(window) == WindowUpdated(sid, 2048)
    assert acceptor.send_credit(sid) == 4096 - 3000 + 2048
    # The responder's DATA to the opener is credited the same way.
    respond(acceptor, dialer, sid)
    dialer_credit = dialer.send_credit(sid)
    assert dialer_credit == 4096
    event = acceptor.receive_message(dialer.send_data(sid, b"y" * 4096))
    assert isinstance(event, DataReceived)
    grant = acceptor.consumed(sid, 4096)
    assert dialer.receive_message(grant) == WindowUpdated(sid, 4096)
    assert dialer.send_credit(sid) == 4096


def test_consumed_on_a_closed_stream_grants_nothing() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer, body=b"x" * 4000)
    acceptor.receive_message(dialer.send_end(sid, {}))
    assert dialer.consumed(sid, 4000) == b""


def test_data_beyond_the_window_is_a_protocol_error() -> None:
    dialer, _ = pair()
    # OPEN without FIN: 96 bytes of credit left.
    assert dialer.receive_message(frames.encode_open(2, {}, b"a" * 4000, False)) is not None
    assert dialer.receive_message(frames.encode(FrameType.DATA, 2, b"b" * 96)) is not None
    assert error_code(dialer, frames.encode(FrameType.DATA, 2, b"c")) == "flow_control"


def test_open_body_beyond_the_window_is_a_protocol_error() -> None:
    dialer, _ = pair()
    assert error_code(dialer, frames.encode_open(2, {}, b"x" * 4097, True)) == "flow_control"


def test_response_data_beyond_the_window_is_a_protocol_error() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    respond(acceptor, dialer, sid)
    acceptor.receive_message(frames.encode(FrameType.DATA, sid, b"x" * 4096))
    assert error_code(acceptor, frames.encode(FrameType.DATA, sid, b"x")) == "flow_control"


def test_window_overflow_is_a_protocol_error() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    top_up = 2**31 - 1 - acceptor.send_credit(sid)
    assert acceptor.receive_message(frames.encode_window(sid, top_up)) is not None
    assert acceptor.send_credit(sid) == 2**31 - 1
    assert error_code(acceptor, frames.encode_window(sid, 1)) == "flow_control"


def test_data_before_response_is_a_protocol_error() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    assert error_code(acceptor, frames.encode(FrameType.DATA, sid, b"x")) == "unexpected_frame"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (frames.encode(FrameType.DATA, 2, b"x", FLAG_FIN), "unknown_flags"),
        (frames.encode(FrameType.DATA, 2, b""), "empty_data"),
        (frames.encode_json(FrameType.RESPONSE, 2, {"status": 200}), "unexpected_frame"),
        (frames.encode_json(FrameType.CANCEL, 2, {"reason": "x"}), "unexpected_frame"),
    ],
    ids=["fin-on-response-data", "empty-data", "second-response", "cancel-from-responder"],
)
def test_response_side_rules(message: bytes, code: str) -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    assert sid == 2
    respond(acceptor, dialer, sid)
    assert error_code(acceptor, message) == code


@pytest.mark.parametrize(
    ("payload", "code"),
    [({"status": 99}, "bad_response"), ({"status": 600}, "bad_response"),
     ({"status": "200"}, "bad_response"), ({}, "bad_response"),
     ({"status": 200, "headers": ["a"]}, "bad_response")],
)
def test_response_validation(payload: dict[str, Any], code: str) -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    assert error_code(acceptor, frames.encode_json(FrameType.RESPONSE, sid, payload)) == code


@pytest.mark.parametrize(
    "message",
    [frames.encode_json(FrameType.RESPONSE, 1, {"status": 200}),
     frames.encode_json(FrameType.END, 1, {}), frames.encode(FrameType.DATA, 1, b"", FLAG_FIN)],
    ids=["response", "end", "empty-fin-data"],
)
def test_request_side_rules(message: bytes) -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(dialer, acceptor, body=b"")  # acceptor serves stream 1, FIN seen
    assert sid == 1
    assert error_code(acceptor, message) == "unexpected_frame"


def test_request_body_may_end_with_an_empty_fin() -> None:
    dialer, acceptor = pair()
    sid, frame, _ = dialer.open_stream({}, b"x" * 5000)
    opened = acceptor.receive_message(frame)
    assert isinstance(opened, StreamOpened) and not opened.fin
    assert acceptor.receive_message(dialer.send_data(sid, b"", fin=True)) == DataReceived(
        sid, b"", True
    )


# ------------------------------------------------------------------ END / CANCEL


def stream_frames(sid: int) -> list[bytes]:
    return [
        frames.encode(FrameType.DATA, sid, b"x"),
        frames.encode(FrameType.DATA, sid, b"", FLAG_FIN),
        frames.encode_window(sid, 100),
        frames.encode_json(FrameType.RESPONSE, sid, {"status": 200}),
        frames.encode_json(FrameType.END, sid, {}),
        frames.encode_json(FrameType.CANCEL, sid, {"reason": "late"}),
    ]


def test_end_closes_the_stream_and_later_frames_are_ignored() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    respond(acceptor, dialer, sid)
    acceptor.receive_message(dialer.send_data(sid, b"answer"))
    info = {"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            "finish_reason": "stop"}
    assert acceptor.receive_message(dialer.send_end(sid, info)) == StreamEnded(sid, info)
    assert not dialer.has_stream(sid) and not acceptor.has_stream(sid)
    assert dialer.active_streams == acceptor.active_streams == 0
    for message in stream_frames(sid):
        assert acceptor.receive_message(message) is None
        assert dialer.receive_message(message) is None
    assert acceptor.send_cancel(sid, "late") == b""
    with pytest.raises(FlowControlError):
        dialer.send_end(sid, {})


def test_end_without_response_carries_the_error() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    info = {"error": {"status": 503, "code": "model_not_served", "message": "no"},
            "retryable": True}
    assert acceptor.receive_message(dialer.send_end(sid, info)) == StreamEnded(sid, info)


def test_cancel_closes_the_stream_and_later_frames_are_ignored() -> None:
    dialer, acceptor = pair()
    sid, frame, _ = acceptor.open_stream({}, b"x" * 5000)
    dialer.receive_message(frame)
    cancel = acceptor.send_cancel(sid, "client gone")
    assert not acceptor.has_stream(sid)
    assert acceptor.send_cancel(sid, "again") == b""
    assert dialer.receive_message(cancel) == StreamCancelled(sid, "client gone")
    assert not dialer.has_stream(sid)
    for message in stream_frames(sid):
        assert acceptor.receive_message(message) is None
        assert dialer.receive_message(message) is None


def test_only_the_opener_cancels() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    assert dialer.send_cancel(sid, "no") == b""
    assert dialer.has_stream(sid)


@pytest.mark.parametrize("side", [Side.DIALER, Side.ACCEPTOR])
@pytest.mark.parametrize("sid", [1, 2, 3, 4, 101, 0xFFFFFFFF])
def test_frames_on_never_opened_streams_are_protocol_errors(side: Side, sid: int) -> None:
    for message in stream_frames(sid):
        dialer, acceptor = pair()
        conn = dialer if side is Side.DIALER else acceptor
        assert error_code(conn, message) == "bad_stream_id"


def test_never_opened_is_judged_per_parity() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)  # 2
    acceptor.receive_message(dialer.send_end(sid, {}))
    # Acceptor: 2 was opened and closed (ignored), 4 is its own and never opened.
    assert acceptor.receive_message(frames.encode_window(2, 1)) is None
    assert error_code(acceptor, frames.encode_window(4, 1)) == "bad_stream_id"


@pytest.mark.parametrize(("side", "sid"), [(Side.ACCEPTOR, 2), (Side.DIALER, 1),
                                           (Side.DIALER, 3)])
def test_open_with_the_wrong_parity(side: Side, sid: int) -> None:
    dialer, acceptor = pair()
    conn = dialer if side is Side.DIALER else acceptor
    assert error_code(conn, frames.encode_open(sid, {}, b"", True)) == "bad_stream_id"


@pytest.mark.parametrize("second", [6, 4])
def test_open_ids_must_increase(second: int) -> None:
    dialer, _ = pair()
    dialer.receive_message(frames.encode_open(6, {}, b"", True))
    assert error_code(dialer, frames.encode_open(second, {}, b"", True)) == "bad_stream_id"


def test_too_many_streams() -> None:
    dialer, acceptor = pair(dialer_limits=Limits(max_streams=2))
    open_and_deliver(acceptor, dialer)
    open_and_deliver(acceptor, dialer)
    assert not acceptor.can_open_stream()
    with pytest.raises(FlowControlError):
        acceptor.open_stream({}, b"")
    assert error_code(dialer, frames.encode_open(6, {}, b"", True)) == "too_many_streams"


def test_closing_a_stream_frees_a_slot_and_own_streams_do_not_count() -> None:
    dialer, acceptor = pair(dialer_limits=Limits(max_streams=1),
                            acceptor_limits=Limits(max_streams=1))
    sid = open_and_deliver(acceptor, dialer)
    open_and_deliver(dialer, acceptor)  # the dialer's own stream does not count
    assert not acceptor.can_open_stream()
    acceptor.receive_message(dialer.send_end(sid, {}))
    assert acceptor.can_open_stream()
    assert open_and_deliver(acceptor, dialer) == 4


# ------------------------------------------------------------------ GOAWAY / close


def test_goaway_received_stops_new_streams() -> None:
    dialer, acceptor = pair()
    sid = open_and_deliver(acceptor, dialer)
    event = acceptor.receive_message(dialer.send_goaway("draining", "node shutting down"))
    assert event == GoAwayReceived("draining", "node shutting down")
    assert acceptor.goaway_received and not acceptor.can_open_stream()
    with pytest.raises(FlowControlError):
        acceptor.open_stream({}, b"")
    # Existing streams carry on.
    respond(acceptor, dialer, sid)
    assert acceptor.receive_message(dialer.send_end(sid, {})) == StreamEnded(sid, {})


def test_goaway_sent_stops_new_streams_both_ways() -> None:
    dialer, _ = pair()
    dialer.send_goaway("draining", "")
    assert dialer.goaway_sent and not dialer.can_open_stream()
    # An OPEN that crossed the GOAWAY is still a stream (so it can be answered with a
    # retryable END at once, and the opener fails over without waiting).
    event = dialer.receive_message(frames.encode_open(2, {}, b"x", False))
    assert event == StreamOpened(2, {}, b"x", False)
    dialer.send_end(2, {"error": {"status": 503, "code": "draining"}, "retryable": True})
    assert dialer.receive_message(frames.encode(FrameType.DATA, 2, b"y")) is None
    assert not dialer.has_stream(2)


def test_goaway_defaults() -> None:
    _, acceptor = pair()
    event = acceptor.receive_message(frames.encode_json(FrameType.GOAWAY, 0, {}))
    assert event == GoAwayReceived("goaway", "")


def test_messages_after_close_are_rejected() -> None:
    dialer, acceptor = pair()
    open_and_deliver(acceptor, dialer)
    acceptor.close()
    assert acceptor.state is State.CLOSED and acceptor.active_streams == 0
    assert not acceptor.can_open_stream()
    assert error_code(acceptor, dialer.send_heartbeat({})) == "closed"


def test_every_event_type_is_reachable() -> None:
    """A full conversation over both directions yields every event type."""
    dialer, acceptor = pair()
    seen: list[Event | None] = []
    seen.append(acceptor.receive_message(dialer.send_models([{"id": "m"}])))
    seen.append(acceptor.receive_message(dialer.send_heartbeat({"t": 1.0})))
    seen.append(dialer.receive_message(acceptor.send_heartbeat_ack(1.0)))
    sid, frame, rest = acceptor.open_stream({}, b"z" * 5000)
    seen.append(dialer.receive_message(frame))
    seen.append(acceptor.receive_message(dialer.consumed(sid, 4096)))
    seen.append(dialer.receive_message(acceptor.send_data(sid, rest, fin=True)))
    seen.append(acceptor.receive_message(dialer.send_response(sid, 200, {})))
    seen.append(acceptor.receive_message(dialer.send_end(sid, {})))
    sid2 = open_and_deliver(acceptor, dialer)
    seen.append(dialer.receive_message(acceptor.send_cancel(sid2, "bye")))
    seen.append(dialer.receive_message(acceptor.send_goaway("draining", "")))
    kinds = {type(event) for event in seen}
    assert kinds == {ModelsReceived, HeartbeatReceived, HeartbeatAcked, StreamOpened,
                     WindowUpdated, DataReceived, ResponseStarted, StreamEnded,
                     StreamCancelled, GoAwayReceived}


def test_proof_gates_the_session_when_asked_for() -> None:
    dialer = Connection(Side.DIALER, Limits())
    acceptor = Connection(Side.ACCEPTOR, Limits())
    hello = acceptor.receive_message(dialer.send_hello("n", "node", "t", {}))
    assert isinstance(hello, HelloReceived)
    welcome = dialer.receive_message(acceptor.send_welcome(
        1, "s", 3.0, extra={"challenge": "Y2hhbGxlbmdl"}, require_proof=True))
    assert isinstance(welcome, WelcomeReceived) and welcome.extra["challenge"]
    with pytest.raises(ProtocolError) as info:
        acceptor.receive_message(dialer.send_models([]))
    assert info.value.code == "proof_required"


def test_proof_frame_round_trip_and_unasked_proof() -> None:
    dialer = Connection(Side.DIALER, Limits())
    acceptor = Connection(Side.ACCEPTOR, Limits())
    acceptor.receive_message(dialer.send_hello("n", "node", "t", {}))
    dialer.receive_message(acceptor.send_welcome(1, "s", 3.0, require_proof=True))
    event = acceptor.receive_message(dialer.send_proof("c2ln"))
    assert event == ProofReceived("c2ln")
    acceptor.proof_verified()
    assert isinstance(acceptor.receive_message(dialer.send_models([])), ModelsReceived)
    with pytest.raises(ProtocolError) as info:
        acceptor.receive_message(dialer.send_proof("again"))
    assert info.value.code == "unexpected_frame"
