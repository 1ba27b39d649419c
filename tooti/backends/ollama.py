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
    HTTP settings, as for the ``openai`` backend (see :mod:`tooti.backends.http_util`).

Request mapping (chat and completions): ``max_completion_tokens`` /
``max_tokens`` → ``options.num_predict``; ``stop`` → ``options.stop`` (a
list); ``temperature``, ``top_p``, ``seed``, ``presence_penalty``,
``frequency_penalty`` (and the non-OpenAI ``top_k``, ``min_p``,
``repeat_penalty``) → ``options``; ``response_format`` ``json_object`` →
``format: "json"``, ``json_schema`` → ``format: <schema>``. Chat messages:
array content → text parts joined with newlines, ``image_url`` data URLs →
the message's base64 ``images``; assistant ``tool_calls`` get their
``arguments`` as objects; ``tool`` messages get a ``tool_name`` found from the
earlier call's id; ``developer`` becomes ``system``. ``tools`` pass through
(dropped when ``tool_choice`` is ``"none"``). ``n`` > 1, ``echo``,
``best_of`` > 1, remote image URLs and token-array inputs are refused with 400;
``logprobs``, ``logit_bias`` and other unknown fields are ignored.

Errors before the response head become :class:`~tooti.backends.base.BackendError`
with Ollama's status and ``{"error": ...}`` message (404 → ``model_not_found``;
5xx, 408 and 429 are retryable). A stream that breaks (connection lost, an
``{"error": ...}`` line, or the end of the body before ``done``) raises a
``BackendError`` with code ``backend_stream_error`` from the chunk iterator.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import trio

from tooti.backends.base import (
    BackendError,
    BackendResponse,
    ModelInfo,
    bad_request,
    requested_model,
)
from tooti.backends.http_util import (
    MAX_ERROR_BODY,
    ClientShards,
    HttpOptions,
    aclose_iterator,
    close_response,
    read_bounded,
    retryable,
    stream_error,
    transport_error,
)
from tooti.settings import BackendSettings

log = logging.getLogger("tooti.backends.ollama")

DEFAULT_URL = "http://127.0.0.1:11434"
MAX_BODY = 256 * 1024 * 1024
"""Largest non-streaming Ollama answer read (embeddings of many inputs are big)."""
MAX_LINE = 16 * 1024 * 1024
"""Longest NDJSON line accepted from a stream."""

_encode = msgspec.json.encode
_decode = msgspec.json.decode

_FINISH_REASONS = {"stop": "stop", "length": "length"}
"""Ollama ``done_reason`` → OpenAI ``finish_reason`` (anything else is ``stop``)."""


# -- small helpers -------------------------------------------------------------


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



