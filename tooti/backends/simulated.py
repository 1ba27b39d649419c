"""A deterministic, clearly labelled fake model server for benchmarks and demos.

:class:`SimulatedBackend` (config type ``simulated``) answers OpenAI-style
requests without any model: completions are the tokens ``" tok0"``,
``" tok1"``, ... and embeddings are deterministic unit vectors derived from the
input. Every model it advertises carries ``owned_by = "tooti-simulated"`` and
``meta = {"simulated": true}`` so nobody mistakes it for real inference.

Options (``BackendSettings.options``):

``ttft``
    Seconds before the first token (default 0). For a stream the head is sent
    at once and the first token follows after ``ttft``; a non-streaming answer's
    head comes after the whole (simulated) generation.
``tokens_per_second``
    Generation speed after the first token (default 0 = as fast as possible).
``tokens``
    Completion length when nothing caps it (default 16).
``embedding_dim``
    Embedding vector size (default 8; a request's ``dimensions`` overrides it).
``context_length``
    Context length advertised in :class:`~tooti.backends.base.ModelInfo`
    (default 8192).

Failure injection (for tests of the layers above):

``fail_rate``
    Probability (0..1) that a request fails before its head with
    :class:`~tooti.backends.base.BackendError` status ``fail_status``. The
    draws come from a private RNG seeded with ``seed`` (default 0), so a given
    sequence of requests fails the same way every run.
``fail_status``
    HTTP status of injected failures (default 500; retryable when >= 500,
    429 or 408).
``stall``
    Seconds to hang before the response head (default 0), i.e. before the
    first token, for first-byte-timeout and cancellation tests.
``cut_after``
    Streams only: after this many content chunks the chunk iterator raises
    :class:`~tooti.backends.base.BackendError` (code ``simulated_stream_cut``)
    as a broken upstream connection would.

All waits are ``trio.sleep`` calls, so cancellation takes effect at once.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from tooti.backends.base import (
    BackendError,
    BackendResponse,
    ModelInfo,
    bad_request,
    requested_model,
)
from tooti.settings import BackendSettings

DEFAULT_MODEL = "tooti-sim"
SYSTEM_FINGERPRINT = "tooti-simulated"
MAX_N = 128
"""Largest ``n`` (choices per prompt) accepted."""
MAX_EMBEDDING_DIM = 65_536

_encode = msgspec.json.encode



def _opt_int(value: Any, name: str) -> int | None:
    """Validate an optional non-negative integer request field."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
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
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _split_inputs(value: Any, name: str) -> list[str | list[int]]:
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


