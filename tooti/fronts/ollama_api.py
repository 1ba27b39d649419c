"""Ollama's API as a front: Ollama clients (the ``ollama`` Python package, Open WebUI,
editor plugins) talking to the gateway as if it were an Ollama server.

Sans-I/O. ``/api/chat`` and ``/api/generate`` bodies become OpenAI chat-completions
bodies (:func:`parse_chat`, :func:`parse_generate`), ``/api/embed`` and the legacy
``/api/embeddings`` become OpenAI embeddings bodies (:func:`parse_embed`,
:func:`parse_embeddings`); the node's answer comes back as Ollama's JSON
(:func:`answer`) or NDJSON stream (:class:`NdjsonStream`). Errors are Ollama's plain
``{"error": "..."}`` (:func:`error_body`); the model listings (``/api/tags``,
``/api/ps``, ``/api/show``, ``/api/version``) and the refused model-management routes
are in :mod:`tooti.fronts.ollama_models`.

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
  ``load_duration`` until the node's answer started (:meth:`NdjsonStream.start`:
  routing, queueing), ``prompt_eval_duration`` from then to the first token,
  ``eval_duration`` from the first token to the end. A whole answer cannot tell these
  apart: ``load_duration`` and ``prompt_eval_duration`` are 0 and ``eval_duration`` is
  the total. Counts are the node's usage (``prompt_tokens`` → ``prompt_eval_count``,
  ``completion_tokens`` → ``eval_count``), absent when the node reported none.
* A tool call whose arguments are not a JSON object is sent as the assistant's text
  (Ollama does the same with a tool call it cannot parse).
* ``/api/chat`` without messages, or ``/api/generate`` with an empty prompt and no
  images, only "loads" the model in Ollama: the request's ``context["load"]`` is true
  and :func:`load_answer` is the whole answer (``done_reason: "load"``), no node asked.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from tooti.errors import APIError
from tooti.fronts.base import ChatRequest
from tooti.protocol.numbers import is_int, is_number

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
"""The media type of every non-streamed answer and of error bodies."""
NDJSON_CONTENT_TYPE = "application/x-ndjson"
"""The media type of a streamed ``/api/chat`` or ``/api/generate`` answer."""

MAX_MODEL_NAME = 256
MAX_MESSAGES = 4096
MAX_IMAGES = 16
"""Images per message (or per generate request)."""
MAX_IMAGE_BASE64 = 32 * 1024 * 1024
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_STOP = 16
MAX_STOP_LENGTH = 1024
MAX_EMBED_INPUTS = 2048
MAX_TOP_LOGPROBS = 20
MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects in a request body (the gateway's default
``max_json_depth``; the parsers take the gateway's setting as ``max_depth``)."""

_encode = msgspec.json.encode
_decode_any = msgspec.json.decode


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
    writes ``created_at``."""
    seconds, nanos = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


# -- errors --------------------------------------------------------------------------


def error_body(error: APIError) -> bytes:
    """Ollama's error shape: ``{"error": "<message>"}`` (what the ``ollama`` client's
    ``ResponseError`` reads); send it with ``error.status`` and ``error.headers``."""
    return _encode({"error": error.message})


def _bad(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<name>[^`]+)`")


def _validation_error(exc: msgspec.ValidationError) -> APIError:
    """msgspec's refusal as a 400 naming the param (``messages[0].role``)."""
    text = str(exc)
    param: str | None = None
    found = _AT.search(text)
    if found:
        param = found.group("path").lstrip(".") or None
        text = text[: found.start()]
    missing = _MISSING.search(text)
    if missing:
        param = f"{param}.{missing.group('name')}" if param else missing.group("name")
    where = f" (at {param})" if param else ""
    return _bad(f"invalid request: {text}{where}", param)


