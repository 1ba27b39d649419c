"""HTTP plumbing shared by the backends that talk to a model server over HTTP.

Both the ``openai`` and the ``ollama`` backends need the same things from
httpx: a few client *shards* used round-robin (one shared client slows down
under many concurrent streams, encode/httpx#3215), identity encoding (chunks
are forwarded or parsed as they arrive), a connect timeout but no read timeout
(the gateway owns deadlines), bounded reads of error bodies, a mapping of
transport failures to :class:`~tooti.backends.base.BackendError`, and a
shielded close of an upstream response so that the server sees the disconnect
even when we are being cancelled. Health checks say why they failed in words
(:func:`failure_cause`, :func:`status_cause`): the operator reads them in the log.

Both backends reach their server through an :class:`Upstream`: requests go through
the lean pooled client of :mod:`tooti.backends.http_client` instead of httpx (about a
tenth of its CPU per request), unless an environment proxy applies to the URL
(:func:`env_proxy`: httpx honours ``HTTPS_PROXY`` and the like, the lean client does
not); the answer is an :class:`Answer` either way. httpx stays for the small control
calls (``/models``, ``/health``, ``/api/tags``).

Common options read by :meth:`HttpOptions.from_settings` (all optional):
``headers`` (a table of strings), ``clients`` (httpx shards, default 4),
``connect_timeout`` (seconds, default 10), ``max_connections`` (per shard,
default 1000), ``control_timeout`` (seconds for small discovery/health calls,
default 10). ``settings.api_key``, when set, is sent as a bearer token.
"""

from __future__ import annotations

import errno
import itertools
import os
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio

from tooti.backends.base import BackendError
from tooti.backends.http_client import (
    ConnectFailed,
    HttpClient,
    HttpError,
    ProtocolFailed,
    read_limited,
)
from tooti.settings import BackendSettings

MAX_ERROR_BODY = 65_536
"""Bytes of an upstream error body read to build the error message."""
CLOSE_TIMEOUT = 5.0
"""Seconds allowed to close an upstream response (shielded from cancellation)."""


def retryable(status: int) -> bool:
    """Whether an upstream ``status`` means another node may succeed (5xx, 408, 429)."""
    return status >= 500 or status in (408, 429)


@dataclass(frozen=True)
class HttpOptions:
    """Connection settings of an HTTP backend (see the module docstring)."""

    headers: dict[str, str] = field(default_factory=dict)
    clients: int = 4
    connect_timeout: float = 10.0
    max_connections: int = 1000
    control_timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: BackendSettings, backend: str) -> HttpOptions:
        """Read the common options of ``settings``; ``backend`` names the type in errors.

        The headers always ask for identity encoding and carry the API key as
        a bearer token when one is configured; ``options.headers`` come last
        and may override either.
        """
        opts = settings.options
        extra = opts.get("headers") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{backend} backend: options.headers must be a table of strings")
        # Identity encoding: chunks are used as they arrive, they must not be compressed.
        headers: dict[str, str] = {"Accept-Encoding": "identity"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        headers.update({str(k): str(v) for k, v in extra.items()})
        return cls(
            headers=headers,
            clients=max(1, int(opts.get("clients", 4))),
            connect_timeout=float(opts.get("connect_timeout", 10.0)),
            max_connections=int(opts.get("max_connections", 1000)),
            control_timeout=float(opts.get("control_timeout", 10.0)),
        )


class ClientShards:
    """A few ``httpx.AsyncClient`` instances handed out round-robin, created lazily."""

    def __init__(self, options: HttpOptions) -> None:
        """Remember the options; no client exists until :meth:`next` is called."""
        self.options = options
        self._clients: list[httpx.AsyncClient] = []
        self._turn = itertools.count()

    def next(self) -> httpx.AsyncClient:
        """Return the next client shard, creating the shards on first use."""
        if not self._clients:
            o = self.options
            timeout = httpx.Timeout(None, connect=o.connect_timeout)
            limits = httpx.Limits(
                max_connections=o.max_connections,
                max_keepalive_connections=min(o.max_connections, 100),
                keepalive_expiry=30.0,
            )
            self._clients = [
                httpx.AsyncClient(timeout=timeout, limits=limits, headers=o.headers)
                for _ in range(o.clients)
            ]
        return self._clients[next(self._turn) % len(self._clients)]

    async def aclose(self) -> None:
        """Close every shard (shielded from cancellation); :meth:`next` may reopen."""
        clients, self._clients = self._clients, []
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()


def pooled_client(options: HttpOptions) -> HttpClient:
    """The :class:`~tooti.backends.http_client.HttpClient` for a backend's requests:
    its headers, connect timeout and connection bound (one pool: the shards that
    work around httpx's slowdown are not needed)."""
    return HttpClient(headers=options.headers, connect_timeout=options.connect_timeout,
                      max_connections=options.max_connections,
                      max_idle=min(options.max_connections, 100))


_PROXY_VARIABLES = ("all_proxy", "http_proxy", "https_proxy")


def env_proxy(url: str) -> bool:
    """True when an environment proxy (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``,
    not excluded by ``NO_PROXY``) applies to ``url``: httpx honours it (``trust_env``),
    the lean client does not, so such a backend's requests keep going through httpx."""
    names = {name.lower() for name in os.environ}
    if not any(variable in names for variable in _PROXY_VARIABLES):
        return False
    scheme, _, rest = url.partition("://")
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(scheme.lower()) or proxies.get("all")):
        return False
    host = rest.split("/", 1)[0]
    return not urllib.request.proxy_bypass_environment(host, proxies)  # type: ignore[attr-defined]


