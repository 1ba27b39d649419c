"""The contract with hypercorn's internals that ``tooti.mesh.hypercorn_compat`` relies on.

Every name the compat module imports from hypercorn, the signature of every constructor
and function it calls, and every attribute it reads are pinned here, with the version:
on a new hypercorn release these tests fail, and say what to look at before moving the
pin in ``pyproject.toml`` (see "The hypercorn seam" in ``docs/architecture.md``).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import socket
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from tooti.mesh import hypercorn_compat
from tooti.mesh.http_server import replay
from tooti.mesh.hypercorn_compat import (
    PINNED_VERSION,
    ConnectionServer,
    ErrorObjectH11,
    ServedApp,
    bound_address,
)

ROOT = Path(__file__).resolve().parent.parent
EMPTY = inspect.Parameter.empty
TCP_SERVER_SHA256 = "5593e38b83d3e22e6576f2cdf8faa5a265d8e0e3bd28d97bdacfbe8d781a90b3"
"""hypercorn 0.18.0's ``hypercorn.trio.tcp_server.TCPServer``, whose loop
:class:`ConnectionServer` follows: a release that changes it may carry a fix to port."""


def parameters(function: Callable[..., Any]) -> list[tuple[str, str, object]]:
    """What a call depends on: each parameter's name, kind and default."""
    return [(p.name, p.kind.name, p.default)
            for p in inspect.signature(function).parameters.values()]


def positional(*names: str, defaults: dict[str, object] | None = None
               ) -> list[tuple[str, str, object]]:
    defaults = defaults or {}
    return [(name, "POSITIONAL_OR_KEYWORD", defaults.get(name, EMPTY)) for name in names]


def test_installed_hypercorn_is_the_pinned_one() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("hypercorn")]
    assert pins == [f"hypercorn=={PINNED_VERSION}"], \
        "pyproject.toml must pin hypercorn exactly, to the release hypercorn_compat is for"
    assert metadata.version("hypercorn") == PINNED_VERSION


def test_only_the_compat_module_imports_hypercorn_internals() -> None:
    public = {("hypercorn.config", "Config"), ("hypercorn.trio", "serve")}
    outside: list[str] = []
    for path in sorted((ROOT / "tooti").rglob("*.py")):
        if path.name == "hypercorn_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hypercorn"):
                outside += [f"{path.relative_to(ROOT)}: {node.module}.{alias.name}"
                            for alias in node.names if (node.module, alias.name) not in public]
            elif isinstance(node, ast.Import):
                outside += [f"{path.relative_to(ROOT)}: {alias.name}" for alias in node.names
                            if alias.name.startswith("hypercorn")]
    assert outside == []


def test_constructor_signatures() -> None:
    protocol_args = ("self", "app", "config", "context", "task_group")
    assert parameters(ProtocolWrapper.__init__) == positional(
        *protocol_args, "state", "ssl", "client", "server", "send", "alpn_protocol",
        defaults={"alpn_protocol": None})
    assert parameters(H11Protocol.__init__) == positional(
        *protocol_args, "connection_state", "ssl", "client", "server", "send")
    assert parameters(TaskGroup.__init__) == positional("self")
    assert parameters(TrioSingleTask.__init__) == positional("self")
    assert parameters(WorkerContext.__init__) == positional("self", "max_requests")
    assert [(f.name, f.default) for f in fields(RawData)] == [("data", MISSING),
                                                              ("address", None)]
    assert [f.name for f in fields(Closed)] == []
    assert [f.name for f in fields(Updated)] == ["idle"]
    assert issubclass(RawData, Event) and issubclass(Closed, Event)
    assert issubclass(Updated, Event)


def test_function_and_method_signatures() -> None:
    assert parameters(wrap_app) == positional("app", "wsgi_max_body_size", "mode")
    assert parameters(parse_socket_addr) == positional("family", "address")
    assert parameters(repr_socket_addr) == positional("family", "address")
    assert parameters(ProtocolWrapper.initiate) == positional("self")
    assert parameters(ProtocolWrapper.handle) == positional("self", "event")
    assert parameters(H11Protocol._send_error_response) == positional("self", "status_code")
    assert parameters(TrioSingleTask.restart) == positional("self", "task_group", "action")
    assert parameters(TrioSingleTask.stop) == positional("self")
    assert parameters(Config.response_headers) == positional("self", "protocol")
    for method in ("set", "wait", "is_set"):
        assert parameters(getattr(WorkerContext.event_class, method)) == positional("self")


def test_types() -> None:
    assert LifespanState == dict[str, Any]
    assert ConnectionState.__supertype__ == dict[str, Any]  # type: ignore[attr-defined]


def test_what_hypercorn_does_with_them() -> None:
    """The behaviour the compat module builds on, beyond signatures: H11Protocol answers
    what h11 refuses through ``_send_error_response``, and a ProtocolWrapper serves
    HTTP/1.1 with an H11Protocol whose attributes the compat module reads."""
    assert "_send_error_response" in inspect.getsource(H11Protocol._handle_events)
    context = WorkerContext(None)
    assert context.max_requests is None and not context.terminated.is_set()
    config = Config()
    for name in ("h11_max_incomplete_size", "wsgi_max_body_size", "keep_alive_timeout",
                 "read_timeout", "graceful_timeout", "backlog"):
        assert hasattr(config, name), name

    async def send(event: Event) -> None:
        pass

    state = ConnectionState({})
    wrapper = ProtocolWrapper(ServedApp.of(_app, config).app, config, context, TaskGroup(),
                              state, False, None, None, send, "http/1.1")
    assert type(wrapper.protocol) is H11Protocol
    assert wrapper.state is state
    protocol = wrapper.protocol
    assert protocol.send is send and protocol.config is config
    assert isinstance(protocol.connection, h11.Connection)


def test_the_loop_connection_server_follows_is_unchanged() -> None:
    source = inspect.getsource(TCPServer)
    assert hashlib.sha256(source.encode()).hexdigest() == TCP_SERVER_SHA256, \
        "hypercorn's TCPServer changed: port what changed to ConnectionServer if it applies"


async def _app(scope: dict[str, Any], receive: Callable[..., Any],
               send: Callable[..., Any]) -> None:
    """An ASGI app answering ``ok`` with the scheme it was served over."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"4")]})
    await send({"type": "http.response.body", "body": scope["scheme"].encode()})


async def _serve_once(request: bytes) -> bytes:
    """Serve one connection (a socket pair) with ``request`` already read off it, the
    way the listener hands it over: all the client got until the server closed."""
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX)
    served = ServedApp.of(_app, Config())
    answer = b""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ConnectionServer(served, replay(trio.SocketStream(ours),
                                                               request)).run)
            client = trio.SocketStream(theirs)
            while chunk := await client.receive_some():
                answer += chunk
            await client.aclose()
            await served.terminate()  # hypercorn's idle task ends at shutdown
    return answer


@pytest.mark.trio
async def test_a_plain_connection_is_served_over_http_1_1() -> None:
    answer = await _serve_once(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nhttp")


@pytest.mark.trio
async def test_what_h11_refuses_is_answered_with_the_error_object() -> None:
    answer = await _serve_once(b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in answer
    assert b'"error"' in answer


def test_compat_names() -> None:
    assert hypercorn_compat.MAX_RECV == 2**16
    assert issubclass(ErrorObjectH11, H11Protocol)
    listening = socket.socket()
    try:
        listening.bind(("127.0.0.1", 0))
        assert bound_address(listening) == f"127.0.0.1:{listening.getsockname()[1]}"
    finally:
        listening.close()