def _nesting_within(raw: bytes, limit: int) -> bool:
    """True if ``raw``'s arrays and objects nest at most ``limit`` deep: two byte counts
    for an ordinary body, else a walk level by level (no recursion)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return True
    try:
        value = _decode_any(raw)
    except (msgspec.DecodeError, RecursionError):
        return False
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return False
        level = [v for item in level for v in (item.values() if isinstance(item, dict)
                                                 else item) if isinstance(v, dict | list)]
    return True


def decode_request(raw: bytes, kind: type[Any], max_depth: int = MAX_JSON_DEPTH
                   ) -> Any:
    """Decode ``raw`` into the Struct ``kind``; every refusal is an APIError(400)."""
    if not _nesting_within(raw, max_depth):
        raise _bad(f"request body nests arrays and objects deeper than {max_depth} levels",
                   None)
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise _bad(f"invalid JSON: {exc}", None) from None
    except RecursionError:
        raise _bad("request body nests arrays and objects too deeply", None) from None


# -- the request schemas ------------------------------------------------------------

ModelName = Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_NAME)]
_Name = Annotated[str, Meta(min_length=1, max_length=256)]
_Stop = Annotated[str, Meta(max_length=MAX_STOP_LENGTH)]
_Image = Annotated[str, Meta(max_length=MAX_IMAGE_BASE64)]
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
    num_predict: Annotated[int, Meta(ge=-2, le=2**31 - 1)] | None = None
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


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))


def _image_part(data: str, param: str) -> dict[str, Any]:
    """One of Ollama's base64 images as an OpenAI ``image_url`` part (a data URL of
    the type its first bytes show)."""
    if data.startswith("data:") and "," in data:
        data = data.partition(",")[2]
    data = data.replace("\n", "").replace("\r", "")
    try:
        head = base64.b64decode(data, validate=True)[:16]
    except (binascii.Error, ValueError):
        raise _bad(f"{param} is not valid base64", param) from None
    mime = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if mime is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
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
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                 "top_k", "min_p", "repeat_penalty"):
        value = getattr(options, name)
        if value is not None:
            body[name] = value
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
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        if tool.function.parameters is not None:
            function["parameters"] = tool.function.parameters
        out.append({"type": "function", "function": function})
    return out


def _body(request: _Generation, model: str, messages: list[dict[str, Any]], stream: bool
          ) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
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


# -- answers -------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def done_reason(finish_reason: Any) -> str:
    """OpenAI's ``finish_reason`` as Ollama's ``done_reason`` (a tool call ends with
    ``stop`` in Ollama; other reasons pass as they are)."""
    if not isinstance(finish_reason, str) or finish_reason in ("tool_calls",
                                                               "function_call"):
        return "stop"
    return finish_reason


def _counts(usage: Any) -> dict[str, int]:
    usage = _dict(usage)
    counts = {}
    for theirs, ours in (("prompt_tokens", "prompt_eval_count"),
                         ("completion_tokens", "eval_count")):
        value = usage.get(theirs)
        if is_int(value) and value >= 0:
            counts[ours] = value
    return counts


def _tool_call(call: dict[str, Any], index: int) -> dict[str, Any] | None:
    """An OpenAI tool call as Ollama's (``arguments`` an object), or None when its
    arguments are not a JSON object."""
    function = _dict(call.get("function"))
    arguments: Any = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = _decode_any(arguments) if arguments.strip() else {}
        except (msgspec.DecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    out: dict[str, Any] = {"function": {"index": index, "name": _str(function.get("name")),
                                        "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tool_calls(calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Ollama's tool calls, and the text of those whose arguments are no object."""
    out: list[dict[str, Any]] = []
    text = ""
    for call in calls:
        mapped = _tool_call(call, len(out))
        if mapped is None:
            text += _str(_dict(call.get("function")).get("arguments"))
        else:
            out.append(mapped)
    return out, text


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """A choice's OpenAI ``logprobs.content`` as Ollama's ``logprobs`` (each token's
    ``token``, ``logprob`` and ``top_logprobs``)."""
    content = _dict(choice.get("logprobs")).get("content")
    out = []
    for item in content if isinstance(content, list) else []:
        if not isinstance(item, dict) or not _finite(item.get("logprob")):
            continue
        entry: dict[str, Any] = {"token": _str(item.get("token")), "logprob": item["logprob"]}
        top = item.get("top_logprobs")
        if isinstance(top, list):
            entry["top_logprobs"] = [
                {"token": _str(t.get("token")), "logprob": t["logprob"]} for t in top
                if isinstance(t, dict) and _finite(t.get("logprob"))]
        out.append(entry)
    return out


def _reasoning(message: dict[str, Any]) -> str:
    return _str(message.get("reasoning_content")) or _str(message.get("reasoning"))


def _final(request: ChatRequest, created_at: str, durations: dict[str, int],
           finish_reason: Any, usage: Any) -> dict[str, Any]:
    return {"model": request.context.get("model", request.model), "created_at": created_at,
            "done": True, "done_reason": done_reason(finish_reason), **durations,
            **_counts(usage)}


