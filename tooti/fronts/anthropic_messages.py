"""Anthropic's Messages API (``POST /v1/messages``), translated to chat completions and back.

Sans-I/O: :func:`parse_request` turns a client's body into a :class:`~tooti.fronts.base.ChatRequest`
for the nodes (or raises :class:`~tooti.errors.APIError` naming the param);
:func:`render_message` turns a node's ``chat.completion`` into a ``Message``;
:class:`~tooti.fronts.anthropic_stream.AnthropicStream` turns its chunks into the SDK's
event sequence; :func:`error_body` renders any error in Anthropic's error shape.
``/v1/messages/count_tokens`` is :func:`parse_count_tokens` and :func:`render_count_tokens`.

What is translated, ignored or refused (``docs/api.md`` lists it field by field):

- ``system`` (a string or text blocks) becomes the first ``system`` message; a
  ``role: "system"`` message inside ``messages`` (newer SDKs) stays where it is.
- Content that is one text block becomes a string; several blocks become OpenAI content
  parts in order (``text``; ``image`` with a ``base64`` source becomes a ``data:`` URL
  ``image_url``, a ``url`` source that URL).
- ``tool_use`` blocks of an assistant turn become its ``tool_calls`` (input encoded as
  the JSON arguments string); ``tool_result`` blocks of a user turn become ``tool``
  messages placed before the rest of that turn (OpenAI wants them right after the
  assistant's calls; Anthropic wants them first in the turn). ``is_error: true``
  prefixes the result's text with ``Error: ``, the one way to tell a chat model that
  the tool failed. Images inside a ``tool_result`` are refused (a ``tool`` message
  carries text only; moving them elsewhere would change the conversation).
- ``thinking`` / ``redacted_thinking`` blocks in assistant turns are dropped (Anthropic
  itself strips earlier turns' thinking from the context). The ``thinking`` parameter
  does not reach the node: whether and how long a model reasons is its node's setup
  (``budget_tokens`` is not enforced), and refusing it would break clients that always
  send it (Claude Code). With ``thinking`` enabled (any type but ``disabled``), the
  reasoning a node returns (``reasoning_content``, or ``reasoning``, as llama.cpp, vLLM
  and SGLang send it) is answered as a ``thinking`` block before the text, with an empty
  ``signature`` (only Anthropic can sign); without it, reasoning is left out, as
  Anthropic answers no thinking unless asked.
- ``tools`` (custom tools: ``name``, ``description``, ``input_schema``, ``strict``)
  become function tools; server tools (``web_search_…``, ``bash_…``, ...) and
  non-empty ``mcp_servers`` are refused, since ignoring them would silently change the
  answer. ``tool_choice``: ``auto`` → ``"auto"``, ``any`` → ``"required"``, ``tool`` →
  that function, ``none`` → ``"none"``; ``disable_parallel_tool_use`` →
  ``parallel_tool_calls: false``.
- ``stop_sequences`` → ``stop``; ``max_tokens`` (required, at least 1) → ``max_tokens``;
  ``temperature`` and ``top_p`` (0 to 1, Anthropic's ranges) as they are; ``top_k`` is
  passed as the ``top_k`` extra field that vLLM, llama.cpp, SGLang and tooti's Ollama
  backend honour (a node whose backend does not know it ignores or refuses it);
  ``metadata.user_id`` → ``user``; ``output_config.format`` (or the older
  ``output_format``) of type ``json_schema`` → ``response_format`` ``json_schema``.
- Ignored as carrying no meaning for a node: ``cache_control`` (anywhere), citations
  settings, ``service_tier``, ``container``, ``inference_geo``, ``speed``,
  ``diagnostics``, ``context_management``, ``output_config.effort``, ``user_profile_id``,
  ``workspace_id`` and any other unknown field.

The answer: the node's choice 0 becomes one ``text`` block (when it has text) then one
``tool_use`` block per tool call. ``finish_reason`` ``stop`` → ``end_turn`` (or
``stop_sequence`` with the sequence when the node says which one matched, as vLLM does
with the choice's ``stop_reason``), ``length`` → ``max_tokens``, ``tool_calls`` (or any
finish with tool calls) → ``tool_use``, ``content_filter`` → ``refusal``. Tool arguments
that are not a JSON object (a model's mistake) are kept, not lost: the ``input`` is
``{"_raw_arguments": "<the text>"}`` (empty arguments are ``{}``); streamed, they pass
through as they came, and the SDK reports them as it does for Claude ("Unable to parse
tool parameter JSON from model").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from tooti.errors import APIError
from tooti.fronts.base import (
    MAX_JSON_DEPTH,
    MAX_TOKENS,
    ChatRequest,
    base64_image,
    chat_tool,
    count,
    decode_as,
    first_choice,
    image_url,
    new_id,
    put_given,
    reasoning_of,
    set_stream,
    validation_error,
)

__all__ = [
    "API_KEY_HEADER",
    "ERROR_CONTENT_TYPE",
    "IGNORED_HEADERS",
    "REQUEST_ID_HEADER",
    "api_key",
    "error_body",
    "error_dict",
    "error_type",
    "message_dict",
    "new_message_id",
    "new_tool_use_id",
    "parse_count_tokens",
    "parse_request",
    "render_count_tokens",
    "render_message",
    "stop_reason",
    "tool_input",
    "usage_dict",
]

# -- headers -----------------------------------------------------------------------

API_KEY_HEADER = "x-api-key"
"""The request header carrying the API key (``Authorization: Bearer`` is accepted too)."""
IGNORED_HEADERS = ("anthropic-version", "anthropic-beta")
"""Request headers the SDK always sends: accepted, never required, ignored."""
REQUEST_ID_HEADER = "request-id"
"""The response header the SDK reads the request id from (errors quote it)."""
ERROR_CONTENT_TYPE = "application/json"


def api_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key: ``x-api-key``, else an ``Authorization: Bearer`` token.

    ``headers`` maps lower-case names to values.
    """
    key = headers.get(API_KEY_HEADER, "").strip()
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


