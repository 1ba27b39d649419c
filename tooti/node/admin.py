"""The admin API of a process that runs a node without a gateway or relay: ``/healthz``
(liveness), ``/readyz`` (200 once at least one model is ready, 503 while every model is
loading or no backend answers, and while draining), ``GET /admin/v1/network`` (what
``tooti peers`` shows) and ``GET /metrics`` (the process's own figures: ``tooti_tasks``,
``process_open_fds``, memory; see :mod:`tooti.admin.metrics`), on ``node.admin_listen``."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tooti.admin.api import check_admin, network_view
from tooti.admin.metrics import CONTENT_TYPE as METRICS_TYPE
from tooti.admin.metrics import process_metrics
from tooti.errors import APIError
from tooti.mesh.http import (
    Receive,
    Scope,
    Send,
    send_bytes,
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

    def reload_admin_key(self, admin_key: str) -> None:
        """SIGHUP: check ``/admin/v1`` by ``admin_key`` from the next request on."""
        self.auth = BearerAuth(admin_key)

    def network_view(self) -> dict[str, Any]:
        """What the node knows of the network, in the gateway's ``/admin/v1/network`` shape."""
        dialer = self.node.dialer
        # A node alone has no public address of its own, nor peers dialled into it.
        return network_view(["node"], [dialer], discover=dialer.network.discover)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when at least one model is ready to serve and the node is not draining."""
        node = self.node
        if node.draining:
            return False, {"status": "not ready", "reason": "draining"}
        if node.models:
            return True, {"status": "ready", "models": len(node.models),
                          "loading": len(node.loading), "sessions": len(node.sessions)}
        reason = (f"still loading {', '.join(sorted(node.loading))}" if node.loading
                  else "no backend serves a model")
        return False, {"status": "not ready", "reason": reason, "models": 0,
                       "loading": len(node.loading), "sessions": len(node.sessions)}

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
            elif path == "/readyz":
                ready, body = self.readiness()
                await send_json(send, 200 if ready else 503, body, [])
            elif path == "/admin/v1/network":
                check_admin(self.auth, scope)
                await send_json(send, 200, self.network_view(), [])
            elif path == "/metrics":
                check_admin(self.auth, scope)
                await send_bytes(send, 200, process_metrics(), [], METRICS_TYPE)
            else:
                raise APIError(404, f"no route for {method} {path}", code="not_found")
        except APIError as error:
            await send_error(send, error, [])
