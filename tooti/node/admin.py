"""The admin API of a process that runs a node without a gateway or relay: ``/healthz``
and ``GET /admin/v1/network`` (what ``tooti peers`` shows), on ``node.admin_listen``."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tooti.admin.api import check_admin, network_view
from tooti.errors import APIError
from tooti.mesh.http import (
    Receive,
    Scope,
    Send,
    send_error,
    send_json,
    serve_lifespan,
)
from tooti.mesh.join_tokens import BearerAuth
from tooti.node.node import Node

log = logging.getLogger("tooti.node")


class NodeAdmin:
    """A small ASGI app over one :class:`Node` (admin key, or loopback only without one)."""

    def __init__(self, node: Node, listen: str, admin_key: str = "") -> None:
        self.node = node
        self.listen = listen
        self.auth = BearerAuth(admin_key)
        self._shutdown = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Serve until :meth:`shutdown`; reports the bound URLs."""
        config = Config()
        config.bind = [self.listen]
        config.accesslog = None
        # A Logger (not "-"): hypercorn adds no handler of its own, so its errors go
        # through the process's one handler and format (tooti.logging_setup).
        config.errorlog = logging.getLogger("hypercorn.error")
        config.include_server_header = False
        app: Any = self
        await serve(app, config, shutdown_trigger=self._shutdown.wait, task_status=task_status)

    def shutdown(self) -> None:
        """Stop serving."""
        self._shutdown.set()

    def network_view(self) -> dict[str, Any]:
        """What the node knows of the network, in the gateway's ``/admin/v1/network`` shape."""
        dialer = self.node.dialer
        # A node alone has no public address of its own, nor peers dialled into it.
        return network_view(["node"], [dialer], discover=dialer.network.discover)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry point (HTTP only)."""
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if method != "GET":
                raise APIError(405, f"use GET on {path}", code="method_not_allowed")
            if path == "/healthz":
                await send_json(send, 200, {
                    "status": "draining" if self.node.draining else "ok",
                    "sessions": len(self.node.sessions), "models": len(self.node.models)}, [])
            elif path == "/admin/v1/network":
                check_admin(self.auth, scope)
                await send_json(send, 200, self.network_view(), [])
            else:
                raise APIError(404, f"no route for {method} {path}", code="not_found")
        except APIError as error:
            await send_error(send, error, [])
