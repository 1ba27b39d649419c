"""Checking an OpenAI request body before it is routed.

Only what the gateway needs (the model, whether to stream) and what would
otherwise fail obscurely on a backend is checked; every other field passes
through untouched. Each failure names the offending parameter. A body nested
deeper than the gateway's ``max_json_depth`` is refused before anything walks it
(Python code, the gateway's or a plugin's, recurses on nested values).

The checks are declared as msgspec Structs (:class:`_Chat`, :class:`_Completion`,
:class:`_Embeddings`): each field the gateway checks, with its type and range.
The body is decoded once into plain values (those are forwarded, shown to hooks
and rewritten as they are; unknown fields are ignored by the Structs) and
converted to its endpoint's Struct, which only checks. Two rules are not about
one field (``stream_options`` only with ``stream``; embeddings do not stream).

msgspec's own refusals (``Expected `int`, got `str` - at `$.n```) are not the
texts clients get, and it reports the first fault in the body's key order, so a
refused body is walked again field by field (:func:`_first_fault`, each field
converted alone to its declared type) to name its first fault in the gateway's
order with the gateway's message, ``param`` and ``code``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from tooti.errors import APIError
from tooti.protocol.json_depth import MAX_JSON_DEPTH, nesting_within

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


def _too_deep(limit: int) -> APIError:
    return APIError(400, f"request body nests arrays and objects deeper than {limit} levels",
                    code="invalid_json")


# -- the declarations ------------------------------------------------------------

_Number = int | float
_Positive = Annotated[int, Meta(ge=1)]
_Name = Annotated[str, Meta(min_length=1)]
_Price = Annotated[int, Meta(ge=0)] | Annotated[float, Meta(ge=0)]


class _StreamOptions(Struct):
    """The body's ``stream_options``."""

    include_usage: bool | None = None


class _Message(Struct):
    """A chat message: only its role and the shape of its content are checked."""

    role: str
    content: str | list[Any] | None = None


class _MaxPrice(Struct, forbid_unknown_fields=True):
    """A preference's ``max_price``: per 1M tokens, each given one a number >= 0."""

    prompt: _Price | UnsetType = UNSET
    completion: _Price | UnsetType = UNSET


class _Preferences(Struct, forbid_unknown_fields=True):
    """The body's ``provider`` / ``tooti`` object (fields in the order their faults
    are reported, after an unknown field)."""

    sort: Literal["price", "latency", "throughput", "load"] | None = None
    allow_fallbacks: bool = True
    max_price: _MaxPrice | None = None
    only: list[str] | None = None
    order: list[str] | None = None
    ignore: list[str] | None = None


class _Request(Struct, kw_only=True):
    """The fields every endpoint checks, in the order their faults are reported
    (the endpoint's own field comes after ``stop``)."""

    model: _Name
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    temperature: _Number | None = None
    top_p: _Number | None = None
    presence_penalty: _Number | None = None
    frequency_penalty: _Number | None = None
    max_tokens: _Positive | None = None
    max_completion_tokens: _Positive | None = None
    n: _Positive | None = None
    seed: int | None = None
    top_logprobs: int | None = None
    stop: str | list[str] | None = None
    provider: _Preferences | UnsetType = UNSET
    tooti: _Preferences | UnsetType = UNSET
    models: list[_Name] | None = None


class _Chat(_Request, kw_only=True):
    """A ``chat/completions`` body."""

    messages: Annotated[list[_Message], Meta(min_length=1)]


class _Completion(_Request, kw_only=True):
    """A (legacy) ``completions`` body."""

    prompt: str | list[Any]


class _Embeddings(_Request, kw_only=True):
    """An ``embeddings`` body."""

    input: str | Annotated[list[Any], Meta(min_length=1)]


_SCHEMAS: dict[str, type[_Request]] = {
    "chat/completions": _Chat, "completions": _Completion, "embeddings": _Embeddings,
}
_LAST = ("provider", "tooti", "models")


def _fault_order(schema: type[_Request]) -> tuple[msgspec.structs.FieldInfo, ...]:
    """``schema``'s fields in the order their faults are reported: its own field
    (``messages``, ``prompt``, ``input``) before the gateway-only ones."""
    return tuple(sorted(msgspec.structs.fields(schema), key=lambda f: f.name in _LAST))


_ORDER = {schema: _fault_order(schema) for schema in (_Request, _Chat, _Completion, _Embeddings)}


# -- the gateway's texts for each fault --------------------------------------------

