"""Backend for any OpenAI-compatible HTTP server (vLLM, llama.cpp server, ...).

:class:`OpenAIBackend` (config type ``openai``) forwards a request's exact
bytes to ``{url}/{endpoint}`` and hands the upstream's raw body bytes back, so
every field and every streaming detail passes through untouched. Only when
``options.rename`` maps the request's model to an upstream name is the body
re-encoded (with that one field changed).

Settings: ``url`` is the base URL ending in ``/v1``; ``api_key`` is sent as a
bearer token; ``models`` (if set) are advertised instead of those discovered
with ``GET {url}/models``.

Options:

``rename``
    ``{public name: upstream name}``; the upstream's own names are advertised
    under their public names.
``headers``
    Extra request headers (a table of strings).
``clients``
    Number of ``httpx.AsyncClient`` shards used round-robin (default 4): one
    client shared by many concurrent streams slows down (encode/httpx#3215).
``connect_timeout``
    Seconds to establish a connection (default 10). Streams have no read
    timeout: the gateway owns deadlines.
``max_connections``
    Connection limit per client shard (default 1000).
``control_timeout``
    Overall timeout of the small ``/models`` and ``/health`` calls (default 10).

Errors before the response head become :class:`~tooti.backends.base.BackendError`:
status 502 with code ``backend_unavailable`` when the server cannot be reached,
the upstream status (and OpenAI error message/code, if any) for an upstream
answer >= 400. A transport failure in the middle of the body is raised from
the chunk iterator as a ``BackendError`` with code ``backend_stream_error``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import trio

from tooti.backends.base import ENDPOINTS, BackendError, BackendResponse, ModelInfo
from tooti.settings import BackendSettings

log = logging.getLogger("tooti.backends.openai")

MAX_ERROR_BODY = 65_536
"""Bytes of an upstream error body read to build the error message."""
CLOSE_TIMEOUT = 5.0
"""Seconds allowed to close an upstream response (shielded from cancellation)."""


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def upstream_error(status: int, body: bytes) -> BackendError:
    """Build the :class:`BackendError` for an upstream answer with ``status`` >= 400.

    The message and code come from an OpenAI error object
    (``{"error": {"message": ..., "code": ..., "type": ...}}``) or a
    ``{"detail": ...}``/``{"message": ...}`` body when present, else from the
    start of the body text.
    """
    message = ""
    code = "upstream_error"
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            if isinstance(error.get("code"), str) and error["code"]:
                code = error["code"]
            elif isinstance(error.get("type"), str) and error["type"]:
                code = error["type"]
        elif isinstance(error, str):
            message = error
        elif isinstance(data.get("detail"), str):
            message = data["detail"]
        elif isinstance(data.get("message"), str):
            message = data["message"]
    if not message:
        text = body[:500].decode("utf-8", "replace").strip()
        message = f"upstream answered {status}" + (f": {text}" if text else "")
    return BackendError(message, status=status, code=code, retryable=_retryable(status))


class _Chunks:
    """The upstream body as raw chunks, with transport errors as BackendError."""

    def __init__(self, response: httpx.Response) -> None:
        self._iter = response.aiter_raw()

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._iter.__anext__()
        except httpx.HTTPError as exc:
            raise BackendError(
                f"upstream stream broke: {exc!r}", status=502, code="backend_stream_error"
            ) from exc

    async def aclose(self) -> None:
        """Finalize httpx's body generator (an unfinished one would be left to the GC)."""
        await _aclose(self._iter)


