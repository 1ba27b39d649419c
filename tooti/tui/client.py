"""The gateway's admin events stream, read with httpx on asyncio, reconnecting.

:class:`EventsClient` opens ``GET /admin/v1/events`` once and yields its messages
(the snapshot, then deltas); :func:`follow` keeps doing that forever, with
backoff between attempts, reporting each change of connection state. A rejected
admin key is not an error to crash on: it is reported and retried slowly (the
key may be fixed on the gateway side meanwhile).

No Textual here: the TUI runs :func:`follow` as one of its workers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx

from tooti.backoff import Backoff
from tooti.protocol.sse import SSEDecoder

EVENTS_PATH = "/admin/v1/events"
DEFAULT_GATEWAY = "http://127.0.0.1:8080"
READ_TIMEOUT = 45.0
"""Seconds without a byte (the gateway sends a keepalive every 15) before the stream
counts as dead."""
AUTH_RETRY = 30.0
"""Seconds between attempts while the admin key is refused."""


class AuthError(Exception):
    """The gateway refused the admin key (401) or answers on loopback only (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class GatewayError(Exception):
    """The events endpoint answered something other than a stream."""


class StreamDropped(Exception):
    """The gateway ended the stream with a ``dropped`` event (we fell behind)."""


def reconnect_backoff() -> Backoff:
    """Delays between reconnection attempts: 0.5 s doubling to 10 s, each 20 % longer or
    shorter at random."""
    return Backoff(0.5, 10.0, jitter=(0.8, 1.2))


@dataclass(frozen=True)
class Status:
    """The connection's state, for display.

    ``state`` is ``connecting``, ``live``, ``reconnecting`` or ``unauthorized``.
    """

    state: str
    message: str = ""
    retry_in: float | None = None
    attempt: int = 0


def normalize_gateway(url: str) -> str:
    """``host:port`` or a URL → an ``http(s)://`` base URL without a trailing slash."""
    url = url.strip() or DEFAULT_GATEWAY
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


async def parse_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events from a stream of bytes: ``(event, data)`` pairs.

    Comments (``: keepalive``) are skipped; multi-line data is joined with newlines
    (:class:`~tooti.protocol.sse.SSEDecoder`); an event left unfinished when the stream
    ends is still yielded.
    """
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.events(chunk):
            yield event.event, event.data
    last = decoder.close()
    if last is not None:
        yield last.event, last.data


def _error_message(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return f"{error['message']} ({error.get('code') or 'error'})"
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or "no detail"


class EventsClient:
    """One gateway's events stream, opened on demand."""

    def __init__(self, gateway: str, admin_key: str = "", *, read_timeout: float = READ_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.gateway = normalize_gateway(gateway)
        self.admin_key = admin_key
        headers = {"accept": "text/event-stream"}
        if admin_key:
            headers["authorization"] = f"Bearer {admin_key}"
        self._http = httpx.AsyncClient(
            base_url=self.gateway, headers=headers, transport=transport,
            timeout=httpx.Timeout(10.0, read=read_timeout),
        )

    async def aclose(self) -> None:
        """Close the underlying connection pool."""
        await self._http.aclose()

    async def messages(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Open the stream and yield ``(kind, data)``: ``snapshot`` first, then each
        delta event. Returns when the gateway ends the stream.

        Raises :class:`AuthError` for a refused key, :class:`StreamDropped` when the
        gateway dropped us for falling behind, :class:`GatewayError` for any other
        answer, and httpx errors when the connection fails.
        """
        async with self._http.stream("GET", EVENTS_PATH) as response:
            if response.status_code in (401, 403):
                raise AuthError(response.status_code, _error_message(await response.aread()))
            if response.status_code != 200:
                detail = _error_message(await response.aread())
                raise GatewayError(f"{EVENTS_PATH} answered {response.status_code}: {detail}")
            async for kind, data in parse_sse(response.aiter_bytes()):
                try:
                    payload = json.loads(data)
                except ValueError as exc:
                    raise GatewayError(f"bad event data: {exc}") from None
                if kind == "dropped":
                    raise StreamDropped(str(payload.get("reason") or "dropped"))
                if isinstance(payload, dict):
                    yield kind, payload


def describe_failure(exc: BaseException, gateway: str) -> str:
    """A short, human reason for a failed or lost connection."""
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {gateway}"
    if isinstance(exc, httpx.TimeoutException):
        return "the gateway stopped answering"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "connection lost"
    if isinstance(exc, StreamDropped):
        return f"dropped by the gateway ({exc})"
    return str(exc) or type(exc).__name__


def auth_message(exc: AuthError, has_key: bool) -> str:
    """What to tell the user when the gateway refuses the admin API."""
    if exc.status == 403:
        return ("the gateway has no admin key, so its admin API answers on loopback only: "
                f"run the TUI on the gateway's host, or configure an admin key [{exc.message}]")
    if has_key:
        return ("admin key rejected: check --admin-key / TOOTI_ADMIN_KEY "
                f"[{exc.message}]")
    return ("the gateway needs an admin key: pass --admin-key or set TOOTI_ADMIN_KEY "
            f"[{exc.message}]")


async def follow(
    client: EventsClient,
    on_message: Callable[[str, dict[str, Any]], None],
    on_status: Callable[[Status], None],
    backoff: Backoff | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    auth_retry: float = AUTH_RETRY,
) -> NoReturn:
    """Read ``client``'s stream forever: on every failure report a status, wait
    (``backoff``'s next delay, by default :func:`reconnect_backoff`; ``auth_retry``
    while the key is refused) and reconnect. A snapshot resets the backoff."""
    backoff = backoff or reconnect_backoff()
    backoff.reset()
    while True:
        on_status(Status("connecting", f"connecting to {client.gateway}…",
                         attempt=backoff.attempts))
        try:
            async for kind, data in client.messages():
                if kind == "snapshot":
                    backoff.reset()
                    on_status(Status("live", f"connected to {client.gateway}"))
                on_message(kind, data)
            failure = "the gateway ended the stream"
        except AuthError as exc:
            backoff.next()  # a refusal counts as an attempt, but waits auth_retry
            on_status(Status("unauthorized", auth_message(exc, bool(client.admin_key)),
                             retry_in=auth_retry, attempt=backoff.attempts))
            await sleep(auth_retry)
            continue
        except (httpx.HTTPError, GatewayError, StreamDropped) as exc:
            failure = describe_failure(exc, client.gateway)
        delay = backoff.next()
        on_status(Status("reconnecting", failure, retry_in=delay, attempt=backoff.attempts))
        await sleep(delay)
