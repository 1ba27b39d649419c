"""What the simulated backend answers, computed without I/O or waiting.

:func:`prepare_job` validates a ``chat/completions`` or ``completions`` request and
plans its answer (a :class:`Job`: the tokens ``" tok0"``, ``" tok1"``, ..., the finish
reason, the number of choices, the prompt's token count);
:func:`prepare_embeddings` does the same for ``embeddings`` (an
:class:`EmbeddingsJob`). :func:`completion_body`, :class:`StreamShape` and
:func:`embeddings_body` turn a plan into the OpenAI wire bytes: one JSON body, or the
SSE events of a stream. Invalid requests raise the 400
:class:`~tooti.backends.base.BackendError` of :func:`~tooti.backends.base.bad_request`.

When each byte is sent (``ttft``, ``tokens_per_second``, ``stall``) and which
requests fail (``fail_rate``, ``cut_after``) is the backend's business, in
:mod:`tooti.backends.simulated`; ids and timestamps are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from dataclasses import dataclass
from typing import Any

import msgspec

from tooti.backends.base import bad_request
from tooti.protocol.numbers import is_int

SYSTEM_FINGERPRINT = "tooti-simulated"
MAX_N = 128
"""Largest ``n`` (choices per prompt) accepted."""
MAX_EMBEDDING_DIM = 65_536
DONE_EVENT = b"data: [DONE]\n\n"
"""The last event of every stream."""

_encode = msgspec.json.encode


# -- request fields ---------------------------------------------------------


def _opt_int(value: Any, name: str) -> int | None:
    """Validate an optional non-negative integer request field."""
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise bad_request(f"'{name}' must be a non-negative integer")
    return value


def _words(text: str) -> int:
    return len(text.split())


def count_message_tokens(messages: list[Any]) -> int:
    """Count prompt "tokens" of chat messages: whitespace-separated words, min 1.

    String contents and the ``text`` parts of array contents are counted.
    """
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += _words(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    text = part.get("text")
                    if isinstance(text, str):
                        total += _words(text)
    return max(total, 1)


def _is_token_array(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(is_int(t) for t in value)
    )


def split_inputs(value: Any, name: str) -> list[str | list[int]]:
    """Normalise a ``prompt``/``input`` field into a list of texts or token arrays."""
    if isinstance(value, str):
        return [value]
    if _is_token_array(value):
        return [list(value)]
    if isinstance(value, list) and value:
        items: list[str | list[int]] = []
        for item in value:
            if isinstance(item, str):
                items.append(item)
            elif _is_token_array(item):
                items.append(list(item))
            else:
                raise bad_request(
                    f"'{name}' must be a string, an array of strings or of token arrays"
                )
        return items
    raise bad_request(f"'{name}' is required: a non-empty string or array")


def input_tokens(item: str | list[int]) -> int:
    """Token count of one prompt/input: its length if a token array, else its words."""
    return len(item) if isinstance(item, list) else _words(item)


def wants_stream(request: dict[str, Any]) -> bool:
    """The request's ``stream`` flag (absent or null: False); 400 unless a boolean."""
    stream = request.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    return bool(stream)


# -- chat and completions -----------------------------------------------------


@dataclass
class Job:
    """A validated chat/completions request and its planned answer."""

    chat: bool
    model: str
    prompt_tokens: int
    n_choices: int
    tokens: list[str]
    """The generated tokens (the same for every choice)."""
    finish_reason: str
    include_usage: bool

    @property
    def usage(self) -> dict[str, int]:
        """The answer's OpenAI ``usage`` object (every choice's tokens count)."""
        return usage(self.prompt_tokens, len(self.tokens) * self.n_choices)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An OpenAI ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def plan_tokens(request: dict[str, Any], length: int) -> tuple[list[str], str]:
    """Return the generated tokens and the finish reason.

    ``length`` tokens unless ``max_tokens``/``max_completion_tokens`` cap them
    (finish reason ``length``) or one of the ``stop`` strings is the next token
    (finish reason ``stop``, that token left out).
    """
    caps = [
        cap
        for cap in (
            _opt_int(request.get("max_tokens"), "max_tokens"),
            _opt_int(request.get("max_completion_tokens"), "max_completion_tokens"),
        )
        if cap is not None
    ]
    stop = request.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad_request("'stop' must be a string or an array of strings")
    stripped = {s.strip() for s in stops if s.strip()}
    limit = min([length, *caps])
    tokens: list[str] = []
    for i in range(limit):
        text = f" tok{i}"
        if text in stops or text.strip() in stripped:
            return tokens, "stop"
        tokens.append(text)
    return tokens, "length" if caps and min(caps) < length else "stop"


