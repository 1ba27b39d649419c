"""The registry's ``peer.updated`` throttle for heartbeats (:meth:`Registry.heartbeat`,
:meth:`Registry.heartbeat_unchanged`): a heartbeat repeating the figures last published
publishes nothing until :attr:`Registry.idle_spacing` has passed (then one event, for
the round-trip time and liveness); figures that changed publish at once, but at most
one event per :attr:`Registry.update_spacing`; a change held back by that spacing is
published by a later heartbeat, even one repeating it. Thousands of idle nodes must not
flood the bus and every subscriber (the TUI, the admin event stream).

The registry reads trio's clock (:func:`tooti.clock.now`): trio's mock clock is moved
by hand here, one heartbeat interval at a time."""

from __future__ import annotations

from typing import Any, cast

import trio
import trio.testing

from tooti.backends.base import ModelInfo
from tooti.mesh.events import BusEvent, EventBus
from tooti.mesh.peer import Peer
from tooti.mesh.registry import IDLE_SPACING_INTERVALS, Registry
from tooti.tunnel import TunnelSession

INTERVAL = 3.0
"""The heartbeat interval (the default)."""
IDLE = {"healthy": True, "in_flight": 0, "queue": 0}


class FakeConn:
    def can_open_stream(self) -> bool:
        return True


class FakeSession:
    """Just what :class:`Peer` and :class:`Registry` read from a tunnel session."""

    def __init__(self) -> None:
        self.closed = trio.Event()
        self.rtt: float | None = 0.001
        self.close_reason = ""
        self.conn = FakeConn()


class Updates:
    """The ``peer.updated`` events published on a bus (each with the peer's stats)."""

    def __init__(self, bus: EventBus) -> None:
        self.stats: list[dict[str, Any]] = []
        bus.listeners.append(self._heard)

    def _heard(self, event: BusEvent) -> None:
        if event.kind == "peer.updated":
            self.stats.append(event.data["peer"]["stats"])

    def take(self) -> list[dict[str, Any]]:
        taken, self.stats = self.stats, []
        return taken


def joined(registry: Registry) -> Peer:
    """A node registered as the gateway registers one: added, then its models set (which
    publishes its first ``peer.updated``), its stats those of an idle node."""
    peer = Peer(id="node-a", role="node", address="test",
                session=cast(TunnelSession, FakeSession()), stats=dict(IDLE))
    registry.add(peer)
    registry.set_models(peer, [ModelInfo(id="m", max_concurrency=2)])
    return peer


async def test_an_idle_peer_publishes_only_every_idle_spacing(
    mock_clock: trio.testing.MockClock,
) -> None:
    bus = EventBus()
    registry = Registry(bus, heartbeat_interval=INTERVAL)
    updates = Updates(bus)
    peer = joined(registry)
    assert updates.take() == [IDLE]
    assert registry.idle_spacing == IDLE_SPACING_INTERVALS * INTERVAL
    # Unchanged figures, both as a new (equal) dict and as "unchanged": nothing.
    for n in range(1, IDLE_SPACING_INTERVALS):
        mock_clock.jump(INTERVAL)
        if n % 2:
            registry.heartbeat(peer, dict(IDLE))
        else:
            registry.heartbeat_unchanged(peer)
        assert updates.take() == [], f"heartbeat {n} published unchanged figures"
    # idle_spacing after the last event: one event, then quiet again.
    mock_clock.jump(INTERVAL)
    registry.heartbeat_unchanged(peer)
    assert updates.take() == [IDLE]
    mock_clock.jump(INTERVAL)
    registry.heartbeat(peer, dict(IDLE))
    assert updates.take() == []
    mock_clock.jump(registry.idle_spacing - INTERVAL)
    registry.heartbeat(peer, dict(IDLE))  # the same through heartbeat()
    assert updates.take() == [IDLE]


async def test_changed_figures_publish_at_most_once_per_update_spacing(
    mock_clock: trio.testing.MockClock,
) -> None:
    bus = EventBus()
    registry = Registry(bus, heartbeat_interval=INTERVAL)
    updates = Updates(bus)
    peer = joined(registry)
    updates.take()
    busy = {**IDLE, "in_flight": 1}
    busier = {**IDLE, "in_flight": 2}
    mock_clock.jump(INTERVAL)
    registry.heartbeat(peer, busy)
    assert updates.take() == [busy]  # a change: published at once
    # Another change within update_spacing is held back...
    mock_clock.jump(registry.update_spacing / 2)
    registry.heartbeat(peer, busier)
    assert updates.take() == []
    # ...and published by the next heartbeat once the spacing passed, though that one
    # repeats the figures (nothing changed since the held-back heartbeat).
    mock_clock.jump(INTERVAL)
    registry.heartbeat_unchanged(peer)
    assert updates.take() == [busier]
    mock_clock.jump(INTERVAL)
    registry.heartbeat_unchanged(peer)
    registry.heartbeat(peer, dict(busier))
    assert updates.take() == []  # published already: quiet
    mock_clock.jump(INTERVAL)
    registry.heartbeat(peer, dict(IDLE))
    assert updates.take() == [IDLE]  # back to idle is a change too


async def test_a_peer_no_longer_registered_publishes_nothing(
    mock_clock: trio.testing.MockClock,
) -> None:
    bus = EventBus()
    registry = Registry(bus, heartbeat_interval=INTERVAL)
    updates = Updates(bus)
    peer = joined(registry)
    registry.remove(peer, "gone")
    updates.take()
    mock_clock.jump(registry.idle_spacing)
    registry.heartbeat(peer, {**IDLE, "in_flight": 1})
    registry.heartbeat_unchanged(peer)
    assert updates.take() == []
