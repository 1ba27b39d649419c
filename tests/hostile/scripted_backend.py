"""A node backend whose answers are scripted by the test: what a lying upstream (or a
node operator who controls the bytes) sends, over a real node and a real tunnel.

Each answer is a status, a content type and a list of body chunks built from the
request, so a test can report any usage, send a header value no HTTP server would
accept, or answer with a hundred megabytes, while everything between the backend and
the client stays the production code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from tooti.backends.base import BackendResponse
from tooti.backends.simulated import SimulatedBackend
from tooti.settings import BackendSettings

MODEL = "liar"


@dataclass
class Answer:
    """One scripted answer."""

    status: int = 200
    content_type: str = "application/json"
    chunks: Iterable[bytes] = ()
    hold: trio.Event | None = None
    """When set, the body's last chunk waits for this event (answers held in flight)."""


Script = Callable[[dict[str, Any]], Answer]


def chat_json(usage: dict[str, Any], content: str = "hello") -> bytes:
    """A non-streamed chat completion carrying ``usage`` exactly as given."""
    return msgspec.json.encode({
        "id": "chatcmpl-scripted", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": usage,
    })


def chat_sse(usage: dict[str, Any], words: int = 3) -> list[bytes]:
    """A streamed chat completion of ``words`` tokens whose last event carries ``usage``."""
    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + msgspec.json.encode(obj) + b"\n\n"

    base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "model": MODEL}
    events = [event({**base, "choices": [{"index": 0, "delta": {"content": f" w{i}"},
                                          "finish_reason": None}]}) for i in range(words)]
    events.append(event({**base, "choices": [{"index": 0, "delta": {},
                                              "finish_reason": "stop"}]}))
    events.append(event({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


class ScriptedBackend(SimulatedBackend):
    """Advertises :data:`MODEL` like a simulated backend; answers with ``script``."""

    def __init__(self, script: Script, **settings: Any) -> None:
        super().__init__(BackendSettings(type="simulated", models=[MODEL], **settings))
        self.script = script
        self.opened = 0

    @asynccontextmanager
    async def open(self, endpoint: str, body: bytes, request: dict[str, Any]
                   ) -> AsyncIterator[BackendResponse]:
        """Answer with the script's status, content type and chunks."""
        self.opened += 1
        answer = self.script(request)

        async def chunks() -> AsyncIterator[bytes]:
            parts = list(answer.chunks)
            for index, chunk in enumerate(parts):
                if answer.hold is not None and index == len(parts) - 1:
                    await answer.hold.wait()
                yield chunk

        yield BackendResponse(answer.status, answer.content_type, chunks())
