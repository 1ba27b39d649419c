"""What an operator reads when something outside the process refuses it (issue 14).

* Bug 7: a node whose join token the gateway refuses logs it at ERROR, saying what to
  fix, and re-dials only after :data:`tooti.dialer.REFUSED_RETRY` (a wrong token does
  not fix itself), while other failures keep the normal reconnect backoff. Checked with
  a real gateway that has a join token and a node with a wrong one, on trio's autojump
  clock (dial attempts counted over virtual time).
* Bug 8: a backend's failed health check names the URL asked and the cause
  (connection refused, the HTTP status, a timeout), in the node's
  ``backend … unavailable`` warning. Checked against a closed port, a real server
  answering 500, and one that never answers.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from itertools import pairwise
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import Network, simulated
from tooti import dialer as dialer_module
from tooti.backends.base import Backend
from tooti.backends.llamacpp import LlamaCppBackend
from tooti.backends.ollama import OllamaBackend
from tooti.backends.openai import OpenAIBackend
from tooti.dialer import REFUSED_RETRY, token_refusal
from tooti.gateway.app import Gateway
from tooti.node.node import Node
from tooti.settings import BackendSettings, GatewaySettings, NodeSettings, TunnelSettings
from tooti.transport.websocket import HandshakeFailed

TOKEN = "right-join-token-0123456789"
WRONG = "wrong-join-token-9876543210"


# ------------------------------------------------------------ helpers

def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def http_server(nursery: trio.Nursery, status: int | None, body: bytes = b"") -> int:
    """A tiny HTTP server on loopback answering every request with ``status`` and
    ``body`` (``None``: reads the request and never answers). Returns its port."""

    async def handle(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some(4096)
            if not data:
                return
            received += data
        if status is None:
            await trio.sleep_forever()
        head = (f"HTTP/1.1 {status} Whatever\r\ncontent-type: text/plain\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        await stream.send_all(head + body)
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def openai(port: int, **options: Any) -> OpenAIBackend:
    return OpenAIBackend(BackendSettings(type="openai", url=f"http://127.0.0.1:{port}/v1",
                                         models=["m"], options=options))


async def unavailable_line(backend: Backend, caplog: pytest.LogCaptureFixture) -> str:
    """The node's warning when its health check of ``backend`` fails."""
    node = Node(NodeSettings(peers=[]), TunnelSettings(), [backend], "health-node", dial=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tooti"):
        await node.refresh_models()
    await backend.close()
    lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert lines[0].levelno == logging.WARNING
    return lines[0].getMessage()


# ------------------------------------------------------------ bug 8: health causes

async def test_health_names_url_and_connection_refused(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    port = closed_port()
    line = await unavailable_line(openai(port), caplog)
    assert line == (f"backend openai unavailable: health check failed: "
                    f"GET http://127.0.0.1:{port}/health: connection refused")


async def test_health_names_url_and_status(nursery: trio.Nursery,
                                           caplog: pytest.LogCaptureFixture) -> None:
    port = await http_server(nursery, 500, b"upstream exploded\n")
    line = await unavailable_line(openai(port), caplog)
    assert line == (f"backend openai unavailable: health check failed: "
                    f"GET http://127.0.0.1:{port}/health answered HTTP 500: upstream exploded")


async def test_health_without_route_names_the_models_url(nursery: trio.Nursery) -> None:
    """A server without ``/health`` (404) is asked ``/models``: that is the URL named."""
    port = await http_server(nursery, 404)
    backend = openai(port)
    assert not await backend.health()
    assert backend.health_error == f"GET http://127.0.0.1:{port}/v1/models answered HTTP 404"
    await backend.close()


async def test_health_names_the_timeout(nursery: trio.Nursery,
                                        caplog: pytest.LogCaptureFixture) -> None:
    port = await http_server(nursery, None)  # takes the request, never answers
    line = await unavailable_line(openai(port, control_timeout=0.2), caplog)
    assert line == (f"backend openai unavailable: health check failed: "
                    f"GET http://127.0.0.1:{port}/health: timed out after 0.2 s")


async def test_ollama_health_names_url_and_cause(nursery: trio.Nursery) -> None:
    refused = OllamaBackend(BackendSettings(type="ollama", url=f"http://127.0.0.1:{closed_port()}"))
    assert not await refused.health()
    assert refused.health_error == f"GET {refused.url}/api/version: connection refused"
    port = await http_server(nursery, 503)
    busy = OllamaBackend(BackendSettings(type="ollama", url=f"http://127.0.0.1:{port}"))
    assert not await busy.health()
    assert busy.health_error == f"GET http://127.0.0.1:{port}/api/version answered HTTP 503"
    for backend in (refused, busy):
        await backend.close()


async def test_llamacpp_health_says_the_child_is_not_running() -> None:
    backend = LlamaCppBackend(BackendSettings(type="llamacpp", options={"model": "x.gguf"}))
    assert not await backend.health()
    assert backend.health_error == "the llama.cpp child is not running"
    await backend.close()


async def test_health_error_clears_once_healthy(nursery: trio.Nursery) -> None:
    port = await http_server(nursery, 200, b"ok")
    backend = openai(port)
    backend.health_error = "stale"
    assert await backend.health()
    assert backend.health_error == ""
    await backend.close()


# ------------------------------------------------------------ bug 7: refused join token

async def gateway_with_token(nursery: trio.Nursery, token: str = TOKEN) -> Network:
    tunnel = TunnelSettings(heartbeat_interval=0.5)
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0", join_token=token), tunnel)
    urls = await nursery.start(gateway.serve)
    return Network(nursery, gateway, urls[0], tunnel)


def count_dials(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the (virtual) time of every dial the dialer makes."""
    times: list[float] = []
    real: Callable[..., Awaitable[Any]] = dialer_module.connect

    async def counting(*args: Any, **kwargs: Any) -> Any:
        times.append(trio.current_time())
        return await real(*args, **kwargs)

    monkeypatch.setattr(dialer_module, "connect", counting)
    return times


async def test_refused_join_token_logged_at_error_and_retried_slowly(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    network = await gateway_with_token(nursery)
    dials = count_dials(monkeypatch)
    caplog.set_level(logging.INFO, logger="tooti")
    node = await network.add_node([simulated()], node_id="wrong-token", wait=False,
                                  join_token=WRONG, reconnect_initial=0.25,
                                  reconnect_max=10.0)
    started = trio.current_time()
    await trio.sleep(3 * REFUSED_RETRY + 1)  # virtual time: the autojump clock
    # Normal backoff (0.25 s doubling to 10 s) would have dialed about 20 times by now.
    assert 3 <= len(dials) <= 4, dials
    gaps = [b - a for a, b in pairwise(dials)]
    assert all(gap >= REFUSED_RETRY for gap in gaps), gaps
    assert dials[0] - started < 1
    errors = [r for r in caplog.records if r.name == "tooti.node" and r.levelno == logging.ERROR]
    assert len(errors) == len(dials)
    message = errors[0].getMessage()
    assert message.startswith(f"gateway {network.tunnel_url} refused the join token "
                              "(HTTP 403: invalid token): check --join-token / "
                              "TOOTI_JOIN_TOKEN, or mint one with `tooti join-tokens create`")
    assert WRONG not in caplog.text and TOKEN not in caplog.text
    link = node.dialer.links[network.tunnel_url]
    assert link.state == "backoff" and "refused the join token" in link.last_error
    assert "wrong-token" not in network.gateway.registry.peers
    network.gateway.shutdown()


async def test_other_failures_keep_the_normal_backoff(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock,
) -> None:
    """A gateway that is not there (connection refused) is re-dialed at the normal
    backoff, and logged at INFO: it may come back any moment."""
    dials = count_dials(monkeypatch)
    caplog.set_level(logging.INFO, logger="tooti")
    url = f"ws://127.0.0.1:{closed_port()}/tooti/v1/tunnel"
    settings = NodeSettings(peers=[url], reconnect_initial=0.25, reconnect_max=10.0)
    node = Node(settings, TunnelSettings(), [simulated()], "no-gateway")
    with trio.move_on_after(REFUSED_RETRY):
        await node.run()
    assert len(dials) >= 8, dials  # 0.25, 0.5, 1, 2, 4, 8, 10, 10, … (jitter: x0.5 to 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_right_token_connects(nursery: trio.Nursery) -> None:
    """The token check refuses only the wrong token (guards the test above)."""
    guarded = await gateway_with_token(nursery)
    await guarded.add_node([simulated()], node_id="right-token", join_token=TOKEN)
    assert "right-token" in guarded.gateway.registry.peers
    guarded.gateway.shutdown()


def test_which_refusals_are_about_the_token() -> None:
    url = "ws://gw.example:8080/tooti/v1/tunnel"
    unauthorized = token_refusal(HandshakeFailed(401, "bad token"), url)
    assert unauthorized is not None and unauthorized.startswith(
        f"gateway {url} refused the join token (HTTP 401: bad token): check --join-token")
    loopback_only = token_refusal(HandshakeFailed(
        403, "no token configured: only loopback clients are accepted"), url)
    assert loopback_only is not None and "has no join token" in loopback_only
    # Not about the token: the normal backoff.
    assert token_refusal(HandshakeFailed(403, "gateway is shutting down"), url) is None
    assert token_refusal(HandshakeFailed(429, "too many tunnel handshakes"), url) is None
    assert token_refusal(HandshakeFailed(0, "no HTTP response to the upgrade"), url) is None
    assert token_refusal(ConnectionRefusedError(111, "Connection refused"), url) is None
