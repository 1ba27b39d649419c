"""Tunnel v1 connection state machine (sans-I/O).

A :class:`Connection` is fed whole WebSocket messages with
:meth:`Connection.receive_message` and returns the events they carry; its
``send_*`` methods return the bytes to put on the wire. It owns the handshake,
stream lifecycle, stream-id rules, per-stream credit flow control and every
hard limit, and never touches a socket or a clock, so it can be driven by
memory streams in tests and fuzzed.

Roles: the *dialer* (a node or relay connecting out) sends HELLO; the
*acceptor* (a gateway or relay) answers WELCOME. Either side may open
streams; the acceptor uses even stream ids, the dialer odd ones. In practice
the acceptor opens streams (it forwards client requests to the node).

Violations raise :class:`ProtocolError`; the adapter then sends the frame
from :meth:`Connection.send_goaway` and closes the transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec

from tooti.protocol import control, frames
from tooti.protocol.errors import ProtocolError
from tooti.protocol.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HeartbeatAcked,
    HeartbeatReceived,
    HelloReceived,
    ModelsReceived,
    ProofReceived,
    ResponseStarted,
    RoutesReceived,
    StreamCancelled,
    StreamEnded,
    StreamOpened,
    WelcomeReceived,
    WindowUpdated,
)
from tooti.protocol.frames import FLAG_ACK, FLAG_FIN, FrameError, FrameType

__all__ = [
    "SUPPORTED_VERSIONS", "Connection", "DataReceived", "Event", "FlowControlError",
    "GoAwayReceived", "HeartbeatAcked", "HeartbeatReceived", "HelloReceived", "Limits",
    "ModelsReceived", "ProofReceived", "ProtocolError", "ResponseStarted", "RoutesReceived",
    "Side", "State", "StreamCancelled", "StreamEnded", "StreamOpened", "WelcomeReceived",
    "WindowUpdated",
]

SUPPORTED_VERSIONS = (1,)


class FlowControlError(Exception):
    """A local send exceeded the stream's credit or the peer's limits."""


class Side(Enum):
    """Which end of the tunnel this connection is."""

    DIALER = "dialer"
    ACCEPTOR = "acceptor"


class State(Enum):
    """Connection lifecycle."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Limits:
    """What one side accepts from its peer; exchanged in HELLO / WELCOME."""

    max_frame_bytes: int = 1_048_576
    max_streams: int = 256
    initial_window: int = 262_144
    max_control_bytes: int = 65_536

    def to_wire(self) -> dict[str, int]:
        """Return the JSON form carried in HELLO / WELCOME."""
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_streams": self.max_streams,
            "initial_window": self.initial_window,
        }


@dataclass(slots=True)
class _Stream:
    local: bool
    send_credit: int
    recv_window: int
    unacked: int = 0
    request_done: bool = False
    response_started: bool = False