def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty dict."""
    return value if isinstance(value, dict) else {}


def _count(item: dict[str, Any], key: str) -> int:
    value = item.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(item: dict[str, Any]) -> dict[str, int]:
    prompt = _count(item, "prompt_eval_count")
    completion = _count(item, "eval_count")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish_reason(item: dict[str, Any]) -> str:
    return _FINISH_REASONS.get(str(item.get("done_reason") or "stop"), "stop")


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


def _raise_for_error_line(item: dict[str, Any]) -> None:
    """Raise the mid-stream ``{"error": ...}`` line of an Ollama stream."""
    error = item.get("error")
    if error is not None:
        raise BackendError(
            f"ollama stream error: {error}", status=502, code="backend_stream_error"
        )


# -- request mapping -------------------------------------------------------------


@dataclass(frozen=True)
class _Defaults:
    """Per-backend values added to every request."""

    num_ctx: int | None = None
    keep_alive: str | int | float | None = None


def _options(request: dict[str, Any], defaults: _Defaults) -> dict[str, Any]:
    """Map OpenAI sampling fields to an Ollama ``options`` object."""
    options: dict[str, Any] = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 0:
            raise bad_request(f"'{name}' must be a non-negative integer")
        options.setdefault("num_predict", value)
    stop = request.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            options["stop"] = list(stop)
    elif stop is not None:
        raise bad_request("'stop' must be a string or an array of strings")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                 "min_p", "repeat_penalty"):
        value = request.get(name)
        if value is None:
            continue
        if not _is_number(value):
            raise bad_request(f"'{name}' must be a number")
        options[name] = value
    for name in ("seed", "top_k"):
        value = request.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise bad_request(f"'{name}' must be an integer")
        options[name] = value
    if defaults.num_ctx is not None:
        options["num_ctx"] = defaults.num_ctx
    return options


def _format(request: dict[str, Any]) -> str | dict[str, Any] | None:
    """Map ``response_format`` to Ollama's ``format`` (None: free text)."""
    response_format = request.get("response_format")
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise bad_request("'response_format' must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else "json"
    raise bad_request(f"unsupported response_format type {kind!r}")


def _common(
    request: dict[str, Any], model: str, stream: bool, defaults: _Defaults
) -> dict[str, Any]:
    """The fields shared by ``/api/chat`` and ``/api/generate`` requests."""
    n = request.get("n")
    if n is not None and n != 1:
        raise bad_request("the ollama backend serves one choice per request ('n' must be 1)")
    payload: dict[str, Any] = {"model": model, "stream": stream}
    options = _options(request, defaults)
    if options:
        payload["options"] = options
    fmt = _format(request)
    if fmt is not None:
        payload["format"] = fmt
    if defaults.keep_alive is not None:
        payload["keep_alive"] = defaults.keep_alive
    return payload


def _image(part: dict[str, Any]) -> str:
    """Return the base64 payload of an ``image_url`` content part (a data URL)."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise bad_request("an image_url part needs a 'url'")
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and header.endswith(";base64")):
        raise bad_request(
            "the ollama backend accepts images only as base64 data URLs "
            "(data:image/...;base64,...)"
        )
    return data.strip()


def _content(content: Any) -> tuple[str, list[str]]:
    """Split OpenAI message content into Ollama's text and base64 images."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request("message content must be a string or an array of parts")
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal") and isinstance(part, dict):
            text = part.get(kind)
            if not isinstance(text, str):
                raise bad_request(f"a {kind} part needs a '{kind}' string")
            texts.append(text)
        elif kind == "image_url" and isinstance(part, dict):
            images.append(_image(part))
        else:
            raise bad_request(f"unsupported content part type {kind!r} for ollama")
    return "\n".join(texts), images


def _tool_call_in(call: Any) -> tuple[str | None, dict[str, Any]]:
    """Map one OpenAI assistant tool call to Ollama's; return (its id, the call)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request("a tool call needs a 'function' with a 'name'")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = _decode(arguments) if arguments.strip() else {}
        except msgspec.DecodeError:
            raise bad_request("tool call arguments must be a JSON object") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise bad_request("tool call arguments must be a JSON object")
    call_id = call.get("id")
    return (call_id if isinstance(call_id, str) else None,
            {"function": {"name": function["name"], "arguments": arguments}})


def _messages(messages: Any) -> list[dict[str, Any]]:
    """Map OpenAI chat messages to Ollama's."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required: a non-empty array")
    names: dict[str, str] = {}  # tool call id → function name, to name the tool results
    result: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(role, str):
            raise bad_request("each message must be an object with a 'role'")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"unsupported message role {role!r}")
        text, images = _content(message.get("content"))
        item: dict[str, Any] = {"role": role, "content": text}
        if images:
            item["images"] = images
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise bad_request("'tool_calls' must be an array")
            item["tool_calls"] = []
            for call in calls:
                call_id, mapped = _tool_call_in(call)
                if call_id:
                    names[call_id] = mapped["function"]["name"]
                item["tool_calls"].append(mapped)
        if role == "tool":
            name = names.get(str(message.get("tool_call_id")), message.get("name"))
            if isinstance(name, str) and name:
                item["tool_name"] = name
        result.append(item)
    return result


def _stream_flags(request: dict[str, Any]) -> tuple[bool, bool]:
    """Return (stream, include_usage) of a chat/completions request."""
    stream = request.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    options = request.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object")
    return bool(stream), bool(stream and options and options.get("include_usage"))


def chat_payload(request: dict[str, Any], model: str, defaults: _Defaults) -> dict[str, Any]:
    """Build the ``/api/chat`` body for an OpenAI chat request (``model``: Ollama's name)."""
    stream, _ = _stream_flags(request)
    payload = _common(request, model, stream, defaults)
    payload["messages"] = _messages(request.get("messages"))
    tools = request.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("'tools' must be an array")
        if tools and request.get("tool_choice") != "none":
            payload["tools"] = tools
    return payload