def prepare_job(endpoint: str, model: str, request: dict[str, Any], length: int) -> Job:
    """Validate a chat/completions request and plan its answer of up to ``length`` tokens."""
    if endpoint == "chat/completions":
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' is required: a non-empty array")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise bad_request("each message must be an object with a 'role'")
        prompt_tokens, n_prompts = count_message_tokens(messages), 1
    else:
        prompts = split_inputs(request.get("prompt"), "prompt")
        prompt_tokens = max(sum(input_tokens(p) for p in prompts), 1)
        n_prompts = len(prompts)
    n = request.get("n", 1)
    if n is None:
        n = 1
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise bad_request(f"'n' must be an integer between 1 and {MAX_N}")
    options = request.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object")
    tokens, finish_reason = plan_tokens(request, length)
    return Job(
        chat=endpoint == "chat/completions",
        model=model,
        prompt_tokens=prompt_tokens,
        n_choices=n * n_prompts,
        tokens=tokens,
        finish_reason=finish_reason,
        include_usage=bool(options and options.get("include_usage")),
    )


def completion_body(job: Job, answer_id: str, created: int) -> bytes:
    """The JSON body of a non-streaming answer; ``answer_id`` follows ``chatcmpl-``/``cmpl-``."""
    text = "".join(job.tokens)
    if job.chat:
        return _encode({
            "id": f"chatcmpl-{answer_id}",
            "object": "chat.completion",
            "created": created,
            "model": job.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": job.finish_reason,
                }
                for i in range(job.n_choices)
            ],
            "usage": job.usage,
        })
    return _encode({
        "id": f"cmpl-{answer_id}",
        "object": "text_completion",
        "created": created,
        "model": job.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
            for i in range(job.n_choices)
        ],
        "usage": job.usage,
    })