class Answer(Protocol):
    """An upstream answer whose head has arrived (the lean client's
    :class:`~tooti.backends.http_client.Response`, or :class:`HttpxAnswer`): iterate for
    the raw body chunks (:class:`~tooti.backends.http_client.HttpError` when the body
    breaks), then :meth:`aclose`."""

    status: int

    def header(self, name: bytes, default: str = "") -> str:
        """The first value of header ``name`` (lower-case)."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The raw (de-chunked, never decompressed) body chunks."""
        ...

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body; a transport failure ends it early."""
        ...

    async def aclose(self) -> None:
        """Release the connection (closed if the body was not read to its end)."""
        ...


class HttpxAnswer:
    """An httpx streamed response behind the :class:`Answer` interface (the requests
    of a backend an environment proxy applies to)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._body = response.aiter_raw()
        self.status = response.status_code

    def header(self, name: bytes, default: str = "") -> str:
        return self._response.headers.get(name.decode("latin-1"), default)

    def __aiter__(self) -> HttpxAnswer:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._body.__anext__()
        except httpx.HTTPError as exc:
            raise ProtocolFailed(f"the answer's body broke: {exc!r}") from exc

    async def read(self, limit: int) -> bytes:
        return await read_limited(self, limit)

    async def aclose(self) -> None:
        try:
            await aclose_iterator(self._body)
        finally:
            await self._response.aclose()


class Upstream:
    """How an HTTP backend reaches its server: :meth:`post` through the lean pooled
    client (:func:`pooled_client`), or through httpx when an environment proxy applies
    to the URL (:func:`env_proxy`, checked once per URL); :meth:`control` is an httpx
    client for the small discovery and health calls."""

    def __init__(self, options: HttpOptions) -> None:
        """No connection is made until a request needs one."""
        self.pool = pooled_client(options)
        self.shards = ClientShards(options)
        self._proxied: dict[str, bool] = {}

    def control(self) -> httpx.AsyncClient:
        """The next httpx client shard (for ``/models``, ``/health`` and the like)."""
        return self.shards.next()

    def proxied(self, url: str) -> bool:
        """Whether an environment proxy applies to ``url`` (remembered per URL)."""
        proxied = self._proxied.get(url)
        if proxied is None:
            if len(self._proxied) > 64:
                self._proxied.clear()
            proxied = self._proxied[url] = env_proxy(url)
        return proxied

    async def post(self, url: str, body: bytes | AsyncIterator[bytes],
                   content_type: str) -> Answer:
        """POST ``body`` to ``url``; the answer once its head has arrived. Raises
        :class:`~tooti.backends.http_client.ConnectFailed` or
        :class:`~tooti.backends.http_client.ProtocolFailed` (:func:`transport_error`
        maps both); the caller must :meth:`Answer.aclose` the answer."""
        if not self.proxied(url):
            return await self.pool.send("POST", url, body, content_type)
        client = self.shards.next()
        request = client.build_request("POST", url, content=body,
                                       headers={"Content-Type": content_type})
        try:
            return HttpxAnswer(await client.send(request, stream=True))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConnectFailed(repr(exc)) from exc
        except httpx.HTTPError as exc:
            raise ProtocolFailed(repr(exc)) from exc

    async def aclose(self) -> None:
        """Close the pool's idle connections and the httpx clients (both reopen)."""
        await self.pool.aclose()
        await self.shards.aclose()


