"""Backend for any OpenAI-compatible HTTP server (vLLM, llama.cpp server, ...).

:class:`OpenAIBackend` (config type ``openai``) forwards a request's exact
bytes to ``{url}/{endpoint}`` and hands the upstream's raw body bytes back, so
every field and every streaming detail passes through untouched. Only when
``options.rename`` maps the request's model to an upstream name is the body
re-encoded (with that one field changed).

Settings: ``url`` is the base URL ending in ``/v1``; ``api_key`` is sent as a
bearer token; ``models`` (if set) are advertised instead of those discovered
with ``GET {url}/models``.

``endpoints`` (a ``[[node.backends]]`` key) names the endpoints its models serve, e.g.
``endpoints = ["chat/completions", "embeddings", "rerank"]``; without it, the usual
three (chat/completions, completions, embeddings). It is configured rather than
discovered: an OpenAI-compatible server has no way to say which routes it serves (a
probe of ``/rerank`` or ``/audio/speech`` would need a valid request for each, and a 404
cannot be told from a model that is merely not loaded). Every endpoint, the pass-through
ones too, is forwarded to ``{url}/{endpoint}``; an ``audio/transcriptions`` upload is
streamed to the server as it arrives (:meth:`OpenAIBackend.open_upload`, the model name
not renamed inside the form).

Options:

``rename``
    ``{public name: upstream name}``; the upstream's own names are advertised
    under their public names.
``headers``
    Extra request headers (a table of strings).
``clients``
    Number of ``httpx.AsyncClient`` shards used round-robin (default 4) for the
    control calls and for requests through an environment proxy: one httpx client
    shared by many concurrent streams slows down (encode/httpx#3215).
``connect_timeout``
    Seconds to establish a connection, TLS handshake included (default 10).
    Streams have no read timeout: the gateway owns deadlines.
``max_connections``
    Most requests in flight to the server at once (default 1000; more wait for
    one to finish); at most 100 idle keep-alive connections are kept, 30 s each.
``control_timeout``
    Overall timeout of the small ``/models`` and ``/health`` calls (default 10).

Requests go through the lean pooled HTTP/1.1 client of
:mod:`tooti.backends.http_client` (llhttp-parsed, keep-alive, ``https`` with a
verifying context; about a tenth of httpx's CPU per request), except when an
environment proxy (``HTTPS_PROXY`` and the like) applies to the URL: then httpx,
which honours it. The small ``/models`` and ``/health`` calls use httpx.

Errors before the response head become :class:`~tooti.backends.base.BackendError`:
status 502 with code ``backend_unavailable`` when the server cannot be reached,
the upstream status (and OpenAI error message/code, if any) for an upstream
answer >= 400. A transport failure in the middle of the body is raised from
the chunk iterator as a ``BackendError`` with code ``backend_stream_error``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import msgspec
import trio

from tooti.backends.base import (
    BackendError,
    BackendResponse,
    ModelInfo,
    Upload,
    check_endpoint,
    configured_endpoints,
)
from tooti.backends.http_client import HttpError, Response
from tooti.backends.http_util import (
    CLOSE_TIMEOUT,
    MAX_ERROR_BODY,
    Answer,
    HttpOptions,
    Upstream,
    close_answer,
    failure_cause,
    retryable,
    status_cause,
    stream_error,
    transport_error,
)
from tooti.protocol.numbers import is_int
from tooti.protocol.schemas import ENDPOINTS
from tooti.settings import BackendSettings

__all__ = ["CLOSE_TIMEOUT", "MAX_ERROR_BODY", "OpenAIBackend", "upstream_error"]

log = logging.getLogger("tooti.backends.openai")


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
    return BackendError(message, status=status, code=code, retryable=retryable(status))


class _Body:
    """The answer's body as raw chunks, with transport errors as BackendError."""

    __slots__ = ("_answer",)

    def __init__(self, answer: Answer) -> None:
        self._answer = answer.__aiter__()

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._answer.__anext__()
        except HttpError as exc:
            raise stream_error(exc) from exc


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
        # Identity encoding (chunks are forwarded raw), bearer key, extra headers.
        http = HttpOptions.from_settings(settings, "openai")
        self.headers: dict[str, str] = http.headers
        self.connect_timeout = http.connect_timeout
        self.max_connections = http.max_connections
        self.control_timeout = http.control_timeout
        self.upstream = Upstream(http)
        """The lean pooled client for requests, httpx for the control calls."""
        self.health_error = ""
        """Why the last :meth:`health` check failed (URL and cause); ``""`` if it passed."""
        self.endpoints = configured_endpoints(settings, ENDPOINTS)
        """What this backend's models are announced to serve (``endpoints``)."""

    # -- lifecycle ------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        """Return the next httpx client shard (round-robin) for a control call."""
        return self.upstream.control()

    async def start(self) -> None:
        """Create the HTTP clients; the server need not be up yet."""
        self._client()

    async def run(self) -> None:
        """Nothing to supervise: sleep until cancelled."""
        await trio.sleep_forever()

    async def close(self) -> None:
        """Close every HTTP client (the pool's idle connections, httpx's clients)."""
        await self.upstream.aclose()

    # -- discovery and health -------------------------------------------

    def _public_names(self, upstream: str) -> list[str]:
        names = [public for public, target in self.rename.items() if target == upstream]
        return names or [upstream]

    def _info(self, model_id: str, context_length: int | None = None) -> ModelInfo:
        s = self.settings
        return ModelInfo(
            id=model_id,
            endpoints=self.endpoints,
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
                ctx = ctx if is_int(ctx) else None
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
        answers 503 while loading) is unhealthy. When unhealthy, :attr:`health_error`
        names the URL asked and the cause (connection refused, the status, a timeout)."""
        client = self._client()
        url = f"{self.root_url}/health"
        try:
            response = await client.get(url, timeout=self.control_timeout)
            if response.status_code in (404, 405):
                url = f"{self.url}/models"
                response = await client.get(url, timeout=self.control_timeout)
        except httpx.HTTPError as exc:
            self.health_error = f"GET {url}: {failure_cause(exc, self.control_timeout)}"
            return False
        if response.status_code != 200:
            self.health_error = f"GET {url} answered {status_cause(response)}"
            return False
        self.health_error = ""
        return True

    # -- requests -------------------------------------------------------

    def open(self, endpoint: str, body: bytes, request: dict[str, Any]
             ) -> AbstractAsyncContextManager[BackendResponse]:
        """Forward one request; see :meth:`tooti.backends.base.Backend.open`."""
        model = request.get("model") if isinstance(request, dict) else None
        if isinstance(model, str) and model in self.rename:
            body = msgspec.json.encode({**request, "model": self.rename[model]})
        return self._post(endpoint, body, "application/json")

    def open_upload(self, endpoint: str, upload: Upload
                    ) -> AbstractAsyncContextManager[BackendResponse]:
        """Stream a multipart upload to ``{url}/{endpoint}`` as its pieces arrive (see
        :class:`~tooti.backends.base.Upload`); the answer as :meth:`open`'s."""
        return self._post(endpoint, upload.chunks, upload.content_type)

    @asynccontextmanager
    async def _post(self, endpoint: str, content: bytes | AsyncIterator[bytes],
                    content_type: str) -> AsyncIterator[BackendResponse]:
        """POST ``content`` (bytes, or pieces sent as they come) to ``{url}/{endpoint}``
        and relay the answer as it streams in; an error status is raised as
        :func:`upstream_error`; an endpoint this backend does not serve is refused."""
        check_endpoint(endpoint)
        try:
            answer = await self.upstream.post(f"{self.url}/{endpoint}", content,
                                              content_type)
        except HttpError as exc:
            raise transport_error(exc, self.url) from exc
        try:
            if answer.status >= 400:
                raise upstream_error(answer.status, await answer.read(MAX_ERROR_BODY))
            chunks: AsyncIterator[bytes]
            if isinstance(answer, Response):  # raises BackendError itself: no wrapper
                answer.body_error = stream_error
                chunks = answer
            else:
                chunks = _Body(answer)
            yield BackendResponse(
                status=answer.status,
                content_type=answer.header(b"content-type", "application/json"),
                chunks=chunks,
            )
        finally:
            # An unfinished answer's connection is closed (not pooled), which is how
            # the server learns that the client went away (also while cancelled: the
            # lean client's close is synchronous, httpx's is shielded).
            if isinstance(answer, Response):
                answer.close()
            else:
                await close_answer(answer)
