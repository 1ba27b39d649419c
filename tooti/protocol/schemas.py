"""Typed schemas of what a peer tells us in control frames, with every bound.

A peer is someone else's machine: each number and string it sends is checked
here, where it enters, before anything stores it. The frame layer
(:mod:`tooti.protocol.control`) checks each payload's own members and passes the
objects below on as sent; the gateway and relay convert model entries, heartbeat
figures, ROUTES entries and HELLO extras with the functions below (the shared
string types are also the control payloads'), and a value out of bounds is a
:class:`~tooti.protocol.errors.ProtocolError` (the peer's session closes and
it is refused for a while, :meth:`tooti.mesh.registry.Registry.penalize`).
Members not named here are dropped, never stored. ``docs/protocol.md`` lists
the bounds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, get_args

import msgspec
from msgspec import Meta, Struct

from tooti.protocol.errors import ProtocolError

ModelState = Literal["ready", "loading"]
"""A model entry's ``state``: ``ready`` takes requests; ``loading`` is announced while
its backend starts (requests for it get 503 ``model_loading`` until it is ready)."""
READY: ModelState = "ready"
LOADING: ModelState = "loading"

MAX_MODEL_ID = 256
"""Longest model id, in characters."""
MAX_CONCURRENCY = 10_000
"""Most concurrent requests one model entry may advertise."""
MAX_CONTEXT = 1 << 30
"""Largest context length (tokens) a model entry may advertise."""
MAX_PRICE = 1_000_000.0
"""Highest price per 1M tokens (input or output) a model entry may advertise."""
MAX_TEXT = 128
"""Longest ``owned_by``, ``software`` and the like."""
MAX_META_BYTES = 4096
"""Largest ``meta`` object of a model entry, as JSON."""
MAX_META_DEPTH = 8
"""Deepest nesting inside ``meta``."""
MAX_LABELS = 32
"""Most labels per peer; keys at most 64 characters, values at most 256, neither with
control characters."""
MAX_COUNT = 1 << 53
"""Largest count (in flight, queued, capacity, ...) in a HEARTBEAT."""
MAX_TTFT_MS = 1e9
MAX_HOPS = 4
"""Longest relay chain a node may be advertised through (stops relay loops)."""
MAX_PEER_ID = 128
"""Longest peer (node, relay) id (printable: no control characters)."""

_UNSHOWN = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
"""Characters a peer may not use in anything it names: control characters (C0, DEL,
C1: a new log line, terminal escapes) and the bidirectional controls (U+061C, U+200E,
U+200F, U+202A to U+202E, U+2066 to U+2069), which reorder how the text around them shows: a
model id with U+202E could display in ``/v1/models``, the TUI or a log as another."""
_PRINTABLE = rf"\A[^{_UNSHOWN}]+\Z"
"""Non-empty text without the characters of :data:`_UNSHOWN`."""
_PRINTABLE_OR_EMPTY = rf"\A[^{_UNSHOWN}]*\Z"

Endpoint = Literal[
    "chat/completions", "completions", "embeddings", "rerank", "audio/transcriptions",
    "audio/speech", "images/generations", "responses"]
ALL_ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)
"""Every endpoint a node may announce for a model (the ``/v1/`` path after the prefix)."""
ENDPOINTS: tuple[Endpoint, ...] = ("chat/completions", "completions", "embeddings")
"""The endpoints a model entry serves when it names none (a node older than the
pass-through endpoints, or an empty list): the three every backend has always served."""
PASSTHROUGH_ENDPOINTS: frozenset[str] = frozenset(ALL_ENDPOINTS) - frozenset(ENDPOINTS)
"""Endpoints the gateway passes through as they are, announced explicitly by a node."""
MAX_ENDPOINT_NAMES = 16
"""Most endpoint names one model entry may list (known or not)."""
EndpointName = Annotated[str, Meta(min_length=1, max_length=64, pattern=_PRINTABLE)]
"""An endpoint name as a peer sends it: bounded text; names this gateway does not
know are dropped (a newer node announcing a newer endpoint is not refused)."""
T = TypeVar("T")

ModelId = Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_ID, pattern=_PRINTABLE)]
PeerId = Annotated[str, Meta(min_length=1, max_length=MAX_PEER_ID, pattern=_PRINTABLE)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Labels = Annotated[
    dict[Annotated[str, Meta(max_length=64, pattern=_PRINTABLE_OR_EMPTY)],
         Annotated[str, Meta(max_length=256, pattern=_PRINTABLE_OR_EMPTY)]],
    Meta(max_length=MAX_LABELS),
]
Price = Annotated[float, Meta(ge=0, le=MAX_PRICE)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]


class Prices(Struct, frozen=True):
    """Price per 1M tokens, in the operator's currency unit."""

    input: Price = 0.0
    output: Price = 0.0


