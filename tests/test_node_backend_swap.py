"""A reload removing a node's backend (SIGHUP, :meth:`Node.replace_backends`): the
backend closes only after every stream it was picked for, counting one whose request
body is still being read; and its ``run`` task ends with it, whether it was started with
the node or added by an earlier reload."""

from __future__ import annotations

import json
from typing import Any, cast

import trio
import trio.testing

from tooti.backends.base import Backend
from tooti.backends.simulated import SimulatedBackend
from tooti.node.node import Node
from tooti.settings import BackendSettings, NodeSettings, TunnelSettings
from tooti.tunnel.streams import InboundStream

LIMIT = 10.0
"""Hang guard of every wait (never reached when the code works)."""


class Recorded(SimulatedBackend):
    """A simulated backend noting when it closes and when its ``run`` ends."""

    def __init__(self, journal: list[str]) -> None:
        super().__init__(BackendSettings(type="simulated", options={"tokens": 3}))
        self.journal = journal
        self.running = trio.Event()
        self.run_ended = trio.Event()

    async def run(self) -> None:
        self.running.set()
        try:
            await trio.sleep_forever()  # a plugin supervising a child would loop here
        finally:
            self.run_ended.set()

    async def close(self) -> None:
        self.journal.append("closed")
        await super().close()


class HeldUpload:
    """What the node reads from an inbound tunnel stream, with a request body that
    arrives only when :attr:`arrive` is set (a large upload still in transit)."""

    def __init__(self, journal: list[str]) -> None:
        self.meta = {"endpoint": "chat/completions", "model": "tooti-sim"}
        self.arrive = trio.Event()
        self.reading = trio.Event()
        self.journal = journal
        self.status = 0
        self.ended: dict[str, Any] | None = None

    async def read_body(self, limit: int) -> bytes:
        self.reading.set()
        await self.arrive.wait()
        return json.dumps({"model": "tooti-sim", "max_tokens": 3,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def respond(self, status: int, headers: dict[str, str]) -> None:
        self.status = status

    async def send(self, data: bytes) -> None:
        pass

    async def end(self, info: dict[str, Any] | None = None) -> None:
        self.ended = info or {}
        self.journal.append("stream ended")


async def running_node(nursery: trio.Nursery, backends: list[Backend]) -> Node:
    node = Node(NodeSettings(peers=[]), TunnelSettings(), backends, "node-a", dial=False)
    await nursery.start(node.run)
    return node


async def test_a_backend_removed_while_a_request_body_is_read_closes_after_it(
        nursery: trio.Nursery) -> None:
    journal: list[str] = []
    old = Recorded(journal)
    node = await running_node(nursery, [old])
    upload = HeldUpload(journal)
    served = trio.Event()

    async def serve() -> None:
        await node._serve_stream(cast(InboundStream, upload))
        served.set()

    nursery.start_soon(serve)
    with trio.fail_after(LIMIT):
        await upload.reading.wait()
        await node.replace_backends([])  # the SIGHUP lands mid-upload
        await trio.testing.wait_all_tasks_blocked()
    assert journal == [], "the backend closed under a request it was picked for"
    upload.arrive.set()
    with trio.fail_after(LIMIT):
        await served.wait()
        await old.run_ended.wait()
        while "closed" not in journal:
            await trio.testing.wait_all_tasks_blocked()
    assert journal == ["stream ended", "closed"]
    assert upload.status == 200 and upload.ended is not None
    assert "error" not in upload.ended, upload.ended


async def test_a_removed_backend_started_with_the_node_stops_running(
        nursery: trio.Nursery) -> None:
    """A backend from the node's start and one a reload added: each reload removing
    one cancels its ``run`` (a plugin's supervisor does not outlive ``close``)."""
    journal: list[str] = []
    first, second = Recorded(journal), Recorded(journal)
    node = await running_node(nursery, [first])
    with trio.fail_after(LIMIT):
        await first.running.wait()
        await second.start()
        await node.replace_backends([second])
        await first.run_ended.wait()
        await second.running.wait()
        await node.replace_backends([])
        await second.run_ended.wait()
    assert journal == ["closed", "closed"]
