"""What every API front shares: the :class:`Front` interface the gateway mounts, the
translated request, the stream translator's shape, and the one helper for each idea the
three dialects have in common.

A front turns a client's request body into a :class:`ChatRequest` (or raises
:class:`~tooti.errors.APIError`, which the front renders in its own dialect's error shape),
and the node's chat-completions answer back: one JSON document for a non-streamed request,
or a :class:`StreamTranslator` fed the stream's chunks one by one (each already decoded from
its SSE ``data:`` line; the ``[DONE]`` line is :meth:`StreamTranslator.finish`).

Rules every front follows (``docs/api.md`` states them for clients):

- **Bodies** are decoded once (:func:`decode_body`), refused past the gateway's
  ``max_json_depth`` (:func:`tooti.protocol.json_depth.nesting_within`, the check the
  OpenAI routes use), then converted to the dialect's schema (:func:`convert`).
- **Params** in a 400 are spelled as the gateway's OpenAI validation spells them:
  ``messages[0].content``, ``tools[2].name`` (:func:`param_of`).
- **Images** are one helper (:func:`image_url`, :func:`base64_image`): only ``http``,
  ``https`` and ``data:`` URLs reach a node (no ``file:``, ``ftp:``, ...); base64 data is
  checked by its alphabet and length, and only its first bytes are decoded (to read
  the image type); at most :data:`MAX_IMAGE_BYTES` of base64 per image.
- **Node answers are not trusted**: a non-object answer is a 502; a chunk that is not
  an object is skipped; a chunk that is an error object (``{"error": ...}`` without
  ``choices``) ends the stream with the dialect's error, as a node error (502)
  (:func:`node_error`). Tool calls are accumulated by :mod:`tooti.fronts.tool_calls`.
- **The common chunk is read typed**: a chunk whose only news is choice 0's text
  (:func:`text_delta`, a msgspec Struct decoded straight from the ``data:`` bytes) goes
  to :meth:`StreamTranslator.feed_text`, which answers the very bytes :meth:`~StreamTranslator.feed`
  gives for it; any other chunk (usage, a finish, tool calls, reasoning, refusals,
  logprobs, errors, junk) takes the general path.
- **Events are spliced, not rebuilt**: a stream encodes each kind of per-token event
  once, with :data:`SLOT` standing for what changes, cuts it with :func:`template`, and
  then writes each event as the constant pieces around the JSON of its values (the same
  bytes as encoding the whole event).
- **Ids** are made by :func:`new_id` (``<prefix>_`` and 32 hex digits).
- ``request.model`` is the model id to route; ``context["model"]`` is the name the
  client sent, which answers echo.
"""

from __future__ import annotations

import binascii
import re
import secrets
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from tooti.errors import APIError
from tooti.protocol.json_depth import MAX_JSON_DEPTH, nesting_within
from tooti.protocol.numbers import is_int
from tooti.protocol.usage import MAX_TOKENS

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TOKENS",
    "SLOT",
    "ChatRequest",
    "Front",
    "StreamTranslator",
    "base64_image",
    "convert",
    "count",
    "decode_body",
    "image_url",
    "new_id",
    "node_error",
    "param_of",
    "reasoning_of",
    "set_stream",
    "template",
    "text_delta",
    "validation_error",
]

MAX_IMAGE_BYTES = 32 * 1024 * 1024
"""Largest base64 text of one image (and largest ``data:`` URL)."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A dialect's request, translated for the nodes."""

    body: dict[str, Any]
    """The OpenAI chat-completions body to send (``model``, ``messages``, ``stream`` and,
    when streaming, ``stream_options: {"include_usage": true}``, ...)."""
    model: str
    """The model id to route (the body's ``model``)."""
    stream: bool
    """Whether the client asked for a stream."""
    context: dict[str, Any] = field(default_factory=dict)
    """What the answer's translation needs from the request (dialect-specific; every
    front sets ``model``, the name the client sent, and ``request_id``)."""


