"""Header values that reach a client from a node, made safe before they reach ``send``.

Only one header of a node's RESPONSE is passed on: ``content-type``. It is parsed and
rebuilt from its parts (a media type from :data:`SAFE_MEDIA_TYPES` and a ``charset``),
so no byte the node chose reaches the client's response head unchecked; a media type
outside that set becomes ``text/plain`` (an upstream's HTML error page is shown as
text, never rendered). A value that does not parse (CR, LF or another control
character, non-ASCII, over :data:`MAX_LENGTH`) is a :class:`BadHeader`: the node broke
the protocol. Values the gateway adds from peer-chosen names (``x-tooti-node``,
``x-tooti-model``) are percent-encoded when they hold anything but visible ASCII.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from urllib.parse import quote

MAX_LENGTH = 256
"""Longest ``content-type`` accepted from a node."""
DEFAULT_TYPE = b"application/json"
SAFE_MEDIA_TYPES = frozenset({
    "application/json", "text/event-stream", "text/plain", "application/x-ndjson",
    "application/problem+json",
})
"""Media types passed on as the node sent them; any other becomes ``text/plain``."""

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA = re.compile(rf"({_TOKEN})/({_TOKEN})")
_PARAM = re.compile(rf"({_TOKEN})=(?:({_TOKEN})|\"([^\"\\]*)\")")
_VISIBLE = re.compile(r"[\x20-\x7e]*")
_VCHARS = re.compile(r"[\x21-\x7e]+")


class BadHeader(ValueError):
    """A node's header value that may not reach a client (the message says why)."""


def content_type(headers: dict[str, Any]) -> bytes:
    """The ``content-type`` to send for a node's RESPONSE ``headers``."""
    value = headers.get("content-type")
    if value is None:
        return DEFAULT_TYPE
    if not isinstance(value, str):
        raise BadHeader(f"content-type is a {type(value).__name__}, not a string")
    return _content_type(value)


@lru_cache(maxsize=256)
def _content_type(value: str) -> bytes:
    if len(value) > MAX_LENGTH or not _VISIBLE.fullmatch(value):
        raise BadHeader(f"content-type {value[:64]!r} is not a visible-ASCII value of at "
                        f"most {MAX_LENGTH} characters")
    media, *params = (part.strip() for part in value.split(";"))
    if not _MEDIA.fullmatch(media):
        raise BadHeader(f"content-type {value[:64]!r} has no type/subtype")
    media = media.lower()
    if media not in SAFE_MEDIA_TYPES:
        return b"text/plain; charset=utf-8"
    for param in params:
        match = _PARAM.fullmatch(param)
        if param and match is None:
            raise BadHeader(f"content-type {value[:64]!r} has a malformed parameter")
        if match and match.group(1).lower() == "charset":
            charset = (match.group(2) or match.group(3) or "").lower()
            if re.fullmatch(_TOKEN, charset):
                return f"{media}; charset={charset}".encode()
    return media.encode()


@lru_cache(maxsize=4096)
def header_value(text: str) -> bytes:
    """``text`` as a header value: unchanged if visible ASCII without spaces, else
    percent-encoded."""
    if _VCHARS.fullmatch(text) and len(text) <= MAX_LENGTH:
        return text.encode()
    return quote(text[:MAX_LENGTH], safe="".join(chr(c) for c in range(0x21, 0x7f)
                                                 if chr(c) != "%")).encode()
