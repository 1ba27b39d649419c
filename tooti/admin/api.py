"""The admin HTTP API every gateway and relay serves (``/admin/v1/…`` and ``/metrics``).

Every route needs the admin key; without one configured, the API answers on loopback
only. ``GET /admin/v1/peers`` (live peers), ``/network`` (what this process knows of
the network, read by ``tooti peers``), ``/requests`` (recent requests), ``/events``
(a snapshot, then every bus event, as server-sent events; the TUI reads it),
``/identities`` (bound node names) and ``DELETE /admin/v1/identities/{name}``;
``GET /metrics`` is the Prometheus text exposition. On a gateway (given a
:class:`~tooti.admin.peer_control.PeerControl`), ``POST /admin/v1/peers/{id}/disable``,
``/enable`` and ``/drain`` control a node (each answers the peer's admin view), and
``GET /admin/v1/peers`` also lists the ``disabled`` ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs

import trio

from tooti import clock
from tooti.admin.events import stream_events
from tooti.admin.metrics import CONTENT_TYPE as METRICS_TYPE
from tooti.admin.metrics import GatewayMetrics
from tooti.admin.peer_control import PeerControl
from tooti.dialer import Dialer
from tooti.errors import APIError
from tooti.identity import derive_id
from tooti.mesh.http import (
    Headers,
    Receive,
    Scope,
    Send,
    cancel_on_disconnect,
    header,
    send_bytes,
    send_json,
)
from tooti.mesh.identity_store import IdentityStoreError
from tooti.mesh.join_tokens import BearerAuth
from tooti.mesh.peer import Peer
from tooti.mesh.station import Station

log = logging.getLogger("tooti.gateway")

ADMIN_PREFIX = "/admin/v1/"
METRICS_PATH = "/metrics"
IDENTITIES_PATH = "/admin/v1/identities"
PEERS_PATH = "/admin/v1/peers"
PEER_ACTIONS = ("disable", "enable", "drain")
"""What ``POST /admin/v1/peers/{id}/{action}`` does (see :class:`PeerControl`)."""
DESCRIBE_BATCH = 200
"""Peers described between two checkpoints by the large views (``/admin/v1/peers``, the
events snapshot): with 10,000 peers the gateway's loop is never blocked for more than a
few milliseconds at a time, so tunnels keep being read and acknowledged meanwhile."""
T = TypeVar("T")


async def describe_peers(peers: Iterable[Peer]) -> list[dict[str, Any]]:
    """Every peer's :meth:`~tooti.mesh.peer.Peer.describe`, :data:`DESCRIBE_BATCH` at a
    time with a checkpoint in between (over a copy: peers may come and go meanwhile; one
    gone by its turn is described as ``gone``, and its ``peer.left`` follows)."""
    out: list[dict[str, Any]] = []
    for index, peer in enumerate(list(peers)):
        if index and not index % DESCRIBE_BATCH:
            await trio.lowlevel.checkpoint()
        out.append(peer.describe())
    return out


def _query_int(scope: Scope, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter, clamped; 400 if it is not an integer."""
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    if not values:
        return default
    try:
        return max(low, min(high, int(values[-1])))
    except ValueError:
        raise APIError(400, f"{name} must be an integer", param=name,
                       code="invalid_type") from None


def _store_call(call: Callable[[], T]) -> T:
    """Run an identity store operation; its failure is a 500 naming the file."""
    try:
        return call()
    except IdentityStoreError as exc:
        raise APIError(500, str(exc), code="identity_store_error") from None


def check_admin(auth: BearerAuth, scope: Scope) -> None:
    """Admin endpoints need the admin key; without one, they answer loopback only."""
    client = scope.get("client")
    refusal = auth.check(header(scope, b"authorization"), client[0] if client else None)
    if refusal is not None:
        if auth.open_to_network:
            raise APIError(401, "a valid admin key is required", code="invalid_admin_key",
                           headers={"www-authenticate": "Bearer"})
        raise APIError(403, "no admin key is configured: the admin API answers on "
                       "loopback only", code="admin_loopback_only")


def network_view(roles: Sequence[str], dialers: Iterable[Dialer], *, discover: bool,
                 public_url: str = "", public_peers: Sequence[str] = (),
                 peers: Iterable[Peer] = ()) -> dict[str, Any]:
    """The ``GET /admin/v1/network`` body (what ``tooti peers`` shows), for any role."""
    return {
        "roles": list(roles),
        "public_url": public_url or None,
        "public_peers": list(public_peers),
        "discover": discover,
        "dialing": [{"role": d.role, "id": d.peer_id, "links": d.describe()} for d in dialers],
        "peers": [{"id": p.id, "role": p.role, "via": p.via or None, "hops": p.hops,
                   "address": p.address, "group": p.group, "token": p.token or None,
                   "state": p.state(), "models": sorted(p.models),
                   "public_url": p.public_url or None}
                  for p in peers],
    }