class StreamTranslator(Protocol):
    """Turns one chat-completions stream into one stream of the dialect's events."""

    content_type: str
    """The media type of the dialect's stream (``text/event-stream``,
    ``application/x-ndjson``)."""

    def start(self) -> bytes:
        """Bytes to send before the first chunk (may be empty)."""

    def feed(self, chunk: Any) -> bytes:
        """The dialect's bytes for one decoded chat-completions chunk (may be empty; a
        chunk that is not an object is skipped)."""

    def feed_text(self, text: str) -> bytes:
        """The same bytes as :meth:`feed` for a chunk whose only news is choice 0's
        ``text`` (possibly empty; :func:`text_delta` read it)."""

    def finish(self) -> bytes:
        """The dialect's closing bytes once the upstream stream ended normally."""

    def fail(self, error: APIError) -> bytes:
        """The dialect's bytes reporting ``error`` mid-stream, ending the stream."""


class Front(Protocol):
    """One API dialect, as the gateway mounts it: every front is called the same way.

    The mounting step decodes nothing itself: it hands the body to :meth:`parse`, sends
    ``request.body`` down the one proxy path (routing on ``request.model``), and answers
    with :meth:`answer` (``media_type``) or a :meth:`stream` translator
    (``stream_media_type``); any :class:`~tooti.errors.APIError` is :meth:`error_body`
    with ``error.status`` and ``error.headers``, in ``media_type``."""

    @property
    def media_type(self) -> str:
        """The media type of a whole answer and of an error body."""

    @property
    def stream_media_type(self) -> str:
        """The media type of a streamed answer."""

    def parse(self, raw: bytes, *, max_depth: int = MAX_JSON_DEPTH,
              request_id: str | None = None) -> ChatRequest:
        """The client's body as a chat-completions request; raises APIError (400)."""

    def answer(self, request: ChatRequest, completion: Any) -> bytes:
        """The node's whole (decoded) answer as the dialect's body; raises APIError
        (502) when the node's answer is not an object."""

    def stream(self, request: ChatRequest) -> StreamTranslator:
        """A translator for the node's stream of chunks."""

    def error_body(self, error: APIError, request_id: str | None = None) -> bytes:
        """``error`` in the dialect's error shape."""


# -- bodies ---------------------------------------------------------------------------

_decoder = msgspec.json.Decoder()


def _too_deep(limit: int) -> APIError:
    return APIError(400, f"request body nests arrays and objects deeper than {limit} levels",
                    code="invalid_json")


