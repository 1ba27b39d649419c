"""What the peers and requests tables show: columns, cell text, sort keys, filters.

Pure functions of the :mod:`tooti.tui.views` dataclasses (no Textual), so the tables' content
is testable on its own and every cell is deterministic for a given ``now``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tooti.tui.views import PeerView, RequestView

T = TypeVar("T")

STATE_STYLES = {
    "live": "green", "ok": "green", "streaming": "cyan", "routed": "cyan",
    "queued": "yellow", "retrying": "yellow", "draining": "yellow",
    "cooldown": "dark_orange", "unhealthy": "dark_orange", "disabled": "magenta",
    "lost": "dim",
    "gone": "dim red", "cancelled": "dim", "error": "red", "failed": "red",
    "failed_midstream": "red", "rejected": "magenta",
}
"""Rich style of each state word."""


@dataclass(frozen=True)
class Column(Generic[T]):
    """One table column: its key, header label, cell text and sort key."""

    key: str
    label: str
    text: Callable[[T, float], str]
    """Cell text for an item at local time ``now`` (gateway time for ages)."""
    sort: Callable[[T], Any]
    """Sort key; ``None`` (shown as ``-``) sorts last either way."""
    numeric: bool = False
    """Right-aligned."""
    style: Callable[[T], str] | None = None
    """Rich style for the cell, if any."""


def ms(value: float | None) -> str:
    """Milliseconds, compactly: ``85 ms``, ``1.2 s``; ``-`` when unknown."""
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.0f} s"
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def rate(value: float | None) -> str:
    """A per-second figure: ``42.0``; ``-`` when unknown."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def age(seconds: float) -> str:
    """A duration: ``4s``, ``3m``, ``2h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    return f"{seconds // 3600:.0f}h"


def short_id(request_id: str) -> str:
    """A request id shortened for the table (``req_`` dropped, 12 characters kept)."""
    return request_id.removeprefix("req_")[:12]


def peer_state(peer: PeerView, now: float) -> str:
    """The peer's state word, with how long ago it left or which models cool down."""
    if peer.gone:
        return "gone" if peer.left_at is None else f"gone {age(now - peer.left_at)}"
    cooling = peer.cooldown_models
    if peer.state == "live" and cooling:
        return f"live ({len(cooling)} cooldown)"
    return peer.state


def peer_style(peer: PeerView) -> str:
    """Style of a peer's state cell (partial cooldown shows as cooldown)."""
    if peer.state == "live" and peer.cooldown_models:
        return STATE_STYLES["cooldown"]
    return STATE_STYLES.get(peer.state, "")


def tokens(request: RequestView) -> str:
    """``prompt→completion`` tokens (``~`` when estimated), ``-`` before the end."""
    if request.prompt_tokens is None and request.completion_tokens is None:
        return "-"
    mark = "~" if request.estimated else ""
    return f"{mark}{request.prompt_tokens or 0}→{request.completion_tokens or 0}"


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters (with an ellipsis when cut)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def key_label(key_id: str) -> str:
    """The caller's key id, short: ``anon`` or the first hex digits of its hash."""
    if not key_id:
        return "-"
    if key_id == "anonymous":
        return "anon"
    return key_id.removeprefix("key-")[:8]


def request_tok_s(request: RequestView) -> float | None:
    """Decode speed of a streamed request. A non-streamed answer arrives whole, so
    the gateway sees no decode phase and its figure would be meaningless."""
    return None if request.stream is False else request.tok_s


PEER_COLUMNS: list[Column[PeerView]] = [
    Column("id", "id", lambda p, now: p.id, lambda p: p.id),
    Column("role", "role", lambda p, now: p.role, lambda p: p.role),
    Column("via", "via", lambda p, now: p.via, lambda p: p.via),
    Column("address", "address", lambda p, now: p.address, lambda p: p.address),
    Column("models", "models", lambda p, now: ", ".join(p.models) or "-",
           lambda p: ",".join(p.models)),
    Column("load", "in-flight", lambda p, now: f"{p.in_flight}/{p.capacity}",
           lambda p: (p.in_flight / max(1, p.capacity), p.in_flight), numeric=True),
    Column("ttft", "TTFT", lambda p, now: ms(p.ttft_ms), lambda p: p.ttft_ms,
           numeric=True),
    Column("tok_s", "tok/s", lambda p, now: rate(p.tok_s), lambda p: p.tok_s,
           numeric=True),
    Column("rtt", "RTT", lambda p, now: ms(p.rtt_ms), lambda p: p.rtt_ms,
           numeric=True),
    Column("state", "state", peer_state, lambda p: (p.gone, p.state), style=peer_style),
]
"""The peers table, left to right."""

REQUEST_COLUMNS: list[Column[RequestView]] = [
    Column("id", "request", lambda r, now: short_id(r.id), lambda r: r.id),
    Column("age", "age", lambda r, now: age(now - r.received_at), lambda r: -r.received_at,
           numeric=True),
    Column("key", "key", lambda r, now: key_label(r.key_id), lambda r: r.key_id),
    Column("account", "account", lambda r, now: clip(r.account, 16) or "-",
           lambda r: r.account),
    Column("model", "model", lambda r, now: r.model or "-", lambda r: r.model),
    Column("node", "node", lambda r, now: r.node or "-", lambda r: r.node),
    Column("attempts", "tries", lambda r, now: str(r.attempts), lambda r: r.attempts,
           numeric=True),
    Column("state", "state", lambda r, now: r.state, lambda r: r.state,
           style=lambda r: STATE_STYLES.get(r.state, "")),
    Column("ttft", "TTFT", lambda r, now: ms(r.ttft_ms), lambda r: r.ttft_ms,
           numeric=True),
    Column("tokens", "tokens", lambda r, now: tokens(r),
           lambda r: r.completion_tokens, numeric=True),
    Column("tok_s", "tok/s", lambda r, now: rate(request_tok_s(r)),
           lambda r: request_tok_s(r), numeric=True),
    Column("error", "error", lambda r, now: clip(r.error or "", 60), lambda r: r.error,
           style=lambda r: "red"),
]
"""The requests table, left to right."""


def peer_matches(peer: PeerView, needle: str) -> bool:
    """True if ``needle`` (lower case) is in the peer's id, role, via, address,
    models, state or labels."""
    haystack = " ".join([peer.id, peer.role, peer.via, peer.address, peer.state,
                         *peer.models, *(f"{k}={v}" for k, v in peer.labels.items())])
    return needle in haystack.lower()


def request_matches(request: RequestView, needle: str) -> bool:
    """True if ``needle`` (lower case) is in the request's id, key, account, model,
    node, state or error."""
    haystack = " ".join([request.id, request.key_id, request.account, request.model,
                         request.node or "",
                         request.state, request.error or ""])
    return needle in haystack.lower()
