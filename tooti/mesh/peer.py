"""One peer (a node, or a relay) with a live tunnel here, and what is known of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tooti import clock
from tooti.accounts.records import ADMIN_ACCOUNT
from tooti.backends.base import ModelInfo
from tooti.mesh.health import ModelHealth
from tooti.tunnel import OutboundStream, TunnelSession


@dataclass(eq=False)
class Peer:
    """One node (or relay) with a live tunnel to this gateway.

    It is the :class:`~tooti.routing.base.Node` a routing policy sees (``id``,
    ``group``, ``labels``, ``models``, ``health``, ``in_flight``, ``stats``,
    ``failures``, ``via``, ``hops``, :meth:`load`, :meth:`capacity`)."""

    id: str
    role: str
    session: TunnelSession
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    software: str = ""
    models: dict[str, ModelInfo] = field(default_factory=dict)
    """Every model it announces, ready or loading (:attr:`ModelInfo.state`; the routing
    index routes only the ready ones)."""
    in_flight: dict[str, int] = field(default_factory=dict)
    """Streams this gateway has open on the peer, by model."""
    stats: dict[str, Any] = field(default_factory=dict)
    """The peer's last HEARTBEAT payload."""
    connected_at: float = field(default_factory=clock.wall)
    """When its tunnel was registered (wall clock, shown to people)."""
    draining: bool = False
    """It takes no new streams: it sent GOAWAY (or its relay did), or an admin drained
    it (:meth:`Registry.drain`)."""
    disabled: bool = False
    """An admin disabled its node id here (:meth:`Registry.disable`): routed nothing new
    until enabled, set again whenever the same id re-joins."""
    failures: int = 0
    health: dict[str, ModelHealth] = field(default_factory=dict)
    """What this gateway measured for each model on this peer."""
    via: str = ""
    """For a node reached through a relay: the relay's peer id (its tunnel is
    ``session``); empty for a direct tunnel."""
    hops: int = 0
    """Relays between this process and the node (0 = direct)."""
    public_key: bytes = b""
    """The Ed25519 key the node proved possession of."""
    proof: dict[str, str] = field(default_factory=dict)
    """The node's handshake proof (challenge, session id, signature; base64), which a
    relay passes upstream so the next hop can check it too."""
    public_url: str = ""
    """The tunnel URL a relay or gateway said others can reach it at (its HELLO's
    ``public_url``), passed on to dialers in WELCOME; empty for nodes."""
    group: str = ""
    """The node group its join token admitted it to (``""`` = ungrouped)."""
    token: str = ""
    """The name of the join token that admitted it (``default`` for ``join_token``,
    ``""`` without tokens; never the token itself). A relayed node has its relay's."""
    owner: str = ADMIN_ACCOUNT
    """The account its join token was minted for, which it earns for (``admin`` for
    the static tokens and loopback peers). A relayed node has its relay's."""
    token_id: str = ""
    """The id of the minted join token that admitted it (``""`` for static tokens)."""
    group_id: str = ""
    """The accounts database id of the group its minted token admitted it to."""
    published_at: float = -1e18
    """``clock.now()`` of its last ``peer.updated`` event (heartbeats publish at
    most one per :attr:`Registry.update_spacing`)."""
    published_stats: dict[str, Any] | None = None
    """The :attr:`stats` its last ``peer.updated`` event carried (a heartbeat repeating
    them publishes nothing new, see :meth:`Registry.heartbeat`)."""
    penalized: bool = False
    """:meth:`Registry.penalize` cut this peer off since it was last registered (once is
    enough; a relayed node registered again after its ban answers for new violations)."""
    stream_limit: int = 1 << 31
    """Streams its tunnel carries at once (the peer's ``max_streams``; through a relay,
    the relay's, shared with the relay's other nodes). Set when the peer is registered."""

    async def open_stream(self, meta: dict[str, Any], body: bytes, *, fin: bool = True
                          ) -> OutboundStream:
        """Open a stream to this node: on its own tunnel, or through its relay with the
        OPEN naming the node (``target``)."""
        return await self.session.open_stream(self._meta(meta), body, fin=fin)

    def open_stream_nowait(self, meta: dict[str, Any], body: bytes, *, fin: bool = True
                           ) -> tuple[OutboundStream, bytes]:
        """Like :meth:`open_stream`, without waiting: returns the stream and the part of
        ``body`` still to send (see :meth:`TunnelSession.open_stream_nowait`)."""
        return self.session.open_stream_nowait(self._meta(meta), body, fin=fin)

    def _meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Through a relay, the OPEN names its target node."""
        return {**meta, "target": self.id} if self.via else meta

    @property
    def live(self) -> bool:
        """True while the tunnel is up and the peer takes new streams."""
        return (
            not self.draining
            and not self.disabled
            and not self.session.closed.is_set()
            and self.stats.get("healthy", True) is not False
        )

    def health_of(self, model: str) -> ModelHealth:
        """This peer's measured record for ``model`` (created on first use)."""
        record = self.health.get(model)
        if record is None:
            record = self.health[model] = ModelHealth()
        return record

    def capacity(self, model: str) -> int:
        """Concurrent streams the peer takes for ``model``: what it advertises, but no
        more than its tunnel carries (the peer's ``max_streams``, shared with its other
        models and, through a relay, with the relay's other nodes)."""
        info = self.models.get(model)
        slots = max(1, info.max_concurrency) if info else 1
        return min(slots, self.stream_limit)

    def has_slot(self, model: str) -> bool:
        """True while in-flight streams for ``model`` are below its capacity and the
        tunnel can take another stream (its ``max_streams`` limit)."""
        return (self.in_flight.get(model, 0) < self.capacity(model)
                and self.session.conn.can_open_stream())

    def load(self, model: str) -> float:
        """In-flight streams for ``model`` divided by its :meth:`capacity`."""
        return self.in_flight.get(model, 0) / self.capacity(model)

    def total_in_flight(self) -> int:
        """Streams open on this peer across every model."""
        return sum(self.in_flight.values())

    def models_summary(self, shown: int = 3) -> str:
        """The first few model ids (each still loading marked so) and how many there
        are, for a log line."""
        ids = sorted(self.models)
        if not ids:
            return "nothing"
        text = ", ".join(m if self.models[m].ready else f"{m} (loading)" for m in ids[:shown])
        return f"{text} and {len(ids) - shown} more ({len(ids)} models)" if len(ids) > shown \
            else text

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for admin and health endpoints."""
        return {
            "id": self.id, "role": self.role, "address": self.address, "labels": self.labels,
            "via": self.via or None, "hops": self.hops, "group": self.group,
            "token": self.token or None, "owner": self.owner,
            "software": self.software, "models": sorted(self.models),
            "in_flight": self.total_in_flight(), "draining": self.draining,
            "disabled": self.disabled,
            "rtt_ms": None if self.session.rtt is None else round(self.session.rtt * 1000, 3),
            "connected_at": self.connected_at,
            "state": self.state(),
            "failures": self.failures,
            "stats": self.stats,
            "per_model": {
                model: {
                    "in_flight": self.in_flight.get(model, 0),
                    "capacity": self.capacity(model),
                    "price": {"input": info.price_input, "output": info.price_output},
                    **self.health_of(model).describe(),
                    **({} if info.ready else {"state": "loading"}),
                }
                for model, info in sorted(self.models.items())
            },
        }

    def state(self) -> str:
        """``live``, ``disabled`` (by an admin), ``draining``, ``unhealthy``,
        ``cooldown`` (every model) or ``gone``, the first that holds in that order
        from ``gone`` up."""
        if self.session.closed.is_set():
            return "gone"
        if self.disabled:
            return "disabled"
        if self.draining:
            return "draining"
        if self.stats.get("healthy", True) is False:
            return "unhealthy"
        if self.models and all(self.health_of(m).in_cooldown for m in self.models):
            return "cooldown"
        return "live"