class StreamShape:
    """The SSE events of one streamed answer to ``job``: the fields every chunk repeats
    (id, object, created, model, fingerprint and, when usage was asked for, ``usage:
    null``), encoded once, and whether it is a chat stream."""

    __slots__ = ("_base", "_chat", "_head", "job")

    def __init__(self, job: Job, answer_id: str, created: int) -> None:
        """Encode the repeated fields; ``answer_id`` follows ``chatcmpl-``/``cmpl-``."""
        chat = job.chat
        self.job = job
        self._chat = chat
        self._base: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{answer_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": job.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if job.include_usage:
            self._base["usage"] = None
        # ``{**base, "choices": [choice]}`` encoded: the base object left open, then
        # the one choice (msgspec writes keys in order, without spaces).
        self._head = b"data: " + _encode(self._base)[:-1] + b',"choices":['

    def _event(self, choice: dict[str, Any]) -> bytes:
        return self._head + _encode(choice) + b"]}\n\n"

    def opening(self) -> list[bytes]:
        """The events before the first token: for a chat answer without tokens, one
        empty content event per choice carrying the assistant role; else none."""
        if self.job.tokens or not self._chat:
            return []
        return [self.content(i, "", True) for i in range(self.job.n_choices)]

    def content(self, index: int, text: str, first: bool) -> bytes:
        """The event carrying ``text`` for choice ``index`` (``first``: also its role)."""
        if not self._chat:
            return self._event(
                {"index": index, "text": text, "logprobs": None, "finish_reason": None}
            )
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return self._event(
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        )

    def closing(self) -> list[bytes]:
        """The events after the last token: each choice's finish reason, the usage
        chunk when asked for, and ``data: [DONE]``."""
        job = self.job
        reason = job.finish_reason
        events = [
            self._event(
                {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}
                if self._chat
                else {"index": i, "text": "", "logprobs": None, "finish_reason": reason}
            )
            for i in range(job.n_choices)
        ]
        if job.include_usage:
            events.append(
                b"data: " + _encode({**self._base, "choices": [], "usage": job.usage}) + b"\n\n"
            )
        events.append(DONE_EVENT)
        return events


# -- embeddings ---------------------------------------------------------------


@dataclass
class EmbeddingsJob:
    """A validated embeddings request: its inputs, vector size and encoding."""

    model: str
    inputs: list[str | list[int]]
    dim: int
    encoding_format: str
    """``float`` or ``base64``."""
    prompt_tokens: int


def prepare_embeddings(model: str, request: dict[str, Any], default_dim: int) -> EmbeddingsJob:
    """Validate an embeddings request (``dimensions`` overrides ``default_dim``)."""
    inputs = split_inputs(request.get("input"), "input")
    dim = request.get("dimensions")
    if dim is None:
        dim = default_dim
    elif not is_int(dim) or not 1 <= dim <= MAX_EMBEDDING_DIM:
        raise bad_request("'dimensions' must be a positive integer")
    fmt = request.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'")
    prompt_tokens = max(sum(input_tokens(i) for i in inputs), 1)
    return EmbeddingsJob(model, inputs, dim, fmt, prompt_tokens)


def embedding_vector(item: str | list[int], dim: int) -> list[float]:
    """Return the deterministic unit vector of one embedding input."""
    key = item if isinstance(item, str) else " ".join(map(str, item))
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


def embeddings_body(job: EmbeddingsJob) -> bytes:
    """The JSON body answering ``job``."""
    data = []
    for index, item in enumerate(job.inputs):
        vec = embedding_vector(item, job.dim)
        embedding: Any = vec
        if job.encoding_format == "base64":
            packed = struct.pack(f"<{len(vec)}f", *vec)
            embedding = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return _encode({
        "object": "list",
        "data": data,
        "model": job.model,
        "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens},
    })


# -- tool calls (the ``tool_calls`` option) -------------------------------------

TOOL_ARGUMENTS = '{"simulated": true}'
"""The arguments of every simulated tool call."""
TOOL_CALL_TOKENS = 3
"""The completion tokens a simulated tool call counts."""


def tool_to_call(request: dict[str, Any]) -> str | None:
    """The name of the first function tool a chat request offers, when its last message
    is not a tool result (a simulated model calls a tool once, then answers text)."""
    tools = request.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    messages = request.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "tool":
        return None
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    return None


def tool_call_body(job: Job, name: str, answer_id: str, created: int) -> bytes:
    """A non-streamed answer calling tool ``name`` with :data:`TOOL_ARGUMENTS`."""
    return _encode({
        "id": f"chatcmpl-{answer_id}", "object": "chat.completion", "created": created,
        "model": job.model, "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": None, "refusal": None,
            "tool_calls": [{"id": f"call_{answer_id[:24]}", "type": "function",
                            "function": {"name": name, "arguments": TOOL_ARGUMENTS}}]},
            "logprobs": None, "finish_reason": "tool_calls"}],
        "usage": usage(job.prompt_tokens, TOOL_CALL_TOKENS),
    })


def tool_call_events(job: Job, name: str, answer_id: str, created: int) -> list[bytes]:
    """The SSE events of a streamed tool call: the call's id and name, its arguments in
    two pieces, the ``tool_calls`` finish, the usage chunk when asked for, ``[DONE]``."""
    base = {"id": f"chatcmpl-{answer_id}", "object": "chat.completion.chunk",
            "created": created, "model": job.model, "system_fingerprint": SYSTEM_FINGERPRINT}
    half = len(TOOL_ARGUMENTS) // 2
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": None, "tool_calls": [{
            "index": 0, "id": f"call_{answer_id[:24]}", "type": "function",
            "function": {"name": name, "arguments": ""}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGUMENTS[:half]}}]},
         None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGUMENTS[half:]}}]},
         None),
        ({}, "tool_calls"),
    ]
    events = [b"data: " + _encode({**base, "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}) + b"\n\n"
        for delta, finish in deltas]
    if job.include_usage:
        events.append(b"data: " + _encode({**base, "choices": [], "usage": usage(
            job.prompt_tokens, TOOL_CALL_TOKENS)}) + b"\n\n")
    events.append(DONE_EVENT)
    return events
