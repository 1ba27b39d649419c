"""OpenAI requests as Ollama native API bodies (pure functions, no I/O).

:mod:`tooti.backends.ollama` sends what these functions build; the answers
come back through :mod:`tooti.backends.ollama_answers`.

Chat and completions: ``max_completion_tokens`` / ``max_tokens`` →
``options.num_predict``; ``stop`` → ``options.stop`` (a list); ``temperature``,
``top_p``, ``seed``, ``presence_penalty``, ``frequency_penalty`` (and the
non-OpenAI ``top_k``, ``min_p``, ``repeat_penalty``) → ``options``;
``response_format`` ``json_object`` → ``format: "json"``, ``json_schema`` →
``format: <schema>``. Chat messages: array content → text parts joined with
newlines, ``image_url`` data URLs → the message's base64 ``images``; assistant
``tool_calls`` get their ``arguments`` as objects; ``tool`` messages get a
``tool_name`` found from the earlier call's id; ``developer`` becomes
``system``. ``tools`` pass through (dropped when ``tool_choice`` is ``"none"``).
``n`` > 1, ``echo``, ``best_of`` > 1, remote image URLs and token-array inputs
are refused with 400 (:func:`~tooti.backends.base.bad_request`); ``logprobs``,
``logit_bias`` and other unknown fields are ignored. Embeddings go to
``/api/embed`` (``dimensions`` passes through).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from tooti.backends.base import bad_request
from tooti.protocol.numbers import is_int, is_number

_decode = msgspec.json.decode


@dataclass(frozen=True)
class Defaults:
    """Per-backend values added to every request."""

    num_ctx: int | None = None
    keep_alive: str | int | float | None = None


def _options(request: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    """Map OpenAI sampling fields to an Ollama ``options`` object."""
    options: dict[str, Any] = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.get(name)
        if value is None:
            continue
        if not is_int(value) or value < 0:
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
        if not is_number(value):
            raise bad_request(f"'{name}' must be a number")
        options[name] = value
    for name in ("seed", "top_k"):
        value = request.get(name)
        if value is None:
            continue
        if not is_int(value):
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
    request: dict[str, Any], model: str, stream: bool, defaults: Defaults
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


def stream_flags(request: dict[str, Any]) -> tuple[bool, bool]:
    """Return (stream, include_usage) of a chat/completions request."""
    stream = request.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    options = request.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object")
    return bool(stream), bool(stream and options and options.get("include_usage"))


def chat_payload(request: dict[str, Any], model: str, defaults: Defaults) -> dict[str, Any]:
    """Build the ``/api/chat`` body for an OpenAI chat request (``model``: Ollama's name)."""
    stream, _ = stream_flags(request)
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
    request: dict[str, Any], model: str, defaults: Defaults
) -> dict[str, Any]:
    """Build the ``/api/generate`` body for an OpenAI (legacy) completions request."""
    stream, _ = stream_flags(request)
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


def embed_payload(request: dict[str, Any], model: str, defaults: Defaults) -> dict[str, Any]:
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
        if not is_int(dimensions) or dimensions < 1:
            raise bad_request("'dimensions' must be a positive integer")
        payload["dimensions"] = dimensions
    if defaults.keep_alive is not None:
        payload["keep_alive"] = defaults.keep_alive
    return payload
