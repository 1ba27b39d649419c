"""Typed payloads of the tunnel's control frames, and where they are decoded.

Each JSON control frame has one :class:`Payload` struct here, chosen by the frame's
type byte (:meth:`tooti.protocol.connection.Connection.receive_message`); DATA and
WINDOW carry no JSON and never come here. :func:`read` decodes a frame's payload
(size checked first, then the JSON object) and converts it to its struct, whose
``Meta`` constraints hold every range and length the frame layer enforces. A value
that does not fit is a :class:`~tooti.protocol.errors.ProtocolError` whose code is
the struct's :attr:`Payload.violation` (or the one :attr:`Payload.member_violations`
gives the offending member) and whose message names the frame and the member's path.

Members a struct does not name are not lost: :func:`read` also returns the object as
the peer sent it, and the events pass on what their readers check with their own
bounds (HELLO / WELCOME extras, model and ROUTES entries, heartbeat figures; see
:mod:`tooti.protocol.schemas`). Three payloads are free objects at this layer and
have no struct: a HEARTBEAT without ACK (its figures are checked by the gateway that
keeps them, :class:`~tooti.protocol.schemas.Stats`; a non-number ``t`` is simply not
echoed), OPEN metadata and END info. The last two belong to one stream, not to the
session: a relay forwards them as they are, a node answers bad metadata with an END
error (``bad_open``) and a gateway reads END with :class:`~tooti.protocol.usage.EndReport`,
where a misfit is a usage violation, not a protocol error that would end every stream
of the session.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec
from msgspec import Meta, Struct

from tooti.protocol import frames
from tooti.protocol.errors import ProtocolError
from tooti.protocol.schemas import Labels, PeerId, Text

MAX_WIRE_LIMIT = 2**31 - 1
"""Largest value of any exchanged limit (they are u31 like stream credit)."""

P = TypeVar("P", bound="Payload")


class Payload(Struct, frozen=True):
    """A control frame's payload as the frame layer checks it."""

    violation: ClassVar[str] = "bad_field"
    """The ProtocolError code of a payload that does not fit."""
    member_violations: ClassVar[Mapping[str, str]] = {}
    """Top-level members whose misfit has a code of its own."""


class WireLimits(Struct, frozen=True):
    """The ``limits`` object of HELLO / WELCOME: what the sender accepts (§ 8)."""

    max_frame_bytes: Annotated[int, Meta(ge=4096, le=MAX_WIRE_LIMIT)]
    max_streams: Annotated[int, Meta(ge=1, le=MAX_WIRE_LIMIT)]
    initial_window: Annotated[int, Meta(ge=1024, le=MAX_WIRE_LIMIT)]


class Hello(Payload, frozen=True):
    """HELLO: the dialer introduces itself. Other members are extras."""

    violation = "bad_hello"
    member_violations = {"role": "bad_field", "software": "bad_field", "limits": "bad_limits"}

    versions: list[int]
    peer_id: PeerId
    limits: WireLimits
    role: Text = "node"
    software: Text = ""
    labels: Labels | None = None


class Welcome(Payload, frozen=True):
    """WELCOME: the acceptor accepts the session. Other members are extras: among
    them ``endpoints``, the endpoint names the acceptor decodes in model entries, read
    leniently by :func:`tooti.protocol.schemas.accepted_endpoints` (a member this struct
    named would refuse the session on a value it did not expect; every decoder of this
    struct, old ones too, ignores members it does not name)."""

    violation = "bad_welcome"
    member_violations = {"version": "unsupported_version", "session_id": "bad_field",
                   "limits": "bad_limits"}

    version: int
    heartbeat_interval: Annotated[float, Meta(gt=0)]
    """Seconds; finite, since JSON has no infinity and a huge integer does not fit."""
    limits: WireLimits
    session_id: str = ""
    peers: list[str] | None = None


class Proof(Payload, frozen=True):
    """PROOF: the dialer's signature over WELCOME's challenge (base64)."""

    signature: str = ""


class Identified(Struct, frozen=True):
    """An entry of MODELS or ROUTES as the frame layer sees it: an object with an id
    (the entry itself is checked by its reader, :mod:`tooti.protocol.schemas`)."""

    id: str


class Models(Payload, frozen=True):
    """MODELS: the sender's complete model list."""

    violation = "bad_models"

    models: list[Identified]


class Routes(Payload, frozen=True):
    """ROUTES: a relay's advertisement (:class:`~tooti.protocol.events.RoutesReceived`)."""

    violation = "bad_routes"

    nodes: list[Identified] = []
    removed: list[str] = []
    full: bool = False
    loads: list[Identified] = []


class HeartbeatAck(Payload, frozen=True):
    """HEARTBEAT with ACK: the echo of the ``t`` we sent."""

    t: float


class Response(Payload, frozen=True):
    """RESPONSE: the response head of a stream."""

    violation = "bad_response"

    status: Annotated[int, Meta(ge=100, le=599)]
    headers: dict[str, Any] | None = None


class Cancel(Payload, frozen=True):
    """CANCEL: the opener abandons a stream."""

    reason: str = ""


class GoAway(Payload, frozen=True):
    """GOAWAY: no new streams; ``code`` says why (a ProtocolError code, ``draining``…)."""

    code: Annotated[str, Meta(max_length=64)] = "goaway"
    reason: Annotated[str, Meta(max_length=1024)] = ""


_AT = re.compile(r" - at `\$\.(\w+)")
"""The top-level member in a ValidationError's path (``- at `$.limits.max_streams```)."""
_MISSING = re.compile(r"missing required field `(\w+)`")
"""A missing top-level member (its error has no path)."""


def read(frame: frames.Frame, max_bytes: int, payload: type[P]) -> tuple[P, dict[str, Any]]:
    """``frame``'s JSON payload as ``payload``, with the object as sent.

    FrameError for an oversized or malformed payload (``control_too_large``,
    ``bad_json``); ProtocolError for one that does not fit (see :func:`convert`).
    """
    obj = frames.decode_json(frame, max_bytes)
    return convert(obj, payload, frame.type), obj


def convert(obj: dict[str, Any], payload: type[P], ftype: frames.FrameType) -> P:
    """A decoded payload ``obj`` of a ``ftype`` frame as ``payload``; ProtocolError with
    the payload's code (or its member's) naming the frame and the member's path."""
    try:
        return msgspec.convert(obj, payload)
    except msgspec.ValidationError as exc:
        message = str(exc)
        member = _AT.search(message) or _MISSING.search(message)
        name = member.group(1) if member else ""
        code = payload.member_violations.get(name, payload.violation)
        raise ProtocolError(code, f"{ftype.name}: {message}") from None


def extras(obj: dict[str, Any], payload: type[Payload]) -> dict[str, Any]:
    """The members of ``obj`` that ``payload`` does not name."""
    named = payload.__struct_encode_fields__
    return {k: v for k, v in obj.items() if k not in named}
