"""Ollama's API as a front: Ollama clients (the ``ollama`` Python package, Open WebUI,
editor plugins) talking to the gateway as if it were an Ollama server.

Sans-I/O. ``/api/chat`` and ``/api/generate`` bodies become OpenAI chat-completions
bodies (:func:`parse_chat`, :func:`parse_generate`), ``/api/embed`` and the legacy
``/api/embeddings`` become OpenAI embeddings bodies (:func:`parse_embed`,
:func:`parse_embeddings`). Errors are Ollama's plain ``{"error": "..."}``
(:func:`error_body`). The node's answer comes back as Ollama's JSON or NDJSON stream
through :mod:`tooti.fronts.ollama_answers`; the model listings (``/api/tags``,
``/api/ps``, ``/api/show``, ``/api/version``) and the refused model-management routes
are in :mod:`tooti.fronts.ollama_models`.

:mod:`tooti.backends.ollama_requests` and :mod:`tooti.backends.ollama_answers` translate
the other way (a node talking to a real Ollama server). Nothing is shared with them on
purpose: each direction is the other's inverse (their option table maps OpenAI fields
to Ollama's, this one Ollama's to OpenAI's; they parse NDJSON and write SSE, this front
the reverse), and the one identical rule, ``:latest`` as the default tag, is a line; a
shared module below both would couple a backend to a front for nothing. A test runs
both (an Ollama body through this front, then the backend) and checks the Ollama node
gets what the client sent.

Decisions where Ollama and the network differ (``docs/api.md`` lists every field):

* **Streaming is the default** (``stream`` absent or ``null`` streams), as in Ollama.
* **Model names**: a name resolves to a live network id (:func:`resolve_model`): the
  name itself, else without its ``:latest`` tag, else with ``:latest`` added; answers
  carry the name the client sent, as Ollama's do.
* **Refused** (400 naming the field), because ignoring them would change the answer:
  ``raw``, a non-empty ``template``, ``context`` or ``suffix``, image-generation
  fields, images on a message that is not the user's, a tool result that answers no
  earlier tool call.
* ``logprobs`` / ``top_logprobs`` (0-20) ask the node for OpenAI ``logprobs`` and
  return them as Ollama's (``token``, ``logprob``, ``top_logprobs``), per line when
  streamed; a node whose backend gives none returns none.
* **Ignored**: ``keep_alive`` (nodes keep their models loaded), load-time options
  (``num_ctx``, ``num_gpu``, ...), and sampling options few backends take
  (``typical_p``, ``repeat_last_n``, ``mirostat*``, ``tfs_z``, ``penalize_newline``,
  ``num_keep``), an earlier assistant message's ``thinking``, ``truncate`` of embed
  (an input longer than the context is refused by the node, not truncated).
* **Timing counters**, in nanoseconds from an injected :class:`Clock`:
  ``total_duration`` from the request's parse to its last line; streamed,
  ``load_duration`` until the node's answer started (``NdjsonStream.start``:
  routing, queueing), ``prompt_eval_duration`` from then to the first token,
  ``eval_duration`` from the first token to the end. A whole answer cannot tell these
  apart: ``load_duration`` and ``prompt_eval_duration`` are 0 and ``eval_duration`` is
  the total. Counts are the node's usage (``prompt_tokens`` → ``prompt_eval_count``,
  ``completion_tokens`` → ``eval_count``), absent when the node reported none.
* A tool call whose arguments are not a JSON object is sent as the assistant's text
  (Ollama does the same with a tool call it cannot parse).
* ``/api/chat`` without messages, or ``/api/generate`` with an empty prompt and no
  images, only "loads" the model in Ollama: the request's ``context["load"]`` is true
  and :func:`~tooti.fronts.ollama_answers.load_answer` is the whole answer
  (``done_reason: "load"``), no node asked.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from tooti.errors import APIError
from tooti.fronts.base import (
    MAX_IMAGE_BYTES,
    MAX_JSON_DEPTH,
    MAX_TOKENS,
    ChatRequest,
    base64_image,
    chat_tool,
    decode_as,
    put_given,
    set_stream,
    validation_error,
)

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
"""The media type of every non-streamed answer and of error bodies."""
NDJSON_CONTENT_TYPE = "application/x-ndjson"
"""The media type of a streamed ``/api/chat`` or ``/api/generate`` answer."""

MAX_MODEL_NAME = 256
MAX_MESSAGES = 4096
MAX_IMAGES = 16
"""Images per message (or per generate request)."""
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_STOP = 16
MAX_STOP_LENGTH = 1024
MAX_EMBED_INPUTS = 2048
MAX_TOP_LOGPROBS = 20

_encode = msgspec.json.encode


# -- the clock -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Clock:
    """Where the front reads time: a monotonic clock for durations, a wall clock for
    ``created_at`` (both in nanoseconds). Tests inject fixed ones."""

    monotonic_ns: Callable[[], int] = time.monotonic_ns
    wall_ns: Callable[[], int] = time.time_ns


SYSTEM_CLOCK = Clock()


def rfc3339(wall_ns: int) -> str:
    """``wall_ns`` (Unix nanoseconds) as RFC 3339 UTC with nanoseconds, as Ollama
    writes ``created_at`` (the second's text is formatted once per second: a stream
    writes a line per token)."""
    seconds, nanos = divmod(wall_ns, 1_000_000_000)
    return f"{_utc_second(seconds)}.{nanos:09d}Z"


@functools.lru_cache(maxsize=2)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


_json_second: tuple[int, bytes] = (-1, b"")
"""The last second :func:`rfc3339_json` formatted, and its JSON text up to the dot."""


def rfc3339_json(wall_ns: int) -> bytes:
    """:func:`rfc3339` encoded as a JSON string (nothing in it needs escaping), the
    second's part kept from the last call: what a stream's line per token writes."""
    global _json_second
    seconds, nanos = divmod(wall_ns, 1_000_000_000)
    cached, prefix = _json_second
    if cached != seconds:
        prefix = b'"' + _utc_second(seconds).encode() + b"."
        _json_second = (seconds, prefix)
    return b'%b%09dZ"' % (prefix, nanos)


# -- errors --------------------------------------------------------------------------


def error_body(error: APIError, request_id: str | None = None) -> bytes:
    """Ollama's error shape: ``{"error": "<message>"}`` (what the ``ollama`` client's
    ``ResponseError`` reads); send it with ``error.status`` and ``error.headers``.
    Ollama's errors carry no request id: ``request_id`` is ignored."""
    return _encode({"error": error.message})


