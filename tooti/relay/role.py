"""The relay role, composed whole: a station that admits node tunnels (its own, or the
gateway's when both roles share a process) and the upstream link that advertises those
nodes to gateways and forwards their streams (:class:`~tooti.relay.upstream.Upstream`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from tooti.admin.api import AdminAPI
from tooti.errors import APIError
from tooti.identity import Identity
from tooti.mesh.http import Headers, Receive, Scope, Send
from tooti.mesh.identity_store import IdentityStore
from tooti.mesh.station import Station
from tooti.relay.upstream import Upstream
from tooti.settings import Settings


async def not_a_gateway(scope: Scope, receive: Receive, send: Send, request_id: str,
                        headers: Headers) -> None:
    """``/v1`` on a relay: the API is a gateway's."""
    raise APIError(404, "this process is a relay: send API requests to a gateway",
                   code="not_a_gateway")


class RelayRole:
    """A relay: station + upstream link, built from the settings and the relay's key."""

    def __init__(self, settings: Settings, relay_id: str, identity: Identity,
                 station: Station | None = None, identities: IdentityStore | None = None,
                 roles: Sequence[str] = ("relay",)) -> None:
        """``station`` is a gateway's in the same process (built with ``relay_id`` as
        its local id); without one the relay builds and serves its own, with the
        admin API, ``identities`` (node-name bindings; None = memory only) and the
        process's ``roles`` (shown by the admin API)."""
        self.owns_station = station is None
        if station is None:
            station = Station(settings.gateway, settings.tunnel, network=settings.network,
                              identities=identities, roles=roles, local_id=relay_id)
            station.mount("/v1/", not_a_gateway)
            AdminAPI(station).mount()
        self.station = station
        self.upstream = Upstream(settings.relay, settings.tunnel, station.registry, relay_id,
                              identity, network=settings.network)
        station.show_dialer(self.upstream.dialer)
        if self.owns_station:  # beside a gateway, the gateway's readiness stands
            station.readiness = self.readiness
        self.drain_grace = settings.drain_grace

    @property
    def id(self) -> str:
        return self.upstream.id

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """A relay alone is ready (``/readyz``) while at least one upstream link is up:
        its nodes reach a gateway only through one."""
        links = len(self.upstream.dialer.sessions)
        if links:
            return True, {"status": "ready", "upstream": links,
                          "peers": len(self.station.registry.peers)}
        return False, {"status": "not ready", "reason": "no upstream link is up",
                       "upstream": 0}

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Serve the station (if the relay owns it) and dial upstream; reports the
        station's URLs."""
        async with trio.open_nursery() as nursery:
            if self.owns_station:
                await nursery.start(lambda task_status: self.station.serve(
                    task_status=task_status, grace=self.drain_grace))
            await nursery.start(self.upstream.run)
            task_status.started(self.station.bound)

    async def drain(self, grace: float) -> None:
        """GOAWAY upstream and let forwarded streams finish; an owned station closes
        its node tunnels only once they have (or the grace is over)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.upstream.drain, grace)
            if self.owns_station:
                nursery.start_soon(self.station.drain, grace, [self.upstream.wait_idle])