def _whole_durations(request: ChatRequest, clock: Clock) -> dict[str, int]:
    total = max(0, clock.monotonic_ns() - int(request.context.get("started_ns", 0)))
    return {"total_duration": total, "load_duration": 0, "prompt_eval_duration": 0,
            "eval_duration": total}


def load_answer(request: ChatRequest, clock: Clock = SYSTEM_CLOCK) -> bytes:
    """The whole answer to a request that only loads its model (``context["load"]``):
    ``done_reason: "load"``; one NDJSON line when streamed."""
    line: dict[str, Any] = {"model": request.context.get("model", request.model),
                            "created_at": rfc3339(clock.wall_ns())}
    if request.context.get("kind") == "generate":
        line["response"] = ""
    else:
        line["message"] = {"role": "assistant", "content": ""}
    line.update(done=True, done_reason="load")
    return _encode(line) + b"\n" if request.stream else _encode(line)


def answer(upstream: dict[str, Any], request: ChatRequest, clock: Clock = SYSTEM_CLOCK
           ) -> bytes:
    """The node's whole answer (a ``chat.completion``, or an embeddings list) as the
    Ollama JSON answer to ``request``."""
    kind = request.context.get("kind")
    if kind in ("embed", "embeddings"):
        return _embedding_answer(upstream, request, clock)
    choices = upstream.get("choices")
    choice = _dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = _dict(choice.get("message"))
    text = _str(message.get("content"))
    upstream_calls = message.get("tool_calls")
    calls, stray = _tool_calls([c for c in upstream_calls if isinstance(c, dict)]
                               if isinstance(upstream_calls, list) else [])
    text += stray
    thinking = _reasoning(message) if request.context.get("think", True) else ""
    out = _final(request, rfc3339(clock.wall_ns()), _whole_durations(request, clock),
                 choice.get("finish_reason"), upstream.get("usage"))
    if kind == "generate":
        body: dict[str, Any] = {"response": text}
        if thinking:
            body["thinking"] = thinking
    else:
        reply: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            reply["thinking"] = thinking
        if calls:
            reply["tool_calls"] = calls
        body = {"message": reply}
    tokens = logprobs(choice)
    if tokens:
        body["logprobs"] = tokens
    return _encode({"model": out.pop("model"), "created_at": out.pop("created_at"),
                    **body, **out})


def _index(item: dict[str, Any]) -> int:
    index = item.get("index")
    return index if is_int(index) else 0


def _embedding_answer(upstream: dict[str, Any], request: ChatRequest, clock: Clock
                      ) -> bytes:
    data = upstream.get("data")
    items = sorted((d for d in data if isinstance(d, dict)) if isinstance(data, list)
                   else [], key=_index)
    vectors = [d.get("embedding") for d in items]
    if not all(isinstance(v, list) and all(_finite(x) for x in v) for v in vectors):
        raise APIError(502, "the node answered embeddings that are not float arrays",
                       code="bad_gateway")
    if request.context.get("kind") == "embeddings":
        return _encode({"embedding": vectors[0] if vectors else []})
    total = max(0, clock.monotonic_ns() - int(request.context.get("started_ns", 0)))
    out: dict[str, Any] = {"model": request.context.get("model", request.model),
                           "embeddings": vectors, "total_duration": total,
                           "load_duration": 0}
    prompt = _dict(upstream.get("usage")).get("prompt_tokens")
    if is_int(prompt) and prompt >= 0:
        out["prompt_eval_count"] = prompt
    return _encode(out)


# -- streams -------------------------------------------------------------------------


@dataclass
class _PendingCall:
    id: str | None = None
    name: str = ""
    arguments: str = ""


