"""What a :class:`~tooti.protocol.connection.Connection` reports for each message it is
fed: one frozen event per kind of frame, and :data:`Event`, their union.

Events hold what the frame layer checked (:mod:`tooti.protocol.control`) and pass on,
as the peer sent them, the objects that their readers check with their own bounds:
model entries and ROUTES entries (:mod:`tooti.protocol.schemas`), heartbeat figures,
HELLO / WELCOME extras, OPEN metadata and END info.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """Acceptor side: the dialer introduced itself."""

    peer_id: str
    role: str
    versions: list[int]
    software: str
    labels: dict[str, str]
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WelcomeReceived:
    """Dialer side: the acceptor accepted the session."""

    version: int
    session_id: str
    heartbeat_interval: float
    peers: list[str]
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ProofReceived:
    """Acceptor side: the dialer's answer to WELCOME's challenge (base64 signature)."""

    signature: str


@dataclass(frozen=True, slots=True)
class ModelsReceived:
    """The peer's full model list (replaces any earlier one)."""

    models: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RoutesReceived:
    """A relay's advertisement of the nodes reachable through it.

    ``nodes`` are added or replaced (each an object with at least a string
    ``id``); ``removed`` are node ids no longer reachable; ``full`` means the
    list is complete and every node not in it is gone; ``loads`` are new load
    figures of nodes already advertised (each an object with a string ``id`` and
    ``stats``), sent instead of their whole entry when nothing else changed.
    """

    nodes: list[dict[str, Any]]
    removed: list[str]
    full: bool
    loads: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """The peer's heartbeat; answer with :meth:`Connection.send_heartbeat_ack`."""

    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class HeartbeatAcked:
    """The peer echoed our heartbeat; ``sent_at`` is the value we sent."""

    sent_at: float


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream (a request for us to serve)."""

    stream_id: int
    meta: dict[str, Any]
    body: bytes
    fin: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Stream bytes: request body (``fin`` ends it) or response body."""

    stream_id: int
    data: bytes
    fin: bool


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The responder's response head for a stream we opened."""

    stream_id: int
    status: int
    headers: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The responder finished a stream we opened (usage or error inside)."""

    stream_id: int
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamCancelled:
    """The opener cancelled a stream we serve."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted more send credit on a stream."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams (draining or closing)."""

    code: str
    reason: str


Event = (
    HelloReceived | WelcomeReceived | ProofReceived | ModelsReceived | RoutesReceived
    | HeartbeatReceived
    | HeartbeatAcked
    | StreamOpened | DataReceived | ResponseStarted | StreamEnded | StreamCancelled
    | WindowUpdated | GoAwayReceived
)