def _input_tokens(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else _words(item)


def embedding_vector(item: str | list[int], dim: int) -> list[float]:
    """Return the deterministic unit vector of one embedding input."""
    key = item if isinstance(item, str) else " ".join(map(str, item))
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


@dataclass
class _Job:
    """A validated chat/completions request and its planned answer."""

    chat: bool
    model: str
    prompt_tokens: int
    n_choices: int
    tokens: list[str]
    """The generated tokens (the same for every choice)."""
    finish_reason: str
    include_usage: bool


class SimulatedBackend:
    """A deterministic fake OpenAI-compatible model server (type ``simulated``).

    See the module docstring for the options. ``healthy`` may be flipped by
    tests to make :meth:`health` report False.
    """

    type_name = "simulated"

    def __init__(self, settings: BackendSettings) -> None:
        """Read the options; nothing is started."""
        self.settings = settings
        opts = settings.options
        self.ttft = float(opts.get("ttft", 0.0))
        self.tokens_per_second = float(opts.get("tokens_per_second", 0.0))
        self.tokens = int(opts.get("tokens", 16))
        self.embedding_dim = int(opts.get("embedding_dim", 8))
        self.context_length = int(opts.get("context_length", 8192))
        self.fail_rate = float(opts.get("fail_rate", 0.0))
        self.fail_status = int(opts.get("fail_status", 500))
        self.stall = float(opts.get("stall", 0.0))
        cut_after = opts.get("cut_after")
        self.cut_after: int | None = None if cut_after is None else int(cut_after)
        self._rng = random.Random(opts.get("seed", 0))
        self.model_ids: list[str] = list(settings.models) or [DEFAULT_MODEL]
        self.healthy = True
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("simulated backend: fail_rate must be within 0..1")
        if self.tokens < 0 or self.embedding_dim < 1:
            raise ValueError("simulated backend: tokens must be >= 0, embedding_dim >= 1")

    async def start(self) -> None:
        """Nothing to prepare."""

    async def run(self) -> None:
        """Nothing to supervise: sleep until cancelled."""
        await trio.sleep_forever()

    async def models(self) -> list[ModelInfo]:
        """Return the configured (or default) simulated models."""
        return [
            ModelInfo(
                id=model_id,
                context_length=self.context_length,
                max_concurrency=self.settings.max_concurrency,
                price_input=self.settings.price_input,
                price_output=self.settings.price_output,
                owned_by="tooti-simulated",
                meta={"simulated": True},
            )
            for model_id in self.model_ids
        ]

    async def health(self) -> bool:
        """Return :attr:`healthy` (True unless a test changed it)."""
        return self.healthy

    async def close(self) -> None:
        """Nothing to release."""

    # -- requests -------------------------------------------------------

    @asynccontextmanager
    async def open(
        self, endpoint: str, body: bytes, request: dict[str, Any]
    ) -> AsyncIterator[BackendResponse]:
        """Answer one request; see :meth:`tooti.backends.base.Backend.open`."""
        model = requested_model(endpoint, request)
        if model not in self.model_ids:
            raise BackendError(
                f"model {model!r} is not served here", status=404, code="model_not_found",
                retryable=False,
            )
        stream = False
        if endpoint == "embeddings":
            chunks = self._embeddings(model, request)
        else:
            stream_field = request.get("stream", False)
            if stream_field is not None and not isinstance(stream_field, bool):
                raise bad_request("'stream' must be a boolean")
            stream = bool(stream_field)
            job = self._prepare(endpoint, model, request)
            chunks = self._stream(job) if stream else self._complete(job)
        try:
            self._maybe_fail()
            if self.stall > 0:
                await trio.sleep(self.stall)
            if stream:
                yield BackendResponse(200, "text/event-stream", chunks)
                return
            # A non-streaming answer's head only comes once "generation" is done.
            first = await chunks.__anext__()
            yield BackendResponse(200, "application/json", _chain(first, chunks))
        finally:
            await chunks.aclose()

    def _maybe_fail(self) -> None:
        if self.fail_rate > 0 and self._rng.random() < self.fail_rate:
            status = self.fail_status
            raise BackendError(
                f"simulated failure (status {status})", status=status, code="simulated_failure",
                retryable=status >= 500 or status in (408, 429),
            )

    # -- generation -----------------------------------------------------

    def _plan(self, request: dict[str, Any]) -> tuple[list[str], str]:
        """Return the generated tokens and the finish reason."""
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
        limit = min([self.tokens, *caps])
        tokens: list[str] = []
        for i in range(limit):
            text = f" tok{i}"
            if text in stops or text.strip() in stripped:
                return tokens, "stop"
            tokens.append(text)
        return tokens, "length" if caps and min(caps) < self.tokens else "stop"

    def _prepare(self, endpoint: str, model: str, request: dict[str, Any]) -> _Job:
        """Validate a chat/completions request and plan its answer."""
        if endpoint == "chat/completions":
            messages = request.get("messages")
            if not isinstance(messages, list) or not messages:
                raise bad_request("'messages' is required: a non-empty array")
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise bad_request("each message must be an object with a 'role'")
            prompt_tokens, n_prompts = count_message_tokens(messages), 1
        else:
            prompts = _split_inputs(request.get("prompt"), "prompt")
            prompt_tokens = max(sum(_input_tokens(p) for p in prompts), 1)
            n_prompts = len(prompts)
        n = request.get("n", 1)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise bad_request(f"'n' must be an integer between 1 and {MAX_N}")
        options = request.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object")
        tokens, finish_reason = self._plan(request)
        return _Job(
            chat=endpoint == "chat/completions",
            model=model,
            prompt_tokens=prompt_tokens,
            n_choices=n * n_prompts,
            tokens=tokens,
            finish_reason=finish_reason,
            include_usage=bool(options and options.get("include_usage")),
        )

    async def _complete(self, job: _Job) -> AsyncGenerator[bytes, None]:
        """Yield the one JSON body of a non-streaming chat/completions answer."""
        delay = self.ttft
        if self.tokens_per_second > 0 and len(job.tokens) > 1:
            delay += (len(job.tokens) - 1) / self.tokens_per_second
        await trio.sleep(delay)
        text = "".join(job.tokens)
        usage = _usage(job.prompt_tokens, len(job.tokens) * job.n_choices)
        created = int(time.time())
        if job.chat:
            yield _encode({
                "id": f"chatcmpl-{uuid.uuid4().hex}",
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
                "usage": usage,
            })
            return
        yield _encode({
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": created,
            "model": job.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": job.finish_reason}
                for i in range(job.n_choices)
            ],
            "usage": usage,
        })

    async def _stream(self, job: _Job) -> AsyncGenerator[bytes, None]:
        """Yield the SSE events of a streaming chat/completions answer."""
        chat = job.chat
        base: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": job.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if job.include_usage:
            base["usage"] = None

        def event(choice: dict[str, Any]) -> bytes:
            return b"data: " + _encode({**base, "choices": [choice]}) + b"\n\n"

        def content(index: int, text: str, first: bool) -> dict[str, Any]:
            if not chat:
                return {"index": index, "text": text, "logprobs": None, "finish_reason": None}
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

        start = trio.current_time() + self.ttft
        await trio.sleep_until(start)
        if not job.tokens and chat:
            for i in range(job.n_choices):
                yield event(content(i, "", True))
        sent = 0
        for position, text in enumerate(job.tokens):
            if position and self.tokens_per_second > 0:
                await trio.sleep_until(start + position / self.tokens_per_second)
            for i in range(job.n_choices):
                if self.cut_after is not None and sent >= self.cut_after:
                    raise BackendError(
                        "simulated stream cut", status=502, code="simulated_stream_cut"
                    )
                await trio.lowlevel.checkpoint()
                yield event(content(i, text, position == 0))
                sent += 1
        for i in range(job.n_choices):
            if chat:
                done = {"index": i, "delta": {}, "logprobs": None,
                        "finish_reason": job.finish_reason}
            else:
                done = {"index": i, "text": "", "logprobs": None,
                        "finish_reason": job.finish_reason}
            yield event(done)
        if job.include_usage:
            usage = _usage(job.prompt_tokens, len(job.tokens) * job.n_choices)
            yield b"data: " + _encode({**base, "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    # -- embeddings -----------------------------------------------------

    def _embeddings(self, model: str, request: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        """Validate an embeddings request now; return the body generator."""
        inputs = _split_inputs(request.get("input"), "input")
        dim = request.get("dimensions")
        if dim is None:
            dim = self.embedding_dim
        elif isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_EMBEDDING_DIM:
            raise bad_request("'dimensions' must be a positive integer")
        fmt = request.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise bad_request("'encoding_format' must be 'float' or 'base64'")
        prompt_tokens = max(sum(_input_tokens(i) for i in inputs), 1)

        async def make() -> AsyncGenerator[bytes, None]:
            await trio.sleep(self.ttft)
            data = []
            for index, item in enumerate(inputs):
                vec = embedding_vector(item, dim)
                embedding: Any = vec
                if fmt == "base64":
                    packed = struct.pack(f"<{len(vec)}f", *vec)
                    embedding = base64.b64encode(packed).decode("ascii")
                data.append({"object": "embedding", "index": index, "embedding": embedding})
            yield _encode({
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            })

        return make()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    yield first
    async for chunk in rest:
        yield chunk