def generate_payload(
    request: dict[str, Any], model: str, defaults: _Defaults
) -> dict[str, Any]:
    """Build the ``/api/generate`` body for an OpenAI (legacy) completions request."""
    stream, _ = _stream_flags(request)
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request(
            "'prompt' must be a string (the ollama backend takes one text prompt, "
            "no token arrays)"
        )
    if request.get("echo"):
        raise bad_request("'echo' is not supported by the ollama backend")
    best_of = request.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad_request("'best_of' is not supported by the ollama backend")
    payload = _common(request, model, stream, defaults)
    payload["prompt"] = prompt
    suffix = request.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str):
            raise bad_request("'suffix' must be a string")
        payload["suffix"] = suffix
    return payload


def embed_payload(request: dict[str, Any], model: str, defaults: _Defaults) -> dict[str, Any]:
    """Build the ``/api/embed`` body for an OpenAI embeddings request."""
    value = request.get("input")
    valid = isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )
    if not valid:
        raise bad_request(
            "'input' must be a string or a non-empty array of strings "
            "(the ollama backend takes no token arrays)"
        )
    fmt = request.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'")
    payload: dict[str, Any] = {"model": model, "input": value}
    dimensions = request.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions) or dimensions < 1:
            raise bad_request("'dimensions' must be a positive integer")
        payload["dimensions"] = dimensions
    if defaults.keep_alive is not None:
        payload["keep_alive"] = defaults.keep_alive
    return payload


# -- response mapping ------------------------------------------------------------