class ModelEntry(Struct, frozen=True):
    """One entry of a MODELS frame (and of a ROUTES node's ``models``)."""

    id: ModelId
    endpoints: Annotated[list[EndpointName], Meta(max_length=MAX_ENDPOINT_NAMES)] = (
        msgspec.field(default_factory=lambda: list(ENDPOINTS)))
    """Absent or empty: :data:`ENDPOINTS` (what every node served before the member
    listed more). Names not in :data:`ALL_ENDPOINTS` are dropped, not refused; a list of
    unknown names only serves nothing."""
    context_length: Annotated[int, Meta(ge=0, le=MAX_CONTEXT)] | None = None
    max_concurrency: Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY)] = 8
    price: Prices = Prices()
    warm: bool = True
    owned_by: Text = "tooti"
    meta: dict[str, Any] = msgspec.field(default_factory=dict)
    state: ModelState = READY
    """Absent (a node older than the field) means ready; any value but the two named is
    refused like any other bad entry. A gateway older than the field ignores it."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            msgspec.structs.force_setattr(self, "endpoints", list(ENDPOINTS))
        elif any(name not in _KNOWN for name in self.endpoints):
            msgspec.structs.force_setattr(
                self, "endpoints", [name for name in self.endpoints if name in _KNOWN])
        if self.meta:
            if len(_encoder.encode(self.meta)) > MAX_META_BYTES:
                raise ValueError(f"meta is over {MAX_META_BYTES} bytes")
            if _depth(self.meta) > MAX_META_DEPTH:
                raise ValueError(f"meta is nested deeper than {MAX_META_DEPTH}")


class Stats(Struct, omit_defaults=True):
    """The HEARTBEAT figures a gateway keeps of a peer (others are dropped)."""

    in_flight: Count | None = None
    queued: Count | None = None
    capacity: Count | None = None
    healthy: bool | None = None
    """``false`` takes the node out of routing."""
    ttft_ms: Annotated[float, Meta(ge=0, le=MAX_TTFT_MS)] | None = None
    nodes: Count | None = None
    """A relay: nodes it advertises."""
    forwarded: Count | None = None
    """A relay: streams it forwarded so far."""


class Proof(Struct, frozen=True):
    """A node's handshake proof as passed on by a relay (base64 / text)."""

    challenge: Annotated[str, Meta(max_length=128)]
    session_id: Annotated[str, Meta(max_length=256)]
    signature: Annotated[str, Meta(max_length=128)]


class RouteEntry(Struct, frozen=True):
    """One node of a ROUTES frame."""

    id: PeerId
    public_key: Annotated[str, Meta(max_length=64)]
    proof: Proof
    hops: Annotated[int, Meta(ge=1, le=MAX_HOPS)]
    models: list[ModelEntry] = msgspec.field(default_factory=list)
    stats: Stats = msgspec.field(default_factory=Stats)
    labels: Labels = msgspec.field(default_factory=dict)
    software: Text = ""
    draining: bool = False


class RouteLoad(Struct, frozen=True):
    """One member of a ROUTES frame's ``loads``: new figures of an advertised node."""

    id: PeerId
    stats: Stats = msgspec.field(default_factory=Stats)


class HelloExtra(Struct, frozen=True):
    """What a gateway reads from a HELLO beyond the frame layer's fields."""

    public_key: Annotated[str, Meta(max_length=64)] | None = None
    public_url: Annotated[str, Meta(max_length=2048)] | None = None


_encoder = msgspec.json.Encoder()
_KNOWN = frozenset(ALL_ENDPOINTS)
_USUAL = frozenset(ENDPOINTS)


def _depth(value: object, level: int = 1) -> int:
    """Nesting depth of a decoded JSON value (stops counting past the limit)."""
    if level > MAX_META_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def convert(obj: object, schema: type[T], code: str, what: str) -> T:
    """``obj`` (decoded JSON) as ``schema``; ProtocolError ``code`` naming ``what`` and
    the offending path if it does not fit."""
    try:
        return msgspec.convert(obj, schema)
    except msgspec.ValidationError as exc:
        raise ProtocolError(code, f"{what}: {exc}") from None


def model_entries(models: list[Any], limit: int) -> list[ModelEntry]:
    """A MODELS list (or a ROUTES node's models): at most ``limit`` valid entries."""
    if len(models) > limit:
        raise ProtocolError(
            "bad_models", f"{len(models)} models, over the limit of {limit} per node "
            "(tunnel.max_models_per_peer)")
    return convert(models, list[ModelEntry], "bad_models", "MODELS")


def accepted_endpoints(value: object) -> frozenset[str]:
    """The endpoint names a peer may announce to an acceptor whose WELCOME had
    ``value`` as its ``endpoints`` member: the usual three (:data:`ENDPOINTS`, which
    every acceptor of protocol v1 decodes) plus the names listed that this side knows.
    Absent (an acceptor older than the member, whose decoder refuses any other name as
    ``bad_models``) or not a list: the usual three only. Entries that are not known
    names are skipped, never an error: the member only narrows what is announced."""
    if not isinstance(value, list):
        return _USUAL
    return _USUAL | frozenset(
        name for name in value if isinstance(name, str) and name in _KNOWN)


def announceable(models: list[dict[str, Any]], accepted: frozenset[str]
                 ) -> list[dict[str, Any]]:
    """MODELS (or ROUTES ``models``) entries as wire dicts, cut to what an acceptor
    understands (:func:`accepted_endpoints`): each entry's ``endpoints`` keeps only
    names in ``accepted`` (left out when the usual three remain, as a node older than
    the member sent them); an entry with none left is not announced at all (it would
    read as the usual three). Entries are copied only when changed."""
    if accepted >= _KNOWN:
        return models
    out: list[dict[str, Any]] = []
    for entry in models:
        names = entry.get("endpoints") or ENDPOINTS
        kept = [name for name in names if name in accepted]
        if len(kept) == len(names):
            out.append(entry)
        elif kept:
            cut = {**entry, "endpoints": kept}
            if tuple(kept) == ENDPOINTS:
                del cut["endpoints"]
            out.append(cut)
    return out


def stats(obj: dict[str, Any]) -> dict[str, Any]:
    """The HEARTBEAT figures worth keeping, checked, as a plain dict."""
    return stats_dict(convert(obj, Stats, "bad_field", "HEARTBEAT"))


def stats_dict(value: Stats) -> dict[str, Any]:
    """Checked figures as the plain dict a peer keeps (absent ones left out)."""
    out: dict[str, Any] = msgspec.to_builtins(value)
    return out
