"""A tiny real OpenAI-shaped HTTP server (hypercorn on a loopback port) for tests.

It streams slowly and records, with trio events, when a request starts and
when the server notices the client went away, so tests can prove that
cancellation reaches the upstream without sleeping to wait for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tests.backend_fixtures import answer_lifespan
from tooti.mesh.http import cancel_on_disconnect

if TYPE_CHECKING:
    from tests.conftest import Network


@dataclass
class SlowUpstream:
    """An ASGI app that streams a token every ``interval`` seconds, forever."""

    interval: float = 0.05
    health_status: int = 200
    started: trio.Event = field(default_factory=trio.Event)
    gone: trio.Event = field(default_factory=trio.Event)
    gone_at: float = 0.0
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"].endswith("/models"):
            body = msgspec.json.encode({"object": "list", "data": [
                {"id": "slow", "object": "model", "created": 0, "owned_by": "test"}]})
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": self.health_status,
                        "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        request = b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream = msgspec.json.decode(request).get("stream") is True
        self.started.set()
        await cancel_on_disconnect(receive, send, lambda tracked: self._generate(tracked, stream))

    async def _generate(self, send: Any, stream: bool) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream" if stream else b"application/json")]})
            i = 0
            while True:
                await trio.sleep(self.interval)
                if stream:
                    chunk = msgspec.json.encode({
                        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                        "model": "slow", "choices": [{"index": 0, "delta": {"content": f" t{i}"},
                                                      "finish_reason": None}]})
                    await send({"type": "http.response.body", "body": b"data: " + chunk + b"\n\n",
                                "more_body": True})
                i += 1
        finally:
            self.gone_at = time.monotonic()
            self.gone.set()


async def start_upstream(nursery: trio.Nursery, app: SlowUpstream) -> str:
    """Serve ``app`` on an ephemeral loopback port; returns its base URL with ``/v1``."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))
    app.url = binds[0] + "/v1"
    return app.url


async def backend_call_cancelled(network: Network, upstream: SlowUpstream,
                                 node_id: str = "node-a") -> None:
    """Return once ``upstream`` saw its client (the node's backend) go and the gateway
    and the node have nothing of the request left in flight."""
    with trio.fail_after(5):
        await upstream.gone.wait()
    registry = network.gateway.registry
    with trio.fail_after(5):
        await registry.wait_until(lambda: registry.peers[node_id].total_in_flight() == 0)
        await network.nodes[0].wait_idle()