def decode_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """``raw`` decoded once: a JSON object nesting at most ``max_depth`` deep, else
    APIError(400, ``invalid_json`` / ``invalid_type``)."""
    try:
        value = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {_why_not_json(raw, exc)}",
                       code="invalid_json") from None
    except RecursionError:  # deeper than the decoder goes, far beyond any limit
        raise _too_deep(max_depth) from None
    if not nesting_within(raw, value, max_depth):
        raise _too_deep(max_depth)
    if not isinstance(value, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_type")
    return value


def _why_not_json(raw: bytes, exc: msgspec.DecodeError) -> str:
    """msgspec's reason, except where it misleads: a string escaping half a UTF-16
    surrogate pair (``"\\ud800"``), which it calls truncated input."""
    reason = str(exc)
    if "truncated" in reason and _LONE_SURROGATE.search(raw):
        return "a string escapes half a UTF-16 surrogate pair (\\ud800-\\udfff alone)"
    return reason


_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def decode_as(raw: bytes, kind: type[Any], max_depth: int,
              refuse: Callable[[msgspec.ValidationError], APIError]
              ) -> tuple[dict[str, Any], Any]:
    """``raw`` decoded once (:func:`decode_body`) and converted to the Struct ``kind``:
    the decoded object and the Struct; msgspec's refusal is raised as ``refuse`` words
    it in the front's dialect."""
    value = decode_body(raw, max_depth)
    try:
        return value, msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise refuse(exc) from None


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")


def param_of(path: str, prefix: str = "") -> str | None:
    """msgspec's path (``$.messages[0].content``) as the param a 400 names
    (``messages[0].content``), under ``prefix`` (``input[3]``); a dict's key is not
    named (``$.metadata[...]`` is ``metadata``)."""
    param = (prefix + path.removeprefix("$").split("[...]")[0]).lstrip(".")
    return param or None


def validation_error(exc: msgspec.ValidationError, prefix: str = "") -> tuple[
        str, str | None, bool]:
    """msgspec's refusal as ``(what, param, missing)``: its text without the path, the
    param (a missing field named in it), and whether a required field is missing."""
    match = _AT.match(str(exc))
    what = match["what"] if match else str(exc)
    param = param_of((match["path"] or "") if match else "", prefix)
    missing = _MISSING.match(what)
    if missing:
        return what, f"{param}.{missing['name']}" if param else missing["name"], True
    return what, param, False


def set_stream(chat: dict[str, Any], stream: bool) -> None:
    """The chat body's ``stream``, and, when streaming, ``stream_options.include_usage``
    (a translated stream's last event carries the usage, which only the node's usage
    chunk gives)."""
    chat["stream"] = stream
    if stream:
        chat["stream_options"] = {"include_usage": True}


def put_given(target: dict[str, Any], **values: Any) -> dict[str, Any]:
    """Set in ``target`` each of ``values`` the client gave (not None), in order; returns
    ``target``. A field left out stays the node's default."""
    for name, value in values.items():
        if value is not None:
            target[name] = value
    return target


def chat_tool(name: str, *, description: str | None = None, parameters: Any = None,
              strict: bool | None = None) -> dict[str, Any]:
    """A function tool in chat completions' shape (members not given left out): what
    every dialect's tool definition becomes."""
    return {"type": "function", "function": put_given(
        {"name": name}, description=description, parameters=parameters, strict=strict)}


def convert(value: Any, kind: type[Any]) -> Any:
    """``value`` (decoded by :func:`decode_body`) as the Struct ``kind``; raises
    msgspec.ValidationError for the front to word."""
    return msgspec.convert(value, kind)


# -- what nodes send -------------------------------------------------------------------


def count(value: Any) -> int:
    """A token count a node reported: a non-negative integer (not a boolean), else 0."""
    return value if is_int(value) and value >= 0 else 0


def reasoning_of(message: Any) -> str:
    """A node message's (or delta's) reasoning text: ``reasoning_content`` (llama.cpp,
    vLLM, DeepSeek) or ``reasoning`` (newer vLLM, OpenRouter); ``""`` when none."""
    if not isinstance(message, dict):
        return ""
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def first_choice(choices: Any) -> dict[str, Any] | None:
    """The choice a front answers from a node's ``choices``: the first object with
    ``index`` 0 (absent counts as 0); another index is not the client's answer."""
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return None


def node_error(chunk: dict[str, Any]) -> APIError | None:
    """The error a stream chunk reports (an OpenAI error object, or an error string,
    under ``error`` and with no ``choices``, as some servers send mid-stream) as a node
    error (502, ``bad_gateway``); None for any other chunk."""
    error = chunk.get("error")
    if error is None or chunk.get("choices"):
        return None
    message = error.get("message") if isinstance(error, dict) else error
    return APIError(502, message if isinstance(message, str) and message
                    else "the node reported an error mid-stream", code="bad_gateway")


class _TextDelta(msgspec.Struct, gc=False):
    """A delta carrying text only: any other news (typed ``None`` here) refuses it."""

    content: str | None = None
    reasoning_content: None = None
    reasoning: None = None
    refusal: None = None
    tool_calls: None = None


class _TextChoice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _TextDelta | None = None
    finish_reason: None = None
    logprobs: None = None


class _TextChunk(msgspec.Struct, gc=False):
    """The chunk of a streamed token, as nodes send nearly every chunk: one choice
    (index 0) whose delta holds only ``content`` (and ``role``), no usage, no error.
    Fields the fronts do not read (``id``, ``created``, ``role``, ...) are not decoded.
    (``gc=False``: these hold no cycles, so the collector need not track them.)"""

    choices: list[_TextChoice]
    usage: None = None
    error: None = None


_text_chunk = msgspec.json.Decoder(_TextChunk)


def text_delta(data: bytes) -> str | None:
    """The text of a chunk's JSON ``data`` when the chunk is a plain text delta
    (see :class:`_TextChunk`; ``text`` is ``""`` for a null or missing content), else
    None: the chunk takes the general path (json-decoded, :meth:`StreamTranslator.feed`).
    One typed decode, no dicts."""
    try:
        chunk = _text_chunk.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    choices = chunk.choices
    if len(choices) != 1 or choices[0].index != 0:
        return None
    delta = choices[0].delta
    return (delta.content or "") if delta is not None else ""


SLOT = f"\0slot-{secrets.token_hex(8)}\0"
"""A value :func:`template` cuts an encoded event at (unguessable: no client's text can
hold it)."""
_SLOT_JSON = msgspec.json.encode(SLOT)


def template(encoded: bytes, slots: int = 1) -> tuple[bytes, ...]:
    """``encoded`` (an event or a line whose JSON holds ``slots`` values that are
    :data:`SLOT`) cut at those values: the ``slots + 1`` constant pieces to write each
    value's JSON between. Made once per stream (or per content block), so each event
    costs one encode of its changing values, not of the whole event."""
    pieces = tuple(encoded.split(_SLOT_JSON))
    if len(pieces) != slots + 1:
        raise ValueError(f"expected {slots} slots in the template, found {len(pieces) - 1}")
    return pieces


def new_id(prefix: str) -> str:
    """A fresh id: ``<prefix>_`` and 32 hex digits (``msg_…``, ``toolu_…``, ``resp_…``,
    ``call_…``)."""
    return f"{prefix}_{secrets.token_hex(16)}"


# -- images ---------------------------------------------------------------------------

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_URL_SCHEMES = ("http://", "https://")


def _bad_image(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def base64_image(data: str, param: str | None) -> str | None:
    """The image type (``image/png``, ...) base64 image ``data`` shows, None when its
    first bytes are of no known type; checked cheaply: at most :data:`MAX_IMAGE_BYTES`,
    the base64 alphabet and a length that is a multiple of 4 (one regex pass, no
    decoding), then only the first 24 characters decoded to read the type. Raises
    APIError(400) naming ``param`` for data that is not base64."""
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad_image(f"the image is larger than {MAX_IMAGE_BYTES} bytes of base64", param)
    encoded = data.encode("ascii", "replace")
    if not data or len(encoded) % 4 or _BASE64.fullmatch(encoded) is None:
        raise _bad_image("the image is not valid base64", param)
    try:
        head = b64decode(encoded[:24], validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image("the image is not valid base64", param) from None
    mime = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    return mime


def image_url(url: str, param: str | None) -> str:
    """An image URL a node may be given: ``http(s)://…``, or a ``data:<type>;base64,``
    URL whose data :func:`base64_image` accepts (returned as it came).
    Any other scheme (``file:``, ``ftp:``, ...) is refused: a node must not read its own
    disk or a network the client chose for it. Raises APIError(400) naming ``param``."""
    lowered = url[:8].lower()
    if lowered.startswith(_URL_SCHEMES):
        if len(url) > MAX_IMAGE_BYTES:
            raise _bad_image("the image URL is too long", param)
        return url
    if lowered.startswith("data:"):
        head, comma, data = url.partition(",")
        if not comma or not head.lower().endswith(";base64"):
            raise _bad_image("a data: image URL must be base64 (data:image/png;base64,...)",
                             param)
        base64_image(data, param)
        return url
    raise _bad_image("an image URL must be http(s):// or a data: URL", param)