@dataclass
class Connection:
    """The protocol state of one tunnel session (see module docstring).

    One class of ~440 lines on purpose: every frame, sent or received, is judged
    against the same state (handshake phase, negotiated version, both sides'
    limits, the stream table with each stream's credit and window, the stream-id
    counters, GOAWAY). Sending and receiving halves would share that table and
    re-check each other's invariants (ids only grow, credit never goes negative,
    no more than ``max_streams``); kept together they hold in one place, and the
    machine is tested and fuzzed as the one unit it is. Its parts without state
    live elsewhere: frame codec (:mod:`~tooti.protocol.frames`), payload schemas
    (:mod:`~tooti.protocol.control`), events (:mod:`~tooti.protocol.events`).
    """

    side: Side
    limits: Limits = field(default_factory=Limits)
    state: State = State.HANDSHAKE
    peer_limits: Limits = field(default_factory=Limits)
    version: int = 0
    goaway_received: bool = False
    goaway_sent: bool = False
    _streams: dict[int, _Stream] = field(default_factory=dict)
    _next_local_id: int = 0
    _highest_peer_id: int = 0
    _hello_sent: bool = False
    _hello_received: bool = False
    _local_open: int = 0
    accepts_routes: bool = False
    """Acceptor: the peer is a relay, so ROUTES frames are allowed from it (from any
    other peer they are ``unexpected_frame``)."""
    awaiting_proof: bool = False
    """Acceptor: WELCOME carried a challenge; nothing but PROOF is accepted until
    :meth:`proof_verified` is called."""

    def __post_init__(self) -> None:
        self._next_local_id = 1 if self.side is Side.DIALER else 2

    # ------------------------------------------------------------ queries

    @property
    def active_streams(self) -> int:
        """Number of streams not yet ended or cancelled."""
        return len(self._streams)

    def has_stream(self, stream_id: int) -> bool:
        """True while ``stream_id`` is open."""
        return stream_id in self._streams

    def send_credit(self, stream_id: int) -> int:
        """Bytes of DATA we may still send on ``stream_id`` (0 if closed)."""
        stream = self._streams.get(stream_id)
        return stream.send_credit if stream else 0

    def max_data_payload(self) -> int:
        """Largest DATA payload the peer accepts in one frame."""
        return self.peer_limits.max_frame_bytes - frames.HEADER_SIZE

    def can_open_stream(self) -> bool:
        """True if a new stream may be opened now."""
        return (
            self.state is State.OPEN
            and not self.goaway_received
            and not self.goaway_sent
            and self._local_count() < self.peer_limits.max_streams
        )

    def _local_count(self) -> int:
        return self._local_open

    def _drop(self, stream_id: int) -> None:
        """Forget a stream (counting the ones we opened without a scan)."""
        if self._streams.pop(stream_id).local:
            self._local_open -= 1

    # ------------------------------------------------------------ sending

    def send_hello(
        self, peer_id: str, role: str, software: str, labels: dict[str, str],
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        """Dialer: the first frame of a session."""
        if self.side is not Side.DIALER or self._hello_sent:
            raise RuntimeError("HELLO is sent once, by the dialer")
        self._hello_sent = True
        obj: dict[str, Any] = dict(extra or {})
        obj.update(
            versions=list(SUPPORTED_VERSIONS), peer_id=peer_id, role=role,
            software=software, labels=labels, limits=self.limits.to_wire(),
        )
        return frames.encode_json(FrameType.HELLO, 0, obj)

    def send_welcome(
        self, version: int, session_id: str, heartbeat_interval: float,
        peers: list[str] | None = None, extra: dict[str, Any] | None = None,
        require_proof: bool = False,
    ) -> bytes:
        """Acceptor: accept the session after HELLO; the connection opens.

        With ``require_proof`` (a ``challenge`` in ``extra``), the dialer's next
        frame must be PROOF; the adapter verifies it and calls
        :meth:`proof_verified` before anything else is accepted.
        """
        self.awaiting_proof = require_proof
        if self.side is not Side.ACCEPTOR or self.state is not State.HANDSHAKE:
            raise RuntimeError("WELCOME is sent once, by the acceptor, after HELLO")
        if not self._hello_received:
            raise RuntimeError("WELCOME before HELLO was received")
        self.version = version
        self.state = State.OPEN
        obj: dict[str, Any] = dict(extra or {})
        obj.update(
            version=version, session_id=session_id, heartbeat_interval=heartbeat_interval,
            limits=self.limits.to_wire(), peers=list(peers or []),
        )
        return frames.encode_json(FrameType.WELCOME, 0, obj)

    def send_proof(self, signature: str) -> bytes:
        """Dialer: answer WELCOME's challenge (base64 signature)."""
        self._require_open()
        return frames.encode_json(FrameType.PROOF, 0, {"signature": signature})

    def proof_verified(self) -> None:
        """Acceptor: the PROOF checked out; the session is fully open."""
        self.awaiting_proof = False

    def send_models(self, models: list[dict[str, Any]]) -> bytes:
        """Announce the full model list."""
        self._require_open()
        return frames.encode_json(FrameType.MODELS, 0, {"models": models})

    def send_routes(self, nodes: Sequence[dict[str, Any] | msgspec.Raw], removed: list[str],
                    full: bool = False,
                    loads: Sequence[dict[str, Any] | msgspec.Raw] = ()) -> bytes:
        """Relay: advertise the nodes reachable through us (see :class:`RoutesReceived`);
        an entry may come already encoded, as ``msgspec.Raw`` JSON."""
        self._require_open()
        payload: dict[str, Any] = {"nodes": nodes, "removed": removed, "full": full}
        if loads:
            payload["loads"] = loads
        return frames.encode_json(FrameType.ROUTES, 0, payload)

    def send_heartbeat(self, stats: dict[str, Any]) -> bytes:
        """Send load figures; include ``t`` (sender's clock) to measure RTT."""
        self._require_open()
        return frames.encode_json(FrameType.HEARTBEAT, 0, stats)

    def send_heartbeat_ack(self, sent_at: float) -> bytes:
        """Echo a received heartbeat's ``t`` back to its sender."""
        self._require_open()
        return frames.encode_json(FrameType.HEARTBEAT, 0, {"t": sent_at}, FLAG_ACK)

    def open_stream(self, meta: dict[str, Any], body: bytes, fin: bool = True
                    ) -> tuple[int, bytes, bytes]:
        """Open a stream; returns (stream id, OPEN frame, body bytes not yet sent).

        As much of ``body`` as credit and frame size allow rides in the OPEN
        frame; the rest must follow with :meth:`send_data` (``fin=True`` on the
        last piece) as credit arrives. With ``fin=False`` the body is not
        complete yet (a relay forwarding it as it arrives): more DATA follows,
        the last with ``fin=True``.
        """
        if not self.can_open_stream():
            raise FlowControlError("cannot open a stream now (limit, GOAWAY or closed)")
        sid = self._next_local_id
        if sid > frames.MAX_STREAM_ID:
            raise FlowControlError("stream ids exhausted")
        meta_len = len(frames.encode_json(FrameType.OPEN, sid, meta)) - frames.HEADER_SIZE
        room = self.peer_limits.max_frame_bytes - frames.HEADER_SIZE - 4 - meta_len
        if room < 0:
            raise FlowControlError("OPEN metadata exceeds the peer's frame size")
        self._next_local_id += 2
        stream = _Stream(
            local=True, send_credit=self.peer_limits.initial_window,
            recv_window=self.limits.initial_window,
        )
        self._streams[sid] = stream
        self._local_open += 1
        room = min(room, stream.send_credit)
        first, rest = body[:room], body[room:]
        stream.send_credit -= len(first)
        fin = fin and not rest
        stream.request_done = fin
        return sid, frames.encode_open(sid, meta, first, fin), rest

    def send_response(self, stream_id: int, status: int, headers: dict[str, Any]) -> bytes:
        """Responder: the response head (after it, failover is impossible)."""
        stream = self._peer_stream(stream_id)
        if stream.response_started:
            raise RuntimeError("RESPONSE sent twice")
        stream.response_started = True
        return frames.encode_json(
            FrameType.RESPONSE, stream_id, {"status": status, "headers": headers}
        )

    def send_data(self, stream_id: int, data: bytes, fin: bool = False) -> bytes:
        """DATA on an open stream; ``len(data)`` must fit the send credit."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise FlowControlError(f"stream {stream_id} is not open")
        if len(data) > stream.send_credit:
            raise FlowControlError("DATA exceeds send credit")
        if len(data) > self.max_data_payload():
            raise FlowControlError("DATA exceeds the peer's frame size")
        stream.send_credit -= len(data)
        if fin and stream.local:
            stream.request_done = True
        return frames.encode(FrameType.DATA, stream_id, data, FLAG_FIN if fin else 0)

    def send_end(self, stream_id: int, info: dict[str, Any]) -> bytes:
        """Responder: finish a stream (usage, finish reason or error); it closes."""
        self._peer_stream(stream_id)
        self._drop(stream_id)
        return frames.encode_json(FrameType.END, stream_id, info)

    def send_cancel(self, stream_id: int, reason: str) -> bytes:
        """Opener: abandon a stream; it closes at once. b'' if already closed."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local:
            return b""
        self._drop(stream_id)
        return frames.encode_json(FrameType.CANCEL, stream_id, {"reason": reason})

    def consumed(self, stream_id: int, nbytes: int) -> bytes:
        """Report that the application consumed ``nbytes`` received on a stream.

        Returns a WINDOW frame once half the initial window is consumed (so
        credit is granted in large steps), else b''.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return b""
        stream.unacked += nbytes
        if stream.unacked < self.limits.initial_window // 2:
            return b""
        increment, stream.unacked = stream.unacked, 0
        stream.recv_window += increment
        return frames.encode_window(stream_id, increment)

    def send_goaway(self, code: str, reason: str) -> bytes:
        """Tell the peer no new streams will be accepted (drain or error)."""
        self.goaway_sent = True
        return frames.encode_json(FrameType.GOAWAY, 0, {"code": code, "reason": reason})

    def close(self) -> None:
        """Mark the connection closed; every stream is gone."""
        self.state = State.CLOSED
        self._streams.clear()
        self._local_open = 0

    # ------------------------------------------------------------ receiving

    def receive_message(self, message: bytes) -> Event | None:
        """Feed one WebSocket message; return its event (None if ignorable)."""
        if self.state is State.CLOSED:
            raise ProtocolError("closed", "message after close")
        try:
            frame = frames.decode(message, self.limits.max_frame_bytes)
            return self._dispatch(frame)
        except FrameError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    def _dispatch(self, frame: frames.Frame) -> Event | None:
        ftype = frame.type
        if self.state is State.HANDSHAKE:
            return self._handshake(frame)
        if self.awaiting_proof and ftype not in (FrameType.PROOF, FrameType.GOAWAY):
            raise ProtocolError("proof_required", f"{ftype.name} before PROOF")
        if ftype is FrameType.DATA:
            return self._on_data(frame)
        if ftype is FrameType.WINDOW:
            return self._on_window(frame)
        if ftype is FrameType.OPEN:
            return self._on_open(frame)
        if ftype in (FrameType.HELLO, FrameType.WELCOME):
            raise ProtocolError("unexpected_frame", f"{ftype.name} after handshake")
        obj = frames.decode_json(frame, self.limits.max_control_bytes)
        if ftype is FrameType.HEARTBEAT:
            if frame.flags & FLAG_ACK:
                return HeartbeatAcked(control.convert(obj, control.HeartbeatAck, ftype).t)
            return HeartbeatReceived(obj)
        if ftype is FrameType.PROOF:
            if not self.awaiting_proof:
                raise ProtocolError("unexpected_frame", "PROOF that was not asked for")
            return ProofReceived(control.convert(obj, control.Proof, ftype).signature)
        if ftype is FrameType.MODELS:
            control.convert(obj, control.Models, ftype)
            return ModelsReceived(obj["models"])
        if ftype is FrameType.ROUTES:
            if not self.accepts_routes:
                raise ProtocolError("unexpected_frame", "ROUTES from a peer that is not a relay")
            routes = control.convert(obj, control.Routes, ftype)
            return RoutesReceived(obj.get("nodes", []), routes.removed, routes.full,
                                  obj.get("loads", []))
        if ftype is FrameType.GOAWAY:
            return self._on_goaway(obj)
        if ftype is FrameType.RESPONSE:
            stream = self._local_stream(frame.stream_id)
            if stream is None:
                return None
            if stream.response_started:
                raise ProtocolError("unexpected_frame", "second RESPONSE on a stream")
            response = control.convert(obj, control.Response, ftype)
            stream.response_started = True
            return ResponseStarted(frame.stream_id, response.status, response.headers or {})
        if ftype is FrameType.END:
            if self._local_stream(frame.stream_id) is None:
                return None
            self._drop(frame.stream_id)
            return StreamEnded(frame.stream_id, obj)
        # CANCEL
        if self._peer_stream_or_none(frame.stream_id) is None:
            return None
        reason = control.convert(obj, control.Cancel, ftype).reason
        self._drop(frame.stream_id)
        return StreamCancelled(frame.stream_id, reason)

    def _on_goaway(self, obj: dict[str, Any]) -> GoAwayReceived:
        self.goaway_received = True
        goaway = control.convert(obj, control.GoAway, FrameType.GOAWAY)
        return GoAwayReceived(goaway.code, goaway.reason)

    def _handshake(self, frame: frames.Frame) -> Event:
        if frame.type is FrameType.GOAWAY:
            return self._on_goaway(frames.decode_json(frame, self.limits.max_control_bytes))
        limit = self.limits.max_control_bytes
        if self.side is Side.ACCEPTOR:
            if frame.type is not FrameType.HELLO or self._hello_received:
                raise ProtocolError("unexpected_frame", f"expected HELLO, got {frame.type.name}")
            hello, obj = control.read(frame, limit, control.Hello)
            self.peer_limits = _limits(hello.limits)
            self._hello_received = True
            return HelloReceived(hello.peer_id, hello.role, hello.versions, hello.software,
                                 hello.labels or {}, control.extras(obj, control.Hello))
        if frame.type is not FrameType.WELCOME:
            raise ProtocolError("unexpected_frame", f"expected WELCOME, got {frame.type.name}")
        welcome, obj = control.read(frame, limit, control.Welcome)
        if welcome.version not in SUPPORTED_VERSIONS:
            raise ProtocolError("unsupported_version", f"acceptor chose {welcome.version!r}")
        self.peer_limits = _limits(welcome.limits)
        self.version = welcome.version
        self.state = State.OPEN
        return WelcomeReceived(self.version, welcome.session_id, welcome.heartbeat_interval,
                               welcome.peers or [], control.extras(obj, control.Welcome))

    def choose_version(self, offered: list[int]) -> int:
        """Acceptor: the highest version both sides speak, or ProtocolError."""
        common = set(offered) & set(SUPPORTED_VERSIONS)
        if not common:
            raise ProtocolError(
                "unsupported_version", f"offered {offered}, speak {SUPPORTED_VERSIONS}"
            )
        return max(common)

    def _on_open(self, frame: frames.Frame) -> Event | None:
        sid = frame.stream_id
        peer_parity = 1 if self.side is Side.ACCEPTOR else 0
        if sid % 2 != peer_parity:
            raise ProtocolError("bad_stream_id", f"peer may not open stream {sid}")
        if sid <= self._highest_peer_id:
            raise ProtocolError("bad_stream_id", f"stream {sid} reused")
        # After our GOAWAY the stream is still accepted here (the peer may not have
        # seen it yet); the adapter answers it at once with a retryable END.
        peer_opened = len(self._streams) - self._local_count()
        if peer_opened >= self.limits.max_streams:
            raise ProtocolError("too_many_streams", f"more than {self.limits.max_streams} streams")
        meta, body = frames.decode_open(frame, self.limits.max_control_bytes)
        if len(body) > self.limits.initial_window:
            raise ProtocolError("flow_control", "OPEN body exceeds the initial window")
        self._highest_peer_id = sid
        fin = bool(frame.flags & FLAG_FIN)
        self._streams[sid] = _Stream(
            local=False, send_credit=self.peer_limits.initial_window,
            recv_window=self.limits.initial_window - len(body), request_done=fin,
        )
        return StreamOpened(sid, meta, body, fin)

    def _on_data(self, frame: frames.Frame) -> Event | None:
        sid = frame.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            self._check_was_open(sid)
            return None
        fin = bool(frame.flags & FLAG_FIN)
        if stream.local:
            if not stream.response_started:
                raise ProtocolError("unexpected_frame", "DATA before RESPONSE")
            if fin:
                raise ProtocolError("unknown_flags", "FIN on response DATA")
        else:
            if stream.request_done:
                raise ProtocolError("unexpected_frame", "request DATA after FIN")
            stream.request_done = fin
        if not frame.payload and not fin:
            raise ProtocolError("empty_data", "empty DATA frame without FIN")
        if len(frame.payload) > stream.recv_window:
            raise ProtocolError("flow_control", f"DATA beyond the window on stream {sid}")
        stream.recv_window -= len(frame.payload)
        return DataReceived(sid, frame.payload, fin)

    def _on_window(self, frame: frames.Frame) -> Event | None:
        increment = frames.decode_window(frame)
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._check_was_open(frame.stream_id)
            return None
        if stream.send_credit + increment >= 2**31:
            raise ProtocolError("flow_control", "window overflow")
        stream.send_credit += increment
        return WindowUpdated(frame.stream_id, increment)

    # ------------------------------------------------------------ helpers

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise RuntimeError(f"connection is {self.state.value}")

    def _peer_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.local:
            raise FlowControlError(f"stream {stream_id} is not an open peer stream")
        return stream

    def _peer_stream_or_none(self, stream_id: int) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_was_open(stream_id)
            return None
        if stream.local:
            raise ProtocolError("unexpected_frame", "CANCEL on a stream we opened")
        return stream

    def _local_stream(self, stream_id: int) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_was_open(stream_id)
            return None
        if not stream.local:
            raise ProtocolError("unexpected_frame", "response frame on a stream the peer opened")
        return stream

    def _check_was_open(self, sid: int) -> None:
        """Frames on closed streams are ignored; on never-opened ones, an error."""
        local_parity = 0 if self.side is Side.ACCEPTOR else 1
        if sid % 2 == local_parity:
            if sid >= self._next_local_id:
                raise ProtocolError("bad_stream_id", f"stream {sid} was never opened")
        elif sid > self._highest_peer_id:
            raise ProtocolError("bad_stream_id", f"stream {sid} was never opened")


def _limits(wire: control.WireLimits) -> Limits:
    return Limits(wire.max_frame_bytes, wire.max_streams, wire.initial_window)
