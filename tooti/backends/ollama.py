"""Backend for an Ollama server through its native API (config type ``ollama``).

:class:`OllamaBackend` translates OpenAI-style requests to Ollama's own
endpoints (``/api/chat``, ``/api/generate``, ``/api/embed``) and their NDJSON
answers back to OpenAI objects and SSE events. The native API is used rather
than Ollama's ``/v1`` compatibility shim because the shim cannot set
``num_ctx``: Ollama would run every model with its small default context.

Settings: ``url`` is the server root (default ``http://127.0.0.1:11434``; a
trailing ``/``, ``/api`` or ``/v1`` is tolerated); ``models`` (if set)
restricts the advertised models to those names (``llama3.2`` matches the
installed ``llama3.2:latest``; names that are not installed are left out);
``api_key`` is sent as a bearer token (for a reverse proxy in front of Ollama).

Discovery: ``GET /api/tags`` lists the installed models, ``GET /api/ps`` the
loaded ones, which are advertised ``warm``. Health is ``GET /api/version``.

Options:

``num_ctx``
    Context length (tokens) sent with every chat and completion request and
    advertised as the models' ``context_length`` (default: not sent, Ollama
    uses its own default and nothing is advertised).
``keep_alive``
    Sent as ``keep_alive`` with every request (e.g. ``"30m"``, ``-1``).
``rename``
    ``{public name: Ollama name}``; Ollama names are advertised under their
    public names and answers carry the public name.
``headers``, ``clients``, ``connect_timeout``, ``max_connections``, ``control_timeout``
    HTTP settings, as for the ``openai`` backend (see :mod:`tooti.backends.http_util`):
    requests go through the lean pooled client of :mod:`tooti.backends.http_client`
    (httpx when an environment proxy applies), the small ``/api/*`` listing and
    health calls through httpx.

The translation is pure and lives beside this module, which does the HTTP:
:mod:`tooti.backends.ollama_requests` builds Ollama's request bodies (the
request mapping is documented there), :mod:`tooti.backends.ollama_answers`
turns its answers and NDJSON streams into OpenAI objects and SSE events.

Errors before the response head become :class:`~tooti.backends.base.BackendError`
with Ollama's status and ``{"error": ...}`` message (404 → ``model_not_found``;
5xx, 408 and 429 are retryable). A stream that breaks (connection lost, an
``{"error": ...}`` line, or the end of the body before ``done``) raises a
``BackendError`` with code ``backend_stream_error`` from the chunk iterator.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx
import msgspec
import trio

from tooti import clock
from tooti.backends.base import (
    BackendError,
    BackendResponse,
    ModelInfo,
    requested_model,
    usual_endpoints,
)
from tooti.backends.http_client import HttpError
from tooti.backends.http_util import (
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
from tooti.backends.ollama_answers import (
    ChatStream,
    CompletionStream,
    NdjsonLines,
    answer_base,
    chat_completion,
    check_first_item,
    decode_answer,
    embedding_list,
    stream_ended_early,
    stream_for,
    text_completion,
)
from tooti.backends.ollama_requests import (
    Defaults,
    chat_payload,
    embed_payload,
    generate_payload,
    stream_flags,
)
from tooti.protocol.numbers import is_int
from tooti.settings import BackendSettings

log = logging.getLogger("tooti.backends.ollama")

DEFAULT_URL = "http://127.0.0.1:11434"
MAX_BODY = 256 * 1024 * 1024
"""Largest non-streaming Ollama answer read (embeddings of many inputs are big)."""

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def root_url(url: str) -> str:
    """Normalise a configured URL to the server root (no ``/``, ``/api`` or ``/v1``)."""
    root = (url or DEFAULT_URL).strip().rstrip("/")
    for suffix in ("/api", "/v1"):
        if root.endswith(suffix):
            root = root[: -len(suffix)].rstrip("/")
    return root


def canonical_name(name: str) -> str:
    """Ollama's full model name: ``llama3.2`` is ``llama3.2:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def ollama_error(status: int, body: bytes) -> BackendError:
    """Build the :class:`BackendError` for an Ollama answer with ``status`` >= 400.

    Ollama answers ``{"error": "..."}``; other bodies (a proxy's page) are
    quoted. 404 gets code ``model_not_found`` (Ollama's only 404 on these
    routes), 400 ``invalid_request_error``, anything else ``upstream_error``.
    """
    message = ""
    try:
        data = _decode(body)
    except msgspec.DecodeError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, str):
            message = error
        elif isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    if not message:
        text = body[:500].decode("utf-8", "replace").strip()
        message = f"ollama answered {status}" + (f": {text}" if text else "")
    code = {404: "model_not_found", 400: "invalid_request_error"}.get(status, "upstream_error")
    return BackendError(message, status=status, code=code, retryable=retryable(status))


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty dict."""
    return value if isinstance(value, dict) else {}


async def _ndjson(answer: Answer) -> AsyncGenerator[dict[str, Any], None]:
    """Yield the JSON objects of an NDJSON body; failures raise :class:`BackendError`."""
    lines = NdjsonLines()
    body = answer.__aiter__()
    while True:
        try:
            data = await body.__anext__()
        except StopAsyncIteration:
            break
        except HttpError as exc:
            raise stream_error(exc) from exc
        for item in lines.feed(data):
            yield item
    for item in lines.end():
        yield item


async def _read_body(answer: Answer, limit: int = MAX_BODY) -> dict[str, Any]:
    """Read and decode a whole (non-streaming) JSON answer before the head is given out."""
    data = bytearray()
    try:
        async for chunk in answer:
            data += chunk
            if len(data) > limit:
                raise BackendError("ollama answer too large", status=502, code="backend_error")
    except HttpError as exc:
        raise BackendError(
            f"ollama answer broke off: {exc!r}", status=502, code="backend_error"
        ) from exc
    return decode_answer(data)


class _Once:
    """An async iterator over one byte string."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


