"""The relay role's upstream link: one outbound link for many nodes.

A relay accepts node tunnels exactly like a gateway (on a station of its own, or the
gateway's in the same process: :class:`~tooti.relay.role.RelayRole`) and dials
its upstream peers - gateways or other relays - like a node does. On each
upstream session it advertises every node it can reach
(:class:`~tooti.relay.advertiser.Advertiser`) and forwards the streams opened to
them (:class:`~tooti.relay.forwarding.Forwarder`).
"""

from __future__ import annotations

from typing import Any

import trio

from tooti.dialer import Dialer
from tooti.identity import Identity
from tooti.mesh.advertisements import can_advertise
from tooti.mesh.registry import Registry
from tooti.relay.advertiser import Advertiser
from tooti.relay.forwarding import Forwarder
from tooti.settings import NetworkSettings, RelaySettings, TunnelSettings
from tooti.tunnel import StreamHandler, StreamOpener, TunnelSession


class Upstream:
    """Dials the upstream peers and, on each session, advertises the nodes in
    ``registry`` (:attr:`advertiser`) and forwards streams to them (:attr:`forwarder`)."""

    def __init__(
        self, settings: RelaySettings, tunnel: TunnelSettings, registry: Registry,
        relay_id: str, identity: Identity, network: NetworkSettings | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.id = relay_id
        self.draining = False
        self.advertiser = Advertiser(registry, tunnel, settings.advertise_interval)
        self.forwarder = Forwarder(settings, registry, relay_id)
        self.handler: StreamHandler | None = self.forwarder.forward
        self.opener: StreamOpener | None = self.forwarder.open
        self.dialer = Dialer(
            self, peer_id=relay_id, role="relay", identity=identity, tunnel=tunnel,
            network=network, join_token=settings.join_token,
            reconnect_initial=settings.reconnect_initial,
            reconnect_max=settings.reconnect_max, is_stopping=lambda: self.draining,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Dial every upstream peer and serve until cancelled."""
        await self.dialer.run(list(self.settings.peers), task_status=task_status)

    async def drain(self, grace: float) -> None:
        """Tell upstream peers GOAWAY; let forwarded streams finish for up to ``grace``."""
        self.draining = True
        await self.dialer.drain(grace, self.wait_idle, "relay shutting down")

    async def wait_idle(self) -> None:
        """Wait until no stream is being forwarded."""
        await self.forwarder.wait_idle()

    def stats(self) -> dict[str, Any]:
        """The HEARTBEAT payload sent upstream."""
        nodes = sum(1 for p in self.registry.peers.values() if can_advertise(p))
        forwarder = self.forwarder
        return {"in_flight": forwarder.forwarding, "nodes": nodes, "healthy": True,
                "forwarded": forwarder.forwarded_total}

    async def on_session(self, session: TunnelSession) -> None:
        """Advertise the reachable nodes on a new upstream session for as long as it
        lives (see :meth:`Advertiser.on_session`), with the endpoint names that
        session's WELCOME listed."""
        await self.advertiser.on_session(session, self.dialer.accepted(session))
