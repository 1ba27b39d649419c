"""The admin views over many peers never block the gateway's loop for long: the peers
are described in batches with a checkpoint between them (``/admin/v1/peers`` and the
events stream's snapshot), so tunnels keep being read and acknowledged meanwhile."""

from __future__ import annotations

from typing import Any

import trio

from tooti.admin.api import DESCRIBE_BATCH, describe_peers
from tooti.admin.events import event_frames
from tooti.mesh.events import EventBus


class FakePeer:
    """Just what :func:`describe_peers` asks of a peer."""

    def __init__(self, n: int) -> None:
        self.n = n

    def describe(self) -> dict[str, Any]:
        return {"id": f"node-{self.n}"}


async def test_describe_peers_lets_other_tasks_run_between_batches() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    peers = [FakePeer(n) for n in range(DESCRIBE_BATCH * 5)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        described = await describe_peers(peers)
        assert ticks - before >= 4  # the ticker ran between the batches
        nursery.cancel_scope.cancel()
    assert [d["id"] for d in described] == [f"node-{n}" for n in range(len(peers))]


async def test_event_frames_take_an_async_snapshot_and_then_the_events() -> None:
    bus = EventBus()

    async def snapshot() -> dict[str, Any]:
        seq = bus.last_seq
        await trio.lowlevel.checkpoint()
        bus.publish("peer.joined", peer={"id": "late"})  # while the snapshot is built
        return {"seq": seq, "peers": []}

    frames = event_frames(snapshot, bus)
    first = await frames.__anext__()
    assert first.startswith(b"event: snapshot\n") and b'"seq":0' in first
    second = await frames.__anext__()  # published during the build: not lost
    assert second.startswith(b"event: peer.joined\n") and b'"late"' in second
    await frames.aclose()
    assert bus.subscribers == 0