@dataclass
class NdjsonStream:
    """Turns a node's chat-completions stream into Ollama's NDJSON stream: a line per
    piece of text (``message.content``, or ``response`` for generate) or of thinking,
    the tool calls in one line once they are whole, then the ``done: true`` line with
    ``done_reason``, the node's counts and the durations (see the module's notes).

    Call :meth:`start` when the node's answer starts, :meth:`feed` with each decoded
    chunk (the usage chunk included; a chunk that is an ``{"error": ...}`` object ends
    the stream as :meth:`fail` does), :meth:`finish` at ``[DONE]``; :meth:`fail` ends
    the stream with Ollama's ``{"error": ...}`` line, which the ``ollama`` client raises
    as ``ResponseError``."""

    request: ChatRequest
    clock: Clock = SYSTEM_CLOCK
    content_type: str = NDJSON_CONTENT_TYPE
    _opened_ns: int | None = None
    _first_token_ns: int | None = None
    _finish_reason: Any = None
    _usage: Any = None
    _calls: dict[int, _PendingCall] = field(default_factory=dict)
    _ended: bool = False

    def _line(self, fields: dict[str, Any]) -> bytes:
        line = {"model": self.request.context.get("model", self.request.model),
                "created_at": rfc3339(self.clock.wall_ns()), **fields}
        return _encode(line) + b"\n"

    def _piece(self, text: str, thinking: str = "", calls: Any = None,
               tokens: list[dict[str, Any]] | None = None) -> bytes:
        if self.request.context.get("kind") == "generate":
            fields: dict[str, Any] = {"response": text}
            if thinking:
                fields["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            fields = {"message": message}
        if tokens:
            fields["logprobs"] = tokens
        fields["done"] = False
        return self._line(fields)

    def start(self) -> bytes:
        """Nothing to send; notes when the node's answer started (``load_duration``)."""
        if self._opened_ns is None:
            self._opened_ns = self.clock.monotonic_ns()
        return b""

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The lines for one chat-completions chunk (may be empty)."""
        if self._ended:
            return b""
        self.start()
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            error = chunk.get("error")
            if error is not None:
                message = _dict(error).get("message") if isinstance(error, dict) else error
                return self.fail(APIError(502, str(message or "the node reported an error"),
                                          code="bad_gateway"))
            return b""
        choice = _dict(choices[0])
        delta = _dict(choice.get("delta"))
        text = _str(delta.get("content"))
        thinking = _reasoning(delta) if self.request.context.get("think", True) else ""
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            self._add_call(_dict(call))
        out = b""
        tokens = logprobs(choice)
        if text or thinking or tokens:
            if self._first_token_ns is None:
                self._first_token_ns = self.clock.monotonic_ns()
            out = self._piece(text, thinking, tokens=tokens)
        if choice.get("finish_reason") is not None:
            self._finish_reason = choice["finish_reason"]
            out += self._flush_calls()
        return out

    def _add_call(self, call: dict[str, Any]) -> None:
        index = call.get("index")
        pending = self._calls.setdefault(index if is_int(index) else len(self._calls),
                                         _PendingCall())
        if isinstance(call.get("id"), str):
            pending.id = call["id"]
        function = _dict(call.get("function"))
        pending.name += _str(function.get("name"))
        pending.arguments += _str(function.get("arguments"))
        if self._first_token_ns is None:
            self._first_token_ns = self.clock.monotonic_ns()

    def _flush_calls(self) -> bytes:
        if not self._calls:
            return b""
        calls = [{"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                 if c.id else {"function": {"name": c.name, "arguments": c.arguments}}
                 for _, c in sorted(self._calls.items())]
        self._calls.clear()
        mapped, stray = _tool_calls(calls)
        return self._piece(stray, calls=mapped) if mapped or stray else b""

    def finish(self) -> bytes:
        """The pending tool calls, then the ``done: true`` line."""
        if self._ended:
            return b""
        out = self._flush_calls()
        self._ended = True
        now = self.clock.monotonic_ns()
        started = int(self.request.context.get("started_ns", now))
        opened = self._opened_ns if self._opened_ns is not None else now
        first = self._first_token_ns if self._first_token_ns is not None else now
        durations = {"total_duration": max(0, now - started),
                     "load_duration": max(0, opened - started),
                     "prompt_eval_duration": max(0, first - opened),
                     "eval_duration": max(0, now - first)}
        final = _final(self.request, rfc3339(self.clock.wall_ns()), durations,
                       self._finish_reason, self._usage)
        empty = ({"response": ""} if self.request.context.get("kind") == "generate"
                 else {"message": {"role": "assistant", "content": ""}})
        line = {"model": final.pop("model"), "created_at": final.pop("created_at"),
                **empty, **final}
        return out + _encode(line) + b"\n"

    def fail(self, error: APIError) -> bytes:
        """Ollama's mid-stream error line; the stream ends."""
        if self._ended:
            return b""
        self._ended = True
        return error_body(error) + b"\n"


def stream_translator(request: ChatRequest, clock: Clock = SYSTEM_CLOCK) -> NdjsonStream:
    """The :class:`~tooti.fronts.base.StreamTranslator` of a streamed chat or
    generate request."""
    return NdjsonStream(request, clock)