# -- the backend -----------------------------------------------------------------


class OllamaBackend:
    """A backend serving from an Ollama server's native API (type ``ollama``).

    See the module docstring for settings, options and the request mapping.
    """

    type_name = "ollama"

    def __init__(self, settings: BackendSettings) -> None:
        """Read the settings; HTTP clients are created lazily."""
        opts = settings.options
        self.settings = settings
        self.endpoints = usual_endpoints(settings)
        """What its models are announced to serve: Ollama's API has chat, generate and
        embed, none of the pass-through endpoints (``endpoints`` may name fewer)."""
        self.url = root_url(settings.url)
        rename = opts.get("rename") or {}
        if not isinstance(rename, dict):
            raise ValueError("ollama backend: options.rename must be a table of names")
        self.rename: dict[str, str] = {str(k): str(v) for k, v in rename.items()}
        num_ctx = opts.get("num_ctx")
        if num_ctx is not None and (not is_int(num_ctx) or num_ctx < 1):
            raise ValueError("ollama backend: options.num_ctx must be a positive integer")
        keep_alive = opts.get("keep_alive")
        if keep_alive is not None and not isinstance(keep_alive, str | int | float):
            raise ValueError("ollama backend: options.keep_alive must be a duration or number")
        self.defaults = Defaults(num_ctx=num_ctx, keep_alive=keep_alive)
        self.http = HttpOptions.from_settings(settings, "ollama")
        self.upstream = Upstream(self.http)
        """The lean pooled client for requests, httpx for the control calls."""
        self.health_error = ""
        """Why the last :meth:`health` check failed (URL and cause); ``""`` if it passed."""

    # -- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Create the HTTP clients; the server need not be up yet."""
        self.upstream.control()

    async def run(self) -> None:
        """Nothing to supervise: sleep until cancelled."""
        await trio.sleep_forever()

    async def close(self) -> None:
        """Close every HTTP client."""
        await self.upstream.aclose()

    # -- discovery and health -------------------------------------------

    async def _get_json(self, path: str) -> Any:
        """GET a small JSON document from the server; failures raise BackendError."""
        url = f"{self.url}{path}"
        try:
            response = await self.upstream.control().get(url, timeout=self.http.control_timeout)
        except httpx.HTTPError as exc:
            raise BackendError(
                f"cannot reach ollama at {url}: {exc!r}", code="backend_unavailable"
            ) from exc
        if response.status_code >= 400:
            raise ollama_error(response.status_code, response.content[:MAX_ERROR_BODY])
        try:
            return _decode(response.content)
        except msgspec.DecodeError as exc:
            raise BackendError(f"bad JSON from {url}", code="backend_error") from exc

    async def _installed(self, path: str) -> dict[str, dict[str, Any]]:
        """The ``models`` of ``/api/tags`` or ``/api/ps``, by canonical name."""
        data = await self._get_json(path)
        entries = data.get("models") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise BackendError(f"bad model list from {self.url}{path}", code="backend_error")
        found: dict[str, dict[str, Any]] = {}
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            name = entry.get("name") or entry.get("model")
            if isinstance(name, str) and name:
                found[canonical_name(name)] = entry
        return found

    def _info(self, public: str, entry: dict[str, Any], warm: bool) -> ModelInfo:
        s = self.settings
        details = _dict(entry.get("details"))
        meta = {
            key: details[key]
            for key in ("family", "parameter_size", "quantization_level", "format")
            if isinstance(details.get(key), str) and details[key]
        }
        return ModelInfo(
            id=public,
            context_length=self.defaults.num_ctx,
            max_concurrency=s.max_concurrency,
            price_input=s.price_input,
            price_output=s.price_output,
            warm=warm,
            endpoints=self.endpoints,
            owned_by="ollama",
            meta=meta,
        )

    async def models(self) -> list[ModelInfo]:
        """List the installed models (restricted to ``settings.models`` if set).

        Models loaded in memory (``/api/ps``) are ``warm``. Raises
        :class:`BackendError` when ``/api/tags`` cannot be read; a failing
        ``/api/ps`` only makes every model cold.
        """
        installed = await self._installed("/api/tags")
        try:
            loaded = set(await self._installed("/api/ps"))
        except BackendError as exc:
            log.warning("ollama at %s: cannot list loaded models: %s", self.url, exc.message)
            loaded = set()
        if self.settings.models:
            wanted = [(name, self.rename.get(name, name)) for name in self.settings.models]
        else:
            wanted = []
            for name, entry in installed.items():
                upstream = str(entry.get("name") or entry.get("model"))
                publics = [p for p, target in self.rename.items()
                           if canonical_name(target) == name]
                wanted.extend((public, upstream) for public in publics or [upstream])
        found: list[ModelInfo] = []
        for public, upstream in wanted:
            key = canonical_name(upstream)
            if key not in installed:
                log.warning("ollama at %s: model %r is not installed (ollama pull %s)",
                            self.url, upstream, upstream)
                continue
            found.append(self._info(public, installed[key], key in loaded))
        return found

    async def health(self) -> bool:
        """True when ``GET /api/version`` answers 200; else :attr:`health_error` names
        the URL and the cause (connection refused, the status, a timeout)."""
        url = f"{self.url}/api/version"
        timeout = self.http.control_timeout
        try:
            response = await self.upstream.control().get(url, timeout=timeout)
        except httpx.HTTPError as exc:
            self.health_error = f"GET {url}: {failure_cause(exc, timeout)}"
            return False
        if response.status_code != 200:
            self.health_error = f"GET {url} answered {status_cause(response)}"
            return False
        self.health_error = ""
        return True

    # -- requests -------------------------------------------------------

    @asynccontextmanager
    async def open(
        self, endpoint: str, body: bytes, request: dict[str, Any]
    ) -> AsyncIterator[BackendResponse]:
        """Translate and send one request; see :meth:`tooti.backends.base.Backend.open`."""
        model = requested_model(endpoint, request)
        upstream_model = self.rename.get(model, model)
        stream, include_usage = False, False
        if endpoint == "chat/completions":
            path, payload = "/api/chat", chat_payload(request, upstream_model, self.defaults)
            stream, include_usage = stream_flags(request)
        elif endpoint == "completions":
            path, payload = "/api/generate", generate_payload(
                request, upstream_model, self.defaults)
            stream, include_usage = stream_flags(request)
        else:
            path, payload = "/api/embed", embed_payload(request, upstream_model, self.defaults)
        try:
            response = await self.upstream.post(f"{self.url}{path}", _encode(payload),
                                                "application/json")
        except HttpError as exc:
            raise transport_error(exc, self.url) from exc
        lines = _ndjson(response)
        events: AsyncGenerator[bytes, None] | None = None
        try:
            if response.status >= 400:
                raise ollama_error(response.status, await response.read(MAX_ERROR_BODY))
            base = answer_base(endpoint, model, int(clock.wall()))
            if stream:
                # The first line comes with Ollama's head; an error there is
                # still reported before ours, so the gateway may retry.
                try:
                    first = await lines.__anext__()
                except StopAsyncIteration:
                    raise BackendError("ollama sent an empty stream", status=502,
                                       code="backend_error") from None
                check_first_item(first)
                translator = stream_for(endpoint, base, include_usage)
                events = self._events(translator, first, lines)
                yield BackendResponse(200, "text/event-stream", events)
                return
            item = await _read_body(response)
            if endpoint == "embeddings":
                fmt = str(request.get("encoding_format") or "float")
                result = embedding_list(item, model, fmt)
            elif endpoint == "chat/completions":
                result = chat_completion(item, base)
            else:
                result = text_completion(item, base)
            yield BackendResponse(200, "application/json", _Once(_encode(result)))
        finally:
            # Closing an unfinished response drops the connection: Ollama sees
            # the disconnect and stops generating (shielded, see close_answer).
            readers: list[AsyncIterator[Any]] = [lines] if events is None else [events, lines]
            await close_answer(response, *readers)

    @staticmethod
    async def _events(
        translator: ChatStream | CompletionStream, first: dict[str, Any],
        lines: AsyncGenerator[dict[str, Any], None],
    ) -> AsyncGenerator[bytes, None]:
        """Translate a stream, starting with its already-read ``first`` item."""
        async with aclosing(lines):
            item: dict[str, Any] | None = first
            while item is not None:
                for event in translator.feed(item):
                    yield event
                if translator.done:
                    return
                item = await anext(lines, None)
        raise stream_ended_early()