# -- bounds ------------------------------------------------------------------------

MAX_MESSAGES = 100_000
"""Messages per request (Anthropic's own limit)."""
MAX_BLOCKS = 10_000
"""Content blocks per message (and per ``system`` or ``tool_result``)."""
MAX_TOOLS = 1_000
MAX_STOP_SEQUENCES = 64
MAX_STOP_LENGTH = 1_000
MAX_MODEL_LENGTH = 256
MAX_ID_LENGTH = 256
MAX_USER_ID_LENGTH = 256

_Model = Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_LENGTH)]
_Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_ToolName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]
_Unit = Annotated[float, Meta(ge=0, le=1)]

# -- the request's schema ------------------------------------------------------------


class _Text(Struct, tag="text", tag_field="type"):
    text: str


class _Base64Source(Struct, tag="base64", tag_field="type"):
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: Annotated[str, Meta(min_length=1)]


class _UrlSource(Struct, tag="url", tag_field="type"):
    url: Annotated[str, Meta(min_length=1)]


class _Image(Struct, tag="image", tag_field="type"):
    source: _Base64Source | _UrlSource


class _ToolUse(Struct, tag="tool_use", tag_field="type"):
    id: _Id
    name: _ToolName
    input: dict[str, Any]


class _ToolResult(Struct, tag="tool_result", tag_field="type"):
    tool_use_id: _Id
    content: str | Annotated[list[_Text | _Image], Meta(max_length=MAX_BLOCKS)] = ""
    is_error: bool = False


class _Thinking(Struct, tag="thinking", tag_field="type"):
    thinking: str = ""