def _tool_calls_out(calls: Any, first_index: int | None = None) -> list[dict[str, Any]]:
    """Map Ollama tool calls to OpenAI's (with ``index`` from ``first_index`` on)."""
    result: list[dict[str, Any]] = []
    for offset, call in enumerate(calls if isinstance(calls, list) else []):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = _encode(arguments if arguments is not None else {}).decode()
        call_id = call.get("id")
        out: dict[str, Any] = {
            "id": call_id if isinstance(call_id, str) and call_id else
            f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": str(function.get("name") or ""), "arguments": arguments},
        }
        if first_index is not None:
            out = {"index": first_index + offset, **out}
        result.append(out)
    return result


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def chat_completion(item: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Map a non-streaming ``/api/chat`` answer to a ``chat.completion`` object."""
    message = _dict(item.get("message"))
    calls = _tool_calls_out(message.get("tool_calls"))
    content = _text(message.get("content"))
    out: dict[str, Any] = {
        "role": "assistant", "content": content if content or not calls else None,
        "refusal": None,
    }
    if calls:
        out["tool_calls"] = calls
    thinking = _text(message.get("thinking"))
    if thinking:
        out["reasoning_content"] = thinking
    return {
        **base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": out, "logprobs": None,
                     "finish_reason": "tool_calls" if calls else _finish_reason(item)}],
        "usage": _usage(item),
    }


def text_completion(item: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Map a non-streaming ``/api/generate`` answer to a ``text_completion`` object."""
    return {
        **base,
        "object": "text_completion",
        "choices": [{"index": 0, "text": _text(item.get("response")), "logprobs": None,
                     "finish_reason": _finish_reason(item)}],
        "usage": _usage(item),
    }


def embedding_list(item: dict[str, Any], model: str, fmt: str) -> dict[str, Any]:
    """Map an ``/api/embed`` answer to the OpenAI embeddings list object."""
    vectors = item.get("embeddings")
    if not isinstance(vectors, list):
        raise BackendError("ollama answered no embeddings", status=502, code="backend_error")
    data = []
    for index, vector in enumerate(vectors):
        if not isinstance(vector, list) or not all(_is_number(x) for x in vector):
            raise BackendError("ollama answered a bad embedding", status=502,
                               code="backend_error")
        embedding: Any = vector
        if fmt == "base64":
            packed = struct.pack(f"<{len(vector)}f", *vector)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    prompt = _usage(item)["prompt_tokens"]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


class ChatStream:
    """Turns ``/api/chat`` NDJSON items into ``chat.completion.chunk`` SSE events."""

    def __init__(self, base: dict[str, Any], include_usage: bool) -> None:
        """``base`` holds id, created and model; usage is sent last if asked."""
        self.base = {**base, "object": "chat.completion.chunk"}
        if include_usage:
            self.base["usage"] = None
        self.include_usage = include_usage
        self.first = True
        self.tool_calls = 0

    def _event(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return _sse({**self.base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    def feed(self, item: dict[str, Any]) -> list[bytes]:
        """Return the SSE events for one NDJSON item (with ``[DONE]`` after the last)."""
        message = _dict(item.get("message"))
        delta: dict[str, Any] = {}
        if self.first:
            delta["role"] = "assistant"
        content = _text(message.get("content"))
        if content or self.first:
            delta["content"] = content
        thinking = _text(message.get("thinking"))
        if thinking:
            delta["reasoning_content"] = thinking
        calls = _tool_calls_out(message.get("tool_calls"), self.tool_calls)
        if calls:
            delta["tool_calls"] = calls
            self.tool_calls += len(calls)
        events = [self._event(delta, None)] if self.first or content or thinking or calls else []
        self.first = False
        if item.get("done"):
            reason = "tool_calls" if self.tool_calls else _finish_reason(item)
            events.append(self._event({}, reason))
            if self.include_usage:
                events.append(_sse({**self.base, "choices": [], "usage": _usage(item)}))
            events.append(b"data: [DONE]\n\n")
        return events


class CompletionStream:
    """Turns ``/api/generate`` NDJSON items into ``text_completion`` SSE events."""

    def __init__(self, base: dict[str, Any], include_usage: bool) -> None:
        """``base`` holds id, created and model; usage is sent last if asked."""
        self.base = {**base, "object": "text_completion"}
        if include_usage:
            self.base["usage"] = None
        self.include_usage = include_usage

    def _event(self, text: str, finish_reason: str | None) -> bytes:
        return _sse({**self.base, "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]})

    def feed(self, item: dict[str, Any]) -> list[bytes]:
        """Return the SSE events for one NDJSON item (with ``[DONE]`` after the last)."""
        text = _text(item.get("response"))
        events = [self._event(text, None)] if text else []
        if item.get("done"):
            events.append(self._event("", _finish_reason(item)))
            if self.include_usage:
                events.append(_sse({**self.base, "choices": [], "usage": _usage(item)}))
            events.append(b"data: [DONE]\n\n")
        return events


async def _ndjson(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """Yield the JSON objects of an NDJSON body; failures raise :class:`BackendError`."""
    buffer = bytearray()
    body = response.aiter_bytes()

    def decode(line: bytes) -> dict[str, Any]:
        try:
            item = _decode(line)
        except msgspec.DecodeError:
            item = None
        if not isinstance(item, dict):
            raise BackendError(
                f"ollama sent a bad stream line: {line[:200]!r}", status=502,
                code="backend_stream_error",
            )
        return item

    try:
        while True:
            try:
                data = await body.__anext__()
            except StopAsyncIteration:
                break
            except httpx.HTTPError as exc:
                raise stream_error(exc) from exc
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if line.strip():
                    yield decode(line)
            if len(buffer) > MAX_LINE:
                raise BackendError("ollama sent an overlong stream line", status=502,
                                   code="backend_stream_error")
        if buffer.strip():
            yield decode(bytes(buffer))
    finally:
        await aclose_iterator(body)


async def _read_body(response: httpx.Response, limit: int = MAX_BODY) -> dict[str, Any]:
    """Read and decode a whole (non-streaming) JSON answer before the head is given out."""
    data = bytearray()
    body = response.aiter_bytes()
    try:
        async for chunk in body:
            data += chunk
            if len(data) > limit:
                raise BackendError("ollama answer too large", status=502, code="backend_error")
    except httpx.HTTPError as exc:
        raise BackendError(
            f"ollama answer broke off: {exc!r}", status=502, code="backend_error"
        ) from exc
    finally:
        await aclose_iterator(body)
    try:
        item = _decode(data)
    except msgspec.DecodeError:
        item = None
    if not isinstance(item, dict):
        raise BackendError("ollama sent a bad answer", status=502, code="backend_error")
    if item.get("error") is not None:
        raise BackendError(f"ollama error: {item['error']}", status=502, code="upstream_error")
    return item


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
        self.url = root_url(settings.url)
        rename = opts.get("rename") or {}
        if not isinstance(rename, dict):
            raise ValueError("ollama backend: options.rename must be a table of names")
        self.rename: dict[str, str] = {str(k): str(v) for k, v in rename.items()}
        num_ctx = opts.get("num_ctx")
        if num_ctx is not None and (not _is_int(num_ctx) or num_ctx < 1):
            raise ValueError("ollama backend: options.num_ctx must be a positive integer")
        keep_alive = opts.get("keep_alive")
        if keep_alive is not None and not isinstance(keep_alive, str | int | float):
            raise ValueError("ollama backend: options.keep_alive must be a duration or number")
        self.defaults = _Defaults(num_ctx=num_ctx, keep_alive=keep_alive)
        self.http = HttpOptions.from_settings(settings, "ollama")
        self._clients = ClientShards(self.http)

    # -- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Create the HTTP clients; the server need not be up yet."""
        self._clients.next()

    async def run(self) -> None:
        """Nothing to supervise: sleep until cancelled."""
        await trio.sleep_forever()

    async def close(self) -> None:
        """Close every HTTP client."""
        await self._clients.aclose()

    # -- discovery and health -------------------------------------------

    async def _get_json(self, path: str) -> Any:
        """GET a small JSON document from the server; failures raise BackendError."""
        url = f"{self.url}{path}"
        try:
            response = await self._clients.next().get(url, timeout=self.http.control_timeout)
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
        """True when ``GET /api/version`` answers 200."""
        try:
            response = await self._clients.next().get(
                f"{self.url}/api/version", timeout=self.http.control_timeout
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

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
            stream, include_usage = _stream_flags(request)
        elif endpoint == "completions":
            path, payload = "/api/generate", generate_payload(
                request, upstream_model, self.defaults)
            stream, include_usage = _stream_flags(request)
        else:
            path, payload = "/api/embed", embed_payload(request, upstream_model, self.defaults)
        client = self._clients.next()
        upstream = client.build_request(
            "POST", f"{self.url}{path}", content=_encode(payload),
            headers={"Content-Type": "application/json"},
        )
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.url) from exc
        lines = _ndjson(response)
        events: AsyncGenerator[bytes, None] | None = None
        try:
            if response.status_code >= 400:
                raise ollama_error(response.status_code, await read_bounded(response))
            chat = endpoint == "chat/completions"
            base: dict[str, Any] = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()),
                "model": model,
            }
            if stream:
                # The first line comes with Ollama's head; an error there is
                # still reported before ours, so the gateway may retry.
                try:
                    first = await lines.__anext__()
                except StopAsyncIteration:
                    raise BackendError("ollama sent an empty stream", status=502,
                                       code="backend_error") from None
                if first.get("error") is not None:
                    raise BackendError(f"ollama error: {first['error']}", status=500,
                                       code="upstream_error")
                translator = ChatStream(base, include_usage) if chat else CompletionStream(
                    base, include_usage)
                events = self._events(translator, first, lines)
                yield BackendResponse(200, "text/event-stream", events)
                return
            item = await _read_body(response)
            if endpoint == "embeddings":
                fmt = str(request.get("encoding_format") or "float")
                result = embedding_list(item, model, fmt)
            elif chat:
                result = chat_completion(item, base)
            else:
                result = text_completion(item, base)
            yield BackendResponse(200, "application/json", _Once(_encode(result)))
        finally:
            # Closing an unfinished response drops the connection: Ollama sees
            # the disconnect and stops generating (shielded, see close_response).
            readers: list[AsyncIterator[Any]] = [lines] if events is None else [events, lines]
            await close_response(response, *readers)

    @staticmethod
    async def _events(
        translator: ChatStream | CompletionStream, first: dict[str, Any],
        lines: AsyncGenerator[dict[str, Any], None],
    ) -> AsyncGenerator[bytes, None]:
        """Translate a stream, starting with its already-read ``first`` item."""
        async with aclosing(lines):
            item: dict[str, Any] | None = first
            while item is not None:
                _raise_for_error_line(item)
                for event in translator.feed(item):
                    yield event
                if item.get("done"):
                    return
                item = await anext(lines, None)
        raise BackendError("ollama stream ended before it was done", status=502,
                           code="backend_stream_error")
