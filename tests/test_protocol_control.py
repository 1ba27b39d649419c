"""The typed control-frame payloads (:mod:`tooti.protocol.control`): what each accepts,
which code a misfit gets, what is passed on as sent, and that the protocol package
stays free of I/O."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tooti.protocol import control, frames
from tooti.protocol.connection import Connection, Limits, Side
from tooti.protocol.errors import ProtocolError
from tooti.protocol.frames import FLAG_ACK, Frame, FrameError, FrameType

LIMITS = {"max_frame_bytes": 4096, "max_streams": 1, "initial_window": 1024}
HELLO: dict[str, Any] = {"versions": [1], "peer_id": "n", "limits": LIMITS}
WELCOME: dict[str, Any] = {"version": 1, "heartbeat_interval": 3.0, "limits": LIMITS}


def frame(ftype: FrameType, obj: Any, flags: int = 0) -> Frame:
    return frames.decode(frames.encode_json(ftype, 0, obj, flags), 1 << 20)


def violation(ftype: FrameType, obj: Any, payload: type[control.Payload]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        control.read(frame(ftype, obj), 1 << 16, payload)
    return info.value


def test_hello_defaults_and_extras() -> None:
    hello, obj = control.read(frame(FrameType.HELLO, {**HELLO, "public_key": "k"}), 4096,
                              control.Hello)
    assert (hello.role, hello.software, hello.labels) == ("node", "", None)
    assert hello.limits == control.WireLimits(4096, 1, 1024)
    assert control.extras(obj, control.Hello) == {"public_key": "k"}


@pytest.mark.parametrize(
    ("member", "value", "code"),
    [("peer_id", "a\nb", "bad_hello"), ("versions", [1.5], "bad_hello"),
     ("labels", {"k": "v" * 257}, "bad_hello"), ("role", "r" * 129, "bad_field"),
     ("software", 3, "bad_field"), ("limits", {**LIMITS, "max_streams": 2**31}, "bad_limits")],
)
def test_hello_misfits_name_the_member(member: str, value: Any, code: str) -> None:
    error = violation(FrameType.HELLO, {**HELLO, member: value}, control.Hello)
    assert error.code == code
    assert error.message.startswith("HELLO: ") and f"$.{member}" in error.message


@pytest.mark.parametrize(
    ("overrides", "code"),
    [({"version": "1"}, "unsupported_version"), ({"heartbeat_interval": 0}, "bad_welcome"),
     ({"peers": [None]}, "bad_welcome"), ({"session_id": []}, "bad_field"),
     ({"limits": {}}, "bad_limits")],
)
def test_welcome_misfits(overrides: dict[str, Any], code: str) -> None:
    assert violation(FrameType.WELCOME, {**WELCOME, **overrides}, control.Welcome).code == code


def test_a_missing_member_is_named() -> None:
    error = violation(FrameType.HELLO, {"versions": [1], "peer_id": "n"}, control.Hello)
    assert error.code == "bad_limits" and "`limits`" in error.message


def test_entries_pass_on_as_sent() -> None:
    """MODELS and ROUTES entries need only an id here; their readers check the rest."""
    entry = {"id": "m", "price": {"input": -1}, "anything": [1, 2]}
    models, obj = control.read(frame(FrameType.MODELS, {"models": [entry]}), 4096,
                               control.Models)
    assert models.models == [control.Identified("m")] and obj["models"] == [entry]
    routes, _ = control.read(frame(FrameType.ROUTES, {}), 4096, control.Routes)
    assert routes == control.Routes([], [], False, [])


@pytest.mark.parametrize("full", ["yes", 1, None])
def test_routes_full_is_a_boolean(full: Any) -> None:
    assert violation(FrameType.ROUTES, {"full": full}, control.Routes).code == "bad_routes"


@pytest.mark.parametrize(("obj", "code"), [({"code": "c" * 65}, "bad_field"),
                                           ({"reason": 5}, "bad_field")])
def test_goaway_bounds(obj: dict[str, Any], code: str) -> None:
    assert violation(FrameType.GOAWAY, obj, control.GoAway).code == code


def test_frame_level_errors_come_before_the_schema() -> None:
    with pytest.raises(FrameError) as info:
        control.read(frame(FrameType.GOAWAY, {"reason": "x" * 100}), 50, control.GoAway)
    assert info.value.code == "control_too_large"
    bad = frames.decode(frames.encode(FrameType.PROOF, 0, b"[1]"), 4096)
    with pytest.raises(FrameError) as info:
        control.read(bad, 4096, control.Proof)
    assert info.value.code == "bad_json"


def test_heartbeat_ack_t_must_fit_a_double() -> None:
    ack, _ = control.read(frame(FrameType.HEARTBEAT, {"t": 2**70}, FLAG_ACK), 4096,
                          control.HeartbeatAck)
    assert ack.t == float(2**70)
    message = frames.encode(FrameType.HEARTBEAT, 0, b'{"t":1' + b"0" * 400 + b"}", FLAG_ACK)
    with pytest.raises(ProtocolError) as info:
        control.read(frames.decode(message, 4096), 4096, control.HeartbeatAck)
    assert info.value.code == "bad_field"


@settings(max_examples=200, deadline=None, database=None)
@given(st.dictionaries(st.sampled_from(["code", "reason", "other"]),
                       st.one_of(st.text(max_size=80), st.integers(), st.none(), st.booleans())))
def test_goaway_accepts_exactly_strings_within_bounds(obj: dict[str, Any]) -> None:
    fits = all(isinstance(obj[k], str) and len(obj[k]) <= limit
               for k, limit in (("code", 64), ("reason", 1024)) if k in obj)
    try:
        goaway, _ = control.read(frame(FrameType.GOAWAY, obj), 4096, control.GoAway)
    except ProtocolError as exc:
        assert not fits and exc.code == "bad_field"
    else:
        assert fits
        assert (goaway.code, goaway.reason) == (obj.get("code", "goaway"), obj.get("reason", ""))


def test_payloads_encode_as_the_connection_sends_them() -> None:
    """The structs describe the wire as it is: what Connection sends decodes into them
    and re-encodes to the same members."""
    dialer = Connection(Side.DIALER, Limits())
    sent = frames.decode(dialer.send_hello("n", "relay", "t", {"a": "b"}), 1 << 20)
    hello, obj = control.read(sent, 4096, control.Hello)
    assert msgspec.to_builtins(hello) == obj


def test_the_protocol_package_imports_no_io() -> None:
    code = ("import sys, tooti.protocol.connection, tooti.protocol.control, "
            "tooti.protocol.websocket, tooti.protocol.budget, tooti.protocol.usage;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'trio', 'socket', 'ssl', 'asyncio'} or m.startswith('tooti.') and "
            "m.split('.')[1] not in {'protocol'});"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