class _RedactedThinking(Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


_Block = _Text | _Image | _ToolUse | _ToolResult | _Thinking | _RedactedThinking
_BLOCK_TYPES = "text, image, tool_use, tool_result, thinking, redacted_thinking"


class _Message(Struct):
    role: Literal["user", "assistant", "system"]
    content: str | Annotated[list[_Block], Meta(max_length=MAX_BLOCKS)]


class _Tool(Struct):
    name: _ToolName
    input_schema: dict[str, Any] | UnsetType = UNSET
    description: str | None = None
    type: str | None = None
    strict: bool | None = None


class _ChoiceAuto(Struct, tag="auto", tag_field="type"):
    disable_parallel_tool_use: bool = False


class _ChoiceAny(Struct, tag="any", tag_field="type"):
    disable_parallel_tool_use: bool = False


class _ChoiceTool(Struct, tag="tool", tag_field="type"):
    name: _ToolName
    disable_parallel_tool_use: bool = False


class _ChoiceNone(Struct, tag="none", tag_field="type"):
    pass


class _ThinkingConfig(Struct):
    type: Annotated[str, Meta(min_length=1, max_length=64)]
    budget_tokens: int | None = None


class _Metadata(Struct):
    user_id: Annotated[str, Meta(max_length=MAX_USER_ID_LENGTH)] | None = None


class _JsonFormat(Struct):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class _OutputConfig(Struct):
    format: _JsonFormat | None = None


class _Common(Struct, kw_only=True):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share (unknown fields are
    ignored by msgspec)."""

    model: _Model
    messages: Annotated[list[_Message], Meta(min_length=1, max_length=MAX_MESSAGES)]
    system: str | Annotated[list[_Text], Meta(max_length=MAX_BLOCKS)] | None = None
    tools: Annotated[list[_Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: _ChoiceAuto | _ChoiceAny | _ChoiceTool | _ChoiceNone | None = None
    thinking: _ThinkingConfig | None = None
    output_config: _OutputConfig | None = None
    output_format: _JsonFormat | None = None
    mcp_servers: list[Any] | None = None


class _Create(_Common, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
    stream: bool | None = None
    stop_sequences: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_LENGTH)]],
        Meta(max_length=MAX_STOP_SEQUENCES),
    ] | None = None
    temperature: _Unit | None = None
    top_p: _Unit | None = None
    top_k: Annotated[int, Meta(ge=0, le=MAX_TOKENS)] | None = None
    metadata: _Metadata | None = None


class _CountTokens(_Common, kw_only=True):
    pass


_any_decoder = msgspec.json.Decoder()
_encode = msgspec.json.encode

# -- errors ------------------------------------------------------------------------

_ERROR_TYPES = {
    401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 429: "rate_limit_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (503 and 529: ``overloaded_error``;
    other 5xx: ``api_error``; other 4xx: ``invalid_request_error``)."""
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_dict(error: APIError, request_id: str | None = None) -> dict[str, Any]:
    """``{"type": "error", "error": {"type": ..., "message": ...}}`` for ``error``.

    Anthropic's error has no ``param``: a named param leads the message
    (``max_tokens: ...``), as Anthropic's own messages do."""
    message = error.message
    if error.param and not message.startswith(error.param + ":"):
        message = f"{error.param}: {message}"
    body: dict[str, Any] = {"type": "error",
                            "error": {"type": error_type(error.status), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_body(error: APIError, request_id: str | None = None) -> bytes:
    """The JSON body of an error answer (status: ``error.status``; headers:
    ``error.headers`` plus :data:`REQUEST_ID_HEADER`)."""
    return _encode(error_dict(error, request_id))


def _bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_request_error")


def _from_validation(exc: msgspec.ValidationError) -> APIError:
    what, param, missing = validation_error(exc)
    if missing:
        return _bad(param, "Field required")
    tag = re.match(r"Invalid value '(.*)'$", what)
    if tag and param and param.endswith(".type"):
        where_of = param.removesuffix(".type")
        if where_of.endswith("source"):
            kinds = "base64, url"
            kind = "image source type"
        elif where_of.startswith("tool_choice"):
            kinds, kind = "auto, any, tool, none", "tool_choice type"
        else:
            kinds, kind = _BLOCK_TYPES, "content block type"
        return _bad(param, f"{kind} '{tag.group(1)}' is not supported here (supported: {kinds})")
    return _bad(param, what)


def _decode(raw: bytes, kind: type[Any], max_depth: int) -> Any:
    return decode_as(raw, kind, max_depth, _from_validation)[1]


# -- request translation ------------------------------------------------------------


def _data_url(source: _Base64Source | _UrlSource, param: str) -> str:
    if isinstance(source, _UrlSource):
        return image_url(source.url, f"{param}.url")
    base64_image(source.data, f"{param}.data")
    return f"data:{source.media_type};base64,{source.data}"


def _parts(blocks: list[tuple[Any, str]]) -> str | list[dict[str, Any]]:
    """OpenAI content for text and image blocks (each with its param): one text block
    is a plain string."""
    if len(blocks) == 1 and isinstance(blocks[0][0], _Text):
        return blocks[0][0].text
    parts: list[dict[str, Any]] = []
    for block, param in blocks:
        if isinstance(block, _Text):
            parts.append({"type": "text", "text": block.text})
        else:
            parts.append({"type": "image_url", "image_url": {
                "url": _data_url(block.source, f"{param}.source")}})
    return parts


def _tool_message(block: _ToolResult, param: str) -> dict[str, Any]:
    content: str | list[dict[str, Any]]
    if isinstance(block.content, str):
        content = block.content
    else:
        for j, part in enumerate(block.content):
            if isinstance(part, _Image):
                raise _bad(f"{param}.content[{j}]", "images in a tool_result are not supported "
                           "by this gateway (a chat-completions tool message carries text "
                           "only); send the image in a user text/image block instead")
        content = _parts([(part, "") for part in block.content]) if block.content else ""
    if block.is_error:
        if isinstance(content, str):
            content = "Error: " + content
        else:
            content = [{"type": "text", "text": "Error:"}, *content]
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _user(message: _Message, param: str, out: list[dict[str, Any]],
          calls: set[str]) -> None:
    if isinstance(message.content, str):
        out.append({"role": "user", "content": message.content})
        return
    rest: list[tuple[Any, str]] = []
    for j, block in enumerate(message.content):
        where = f"{param}.content[{j}]"
        if isinstance(block, _ToolResult):
            if block.tool_use_id not in calls:
                raise _bad(f"{where}.tool_use_id", f"tool_result '{block.tool_use_id[:64]}' "
                           "answers no tool_use block of an earlier assistant turn")
            out.append(_tool_message(block, where))
        elif isinstance(block, _Text | _Image):
            rest.append((block, where))
        elif isinstance(block, _Thinking | _RedactedThinking):
            continue
        else:
            raise _bad(f"{where}.type", "tool_use blocks belong in assistant turns")
    if rest or not message.content:
        out.append({"role": "user", "content": _parts(rest) if rest else ""})


def _assistant(message: _Message, param: str, out: list[dict[str, Any]],
               made: set[str]) -> None:
    if isinstance(message.content, str):
        out.append({"role": "assistant", "content": message.content})
        return
    texts: list[tuple[Any, str]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        where = f"{param}.content[{j}]"
        if isinstance(block, _Text):
            texts.append((block, where))
        elif isinstance(block, _ToolUse):
            made.add(block.id)
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name,
                                       "arguments": _encode(block.input).decode()}})
        elif isinstance(block, _Thinking | _RedactedThinking):
            continue
        else:
            kind = "image" if isinstance(block, _Image) else "tool_result"
            raise _bad(f"{where}.type", f"{kind} blocks belong in user turns")
    entry: dict[str, Any] = {"role": "assistant",
                             "content": _parts(texts) if texts else (None if calls else "")}
    if calls:
        entry["tool_calls"] = calls
    out.append(entry)


def _system_content(content: str | list[_Text]) -> str | list[dict[str, Any]]:
    return content if isinstance(content, str) else _parts([(block, "") for block in content])


def _messages(body: _Common) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    calls: set[str] = set()
    if body.system:
        out.append({"role": "system", "content": _system_content(body.system)})
    for i, message in enumerate(body.messages):
        param = f"messages[{i}]"
        if message.role == "user":
            _user(message, param, out, calls)
        elif message.role == "assistant":
            _assistant(message, param, out, calls)
        else:
            if not isinstance(message.content, str):
                for j, block in enumerate(message.content):
                    if not isinstance(block, _Text):
                        raise _bad(f"{param}.content[{j}].type",
                                   "a system message takes text blocks only")
            out.append({"role": "system",
                        "content": _system_content(message.content)})  # type: ignore[arg-type]
    if not any(m["role"] != "system" for m in out):
        raise _bad("messages", "no user or assistant turn with content a model can read "
                   "(thinking blocks are dropped)")
    return out


def _tools(body: _Common, chat: dict[str, Any]) -> None:
    names: set[str] = set()
    if body.tools:
        tools: list[dict[str, Any]] = []
        for i, tool in enumerate(body.tools):
            if tool.type not in (None, "custom"):
                raise _bad(f"tools[{i}].type", f"server tool '{tool.type}' is not supported by "
                           "this gateway; only custom tools (name, description, input_schema)")
            if isinstance(tool.input_schema, UnsetType):
                raise _bad(f"tools[{i}].input_schema", "Field required")
            if tool.name in names:
                raise _bad(f"tools[{i}].name", f"tool name '{tool.name}' is used twice")
            names.add(tool.name)
            tools.append(chat_tool(tool.name, description=tool.description,
                                   parameters=tool.input_schema, strict=tool.strict))
        chat["tools"] = tools
    choice = body.tool_choice
    if choice is None:
        return
    if not names:
        if isinstance(choice, _ChoiceAny | _ChoiceTool):
            raise _bad("tool_choice", f"tool_choice '{choice.__struct_config__.tag}' needs "
                       "tools")
        return
    if isinstance(choice, _ChoiceAuto):
        chat["tool_choice"] = "auto"
    elif isinstance(choice, _ChoiceAny):
        chat["tool_choice"] = "required"
    elif isinstance(choice, _ChoiceTool):
        if choice.name not in names:
            raise _bad("tool_choice.name", f"no tool named '{choice.name}' in tools")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        chat["tool_choice"] = "none"
    if not isinstance(choice, _ChoiceNone) and choice.disable_parallel_tool_use:
        chat["parallel_tool_calls"] = False


def _common(body: _Common, chat: dict[str, Any]) -> None:
    if body.mcp_servers:
        raise _bad("mcp_servers", "MCP servers are not supported by this gateway")
    _tools(body, chat)
    fmt = body.output_config.format if body.output_config is not None else None
    fmt = fmt or body.output_format
    if fmt is not None:
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt.schema}}


