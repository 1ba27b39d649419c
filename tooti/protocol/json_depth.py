"""How deep a JSON body nests, checked once for every reader of request bodies (the
gateway's OpenAI validation and every API front).

Python code (the gateway's, a plugin's, a front's) recurses on nested values, so a body
nesting arrays and objects deeper than the gateway's ``max_json_depth`` is refused
before anything walks it. A body is decoded once into plain values, checked here, then
converted to its schema (``msgspec.convert``): never decoded twice.
"""

from __future__ import annotations

from typing import Any

MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects in a request body, unless the gateway's
``max_json_depth`` says otherwise."""


def nesting_within(raw: bytes, value: Any, limit: int) -> bool:
    """True if ``value`` (decoded from ``raw``) nests arrays and objects at most
    ``limit`` deep (``[]`` is 1 deep). Walked level by level, without recursion, and
    only when ``raw`` holds more than ``limit`` brackets: an ordinary body costs two
    byte counts."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return True
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return False
        level = [v for item in level for v in (item.values() if isinstance(item, dict)
                                                 else item) if isinstance(v, dict | list)]
    return True