class OpenAIBackend:
    """A backend forwarding requests to an OpenAI-compatible server (type ``openai``).

    See the module docstring for settings and options. :attr:`url` may be
    changed at run time (the llama.cpp backend re-points it after restarting
    its child server).
    """

    type_name = "openai"

    def __init__(self, settings: BackendSettings) -> None:
        """Read the settings; HTTP clients are created lazily."""
        if not settings.url:
            raise ValueError("the openai backend needs a url (e.g. http://127.0.0.1:8000/v1)")
        opts = settings.options
        self.settings = settings
        self.url = settings.url.rstrip("/")
        rename = opts.get("rename") or {}
        if not isinstance(rename, dict):
            raise ValueError("openai backend: options.rename must be a table of names")
        self.rename: dict[str, str] = {str(k): str(v) for k, v in rename.items()}
        extra = opts.get("headers") or {}
        if not isinstance(extra, dict):
            raise ValueError("openai backend: options.headers must be a table of strings")
        # Identity encoding: chunks are forwarded raw, so they must not be compressed.
        self.headers: dict[str, str] = {"Accept-Encoding": "identity"}
        if settings.api_key:
            self.headers["Authorization"] = f"Bearer {settings.api_key}"
        self.headers.update({str(k): str(v) for k, v in extra.items()})
        self.n_clients = max(1, int(opts.get("clients", 4)))
        self.connect_timeout = float(opts.get("connect_timeout", 10.0))
        self.max_connections = int(opts.get("max_connections", 1000))
        self.control_timeout = float(opts.get("control_timeout", 10.0))
        self._clients: list[httpx.AsyncClient] = []
        self._turn = itertools.count()

    # -- lifecycle ------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        """Return the next client shard (round-robin), creating the shards once."""
        if not self._clients:
            timeout = httpx.Timeout(None, connect=self.connect_timeout)
            limits = httpx.Limits(
                max_connections=self.max_connections,
                max_keepalive_connections=min(self.max_connections, 100),
                keepalive_expiry=30.0,
            )
            self._clients = [
                httpx.AsyncClient(timeout=timeout, limits=limits, headers=self.headers)
                for _ in range(self.n_clients)
            ]
        return self._clients[next(self._turn) % len(self._clients)]

    async def start(self) -> None:
        """Create the HTTP clients; the server need not be up yet."""
        self._client()

    async def run(self) -> None:
        """Nothing to supervise: sleep until cancelled."""
        await trio.sleep_forever()

    async def close(self) -> None:
        """Close every HTTP client."""
        clients, self._clients = self._clients, []
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()

    # -- discovery and health -------------------------------------------

    def _public_names(self, upstream: str) -> list[str]:
        names = [public for public, target in self.rename.items() if target == upstream]
        return names or [upstream]

    def _info(self, model_id: str, context_length: int | None = None) -> ModelInfo:
        s = self.settings
        return ModelInfo(
            id=model_id,
            context_length=context_length,
            max_concurrency=s.max_concurrency,
            price_input=s.price_input,
            price_output=s.price_output,
        )

    async def models(self) -> list[ModelInfo]:
        """Return ``settings.models``, or discover them with ``GET {url}/models``.

        Raises :class:`BackendError` when discovery fails (server down, bad
        answer), so the caller can keep its previous list.
        """
        if self.settings.models:
            return [self._info(name) for name in self.settings.models]
        try:
            response = await self._client().get(
                f"{self.url}/models", timeout=self.control_timeout
            )
        except httpx.HTTPError as exc:
            raise BackendError(
                f"cannot list models at {self.url}: {exc!r}", code="backend_unavailable"
            ) from exc
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.content[:MAX_ERROR_BODY])
        try:
            entries = msgspec.json.decode(response.content)["data"]
            found: list[ModelInfo] = []
            for entry in entries:
                meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
                ctx = entry.get("max_model_len") or meta.get("n_ctx")
                ctx = ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None
                found.extend(self._info(name, ctx) for name in self._public_names(entry["id"]))
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"bad model list from {self.url}/models", code="backend_error"
            ) from exc
        return found

    @property
    def root_url(self) -> str:
        """The server root: :attr:`url` without its trailing ``/v1``."""
        return self.url.removesuffix("/v1")

    async def health(self) -> bool:
        """True if ``{root}/health`` answers 200; a server without that route (404 or
        405) is healthy when ``{url}/models`` succeeds. Any other status (llama.cpp
        answers 503 while loading) is unhealthy."""
        client = self._client()
        try:
            response = await client.get(f"{self.root_url}/health", timeout=self.control_timeout)
            if response.status_code not in (404, 405):
                return response.status_code == 200
            response = await client.get(f"{self.url}/models", timeout=self.control_timeout)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    # -- requests -------------------------------------------------------

    @asynccontextmanager
    async def open(
        self, endpoint: str, body: bytes, request: dict[str, Any]
    ) -> AsyncIterator[BackendResponse]:
        """Forward one request; see :meth:`tooti.backends.base.Backend.open`."""
        if endpoint not in ENDPOINTS:
            raise BackendError(
                f"unknown endpoint {endpoint!r}", status=404, code="not_found", retryable=False
            )
        model = request.get("model") if isinstance(request, dict) else None
        if isinstance(model, str) and model in self.rename:
            body = msgspec.json.encode({**request, "model": self.rename[model]})
        client = self._client()
        upstream = client.build_request(
            "POST", f"{self.url}/{endpoint}", content=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            response = await client.send(upstream, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise BackendError(
                f"cannot reach {self.url}: {exc!r}", status=502, code="backend_unavailable"
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendError(
                f"upstream request to {self.url} failed: {exc!r}", status=502,
                code="backend_error",
            ) from exc
        chunks = _Chunks(response)
        try:
            if response.status_code >= 400:
                raise upstream_error(response.status_code, await _read_bounded(response))
            yield BackendResponse(
                status=response.status_code,
                content_type=response.headers.get("content-type", "application/json"),
                chunks=chunks,
            )
        finally:
            # Closing an unfinished response drops the connection, which is how
            # the server learns that the client went away. Shielded so that it
            # also happens when we are being cancelled.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await chunks.aclose()
                await response.aclose()


async def _read_bounded(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
    """Read at most ``limit`` bytes of an (error) response body."""
    data = bytearray()
    body = response.aiter_bytes()
    try:
        async for chunk in body:
            data += chunk
            if len(data) >= limit:
                break
    except httpx.HTTPError:
        pass
    finally:
        await _aclose(body)
    return bytes(data[:limit])


async def _aclose(iterator: AsyncIterator[bytes]) -> None:
    """Close an async generator that may not have been exhausted."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
