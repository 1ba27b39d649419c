"""OpenAI's Responses API (``POST /v1/responses``) translated to chat completions and back.

:func:`parse_request` turns a Responses body into a :class:`~tooti.fronts.base.ChatRequest`
(or raises :class:`~tooti.errors.APIError` naming the ``param``); :func:`answer_body` turns
the node's ``chat.completion`` into a ``Response`` object; :class:`ResponsesStream` (in
:mod:`tooti.fronts.responses_stream`) turns the node's chunks into the semantic events;
:func:`error_body` is the OpenAI error object. ``docs/api.md`` lists every field.

Decisions where the API leaves room (what a LiteLLM / OpenRouter user expects):

- **No stored state.** ``previous_response_id`` is refused with a 400 telling the client
  to send the whole conversation in ``input`` (:func:`resolve_previous_response` is the one
  place a response store would replace); so are ``item_reference`` items, ``conversation``,
  ``prompt`` (saved prompts) and ``background: true``. ``store`` is accepted and echoed
  (nothing is stored: clients that send ``store: false`` with the whole conversation, like
  Codex and the Agents SDK, work unchanged).
- **Input ``reasoning`` items are dropped**: agents replay them from earlier turns, chat
  completions has no place for them, and refusing them would break those agents.
- **Roles.** ``developer`` becomes ``system``; ``instructions`` becomes the first system
  message. A text-only content list of a system or assistant message is joined into one
  string (``"\\n"`` between parts), which every backend takes; a user's content stays a
  list of parts (images need it).
- **Tool round trips.** Consecutive ``function_call`` items become one assistant message's
  ``tool_calls`` (joined to the assistant message right before them); each
  ``function_call_output`` becomes a ``tool`` message (a list output's text parts joined).
- **Refused with a 400 naming the param** (ignoring them would silently change the
  answer): built-in tools (web search, file search, computer use, MCP, code interpreter,
  image generation, custom and shell tools) and ``tool_choice`` forcing one, input files
  and ``file_id`` images (no Files API here), images outside user messages or in tool
  output, ``include: ["message.output_text.logprobs"]``.
- **Accepted and ignored** (hints, or features of OpenAI's platform): ``reasoning``,
  ``text.verbosity``, ``truncation``, ``max_tool_calls``, ``service_tier``,
  ``safety_identifier``, ``prompt_cache_key``, ``prompt_cache_retention``,
  ``stream_options``, ``top_logprobs``, other ``include`` values, and unknown fields.
- **Reasoning out.** A node's ``reasoning_content`` (or ``reasoning``) becomes a
  ``reasoning`` output item before the message, its text as one ``reasoning_text`` part
  and an empty ``summary`` (there is no summarizer); ``usage`` counts its tokens as the
  node reported them.
- **Routing.** The gateway's own ``provider`` / ``tooti`` preferences and ``models``
  fallback list are copied into the chat body unchanged, so the gateway's usual checks and
  routing read them as for a chat request.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from tooti.errors import APIError
from tooti.fronts import base
from tooti.fronts.base import ChatRequest, count, image_url, new_id

ROUTE = "/v1/responses"
"""The route the mounting step serves (``POST``)."""
CONTENT_TYPE = "application/json"
"""The media type of a non-streamed answer and of an error body."""
STREAM_CONTENT_TYPE = "text/event-stream"
"""The media type of a streamed answer."""
AUTH_HEADERS = ("authorization",)
"""Where the client's key is: ``Authorization: Bearer <key>`` as for chat completions."""

MAX_INPUT_ITEMS = 4096
MAX_CONTENT_PARTS = 1024
MAX_TOOLS = 128
MAX_METADATA_KEYS = 16
MAX_MODEL_LENGTH = 256
MAX_ID_LENGTH = 256

_encoder = msgspec.json.Encoder()

# -- the request's schemas ---------------------------------------------------------------

_ToolName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]
_Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_Temperature = Annotated[float, Meta(ge=0, le=2)]
_TopP = Annotated[float, Meta(ge=0, le=1)]
_Detail = Literal["low", "high", "auto", "original"]


class _InputText(Struct, tag="input_text", tag_field="type"):
    text: str


class _OutputText(Struct, tag="output_text", tag_field="type"):
    text: str


