"""The gateway's request checks: each refusal's exact message, param and code,
which of several faults is reported, and what passes through untouched."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tooti.errors import APIError
from tooti.gateway.validation import parse_request

CHAT = "chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
KNOWN = "allow_fallbacks, ignore, max_price, only, order, sort"
PRICE = ("max_price must be an object with non-negative numbers 'prompt' and/or "
         "'completion' (per 1M tokens)")


def refusal(endpoint: str, body: Any) -> tuple[str, str | None, str | None]:
    """(message, param, code) of the 400 that ``body`` gets on ``endpoint``."""
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    with pytest.raises(APIError) as info:
        parse_request(endpoint, raw)
    assert info.value.status == 400
    return info.value.message, info.value.param, info.value.code


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **fields}


TYPE = "invalid_type"
VALUE = "invalid_value"
MISSING = "missing_required_parameter"

CHAT_REFUSALS: list[tuple[dict[str, Any], tuple[str, str | None, str]]] = [
    ({"messages": MESSAGES}, ("you must provide a model parameter", "model", MISSING)),
    (chat(model=None), ("you must provide a model parameter", "model", MISSING)),
    (chat(model=5), ("model must be a non-empty string", "model", TYPE)),
    (chat(model=""), ("model must be a non-empty string", "model", TYPE)),
    (chat(stream="yes"), ("stream must be a boolean", "stream", TYPE)),
    (chat(stream=1), ("stream must be a boolean", "stream", TYPE)),
    (chat(stream=True, stream_options=[]),
     ("stream_options must be an object", "stream_options", TYPE)),
    (chat(stream_options={}),
     ("stream_options is only allowed when stream is true", "stream_options", VALUE)),
    (chat(stream=None, stream_options={"include_usage": True}),
     ("stream_options is only allowed when stream is true", "stream_options", VALUE)),
    (chat(stream=True, stream_options={"include_usage": "yes"}),
     ("include_usage must be a boolean", "stream_options.include_usage", TYPE)),
    (chat(temperature="hot"), ("temperature must be a number", "temperature", TYPE)),
    (chat(temperature=True), ("temperature must be a number", "temperature", TYPE)),
    (chat(top_p=[1]), ("top_p must be a number", "top_p", TYPE)),
    (chat(presence_penalty={}), ("presence_penalty must be a number", "presence_penalty", TYPE)),
    (chat(frequency_penalty="0"),
     ("frequency_penalty must be a number", "frequency_penalty", TYPE)),
    (chat(max_tokens="5"), ("max_tokens must be an integer", "max_tokens", TYPE)),
    (chat(max_tokens=5.0), ("max_tokens must be an integer", "max_tokens", TYPE)),
    (chat(max_tokens=False), ("max_tokens must be an integer", "max_tokens", TYPE)),
    (chat(max_completion_tokens=1.5),
     ("max_completion_tokens must be an integer", "max_completion_tokens", TYPE)),
    (chat(n="2"), ("n must be an integer", "n", TYPE)),
    (chat(seed=0.5), ("seed must be an integer", "seed", TYPE)),
    (chat(top_logprobs="3"), ("top_logprobs must be an integer", "top_logprobs", TYPE)),
    (chat(max_tokens=0), ("max_tokens must be at least 1", "max_tokens", VALUE)),
    (chat(max_completion_tokens=-3),
     ("max_completion_tokens must be at least 1", "max_completion_tokens", VALUE)),
    (chat(n=0), ("n must be at least 1", "n", VALUE)),
    (chat(stop=5), ("stop must be a string or a list of strings", "stop", TYPE)),
    (chat(stop=["a", 1]), ("stop must be a string or a list of strings", "stop", TYPE)),
    (chat(messages=None), ("you must provide messages", "messages", MISSING)),
    ({"model": "m"}, ("you must provide messages", "messages", MISSING)),
    (chat(messages="hi"), ("messages must be a non-empty array", "messages", TYPE)),
    (chat(messages=[]), ("messages must be a non-empty array", "messages", TYPE)),
    (chat(messages=[*MESSAGES, "hi"]), ("messages[1] must be an object", "messages[1]", TYPE)),
    (chat(messages=[{"content": "x"}]),
     ("messages[0].role must be a string", "messages[0].role", TYPE)),
    (chat(messages=[*MESSAGES, {"role": None}]),
     ("messages[1].role must be a string", "messages[1].role", TYPE)),
    (chat(messages=[{"role": "user", "content": 5}]),
     ("messages[0].content must be a string or an array", "messages[0].content", TYPE)),
    (chat(messages=[{"role": "user", "content": {"text": "x"}}]),
     ("messages[0].content must be a string or an array", "messages[0].content", TYPE)),
    (chat(provider="fast"), ("provider must be an object", "provider", TYPE)),
    (chat(tooti=[1]), ("tooti must be an object", "tooti", TYPE)),
    (chat(provider={"quantizations": ["q4"]}),
     (f"unknown provider field 'quantizations' (known: {KNOWN})", "provider.quantizations",
      VALUE)),
    (chat(tooti={"order": ["a"], "x": 1}),
     (f"unknown tooti field 'x' (known: {KNOWN})", "tooti.x", VALUE)),
    (chat(provider={"order": "a"}),
     ("provider.order must be a list of node ids", "provider.order", TYPE)),
    (chat(provider={"only": [1]}),
     ("provider.only must be a list of node ids", "provider.only", TYPE)),
    (chat(tooti={"ignore": [None]}),
     ("tooti.ignore must be a list of node ids", "tooti.ignore", TYPE)),
    (chat(provider={"sort": "fastest"}),
     ("provider.sort must be one of price, latency, throughput, load", "provider.sort", VALUE)),
    (chat(provider={"sort": 3}),
     ("provider.sort must be one of price, latency, throughput, load", "provider.sort", VALUE)),
    (chat(provider={"allow_fallbacks": 0}),
     ("provider.allow_fallbacks must be a boolean", "provider.allow_fallbacks", TYPE)),
    (chat(provider={"allow_fallbacks": None}),
     ("provider.allow_fallbacks must be a boolean", "provider.allow_fallbacks", TYPE)),
    (chat(provider={"max_price": 5}), (f"provider.{PRICE}", "provider.max_price", TYPE)),
    (chat(provider={"max_price": {"prompt": -1}}),
     (f"provider.{PRICE}", "provider.max_price", TYPE)),
    (chat(provider={"max_price": {"prompt": "1"}}),
     (f"provider.{PRICE}", "provider.max_price", TYPE)),
    (chat(provider={"max_price": {"completion": True}}),
     (f"provider.{PRICE}", "provider.max_price", TYPE)),
    (chat(provider={"max_price": {"completion": None}}),
     (f"provider.{PRICE}", "provider.max_price", TYPE)),
    (chat(tooti={"max_price": {"total": 1}}), (f"tooti.{PRICE}", "tooti.max_price", TYPE)),
    (chat(models="m2"), ("models must be a list of model names", "models", TYPE)),
    (chat(models=[1]), ("models must be a list of model names", "models", TYPE)),
    (chat(models=["m2", ""]), ("models must be a list of model names", "models", TYPE)),
]


@pytest.mark.parametrize(("body", "expected"), CHAT_REFUSALS)
def test_chat_refusals(body: dict[str, Any], expected: tuple[str, str | None, str]) -> None:
    assert refusal(CHAT, body) == expected


@pytest.mark.parametrize(("endpoint", "body", "expected"), [
    ("completions", {"model": "m"},
     ("you must provide a prompt", "prompt", MISSING)),
    ("completions", {"model": "m", "prompt": None},
     ("you must provide a prompt", "prompt", MISSING)),
    ("completions", {"model": "m", "prompt": 5},
     ("prompt must be a string or an array", "prompt", TYPE)),
    ("embeddings", {"model": "m"}, ("you must provide an input", "input", MISSING)),
    ("embeddings", {"model": "m", "input": {}},
     ("input must be a string or a non-empty array", "input", TYPE)),
    ("embeddings", {"model": "m", "input": []},
     ("input must be a string or a non-empty array", "input", TYPE)),
    ("embeddings", {"model": "m", "input": "x", "stream": True},
     ("embeddings cannot be streamed", "stream", VALUE)),
    ("embeddings", {"model": "m", "input": "x", "max_tokens": 0},
     ("max_tokens must be at least 1", "max_tokens", VALUE)),
])
def test_other_endpoint_refusals(
    endpoint: str, body: dict[str, Any], expected: tuple[str, str | None, str]
) -> None:
    assert refusal(endpoint, body) == expected


def test_bodies_that_are_not_objects() -> None:
    assert refusal(CHAT, b"[1, 2]") == ("request body must be a JSON object", None, TYPE)
    assert refusal(CHAT, b"null") == ("request body must be a JSON object", None, TYPE)
    message, param, code = refusal(CHAT, b"{not json")
    assert message.startswith("request body is not valid JSON: ") and code == "invalid_json"
    assert param is None


def test_depth_is_refused_before_anything_else() -> None:
    deep = b'{"model": 5, "x": ' + b"[" * 200 + b"]" * 200 + b"}"
    assert refusal(CHAT, deep) == (
        "request body nests arrays and objects deeper than 128 levels", None, "invalid_json")
    with pytest.raises(APIError) as info:
        parse_request(CHAT, msgspec.json.encode(chat(tools=[[[[1]]]])), max_depth=4)
    assert info.value.code == "invalid_json"
    assert parse_request(CHAT, msgspec.json.encode(chat(tools=[[[1]]])), max_depth=4)


# Several faults at once: the one reported is the first in the order the gateway
# has always checked (model, stream, stream_options, numbers, integers, ranges,
# stop, the endpoint's own fields, preferences, models), whatever the body's order.
@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": "x", "messages": 5}, "model"),
    ({"messages": 5, "stop": 5, "model": "m"}, "stop"),
    ({"seed": "x", "temperature": "x", "model": "m"}, "temperature"),
    ({"n": 0, "seed": "x", "model": "m"}, "seed"),
    ({"stop": 1, "n": 0, "model": "m"}, "n"),
    ({"max_tokens": 0, "max_completion_tokens": 0, "model": "m"}, "max_tokens"),
    ({"models": 5, "provider": 5, "messages": MESSAGES, "model": "m"}, "provider"),
    ({"tooti": 5, "provider": 5, "messages": MESSAGES, "model": "m"}, "provider"),
    ({"provider": {"only": 1, "sort": "x", "q": 1}, "messages": MESSAGES, "model": "m"},
     "provider.q"),
    ({"provider": {"ignore": 1, "order": 1, "only": 1, "max_price": 1},
      "messages": MESSAGES, "model": "m"}, "provider.max_price"),
    ({"provider": {"ignore": 1, "order": 1, "only": 1}, "messages": MESSAGES, "model": "m"},
     "provider.only"),
    ({"provider": {"ignore": 1, "order": 1}, "messages": MESSAGES, "model": "m"},
     "provider.order"),
    ({"provider": {"allow_fallbacks": 1, "sort": "x"}, "messages": MESSAGES, "model": "m"},
     "provider.sort"),
    ({"messages": [{"role": 1}, 5], "model": "m"}, "messages[0].role"),
    ({"messages": [{"content": 5, "role": 1}], "model": "m"}, "messages[0].role"),
    ({"stream_options": {"include_usage": 1}, "model": "m", "messages": MESSAGES},
     "stream_options"),
])
def test_first_fault_is_reported(body: dict[str, Any], param: str) -> None:
    assert refusal(CHAT, body)[1] == param


def test_what_is_learned_and_what_passes_through() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}],
                                        "name": 5}],
            "stream": True, "stream_options": {"include_usage": True, "x": 1},
            "temperature": 1, "top_p": 0.5, "max_tokens": 2**40, "seed": -1, "stop": [],
            "logit_bias": {"1": 2}, "unknown": {"deep": [1, "two"]}, "n": 1}
    raw = msgspec.json.encode(body)
    parsed = parse_request(CHAT, raw)
    assert parsed.body == body and parsed.stream and parsed.model == "m"
    assert parsed.models == ("m",) and not parsed.rewrite and parsed.preferences.is_default
    assert not parse_request(CHAT, msgspec.json.encode(chat(stream=None))).stream
    assert parse_request("completions", b'{"model": "m", "prompt": [1, 2]}').endpoint == (
        "completions")
    assert parse_request("embeddings", b'{"model": "m", "input": ["a"], "stream": false}')
    assert parse_request("models", b'{"model": "m"}').body == {"model": "m"}
    fallbacks = parse_request(CHAT, msgspec.json.encode(chat(models=["b", "m", "b"])))
    assert fallbacks.models == ("m", "b") and fallbacks.rewrite
    empty = parse_request(CHAT, msgspec.json.encode(chat(provider={})))
    assert empty.rewrite and empty.preferences.is_default
    price = parse_request(CHAT, msgspec.json.encode(chat(tooti={"max_price": {"prompt": 0}})))
    assert price.preferences.max_price_prompt == 0.0
    assert price.preferences.max_price_completion is None
    huge = b'{"model": "m", "messages": [], "provider": {"max_price": {"prompt": 1%s}}}'
    assert refusal(CHAT, huge % (b"0" * 400))[1] == "messages"
    huge = huge.replace(b"[]", b'[{"role": "user"}]')
    assert parse_request(CHAT, huge % (b"0" * 400)).preferences.max_price_prompt == float("inf")
