"""The routing policy contract: what a policy sees of a request, of a node and of the
set of candidate nodes, and what it returns.

A policy sees one request and the live candidate nodes for its model (the
router has already removed nodes that failed this request) and returns them
best first. It must be fast and synchronous: it runs on every request, at up
to thousands of nodes, so no I/O and nothing that waits.

A node is whatever has the read-only members of :class:`Node`; the gateway's peers
have them. The router passes the candidates as a :class:`CandidateSet`: an ordinary
read-only sequence, which is all a policy may rely on (tests and other callers pass
plain lists), that also answers indexed queries (``least_loaded``, ``min_by``,
``at_most``, ``by_id``, ...) without a pass over every node. The built-in policies
use them when they get such a set (``isinstance(candidates, CandidateSet)``).

This module is the whole contract: it imports nothing from the roles (gateway, relay,
node, the mesh they share), which implement it.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar, get_args

import msgspec

KeyName = Literal["least_loaded", "load", "price", "latency", "throughput", "fastest",
                  "ttft", "price_in", "price_out"]
"""Keys a :class:`CandidateSet` keeps for every node with a free slot (lower is better),
by name:

- ``least_loaded``: (in-flight ÷ capacity, measured TTFT or 0)
- ``load``: (in-flight ÷ capacity,)
- ``price``: (input + output price per 1M tokens, load)
- ``latency``: (measured TTFT or 0, load)
- ``throughput``: (-measured tok/s, or -1e12 when unmeasured, load)
- ``fastest``: (measured TTFT or -1, -measured tok/s or 0, load)
- ``ttft``: (measured TTFT or 0,)
- ``price_in`` / ``price_out``: (that price per 1M tokens,)
"""
KEY_NAMES: tuple[KeyName, ...] = get_args(KeyName)


class ModelOffer(Protocol):
    """What a node advertised for one model (its MODELS entry)."""

    @property
    def price_input(self) -> float:
        """Price per 1M prompt tokens, in the operator's currency unit."""
        ...

    @property
    def price_output(self) -> float:
        """Price per 1M completion tokens."""
        ...

    @property
    def max_concurrency(self) -> int:
        """Streams of this model the node says it takes at once."""
        ...

    @property
    def context_length(self) -> int | None:
        """The model's context window in tokens, when the node says."""
        ...


class Measured(Protocol):
    """What this gateway measured of one model on one node (never the node's own
    report): moving averages over the requests it forwarded, and its cooldown."""

    @property
    def ttft_ms(self) -> float | None:
        """Time from OPEN to the first token, milliseconds (EWMA); None = unmeasured."""
        ...

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens per second after the first (EWMA); None = unmeasured."""
        ...

    @property
    def in_cooldown(self) -> bool:
        """True while the model is cooling down on this node after failures."""
        ...


class Node(Protocol):
    """One node as a routing policy sees it (read-only)."""

    @property
    def id(self) -> str:
        """The node's id (derived from its key, or a chosen name bound to it)."""
        ...

    @property
    def group(self) -> str:
        """The node group its join token admitted it to (``""`` = ungrouped)."""
        ...

    @property
    def labels(self) -> Mapping[str, str]:
        """Labels from its HELLO (``node.labels``, e.g. ``{"region": "eu"}``)."""
        ...

    @property
    def models(self) -> Mapping[str, ModelOffer]:
        """Model id → what it advertised for that model."""
        ...

    @property
    def health(self) -> Mapping[str, Measured]:
        """Model id → what this gateway measured (absent until first measured)."""
        ...

    @property
    def in_flight(self) -> Mapping[str, int]:
        """Model id → streams this gateway has open on the node."""
        ...

    @property
    def stats(self) -> Mapping[str, Any]:
        """The node's last HEARTBEAT payload (its own figures, e.g. ``ttft_ms``)."""
        ...

    @property
    def failures(self) -> int:
        """Failed streams counted against it."""
        ...

    @property
    def via(self) -> str:
        """The relay it is reached through; empty for a direct tunnel."""
        ...

    @property
    def hops(self) -> int:
        """Relays between the gateway and the node (0 = direct)."""
        ...

    def load(self, model: str) -> float:
        """In-flight streams for ``model`` divided by :meth:`capacity`."""
        ...

    def capacity(self, model: str) -> int:
        """Streams of ``model`` it takes at once (advertised, within its tunnel's limit)."""
        ...


N = TypeVar("N", bound=Node)
"""The node type of one set of candidates (the gateway's peer, or a test's stand-in)."""


class CandidateSet(Sequence[N]):
    """The nodes with a free slot for one model that one request may use.

    A read-only sequence, plus queries answered from an index kept as nodes change
    instead of by a pass over every node. A set is current for one routing decision.
    Implemented by the gateway; a policy only reads it.
    """

    __slots__ = ()

    @property
    @abstractmethod
    def model(self) -> str:
        """The model these nodes have a free slot for."""

    @abstractmethod
    def get(self, node_id: str) -> N | None:
        """The node with id ``node_id`` if it is in this set, else None."""

    @abstractmethod
    def without(self, node: N) -> CandidateSet[N]:
        """This set without ``node``."""

    @abstractmethod
    def excluding(self, node_ids: Iterable[str]) -> CandidateSet[N]:
        """This set without the nodes ``node_ids`` (unknown ids are ignored)."""

    @abstractmethod
    def restrict(self, node_ids: Iterable[str]) -> CandidateSet[N]:
        """Only the nodes ``node_ids`` that are in this set."""

    @abstractmethod
    def at_most(self, name: KeyName, limit: float) -> CandidateSet[N]:
        """Only the nodes whose key ``name`` (its first element) is at most ``limit``."""

    @abstractmethod
    def least_loaded(self, rng: random.Random) -> N | None:
        """The node with the lowest key ``least_loaded``; exact ties drawn with ``rng``."""

    @abstractmethod
    def min_by(self, name: KeyName, rng: random.Random | None = None) -> N | None:
        """The node with the lowest key ``name``; exact ties go to the first in this
        set's order, or with ``rng``, are drawn at random."""

    @abstractmethod
    def by_id(self) -> list[N]:
        """The nodes of this set, sorted by id."""


class RouteRequest(msgspec.Struct, frozen=True):
    """What a policy may look at for one request (a frozen struct)."""

    request_id: str
    model: str
    endpoint: str
    headers: Mapping[str, str]
    """Request headers, lower-case names (e.g. ``x-tooti-region``)."""
    body: Mapping[str, Any] = msgspec.field(default_factory=dict)
    """The decoded request body (read-only by convention)."""
    key_id: str = "anonymous"


class RoutingPolicy(Protocol):
    """Orders candidate nodes for one request."""

    def rank(self, request: RouteRequest, candidates: Sequence[N]) -> Sequence[N]:
        """Return ``candidates`` (or a subset) best first; an empty result means no route.

        Generic in the node type: a policy returns nodes it was given, never others.
        ``candidates`` may be a :class:`CandidateSet` or any other sequence."""
        ...
