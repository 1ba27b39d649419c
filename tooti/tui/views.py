"""What ``tooti tui`` knows of one peer and one request, as plain dataclasses.

:class:`PeerView` is a peer as the gateway last described it, :class:`RequestView`
a request with its timeline of :class:`Step`s, :class:`Totals` the header figures.
Built by :mod:`tooti.tui.state` and :mod:`tooti.tui.flows` from the admin events;
read by the columns, the details and the header. No I/O, no Textual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tooti.protocol.numbers import is_number

ACTIVE_PHASES = ("received", "routed", "first_token")
"""Request phases before ``finished``."""


@dataclass
class Step:
    """One step of a request's life: received, routed, first_token or finished."""

    kind: str
    ts: float
    node: str | None = None
    detail: str = ""


@dataclass
class RequestView:
    """What is known about one request, from its events."""

    id: str
    received_at: float = 0.0
    model: str = ""
    endpoint: str = ""
    stream: bool | None = None
    key_id: str = ""
    account: str = ""
    """The name of the account the request's API key belongs to (empty: anonymous)."""
    node: str | None = None
    attempts: int = 0
    phase: str = "received"
    """``received``, ``routed``, ``first_token``, ``finished``, or ``lost`` (the
    connection to the gateway was lost before the request finished)."""
    status: str | None = None
    """The gateway's final status (``ok``, ``error``, ``failed``, ``cancelled``, ...)."""
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    estimated: bool = False
    tok_s: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    nodes_tried: list[str] = field(default_factory=list)
    timeline: list[Step] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """True until the request finished (or was lost)."""
        return self.phase in ACTIVE_PHASES

    @property
    def state(self) -> str:
        """A one-word state for display."""
        if self.phase == "finished":
            return self.status or "finished"
        if self.phase == "received":
            return "queued"
        if self.phase == "routed":
            return "retrying" if self.attempts > 1 else "routed"
        if self.phase == "first_token":
            return "streaming"
        return self.phase

    @property
    def finished_at(self) -> float | None:
        """Gateway time the request finished, if it has."""
        for step in reversed(self.timeline):
            if step.kind == "finished":
                return step.ts
        return None


@dataclass
class PeerView:
    """One peer as last described by the gateway (``Peer.describe()``)."""

    id: str
    role: str = "node"
    via: str = "direct"
    """``direct``, or the relay the peer is reached through."""
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    software: str = ""
    models: list[str] = field(default_factory=list)
    in_flight: int = 0
    draining: bool = False
    rtt_ms: float | None = None
    connected_at: float | None = None
    state: str = "live"
    failures: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    left_at: float | None = None
    """Gateway time the peer left (``gone`` peers only)."""
    left_reason: str = ""

    @classmethod
    def from_describe(cls, data: dict[str, Any]) -> PeerView:
        """Build from one ``Peer.describe()`` dict (unknown keys are ignored)."""
        via = data.get("via") or "direct"
        return cls(
            id=str(data.get("id", "?")), role=str(data.get("role") or "node"),
            via=str(via), address=str(data.get("address") or ""),
            labels=dict(data.get("labels") or {}), software=str(data.get("software") or ""),
            models=list(data.get("models") or []), in_flight=int(data.get("in_flight") or 0),
            draining=bool(data.get("draining")), rtt_ms=as_float(data.get("rtt_ms")),
            connected_at=as_float(data.get("connected_at")), state=str(data.get("state") or "live"),
            failures=int(data.get("failures") or 0), stats=dict(data.get("stats") or {}),
            per_model={m: dict(v) for m, v in (data.get("per_model") or {}).items()},
        )

    @property
    def gone(self) -> bool:
        """True once the peer has left."""
        return self.state == "gone"

    @property
    def capacity(self) -> int:
        """Concurrent streams the peer advertises, over all its models."""
        total = sum(int(m.get("capacity") or 0) for m in self.per_model.values())
        if total:
            return total
        return int(self.stats.get("capacity") or 0)

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token the gateway measured (mean over models, by samples);
        the node's own figure when the gateway has measured nothing yet."""
        return self._measured("ttft_ms", "ttft_ms")

    @property
    def tok_s(self) -> float | None:
        """Decode tokens per second the gateway measured (mean over models, by samples)."""
        return self._measured("tokens_per_s", "tokens_per_s")

    def _measured(self, key: str, stats_key: str) -> float | None:
        total = weight = 0.0
        for record in self.per_model.values():
            value = as_float(record.get(key))
            if value is not None:
                samples = max(1, int(record.get("samples") or 0))
                total += value * samples
                weight += samples
        if weight:
            return total / weight
        return as_float(self.stats.get(stats_key))

    @property
    def cooldown_models(self) -> list[str]:
        """Models of this peer the gateway has in cooldown."""
        return [m for m, r in sorted(self.per_model.items()) if r.get("state") == "cooldown"]


@dataclass(frozen=True)
class Totals:
    """Headline figures for the header."""

    live_peers: int
    peers: int
    in_flight: int
    queued: int
    req_rate: float
    tok_rate: float
    req_series: list[float]
    tok_series: list[float]


def as_float(value: Any, default: float | None = None) -> float | None:
    """``value`` as a float if it is a number (not a bool), else ``default``."""
    if not is_number(value):
        return default
    return float(value)


def as_int(value: Any) -> int | None:
    """``value`` as an int if it is a number (not a bool), else None."""
    if not is_number(value):
        return None
    return int(value)