class AdminAPI:
    """The admin routes of one station; ``queued`` counts requests waiting for a node
    (a gateway's proxy; nothing on a relay); ``peer_control`` serves the peer actions
    (a gateway's; without one they are 404)."""

    def __init__(self, station: Station, queued: Callable[[], int] = lambda: 0,
                 peer_control: PeerControl | None = None) -> None:
        self.station = station
        self.registry = station.registry
        self.queued = queued
        self.peer_control = peer_control
        self.metrics = GatewayMetrics(station.registry, station.registry.bus, queued)

    def mount(self) -> None:
        """Serve ``/admin/v1/`` and ``/metrics`` on the station."""
        self.station.mount(ADMIN_PREFIX, self.handle)
        self.station.mount(METRICS_PATH, self.handle)

    async def handle(self, scope: Scope, receive: Receive, send: Send, request_id: str,
                     headers: Headers) -> None:
        path, method = scope["path"], scope["method"]
        if path != METRICS_PATH and not path.startswith(ADMIN_PREFIX):
            raise APIError(404, f"no route for {method} {path}", code="not_found")
        check_admin(self.station.admin_auth, scope)
        if path == IDENTITIES_PATH or path.startswith(IDENTITIES_PATH + "/"):
            await self._identities(scope, send, headers)
            return
        if path.startswith(PEERS_PATH + "/"):
            await send_json(send, 200, self._peer_action(path, method), headers)
            return
        if method != "GET":
            raise APIError(405, f"use GET on {path}", code="method_not_allowed")
        bus = self.registry.bus
        if path == METRICS_PATH:
            await send_bytes(send, 200, self.metrics.render(), headers, METRICS_TYPE)
        elif path == "/admin/v1/peers":
            data = await describe_peers(self.registry.peers.values())
            await send_json(send, 200, {
                "object": "list",
                "data": data,
                "queued": self.queued(),
                "disabled": sorted(self.registry.disabled_ids),
            }, headers)
        elif path == "/admin/v1/network":
            await send_json(send, 200, self.network_view(), headers)
        elif path == "/admin/v1/requests":
            limit = _query_int(scope, "limit", 100, 1, bus.recent_limit)
            await send_json(send, 200, {
                "object": "list", "data": bus.recent_requests(limit)}, headers)
        elif path == "/admin/v1/events":
            await cancel_on_disconnect(receive, send, lambda tracked: stream_events(
                self.snapshot_async, bus, tracked, headers))
        else:
            raise APIError(404, f"no admin route {path}", code="not_found")

    def _peer_action(self, path: str, method: str) -> dict[str, Any]:
        """``POST /admin/v1/peers/{id}/disable|enable|drain`` (see :class:`PeerControl`):
        the peer's admin view after the action."""
        node_id, _, action = path[len(PEERS_PATH) + 1:].rpartition("/")
        control = self.peer_control
        if not node_id or action not in PEER_ACTIONS or control is None:
            raise APIError(404, f"no admin route {path}", code="not_found")
        if method != "POST":
            raise APIError(405, f"use POST on {path}", code="method_not_allowed")
        if action == "disable":
            return control.disable(node_id)
        if action == "enable":
            return control.enable(node_id)
        return control.drain(node_id)

    async def _identities(self, scope: Scope, send: Send, headers: Headers) -> None:
        """``GET /admin/v1/identities``: bound node names with their keys' fingerprints
        (the key's derived id); ``DELETE /admin/v1/identities/{name}``: forget a binding,
        so the next key to prove the name claims it (a session already up stays up)."""
        path, method = scope["path"], scope["method"]
        store = self.registry.identity_store
        if path == IDENTITIES_PATH:
            if method != "GET":
                raise APIError(405, f"use GET on {path}", code="method_not_allowed")
            bindings: list[tuple[str, bytes, float | None]]
            if store is not None:
                bindings = [(b.name, b.public_key, b.bound_at)
                            for b in _store_call(store.bindings)]
            else:
                bindings = [(name, key, None)
                            for name, key in sorted(self.registry.identities.items())]
            await send_json(send, 200, {"object": "list", "data": [
                {"name": name, "fingerprint": derive_id(key), "bound_at": bound_at,
                 "connected": name in self.registry.peers}
                for name, key, bound_at in bindings
            ]}, headers)
            return
        name = path[len(IDENTITIES_PATH) + 1:]
        if method != "DELETE":
            raise APIError(405, f"use DELETE on {path}", code="method_not_allowed")
        known = store is not None and _store_call(lambda: store.forget(name))
        known = self.registry.identities.pop(name, None) is not None or known
        if not known:
            raise APIError(404, f"no identity is bound to the name '{name}'",
                           code="identity_not_found")
        log.info("identity binding of %s forgotten (admin)", name)
        await send_json(send, 200, {"name": name, "deleted": True}, headers)

    def snapshot(self) -> dict[str, Any]:
        """Peers and recent requests now, for a new events subscriber."""
        return {
            "seq": self.registry.bus.last_seq,
            "ts": clock.wall(),
            "peers": [peer.describe() for peer in self.registry.peers.values()],
            "requests": self.registry.bus.recent_requests(200),
            "queued": self.queued(),
        }

    async def snapshot_async(self) -> dict[str, Any]:
        """:meth:`snapshot`, its peers described in batches with checkpoints between
        them (:func:`describe_peers`); current at least up to its ``seq`` (taken first:
        the events after it describe whole peers, so a subscriber applying them on top
        gets it right)."""
        seq = self.registry.bus.last_seq
        peers = await describe_peers(self.registry.peers.values())
        return {
            "seq": seq,
            "ts": clock.wall(),
            "peers": peers,
            "requests": self.registry.bus.recent_requests(200),
            "queued": self.queued(),
        }

    def network_view(self) -> dict[str, Any]:
        """What this process knows of the network (``GET /admin/v1/network``)."""
        station = self.station
        return network_view(station.roles, station.dialers,
                            discover=station.network.discover,
                            public_url=station.network.public_url,
                            public_peers=station.public_peers(),
                            peers=self.registry.peers.values())