def _bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _validation_error(exc: msgspec.ValidationError) -> APIError:
    """msgspec's refusal as a 400 naming the param (``messages[0].role``)."""
    what, param, _ = validation_error(exc)
    where = f" (at {param})" if param else ""
    return _bad(f"invalid request: {what}{where}", param)


def decode_request(raw: bytes, kind: type[Any], max_depth: int = MAX_JSON_DEPTH
                   ) -> Any:
    """Decode ``raw`` once into the Struct ``kind``; every refusal is an APIError(400)."""
    return decode_as(raw, kind, max_depth, _validation_error)[1]


# -- the request schemas ------------------------------------------------------------

ModelName = Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_NAME)]
_Name = Annotated[str, Meta(min_length=1, max_length=256)]
_Stop = Annotated[str, Meta(max_length=MAX_STOP_LENGTH)]
_Image = Annotated[str, Meta(max_length=MAX_IMAGE_BYTES)]
_Images = Annotated[list[_Image], Meta(max_length=MAX_IMAGES)]
_Think = bool | Literal["low", "medium", "high"]


class _Options(Struct):
    """The ``options`` a node can honour (others are ignored, as Ollama ignores an
    option it does not know)."""

    temperature: Annotated[float, Meta(ge=0, le=100)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    num_predict: Annotated[int, Meta(ge=-2, le=MAX_TOKENS)] | None = None
    stop: _Stop | Annotated[list[_Stop], Meta(max_length=MAX_STOP)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    repeat_penalty: Annotated[float, Meta(ge=0, le=100)] | None = None


class _ToolFunction(Struct):
    name: _Name
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(Struct):
    function: _ToolFunction
    type: str = "function"


class _CallFunction(Struct):
    name: _Name
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class _ToolCall(Struct):
    function: _CallFunction
    id: str | None = None


class _Message(Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: _Images | None = None
    thinking: str | None = None
    tool_calls: Annotated[list[_ToolCall], Meta(max_length=MAX_TOOL_CALLS)] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class _Generation(Struct, kw_only=True):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model: ModelName
    format: str | dict[str, Any] | None = None
    options: _Options | None = None
    stream: bool | None = None
    think: _Think | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None


class _Chat(_Generation, kw_only=True):
    messages: Annotated[list[_Message], Meta(max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[_Tool], Meta(max_length=MAX_TOOLS)] | None = None


class _Generate(_Generation, kw_only=True):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: _Images | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None


class _Embed(Struct):
    model: ModelName
    input: str | Annotated[list[str], Meta(min_length=1, max_length=MAX_EMBED_INPUTS)]
    truncate: bool | None = None
    dimensions: Annotated[int, Meta(ge=1, le=65536)] | None = None


class _Embeddings(Struct):
    model: ModelName
    prompt: str | None = None


# -- model names ---------------------------------------------------------------------


def _has_tag(name: str) -> bool:
    return ":" in name.rsplit("/", 1)[-1]


def ollama_name(model_id: str) -> str:
    """The name Ollama clients see for a network model id: ``gemma-3-270m`` is
    ``gemma-3-270m:latest``; an id with a tag (``llama3.2:1b``) is itself."""
    return model_id if _has_tag(model_id) else f"{model_id}:latest"


def resolve_model(name: str, live: Collection[str]) -> str:
    """The live network id an Ollama client means by ``name``: ``name`` itself, else
    ``name`` without ``:latest``, else ``name`` with ``:latest``; else ``name``
    unchanged (routing answers it is not found)."""
    if name in live:
        return name
    if name.endswith(":latest") and name[: -len(":latest")] in live:
        return name[: -len(":latest")]
    if not _has_tag(name) and f"{name}:latest" in live:
        return f"{name}:latest"
    return name


# -- requests ------------------------------------------------------------------------


def _image_part(data: str, param: str) -> dict[str, Any]:
    """One of Ollama's base64 images as an OpenAI ``image_url`` part (a data URL of
    the type its first bytes show; :func:`~tooti.fronts.base.base64_image` checks it)."""
    if data.startswith("data:") and "," in data:
        data = data.partition(",")[2]
    if "\n" in data or "\r" in data:
        data = data.replace("\n", "").replace("\r", "")
    mime = base64_image(data, param)
    if mime is None:
        raise _bad(f"{param} is not a PNG, JPEG, GIF, WebP or BMP image", param)
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _user_content(text: str, images: list[str] | None, param: str) -> str | list[Any]:
    if not images:
        return text
    parts: list[Any] = [{"type": "text", "text": text}] if text else []
    parts.extend(_image_part(image, f"{param}[{i}]") for i, image in enumerate(images))
    return parts


def _arguments(arguments: dict[str, Any]) -> str:
    return _encode(arguments).decode()


def _messages(messages: list[_Message]) -> list[dict[str, Any]]:
    """Ollama's chat messages as OpenAI's: images as parts, tool calls with ids (made
    up when the client sent none), each tool result linked to the call it answers."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    for i, message in enumerate(messages):
        text = message.content or ""
        if message.images and message.role != "user":
            raise _bad(f"messages[{i}].images: only a user message may carry images",
                       f"messages[{i}].images")
        if message.role == "user":
            out.append({"role": "user", "content": _user_content(
                text, message.images, f"messages[{i}].images")})
        elif message.role == "system":
            out.append({"role": "system", "content": text})
        elif message.role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": text}
            if message.tool_calls:
                pending = []
                calls = []
                for k, call in enumerate(message.tool_calls):
                    # not new_id: the client sends the same history again next turn,
                    # and a stable id keeps the prompt (and a node's prefix cache) the same
                    call_id = call.id or f"call_{i}_{k}"
                    pending.append((call_id, call.function.name))
                    calls.append({"id": call_id, "type": "function", "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments)}})
                item["tool_calls"] = calls
                if not text:
                    item["content"] = None
            out.append(item)
        else:
            match = next((p for p in pending if message.tool_call_id == p[0]), None)
            if match is None and message.tool_name:
                match = next((p for p in pending if p[1] == message.tool_name), None)
            if match is None and not message.tool_name and pending:
                match = pending[0]
            if match is None:
                raise _bad(f"messages[{i}]: a tool result must follow an assistant message "
                           "with the tool call it answers", f"messages[{i}]")
            pending.remove(match)
            out.append({"role": "tool", "tool_call_id": match[0], "content": text})
    return out


def _sampling(body: dict[str, Any], options: _Options | None) -> None:
    """Ollama's ``options`` as OpenAI sampling fields (``top_k``, ``min_p`` and
    ``repeat_penalty`` under their own names, as llama.cpp and vLLM take them)."""
    if options is None:
        return
    put_given(body, **{name: getattr(options, name) for name in (
        "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k",
        "min_p", "repeat_penalty")})
    if options.num_predict is not None:
        if options.num_predict == 0:
            raise _bad("options.num_predict must be positive, or -1 (no limit)",
                       "options.num_predict")
        if options.num_predict > 0:
            body["max_tokens"] = options.num_predict
    stop = [options.stop] if isinstance(options.stop, str) else options.stop
    if stop:
        body["stop"] = stop


def _response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise _bad("format must be \"json\" or a JSON schema object", "format")


def _tools(tools: list[_Tool]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise _bad(f"tools[{i}].type must be \"function\"", f"tools[{i}].type")
        out.append(chat_tool(tool.function.name, description=tool.function.description,
                             parameters=tool.function.parameters))
    return out


def _body(request: _Generation, model: str, messages: list[dict[str, Any]], stream: bool
          ) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages}
    set_stream(body, stream)
    _sampling(body, request.options)
    response_format = _response_format(request.format)
    if response_format is not None:
        body["response_format"] = response_format
    if isinstance(request.think, str):
        body["reasoning_effort"] = request.think
    if request.logprobs or request.top_logprobs:
        body["logprobs"] = True
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
    return body


def _context(kind: str, request: _Generation, clock: Clock) -> dict[str, Any]:
    return {"kind": kind, "endpoint": "chat/completions", "model": request.model,
            "think": request.think is not False, "started_ns": clock.monotonic_ns(),
            "load": False}


def parse_chat(raw: bytes, *, live: Collection[str] = (), clock: Clock = SYSTEM_CLOCK,
               max_depth: int = MAX_JSON_DEPTH) -> ChatRequest:
    """An ``/api/chat`` body as a chat-completions request; ``live``: the network's
    model ids the caller may use (for :func:`resolve_model`). Raises APIError(400)."""
    request: _Chat = decode_request(raw, _Chat, max_depth)
    model = resolve_model(request.model, live)
    stream = request.stream is not False
    context = _context("chat", request, clock)
    messages = _messages(request.messages or [])
    body = _body(request, model, messages, stream)
    if request.tools:
        body["tools"] = _tools(request.tools)
    context["load"] = not messages
    return ChatRequest(body=body, model=model, stream=stream, context=context)


def parse_generate(raw: bytes, *, live: Collection[str] = (), clock: Clock = SYSTEM_CLOCK,
                   max_depth: int = MAX_JSON_DEPTH) -> ChatRequest:
    """An ``/api/generate`` body as a chat-completions request (``system`` and
    ``prompt`` as a system and a user message). Raises APIError(400)."""
    request: _Generate = decode_request(raw, _Generate, max_depth)
    if request.raw:
        raise _bad("raw prompts are not supported: nodes apply their model's own "
                   "template", "raw")
    for name in ("template", "suffix"):
        if getattr(request, name):
            raise _bad(f"{name} is not supported by this gateway", name)
    if request.context:
        raise _bad("context (the token history of an earlier answer) is not supported: "
                   "send the conversation to /api/chat instead", "context")
    for name in ("width", "height", "steps"):
        if getattr(request, name) is not None:
            raise _bad(f"{name}: image generation is not supported", name)
    model = resolve_model(request.model, live)
    stream = request.stream is not False
    context = _context("generate", request, clock)
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    prompt = request.prompt or ""
    if prompt or request.images:
        messages.append({"role": "user", "content": _user_content(
            prompt, request.images, "images")})
    context["load"] = not (prompt or request.images)
    return ChatRequest(body=_body(request, model, messages, stream), model=model,
                       stream=stream, context=context)


def parse_embed(raw: bytes, *, live: Collection[str] = (), clock: Clock = SYSTEM_CLOCK,
                max_depth: int = MAX_JSON_DEPTH) -> ChatRequest:
    """An ``/api/embed`` body as an OpenAI embeddings request (``context["endpoint"]``
    is ``embeddings``). Raises APIError(400)."""
    request: _Embed = decode_request(raw, _Embed, max_depth)
    model = resolve_model(request.model, live)
    body: dict[str, Any] = {"model": model, "input": request.input,
                            "encoding_format": "float"}
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return ChatRequest(body=body, model=model, stream=False, context={
        "kind": "embed", "endpoint": "embeddings", "model": request.model,
        "started_ns": clock.monotonic_ns(), "load": False})


def parse_embeddings(raw: bytes, *, live: Collection[str] = (),
                     clock: Clock = SYSTEM_CLOCK, max_depth: int = MAX_JSON_DEPTH
                     ) -> ChatRequest:
    """A legacy ``/api/embeddings`` body (one ``prompt``) as an OpenAI embeddings
    request. Raises APIError(400)."""
    request: _Embeddings = decode_request(raw, _Embeddings, max_depth)
    if not request.prompt:
        raise _bad("prompt is required: the text to embed", "prompt")
    model = resolve_model(request.model, live)
    return ChatRequest(body={"model": model, "input": request.prompt,
                             "encoding_format": "float"},
                       model=model, stream=False, context={
        "kind": "embeddings", "endpoint": "embeddings", "model": request.model,
        "started_ns": clock.monotonic_ns(), "load": False})