class _Refusal(Struct, tag="refusal", tag_field="type"):
    refusal: str


class _InputImage(Struct, tag="input_image", tag_field="type"):
    image_url: str | None = None
    file_id: str | None = None
    detail: _Detail | None = None


class _InputFile(Struct, tag="input_file", tag_field="type"):
    file_id: str | None = None
    filename: str | None = None


_Part = _InputText | _OutputText | _Refusal | _InputImage | _InputFile
_OutputPart = _InputText | _InputImage | _InputFile


class _Message(Struct):
    """A ``message`` item (``type`` may be left out: the easy input message)."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[_Part], Meta(max_length=MAX_CONTENT_PARTS)]


class _FunctionCall(Struct):
    """A ``function_call`` item: the model's call, sent back in a later turn."""

    call_id: _Id
    name: _ToolName
    arguments: str


class _FunctionCallOutput(Struct):
    """A ``function_call_output`` item: the caller's result of a call."""

    call_id: _Id
    output: str | Annotated[list[_OutputPart], Meta(max_length=MAX_CONTENT_PARTS)]


class _FunctionTool(Struct):
    """A function tool (the Responses shape is flat)."""

    name: _ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _FormatText(Struct, tag="text", tag_field="type"):
    pass


class _FormatJSONObject(Struct, tag="json_object", tag_field="type"):
    pass


class _FormatJSONSchema(Struct, tag="json_schema", tag_field="type"):
    name: _ToolName
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class _Text(Struct):
    format: _FormatText | _FormatJSONObject | _FormatJSONSchema | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


_Metadata = Annotated[
    dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]],
    Meta(max_length=MAX_METADATA_KEYS),
]


