"""The one accumulator of a node's streamed tool calls, used by every front's stream.

An OpenAI stream sends each tool call in pieces: ``delta.tool_calls`` entries carrying
an ``index``, and the call's ``id``, ``function.name`` and a piece of
``function.arguments``. Nodes differ (llama.cpp, vLLM, SGLang, proxies in front of
them), so the rules are fixed here, once:

- Calls are keyed by ``index``. **An entry without an integer index** continues the
  call streamed last (the one whose entry came most recently), unless it carries an
  ``id`` different from that call's: then it starts a new call (keyed one past the
  largest index seen). A stream that never sends indexes is thus one call per ``id``,
  and ``{"a":`` then ``1}`` are one call's arguments, not two calls.
- **The first id wins**; **the name is set once** (a node repeating the name in every
  chunk does not make ``get_weatherget_weather``). A call whose name never came is
  dropped (there is nothing to call).
- **Arguments are kept as a list of pieces** and joined once, when the call is read
  whole; an ``arguments`` sent as an object (some servers) is encoded as JSON text.
- **Bounds**: at most :data:`MAX_CALLS` calls and :data:`MAX_ARGUMENT_BYTES` bytes of
  argument text per stream. Past either, :meth:`ToolCalls.add` raises an
  :class:`~tooti.errors.APIError` (502, ``bad_gateway``): the front ends the stream with
  its dialect's error, as for any node error.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tooti.errors import APIError
from tooti.protocol.numbers import is_int

__all__ = ["MAX_ARGUMENT_BYTES", "MAX_CALLS", "ToolCall", "ToolCalls"]

MAX_CALLS = 128
"""Tool calls one streamed answer may make."""
MAX_ARGUMENT_BYTES = 4 * 1024 * 1024
"""Argument text all of one answer's tool calls may stream, counted in characters (each
at least one byte of the node's stream)."""

_encode = msgspec.json.encode


class ToolCall:
    """One call being streamed: its key, first id, name, and argument pieces."""

    __slots__ = ("id", "key", "name", "pieces", "position")

    def __init__(self, key: int, position: int) -> None:
        self.key = key
        self.position = position
        """The order in which the call first appeared."""
        self.id: str | None = None
        self.name: str | None = None
        self.pieces: list[str] = []

    @property
    def arguments(self) -> str:
        """The argument text so far, joined (call it once, when the call is whole)."""
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""


class ToolCalls:
    """One stream's tool calls (see the module's rules)."""

    __slots__ = ("_bytes", "_calls", "_last", "_made", "_next_key")

    def __init__(self) -> None:
        self._calls: dict[int, ToolCall] = {}
        self._last: ToolCall | None = None
        self._next_key = 0
        self._bytes = 0
        self._made = 0

    def __len__(self) -> int:
        return len(self._calls)

    def add(self, entry: Any) -> tuple[ToolCall, str] | None:
        """Take one ``delta.tool_calls`` entry: the call it belongs to and the argument
        piece it added (``""`` if none); None for an entry that is not an object.
        Raises APIError(502) past the bounds."""
        if not isinstance(entry, dict):
            return None
        index = entry.get("index")
        entry_id = entry.get("id")
        entry_id = entry_id if isinstance(entry_id, str) and entry_id else None
        if is_int(index):
            key = index
        elif self._last is not None and (entry_id is None or self._last.id in (None, entry_id)):
            key = self._last.key
        else:
            key = self._next_key
        call = self._calls.get(key)
        if call is None:
            if self._made >= MAX_CALLS:
                raise APIError(502, f"the node streamed more than {MAX_CALLS} tool calls",
                               code="bad_gateway")
            call = self._calls[key] = ToolCall(key, self._made)
            self._made += 1
        if key >= self._next_key:
            self._next_key = key + 1
        self._last = call
        if call.id is None and entry_id is not None:
            call.id = entry_id
        function = entry.get("function")
        function = function if isinstance(function, dict) else {}
        name = function.get("name")
        if call.name is None and isinstance(name, str) and name:
            call.name = name
        piece = function.get("arguments")
        if isinstance(piece, dict):
            piece = _encode(piece).decode()
        if not isinstance(piece, str) or not piece:
            return call, ""
        self._bytes += len(piece)
        if self._bytes > MAX_ARGUMENT_BYTES:
            raise APIError(502, f"the node streamed more than {MAX_ARGUMENT_BYTES} bytes of "
                           "tool call arguments", code="bad_gateway")
        call.pieces.append(piece)
        return call, piece

    def named(self) -> list[ToolCall]:
        """The calls that have a name, in the order they first appeared."""
        return [call for call in self._calls.values() if call.name is not None]

    def clear(self) -> None:
        """Forget the calls (they were answered); the bounds keep counting."""
        self._calls.clear()
        self._last = None