_MISSING = {
    "model": "you must provide a model parameter",
    "messages": "you must provide messages",
    "prompt": "you must provide a prompt",
    "input": "you must provide an input",
}
_TYPES = {
    "model": "model must be a non-empty string",
    "stream": "stream must be a boolean",
    "stream_options": "stream_options must be an object",
    **{name: f"{name} must be a number"
       for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")},
    **{name: f"{name} must be an integer"
       for name in ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs")},
    "stop": "stop must be a string or a list of strings",
    "messages": "messages must be a non-empty array",
    "prompt": "prompt must be a string or an array",
    "input": "input must be a string or a non-empty array",
    "provider": "provider must be an object",
    "tooti": "tooti must be an object",
    "models": "models must be a list of model names",
}
_INTEGERS = frozenset({"max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs"})
_MESSAGE_TYPES = {"role": "must be a string", "content": "must be a string or an array"}
_PREFERENCE_TYPES = {
    "allow_fallbacks": "must be a boolean",
    "max_price": "must be an object with non-negative numbers 'prompt' and/or "
                 "'completion' (per 1M tokens)",
    "only": "must be a list of node ids",
    "order": "must be a list of node ids",
    "ignore": "must be a list of node ids",
}


def _bad(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _fits(value: Any, kind: Any) -> bool:
    """True when ``value`` converts to the declared type ``kind``."""
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return False
    return True


def _first_fault(endpoint: str, body: dict[str, Any]) -> APIError:
    """Name the first fault of a body its Struct refused (or that broke a rule
    about two fields), in the order the gateway reports them.

    A range fault of an integer (``n`` is 0) is reported after the type faults
    of every integer (``seed`` is a string).
    """
    stream = body.get("stream") is True
    out_of_range: APIError | None = None
    for field in _ORDER[_SCHEMAS.get(endpoint, _Request)]:
        name = field.name
        if out_of_range is not None and name not in _INTEGERS:
            return out_of_range
        value = body.get(name)
        if value is None and field.required:
            return _bad(_MISSING[name], name, "missing_required_parameter")
        if name not in body:
            continue
        if name == "stream_options" and isinstance(value, dict) and not stream:
            return _bad("stream_options is only allowed when stream is true", name)
        if not _fits(value, field.type):
            if name in _INTEGERS and type(value) is int:
                out_of_range = out_of_range or _bad(f"{name} must be at least 1", name)
            elif name == "stream_options" and isinstance(value, dict):
                return _bad("include_usage must be a boolean", "stream_options.include_usage",
                            "invalid_type")
            elif name == "messages" and isinstance(value, list) and value:
                return _message_fault(value)
            elif name in ("provider", "tooti") and isinstance(value, dict):
                return _preference_fault(value, name)
            else:
                return _bad(_TYPES[name], name, "invalid_type")
        if name == "input" and stream:  # only embeddings have an input
            return _bad("embeddings cannot be streamed", "stream")
    if out_of_range is not None:
        return out_of_range
    raise AssertionError(f"no fault found in a refused {endpoint} body")


def _message_fault(messages: list[Any]) -> APIError:
    """The first fault of a non-empty ``messages`` array."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return _bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        for field in msgspec.structs.fields(_Message):
            if not _fits(message.get(field.name), field.type):
                param = f"messages[{i}].{field.name}"
                return _bad(f"{param} {_MESSAGE_TYPES[field.name]}", param, "invalid_type")
    raise AssertionError("no fault found in refused messages")


def _preference_fault(value: dict[str, Any], name: str) -> APIError:
    """The first fault of a ``provider`` / ``tooti`` object."""
    known = [field.name for field in msgspec.structs.fields(_Preferences)]
    for key in value:
        if key not in known:
            return _bad(f"unknown {name} field '{key}' (known: {', '.join(sorted(known))})",
                        f"{name}.{key}")
    for field in msgspec.structs.fields(_Preferences):
        if field.name in value and not _fits(value[field.name], field.type):
            param = f"{name}.{field.name}"
            if field.name == "sort":
                return _bad(f"{param} must be one of {', '.join(SORTS)}", param)
            return _bad(f"{param} {_PREFERENCE_TYPES[field.name]}", param, "invalid_type")
    raise AssertionError(f"no fault found in a refused {name} object")


# -- parsing -----------------------------------------------------------------------


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
    try:
        checked = msgspec.convert(body, _SCHEMAS.get(endpoint, _Request))
    except msgspec.ValidationError:
        raise _first_fault(endpoint, body) from None
    stream = bool(checked.stream)
    if (checked.stream_options is not None and not stream) or (
        stream and endpoint == "embeddings"
    ):
        raise _first_fault(endpoint, body)
    preferences = _DEFAULT_PREFERENCES
    rewrite = False
    chosen = checked.provider if checked.tooti is UNSET else checked.tooti
    if chosen is not UNSET:
        preferences = _preferences(chosen)
        rewrite = True
    model = checked.model
    models: tuple[str, ...] = (model,)
    if checked.models is not None:
        models = tuple(dict.fromkeys([model, *checked.models]))
        rewrite = True
    return ParsedRequest(endpoint, model, stream, body, preferences, models, rewrite)


def _price(value: float | UnsetType) -> float | None:
    """A checked price as a float (an integer too big for one is no limit)."""
    if value is UNSET:
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _preferences(value: _Preferences) -> Preferences:
    """The routing preferences a checked ``provider`` / ``tooti`` object asks for."""
    price = value.max_price or _MaxPrice()
    return Preferences(
        order=tuple(value.order or ()),
        only=frozenset(value.only) if value.only is not None else None,
        ignore=frozenset(value.ignore or ()),
        sort=value.sort,
        max_price_prompt=_price(price.prompt),
        max_price_completion=_price(price.completion),
        allow_fallbacks=value.allow_fallbacks,
    )
