"""The routing policy contract.

A policy sees one request and the live candidate nodes for its model (the
router has already removed nodes that failed this request) and returns them
best first. It must be fast and synchronous: it runs on every request, at up
to thousands of nodes, so no I/O and nothing that waits.

The router passes the candidates as a
:class:`~tooti.mesh.registry.Candidates` view: an ordinary read-only
sequence, which is all a policy may rely on (tests and other callers pass
plain lists), that also answers indexed queries (``least_loaded``,
``min_by``, ``at_most``, ``by_id``) without a pass over every node. The
built-in policies use them when they get such a view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tooti.mesh.registry import Peer


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy may look at for one request."""

    request_id: str
    model: str
    endpoint: str
    headers: Mapping[str, str]
    """Request headers, lower-case names (e.g. ``x-tooti-region``)."""
    body: Mapping[str, Any] = field(default_factory=dict)
    """The decoded request body (read-only by convention)."""
    key_id: str = "anonymous"


class RoutingPolicy(Protocol):
    """Orders candidate nodes for one request."""

    def rank(self, request: RouteRequest, candidates: Sequence[Peer]) -> Sequence[Peer]:
        """Return ``candidates`` (or a subset) best first; an empty result means no route."""
        ...
