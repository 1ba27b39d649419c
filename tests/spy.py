"""A backend wrapper for tests that records what reaches the backend and can hold
streams after their first chunk (shared by the routing and failover tests)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from tooti.backends.base import BackendResponse
from tooti.backends.simulated import SimulatedBackend

CHAT = "/v1/chat/completions"
LIMIT = 10.0
"""Seconds any wait in these tests may take before it counts as a hang."""


def is_probe(request: dict[str, Any]) -> bool:
    """True for the gateway's cooldown probe (see ``tooti.gateway.probe.probe_body``)."""
    return request.get("messages") == [{"role": "user", "content": "ping"}]


class Spy:
    """Wraps a backend's ``open``: records every request and, with a ``gate``, holds
    each stream after its first chunk until the gate is set."""

    def __init__(self, target: SimulatedBackend, gate: trio.Event | None = None) -> None:
        self.backend = target
        self.gate = gate
        self.bodies: list[bytes] = []
        self.requests: list[dict[str, Any]] = []
        self.log: list[str] = []
        """``open N`` / ``end N`` entries in the order they happened."""
        self._changed = trio.Event()
        original = target.open

        @asynccontextmanager
        async def spy(endpoint: str, body: bytes, request: dict[str, Any]
                      ) -> AsyncIterator[BackendResponse]:
            self.bodies.append(body)
            self.requests.append(request)
            number = len(self.requests)
            self._note(f"open {number}")
            try:
                async with original(endpoint, body, request) as response:
                    if self.gate is not None:
                        response = BackendResponse(response.status, response.content_type,
                                                   self._gated(response.chunks))
                    yield response
            finally:
                self._note(f"end {number}")

        target.open = spy  # type: ignore[method-assign]

    @property
    def user_requests(self) -> list[dict[str, Any]]:
        """Requests other than the gateway's cooldown probes."""
        return [r for r in self.requests if not is_probe(r)]

    async def _gated(self, chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        first = True
        async for chunk in chunks:
            yield chunk
            if first and self.gate is not None:
                first = False
                await self.gate.wait()

    def _note(self, entry: str) -> None:
        self.log.append(entry)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until ``condition()`` holds, re-checked on every open/end."""
        with trio.fail_after(LIMIT):
            while not condition():
                await self._changed.wait()


async def read_stream(http: httpx.AsyncClient, body: dict[str, Any]
                      ) -> tuple[httpx.Response, list[str]]:
    """POST a streaming request; return the response and its ``data:`` lines."""
    async with http.stream("POST", CHAT, json={**body, "stream": True}) as response:
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    return response, lines