class _Request(Struct, kw_only=True):
    """A ``/v1/responses`` body: the fields read, with their bounds (unknown fields are
    ignored; the refused ones are checked after conversion)."""

    model: Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_LENGTH)]
    input: str | Annotated[list[Any], Meta(max_length=MAX_INPUT_ITEMS)] | None = None
    instructions: str | None = None
    stream: bool | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    max_output_tokens: Annotated[int, Meta(ge=1, le=base.MAX_TOKENS)] | None = None
    tools: Annotated[list[dict[str, Any]], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: _Text | None = None
    metadata: _Metadata | None = None
    store: bool | None = None
    user: Annotated[str, Meta(max_length=MAX_ID_LENGTH)] | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    include: Annotated[list[str], Meta(max_length=64)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None


_ROUTING_FIELDS = ("provider", "tooti", "models")
"""Gateway-only fields copied into the chat body for the gateway's own checks."""

_BUILT_IN_TOOLS = frozenset({
    "web_search", "web_search_preview", "web_search_preview_2025_03_11", "web_search_2025_08_26",
    "file_search", "computer", "computer_use_preview", "computer_use", "code_interpreter",
    "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom", "namespace",
    "tool_search",
})


# -- errors -------------------------------------------------------------------------------


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _from_validation(exc: msgspec.ValidationError, prefix: str) -> APIError:
    """An APIError naming the param msgspec's refusal points at (``prefix`` is the path of
    the converted value in the body: ``input[3]``, ``tools[0]``, or ``""``)."""
    what, param, missing = base.validation_error(exc, prefix)
    if missing:
        return _bad(f"Missing required parameter: '{param}'.", param,
                    "missing_required_parameter")
    if not param:
        return _bad(f"Invalid request body: {what}", None, "invalid_type")
    return _bad(f"Invalid value for '{param}': {what[:1].lower()}{what[1:]}.", param)


def resolve_previous_response(previous_response_id: str) -> list[dict[str, Any]]:
    """The chat messages of a stored response's conversation, to put before ``input``.

    Nothing is stored: every id is refused with a 400 that tells the client to send the
    whole conversation. A response store replaces this function (and only it)."""
    raise _bad("previous_response_id is not supported by this gateway: responses are not "
               "stored. Send the whole conversation in 'input' (earlier messages, "
               "function_call and function_call_output items) instead.",
               "previous_response_id", "unsupported_parameter")


# -- parsing ------------------------------------------------------------------------------


def parse_request(raw: bytes, *, max_depth: int = base.MAX_JSON_DEPTH,
                  request_id: str | None = None, created_at: float | None = None,
                  response_id: str | None = None) -> ChatRequest:
    """Decode and translate a ``/v1/responses`` body; raise APIError(400) naming the param.

    The ChatRequest's ``context`` holds what the answer needs: ``response_id``
    (``resp_…``), ``created_at``, ``echo`` (the request's parameters the ``Response``
    object repeats) and ``raw`` (the body as received, for passing it through to a node
    whose backend serves ``/v1/responses`` itself).
    """
    value, request = base.decode_as(raw, _Request, max_depth,
                                    lambda exc: _from_validation(exc, ""))
    context = {"model": request.model, "request_id": request_id,
               "response_id": response_id or new_id("resp"),
               "created_at": int(time.time() if created_at is None else created_at),
               "raw": raw}
    return _translate(request, value, context)


def _translate(request: _Request, body: dict[str, Any], context: dict[str, Any]
               ) -> ChatRequest:
    if request.background:
        raise _bad("background responses are not supported by this gateway (nothing is "
                   "stored to poll); leave 'background' unset or false.", "background",
                   "unsupported_parameter")
    if request.conversation is not None:
        raise _bad("conversation is not supported by this gateway (nothing is stored); "
                   "send the whole conversation in 'input'.", "conversation",
                   "unsupported_parameter")
    if request.prompt is not None:
        raise _bad("saved prompts ('prompt') are not supported by this gateway; send "
                   "'instructions' and 'input' instead.", "prompt", "unsupported_parameter")
    if "message.output_text.logprobs" in (request.include or ()):
        raise _bad("logprobs are not supported by this gateway's Responses API", "include",
                   "unsupported_value")
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if request.previous_response_id is not None:
        messages.extend(resolve_previous_response(request.previous_response_id))
    if request.input is None:
        raise _bad("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        _input_messages(request.input, messages)
    if not any(m["role"] != "system" for m in messages):
        raise _bad("input must hold at least one message or function_call_output item",
                   "input")
    tools, chat_tools = _tools(request.tools or [])
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    stream = bool(request.stream)
    base.set_stream(chat, stream)
    base.put_given(chat, temperature=request.temperature, top_p=request.top_p,
                   max_tokens=request.max_output_tokens)
    tool_choice, choice_echo, chat_tools = _tool_choice(request.tool_choice, tools, chat_tools)
    if chat_tools:
        chat["tools"] = chat_tools
        if request.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = request.parallel_tool_calls
    if tool_choice is not None:
        chat["tool_choice"] = tool_choice
    text_echo: dict[str, Any] = {"format": {"type": "text"}}
    if request.text is not None:
        response_format, text_echo = _text(request.text)
        if response_format is not None:
            chat["response_format"] = response_format
    if request.user is not None:
        chat["user"] = request.user
    for name in _ROUTING_FIELDS:
        if name in body:
            chat[name] = body[name]
    echo: dict[str, Any] = {
        "instructions": request.instructions,
        "metadata": request.metadata or {},
        "parallel_tool_calls": True if request.parallel_tool_calls is None
        else request.parallel_tool_calls,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tool_choice": choice_echo,
        "tools": [_tool_echo(tool) for tool in tools],
        "max_output_tokens": request.max_output_tokens,
        "text": text_echo,
        "user": request.user,
        "store": True if request.store is None else request.store,
        "truncation": request.truncation or "disabled",
        "previous_response_id": None,
        "reasoning": None,
        "background": False,
    }
    context["echo"] = echo
    return ChatRequest(body=chat, model=request.model, stream=stream, context=context)


def _input_messages(items: list[Any], messages: list[dict[str, Any]]) -> None:
    """Append the chat messages of ``input``'s items to ``messages``."""
    calls: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"Invalid value for '{where}': expected an object.", where, "invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(_convert(item, _Message, where), where))
        elif kind == "function_call":
            call = _convert(item, _FunctionCall, where)
            calls.add(call.call_id)
            tool_call = {"id": call.call_id, "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(tool_call)
            else:
                messages.append({"role": "assistant", "content": None,
                                 "tool_calls": [tool_call]})
        elif kind == "function_call_output":
            result = _convert(item, _FunctionCallOutput, where)
            if result.call_id not in calls:
                raise _bad(f"No tool call found for function call output with call_id "
                           f"{result.call_id[:64]}: it answers no function_call item before "
                           "it in 'input'.", f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": result.call_id,
                             "content": _tool_output(result.output, where)})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad("item_reference items are not supported by this gateway: nothing is "
                       "stored. Send the item itself.", f"{where}.type", "unsupported_value")
        elif isinstance(kind, str):
            raise _bad(f"input item type '{kind[:64]}' is not supported by this gateway "
                       "(supported: message, function_call, function_call_output, "
                       "reasoning)", f"{where}.type", "unsupported_value")
        else:
            raise _bad(f"Missing required parameter: '{where}.type'.", f"{where}.type",
                       "missing_required_parameter")


def _convert(item: dict[str, Any], kind: type[Any], where: str) -> Any:
    # the ``type`` key is the dispatch and not a field of the Struct
    fields = {k: v for k, v in item.items() if k != "type"}
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise _from_validation(exc, where) from None


def _message(message: _Message, where: str) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    if isinstance(message.content, str):
        return {"role": role, "content": message.content}
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(message.content):
        param = f"{where}.content[{j}]"
        if isinstance(part, _InputText | _OutputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, _Refusal):
            parts.append({"type": "text", "text": part.refusal})
        elif isinstance(part, _InputImage):
            if role != "user":
                raise _bad(f"images are only supported in user messages, not in "
                           f"{message.role} messages", param, "unsupported_value")
            parts.append(_image(part, param))
        else:
            raise _file_refused(param)
    if role == "user":
        return {"role": role, "content": parts}
    return {"role": role, "content": "\n".join(p["text"] for p in parts)}


def _image(part: _InputImage, param: str) -> dict[str, Any]:
    if not part.image_url:
        raise _bad("images by file_id are not supported by this gateway (no Files API); send "
                   "image_url (an https URL or a data: URL)", f"{param}.image_url",
                   "unsupported_value")
    image: dict[str, Any] = {"url": image_url(part.image_url, f"{param}.image_url")}
    if part.detail in ("low", "high", "auto"):
        image["detail"] = part.detail
    return {"type": "image_url", "image_url": image}


def _file_refused(param: str) -> APIError:
    return _bad("input_file content is not supported by this gateway; send the file's text "
                "as input_text", param, "unsupported_value")


def _tool_output(output: str | list[Any], where: str) -> str:
    if isinstance(output, str):
        return output
    texts: list[str] = []
    for j, part in enumerate(output):
        param = f"{where}.output[{j}]"
        if isinstance(part, _InputText):
            texts.append(part.text)
        elif isinstance(part, _InputImage):
            raise _bad("images in function_call_output are not supported (chat completions' "
                       "tool messages carry text only)", param, "unsupported_value")
        else:
            raise _file_refused(param)
    return "".join(texts)


def _tools(tools: list[dict[str, Any]]) -> tuple[list[_FunctionTool], list[dict[str, Any]]]:
    """The request's function tools, checked, and the chat body's ``tools``."""
    checked: list[_FunctionTool] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type")
        if kind != "function":
            if isinstance(kind, str) and kind in _BUILT_IN_TOOLS:
                raise _bad(f"built-in tool '{kind}' is not supported by this gateway; only "
                           "function tools are (run the tool yourself and declare it as a "
                           "function)", f"{where}.type", "unsupported_value")
            if kind is None:
                raise _bad(f"Missing required parameter: '{where}.type'.", f"{where}.type",
                           "missing_required_parameter")
            raise _bad(f"tool type {str(kind)[:64]!r} is not supported by this gateway; only "
                       "'function' tools are", f"{where}.type", "unsupported_value")
        function = _convert(tool, _FunctionTool, where)
        if function.name in seen:
            raise _bad(f"duplicate tool name '{function.name}'", f"{where}.name")
        seen.add(function.name)
        checked.append(function)
    return checked, [_chat_tool(tool) for tool in checked]


def _chat_tool(tool: _FunctionTool) -> dict[str, Any]:
    return base.chat_tool(tool.name, description=tool.description,
                          parameters=tool.parameters, strict=tool.strict)


def _tool_echo(tool: _FunctionTool) -> dict[str, Any]:
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": tool.parameters, "strict": tool.strict}


def _tool_choice(choice: str | dict[str, Any] | None, tools: list[_FunctionTool],
                 chat_tools: list[dict[str, Any]]
                 ) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The chat ``tool_choice`` (None: leave it out), its echo in the Response, and the
    chat tools (``allowed_tools`` narrows them)."""
    if choice is None:
        return None, "auto", chat_tools
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad("tool_choice must be 'none', 'auto', 'required' or an object",
                       "tool_choice")
        if choice == "required" and not tools:
            raise _bad("tool_choice 'required' needs at least one tool in 'tools'",
                       "tool_choice")
        return choice, choice, chat_tools
    names = [tool.name for tool in tools]
    kind = choice.get("type")
    if kind == "function":
        name = choice.get("name")
        if not isinstance(name, str) or name not in names:
            raise _bad("tool_choice.name must name a function in 'tools'", "tool_choice.name")
        return ({"type": "function", "function": {"name": name}},
                {"type": "function", "name": name}, chat_tools)
    if kind == "allowed_tools":
        mode = choice.get("mode")
        allowed = choice.get("tools")
        if mode not in ("auto", "required"):
            raise _bad("tool_choice.mode must be 'auto' or 'required'", "tool_choice.mode")
        if not isinstance(allowed, list) or not allowed:
            raise _bad("tool_choice.tools must be a non-empty list of tools",
                       "tool_choice.tools")
        keep: set[str] = set()
        for j, entry in enumerate(allowed):
            if (not isinstance(entry, dict) or entry.get("type") != "function"
                    or entry.get("name") not in names):
                raise _bad("tool_choice.tools must list function tools named in 'tools'",
                           f"tool_choice.tools[{j}]")
            keep.add(entry["name"])
        narrowed = [t for t in chat_tools if t["function"]["name"] in keep]
        return mode, {"type": "allowed_tools", "mode": mode, "tools": allowed}, narrowed
    raise _bad(f"tool_choice type {str(kind)[:64]!r} is not supported by this gateway "
               "(supported: 'none', 'auto', 'required', a function, allowed_tools)",
               "tool_choice.type", "unsupported_value")


def _text(text: _Text) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The chat ``response_format`` (None: leave it out) and the echo of ``text``."""
    echo: dict[str, Any] = {}
    if text.verbosity is not None:
        echo["verbosity"] = text.verbosity
    fmt = text.format
    if fmt is None or isinstance(fmt, _FormatText):
        echo["format"] = {"type": "text"}
        return None, echo
    if isinstance(fmt, _FormatJSONObject):
        echo["format"] = {"type": "json_object"}
        return {"type": "json_object"}, echo
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
    if fmt.description is not None:
        schema["description"] = fmt.description
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    echo["format"] = {"type": "json_schema", **schema}
    return {"type": "json_schema", "json_schema": schema}, echo


# -- the answer ---------------------------------------------------------------------------


def response_object(request: ChatRequest, *, status: str, output: list[Any],
                    usage: dict[str, Any] | None = None,
                    incomplete_reason: str | None = None,
                    error: dict[str, Any] | None = None,
                    completed_at: float | None = None) -> dict[str, Any]:
    """A ``Response`` object for ``request`` (stream events carry one too)."""
    context = request.context
    return {
        "id": context["response_id"],
        "object": "response",
        "created_at": context["created_at"],
        **response_state(request, status=status, output=output, usage=usage,
                         incomplete_reason=incomplete_reason, error=error,
                         completed_at=completed_at),
        **context["echo"],
    }


def response_state(request: ChatRequest, *, status: str, output: list[Any],
                   usage: dict[str, Any] | None = None,
                   incomplete_reason: str | None = None,
                   error: dict[str, Any] | None = None,
                   completed_at: float | None = None) -> dict[str, Any]:
    """The members of a ``Response`` that change while it streams (``status`` …
    ``usage``, in the object's order): what :func:`response_frame` leaves out. ``model``
    is the one the request named, never the one a node says it is."""
    return {
        "status": status,
        "completed_at": int(completed_at) if completed_at is not None else None,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "model": request.model,
        "output": output,
        "usage": usage,
    }


_STATUS_MEMBER = b'"status":'
_NO_USAGE = b',"usage":null'


def response_frame(request: ChatRequest, status: str) -> tuple[bytes, tuple[bytes, bytes]]:
    """The encoded :func:`response_object` of ``request`` with ``status``, no output and
    no usage (the ``Response`` of ``response.created``), and that object cut around its
    changing members (:func:`response_state`): ``head + encode(state)[1:-1] + tail`` is
    the encoded :func:`response_object`, byte for byte. One encode per stream, so the
    stream's later ``Response`` objects encode only those members, not the request's
    echo."""
    encoded = _encoder.encode(response_object(request, status=status, output=[]))
    start = encoded.find(_STATUS_MEMBER)  # the first members are the request's id, ...
    end = encoded.find(_NO_USAGE, start)  # the first: JSON strings escape every '"'
    if start < 0 or end < 0:
        raise ValueError("the Response's changing members are not where expected")
    return encoded, (encoded[:start], encoded[end + len(_NO_USAGE):])


def usage_object(usage: Any) -> dict[str, Any] | None:
    """The Responses ``usage`` of a chat ``usage`` object (None when it has none)."""
    if not isinstance(usage, dict):
        return None
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = count(prompt_details.get("cached_tokens")) if isinstance(
        prompt_details, dict) else 0
    reasoning = count(completion_details.get("reasoning_tokens")) if isinstance(
        completion_details, dict) else 0
    total = usage.get("total_tokens")
    total = total if total is not None and count(total) == total else None
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion if total is None else total,
    }


INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}
"""Chat ``finish_reason``s that make a response ``incomplete``, and the reason given."""


def text_part(text: str) -> dict[str, Any]:
    """An ``output_text`` content part (no annotations, no logprobs)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def refusal_part(refusal: str) -> dict[str, Any]:
    """A ``refusal`` content part."""
    return {"type": "refusal", "refusal": refusal}


def message_item(item_id: str, content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    """An assistant ``message`` output item."""
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": content}


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A ``reasoning`` output item carrying the model's reasoning text (a chat answer's
    ``reasoning_content``) as one ``reasoning_text`` part, with no summary."""
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str) -> dict[str, Any]:
    """A ``function_call`` output item."""
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def build_response(request: ChatRequest, completion: Any,
                   completed_at: float | None = None) -> dict[str, Any]:
    """The ``Response`` object of a node's ``chat.completion`` answer (a dict); 502
    when the answer is not a JSON object."""
    if not isinstance(completion, dict):
        raise APIError(502, "the node's answer is not a JSON object", code="bad_gateway")
    choice = base.first_choice(completion.get("choices")) or {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    finish = choice.get("finish_reason")
    reason = INCOMPLETE_REASONS.get(finish) if isinstance(finish, str) else None
    item_status = "incomplete" if reason else "completed"
    output: list[dict[str, Any]] = []
    text = _text_of(message.get("content"))
    refusal = message.get("refusal") if isinstance(message.get("refusal"), str) else None
    calls = message.get("tool_calls")
    calls = [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    reasoning = base.reasoning_of(message)
    if reasoning:
        output.append(reasoning_item(new_id("rs"), reasoning, item_status))
    if text or refusal is not None or not calls:
        content = [text_part(text)] if text or refusal is None else []
        if refusal is not None:
            content.append(refusal_part(refusal))
        output.append(message_item(new_id("msg"), content, item_status))
    for call in calls:
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        call_id = call.get("id") if isinstance(call.get("id"), str) and call["id"] else None
        output.append(function_call_item(
            new_id("fc"), call_id or new_id("call"), _str(function.get("name")),
            _str(function.get("arguments")), "completed"))
    return response_object(  # named as asked (as the stream is), never as the node says
        request, status="incomplete" if reason else "completed", output=output,
        usage=usage_object(completion.get("usage")), incomplete_reason=reason,
        completed_at=None if reason else (time.time() if completed_at is None
                                          else completed_at))


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some backends answer with a list of text parts
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def answer_body(request: ChatRequest, completion: Any) -> bytes:
    """The JSON ``Response`` of a node's non-streamed ``chat.completion`` (decoded)."""
    return _encoder.encode(build_response(request, completion))


def error_body(error: APIError, request_id: str | None = None) -> bytes:
    """The OpenAI error object, the Responses API's error shape (the request id is in
    the ``x-request-id`` header, not the body: ``request_id`` is ignored)."""
    return error.to_json()