async def close_answer(answer: Answer, *iterators: AsyncIterator[Any]) -> None:
    """Close ``iterators`` (readers of the body) then ``answer``, even while cancelled
    (shielded, at most :data:`CLOSE_TIMEOUT`): an unfinished answer's connection is
    closed, which is how the server learns that the client went away."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        try:
            for iterator in iterators:
                await aclose_iterator(iterator)
        finally:
            await answer.aclose()


def transport_error(exc: httpx.HTTPError | HttpError, url: str) -> BackendError:
    """The :class:`BackendError` for a request that failed before any response head.

    A connection that cannot be made is ``backend_unavailable``; anything else
    (the server dropped the connection, a protocol error) is ``backend_error``.
    Both are 502 and retryable.
    """
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | ConnectFailed):
        return BackendError(
            f"cannot reach {url}: {exc!r}", status=502, code="backend_unavailable"
        )
    return BackendError(
        f"upstream request to {url} failed: {exc!r}", status=502, code="backend_error"
    )


def failure_cause(exc: httpx.HTTPError, timeout: float | None = None) -> str:
    """Why a request failed before its answer, for a log line: ``connection refused``,
    ``timed out after 10 s`` (``timeout``: the seconds allowed, if known), ``cannot
    connect: <the OS's reason>`` or the error itself."""
    if isinstance(exc, httpx.TimeoutException):
        what = "connect timeout" if isinstance(exc, httpx.ConnectTimeout) else "timed out"
        return f"{what} after {timeout:g} s" if timeout is not None else what
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None:  # httpcore wraps the OSError (and trio may group it)
            if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
                return "connection refused"
            if isinstance(cause, BaseExceptionGroup):
                cause = next(iter(cause.exceptions), None)
                continue
            cause = cause.__cause__ or cause.__context__
        text = str(exc)
        if "refused" in text.lower():
            return "connection refused"
        return f"cannot connect: {text or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def status_cause(response: httpx.Response) -> str:
    """An unexpected answer in words: ``HTTP 500`` and the start of its body (one line,
    at most 200 characters), e.g. ``HTTP 503: {"error": "Loading model"}``."""
    try:
        text = " ".join(response.text.split())
    except (httpx.HTTPError, UnicodeDecodeError):  # a body not (yet) read: status only
        text = ""
    if len(text) > 200:
        text = text[:200] + "…"
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")


def stream_error(exc: BaseException) -> BackendError:
    """The :class:`BackendError` raised from a chunk iterator when the body breaks."""
    return BackendError(
        f"upstream stream broke: {exc!r}", status=502, code="backend_stream_error"
    )


async def read_bounded(response: httpx.Response, limit: int = MAX_ERROR_BODY) -> bytes:
    """Read at most ``limit`` bytes of an (error) response body; transport errors end it."""
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
        await aclose_iterator(body)
    return bytes(data[:limit])


async def aclose_iterator(iterator: Any) -> None:
    """Close an async generator/iterator that may not have been exhausted."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def close_response(response: httpx.Response, *iterators: AsyncIterator[Any]) -> None:
    """Close ``iterators`` (body readers) then ``response``, even while cancelled.

    Closing an unfinished response drops the connection, which is how the
    server learns that the client went away. Shielded (with
    :data:`CLOSE_TIMEOUT`) so that it also happens during cancellation.
    """
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        try:
            for iterator in iterators:
                await aclose_iterator(iterator)
        finally:
            await response.aclose()