def parse_request(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH,
                  request_id: str | None = None) -> ChatRequest:
    """A ``/v1/messages`` body as the chat-completions request the nodes serve.

    Raises :class:`~tooti.errors.APIError` (400, ``param`` named) for a body Anthropic
    would refuse or this gateway cannot honour. ``context`` holds what the answer needs:
    ``model`` (echoed), ``stop_sequences`` (to name a matched one) and ``thinking``
    (whether to answer the node's reasoning as thinking blocks).
    """
    body: _Create = _decode(raw, _Create, max_depth)
    chat: dict[str, Any] = {"model": body.model, "messages": _messages(body),
                            "max_tokens": body.max_tokens}
    stream = bool(body.stream)
    set_stream(chat, stream)
    put_given(chat, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
    if body.stop_sequences:
        chat["stop"] = list(body.stop_sequences)
    _common(body, chat)
    if body.metadata is not None and body.metadata.user_id:
        chat["user"] = body.metadata.user_id
    thinking = body.thinking is not None and body.thinking.type != "disabled"
    return ChatRequest(body=chat, model=body.model, stream=stream,
                       context={"model": body.model, "thinking": thinking,
                                "request_id": request_id,
                                "stop_sequences": tuple(body.stop_sequences or ())})


def parse_count_tokens(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> ChatRequest:
    """A ``/v1/messages/count_tokens`` body as a chat-completions request whose answer's
    ``usage.prompt_tokens`` is the count: the node's own tokenizer and chat template
    count the prompt (``max_tokens: 1``, not streamed), so the number is exact, not an
    estimate. The node evaluates the prompt and makes one token: it costs (and is
    metered as) that small request."""
    body: _CountTokens = _decode(raw, _CountTokens, max_depth)
    chat: dict[str, Any] = {"model": body.model, "messages": _messages(body),
                            "max_tokens": 1, "stream": False}
    _common(body, chat)
    return ChatRequest(body=chat, model=body.model, stream=False,
                       context={"model": body.model, "count_tokens": True})


def render_count_tokens(completion: Any) -> bytes:
    """``{"input_tokens": N}`` from the node's answer to :func:`parse_count_tokens`'s
    request; 502 when the node reported no prompt token count."""
    usage = completion.get("usage") if isinstance(completion, dict) else None
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if prompt is None or count(prompt) != prompt:
        raise APIError(502, "the node did not report a prompt token count",
                       code="bad_gateway")
    return _encode({"input_tokens": prompt})


# -- answer translation ------------------------------------------------------------


def new_message_id() -> str:
    """A fresh ``msg_…`` id."""
    return new_id("msg")


def new_tool_use_id() -> str:
    """A fresh ``toolu_…`` id (for a tool call a node sent without one)."""
    return new_id("toolu")


def usage_dict(usage: Any) -> dict[str, int]:
    """Anthropic ``usage`` from an OpenAI one. Anthropic's ``input_tokens`` excludes
    cached tokens, reported apart as ``cache_read_input_tokens``."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = min(cached, prompt)
    out = {"input_tokens": prompt - cached, "output_tokens": count(usage.get("completion_tokens"))}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def stop_reason(finish_reason: Any, matched: Any, stop_sequences: tuple[str, ...],
                has_tool_calls: bool) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` for a chat-completions finish.

    ``matched`` is the choice's non-standard ``stop_reason`` (vLLM: the stop string
    that matched); only a string among ``stop_sequences`` counts. ``tool_use`` only
    when the answer has a tool_use block: a ``tool_calls`` finish without a named call
    is ``end_turn`` (an agent loop would wait for a call that is not there)."""
    if has_tool_calls:
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "content_filter":
        return "refusal", None
    if isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's ``arguments`` as a ``tool_use`` input: the JSON object; ``{}`` when
    empty; ``{"_raw_arguments": text}`` when the model wrote something else."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = _any_decoder.decode(arguments)
    except (msgspec.DecodeError, RecursionError):
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"_raw_arguments": arguments}


def message_dict(completion: Any, request: ChatRequest, *,
                 message_id: str | None = None) -> dict[str, Any]:
    """The ``Message`` for a node's ``chat.completion`` (choice 0)."""
    if not isinstance(completion, dict):
        raise APIError(502, "the node's answer is not a JSON object", code="bad_gateway")
    choice = first_choice(completion.get("choices")) or {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = reasoning_of(message) if request.context.get("thinking") else None
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):  # content parts, from some servers
        text = "".join(p.get("text", "") for p in text
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        call_id = call.get("id")
        content.append({"type": "tool_use",
                        "id": call_id if isinstance(call_id, str) and call_id
                        else new_tool_use_id(),
                        "name": function["name"],
                        "input": tool_input(function.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"),
                                   request.context.get("stop_sequences", ()),
                                   any(block["type"] == "tool_use" for block in content))
    return {"id": message_id or new_message_id(), "type": "message", "role": "assistant",
            "model": request.context.get("model", request.model), "content": content,
            "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage_dict(completion.get("usage"))}


def render_message(completion: Any, request: ChatRequest, *,
                   message_id: str | None = None) -> bytes:
    """:func:`message_dict` as the JSON body of a ``/v1/messages`` answer."""
    return _encode(message_dict(completion, request, message_id=message_id))
