"""Checking an OpenAI request body before it is routed.

Only what the gateway needs (the model, whether to stream) and what would
otherwise fail obscurely on a backend is checked; every other field passes
through untouched. Each failure names the offending parameter. A body nested
deeper than the gateway's ``max_json_depth`` is refused before anything walks it
(Python code, the gateway's or a plugin's, recurses on nested values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from tooti.errors import APIError

_decoder = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class Preferences:
    """Per-request routing preferences (the body's ``provider`` or ``tooti`` object).

    Node ids are matched exactly. ``order`` puts those nodes first, in that
    order; ``only`` / ``ignore`` restrict the candidates; ``sort`` overrides the
    gateway's policy (``price``, ``latency``, ``throughput``, ``load``);
    ``max_price`` (per 1M tokens, ``prompt`` / ``completion``) drops dearer
    nodes; ``allow_fallbacks = false`` means only the first choice is tried.

    ``group`` is not read from the body: it is the node group of the request's API
    key (``""`` = none), set by the gateway. A request is routed only to nodes of
    its own group (ungrouped requests to ungrouped nodes).
    """

    order: tuple[str, ...] = ()
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    sort: str | None = None
    max_price_prompt: float | None = None
    max_price_completion: float | None = None
    allow_fallbacks: bool = True
    group: str = ""

    @property
    def is_default(self) -> bool:
        """True when the request expressed no preference."""
        return self == _DEFAULT_PREFERENCES


_DEFAULT_PREFERENCES = Preferences()
SORTS = ("price", "latency", "throughput", "load")


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the gateway learned from a request body."""

    endpoint: str
    model: str
    stream: bool
    body: dict[str, Any]
    preferences: Preferences = _DEFAULT_PREFERENCES
    models: tuple[str, ...] = ()
    """Models to try in order (``model`` first, then the body's ``models`` list)."""
    rewrite: bool = False
    """The body carries gateway-only fields that must not reach the backend."""


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs")


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


def _too_deep(limit: int) -> APIError:
    return APIError(400, f"request body nests arrays and objects deeper than {limit} levels",
                    code="invalid_json")


def parse_request(endpoint: str, raw: bytes, max_depth: int = MAX_JSON_DEPTH
                  ) -> ParsedRequest:
    """Decode and check a request body for ``endpoint``; raise APIError(400)."""
    try:
        body = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # deeper than the decoder goes, far beyond any limit
        raise _too_deep(max_depth) from None
    if not nesting_within(raw, body, max_depth):
        raise _too_deep(max_depth)
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model", "invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options must be an object", "stream_options", "invalid_type")
        if not stream:
            raise _bad("stream_options is only allowed when stream is true", "stream_options")
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise _bad("include_usage must be a boolean", "stream_options.include_usage",
                       "invalid_type")
    for name in _NUMBER_FIELDS:
        value = body.get(name)
        if value is not None and not _is_number(value):
            raise _bad(f"{name} must be a number", name, "invalid_type")
    for name in _INT_FIELDS:
        value = body.get(name)
        if value is not None and not _is_int(value):
            raise _bad(f"{name} must be an integer", name, "invalid_type")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(name)
        if value is not None and value < 1:
            raise _bad(f"{name} must be at least 1", name)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if endpoint == "chat/completions":
        _check_messages(body.get("messages"))
    elif endpoint == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise _bad("you must provide a prompt", "prompt", "missing_required_parameter")
        if not isinstance(prompt, str | list):
            raise _bad("prompt must be a string or an array", "prompt", "invalid_type")
    elif endpoint == "embeddings":
        value = body.get("input")
        if value is None:
            raise _bad("you must provide an input", "input", "missing_required_parameter")
        if not isinstance(value, str | list) or (isinstance(value, list) and not value):
            raise _bad("input must be a string or a non-empty array", "input", "invalid_type")
        if stream:
            raise _bad("embeddings cannot be streamed", "stream")
    preferences = _DEFAULT_PREFERENCES
    rewrite = False
    for name in ("provider", "tooti"):
        if name in body:
            preferences = _parse_preferences(body[name], name)
            rewrite = True
    models: tuple[str, ...] = (model,)
    fallbacks = body.get("models")
    if fallbacks is not None:
        if not isinstance(fallbacks, list) or not all(
            isinstance(m, str) and m for m in fallbacks
        ):
            raise _bad("models must be a list of model names", "models", "invalid_type")
        models = tuple(dict.fromkeys([model, *fallbacks]))
        rewrite = True
    return ParsedRequest(endpoint, model, stream, body, preferences, models, rewrite)


def _parse_preferences(value: Any, name: str) -> Preferences:
    if not isinstance(value, dict):
        raise _bad(f"{name} must be an object", name, "invalid_type")
    known = {"order", "only", "ignore", "sort", "max_price", "allow_fallbacks"}
    for key in value:
        if key not in known:
            raise _bad(f"unknown {name} field '{key}' (known: {', '.join(sorted(known))})",
                       f"{name}.{key}")

    def ids(key: str) -> tuple[str, ...] | None:
        items = value.get(key)
        if items is None:
            return None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise _bad(f"{name}.{key} must be a list of node ids", f"{name}.{key}",
                       "invalid_type")
        return tuple(items)

    sort = value.get("sort")
    if sort is not None and sort not in SORTS:
        raise _bad(f"{name}.sort must be one of {', '.join(SORTS)}", f"{name}.sort")
    allow = value.get("allow_fallbacks", True)
    if not isinstance(allow, bool):
        raise _bad(f"{name}.allow_fallbacks must be a boolean", f"{name}.allow_fallbacks",
                   "invalid_type")
    prompt = completion = None
    price = value.get("max_price")
    if price is not None:
        if not isinstance(price, dict) or not all(
            k in ("prompt", "completion") and _is_number(v) and v >= 0 for k, v in price.items()
        ):
            raise _bad(f"{name}.max_price must be an object with non-negative numbers "
                       "'prompt' and/or 'completion' (per 1M tokens)", f"{name}.max_price",
                       "invalid_type")
        prompt, completion = price.get("prompt"), price.get("completion")
    only = ids("only")
    return Preferences(
        order=ids("order") or (),
        only=frozenset(only) if only is not None else None,
        ignore=frozenset(ids("ignore") or ()),
        sort=sort,
        max_price_prompt=None if prompt is None else float(prompt),
        max_price_completion=None if completion is None else float(completion),
        allow_fallbacks=allow,
    )


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _bad("you must provide messages", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty array", "messages", "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        if not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}].role must be a string", f"messages[{i}].role",
                       "invalid_type")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"messages[{i}].content must be a string or an array",
                       f"messages[{i}].content", "invalid_type")
