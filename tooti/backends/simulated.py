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
``tool_calls``
    When true, a chat request that offers function ``tools`` and whose last message is
    not a tool result is answered with one call of its first tool, arguments
    ``{"simulated": true}`` (streamed in pieces, finish reason ``tool_calls``, 3
    completion tokens); once the conversation ends with a tool result the answer is
    text again, so a client's tool round trip completes (default false).
``cut_after``
    Streams only: after this many content chunks the chunk iterator raises
    :class:`~tooti.backends.base.BackendError` (code ``simulated_stream_cut``)
    as a broken upstream connection would.

All waits are ``trio.sleep`` calls, so cancellation takes effect at once.

The answers themselves (request validation, the planned tokens, the JSON bodies and
SSE events) are computed without I/O in :mod:`tooti.backends.simulated_answers`;
this module adds the options, the timing and the injected failures.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from tooti import clock
from tooti.backends.base import (
    BackendError,
    BackendResponse,
    ModelInfo,
    Upload,
    configured_endpoints,
    requested_model,
)
from tooti.backends.simulated_answers import (
    EmbeddingsJob,
    Job,
    StreamShape,
    completion_body,
    embeddings_body,
    prepare_embeddings,
    prepare_job,
    tool_call_body,
    tool_call_events,
    tool_to_call,
    wants_stream,
)
from tooti.backends.simulated_passthrough import passthrough_answer, transcription
from tooti.protocol.schemas import ALL_ENDPOINTS, PASSTHROUGH_ENDPOINTS
from tooti.settings import BackendSettings

DEFAULT_MODEL = "tooti-sim"


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
        self.tool_calls = bool(opts.get("tool_calls", False))
        self._rng = random.Random(opts.get("seed", 0))
        self.model_ids: list[str] = list(settings.models) or [DEFAULT_MODEL]
        self.healthy = True
        self.endpoints = configured_endpoints(settings, ALL_ENDPOINTS)
        """Every endpoint unless ``endpoints`` names fewer (the pass-through ones answer
        labelled fakes: :mod:`tooti.backends.simulated_passthrough`)."""
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
                endpoints=self.endpoints,
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
        if endpoint in PASSTHROUGH_ENDPOINTS:
            self._maybe_fail()
            if self.stall > 0:
                await trio.sleep(self.stall)
            yield passthrough_answer(endpoint, model, request)
            return
        stream = False
        if endpoint == "embeddings":
            chunks = self._embeddings(prepare_embeddings(model, request, self.embedding_dim))
        else:
            stream = wants_stream(request)
            job = prepare_job(endpoint, model, request, self.tokens)
            tool = (tool_to_call(request) if self.tool_calls and endpoint == "chat/completions"
                    else None)
            if tool is not None:
                chunks = self._tool_call(job, tool, stream)
            else:
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

    @asynccontextmanager
    async def open_upload(self, endpoint: str, upload: Upload
                          ) -> AsyncIterator[BackendResponse]:
        """Answer an ``audio/transcriptions`` upload once it has streamed past (see
        :func:`~tooti.backends.simulated_passthrough.transcription`)."""
        if endpoint != "audio/transcriptions" or endpoint not in self.endpoints:
            raise BackendError(f"no upload on /{endpoint}", status=404,
                               code="endpoint_not_served", retryable=False)
        if upload.model not in self.model_ids:
            raise BackendError(f"model {upload.model!r} is not served here", status=404,
                               code="model_not_found", retryable=False)
        self._maybe_fail()
        body = await transcription(upload)
        yield BackendResponse(200, "application/json", _chain(body, _nothing()))

    def _maybe_fail(self) -> None:
        if self.fail_rate > 0 and self._rng.random() < self.fail_rate:
            status = self.fail_status
            raise BackendError(
                f"simulated failure (status {status})", status=status, code="simulated_failure",
                retryable=status >= 500 or status in (408, 429),
            )

    # -- timing ---------------------------------------------------------

    async def _complete(self, job: Job) -> AsyncGenerator[bytes, None]:
        """Yield the one JSON body of a non-streaming answer once "generated"."""
        delay = self.ttft
        if self.tokens_per_second > 0 and len(job.tokens) > 1:
            delay += (len(job.tokens) - 1) / self.tokens_per_second
        await trio.sleep(delay)
        yield completion_body(job, uuid.uuid4().hex, int(clock.wall()))

    async def _stream(self, job: Job) -> AsyncGenerator[bytes, None]:
        """Yield the SSE events of a streaming answer, paced by ``ttft`` and
        ``tokens_per_second``, broken after ``cut_after`` content events."""
        shape = StreamShape(job, uuid.uuid4().hex, int(clock.wall()))
        start = clock.now() + self.ttft
        await trio.sleep_until(start)
        for event in shape.opening():
            yield event
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
                yield shape.content(i, text, position == 0)
                sent += 1
        for event in shape.closing():
            yield event

    async def _tool_call(self, job: Job, name: str, stream: bool
                         ) -> AsyncGenerator[bytes, None]:
        """Yield a call of tool ``name`` (the ``tool_calls`` option) after ``ttft``."""
        await trio.sleep(self.ttft)
        answer_id, created = uuid.uuid4().hex, int(clock.wall())
        if not stream:
            yield tool_call_body(job, name, answer_id, created)
            return
        for event in tool_call_events(job, name, answer_id, created):
            await trio.lowlevel.checkpoint()
            yield event

    async def _embeddings(self, job: EmbeddingsJob) -> AsyncGenerator[bytes, None]:
        """Yield the embeddings body after ``ttft``."""
        await trio.sleep(self.ttft)
        yield embeddings_body(job)


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    yield first
    async for chunk in rest:
        yield chunk


async def _nothing() -> AsyncGenerator[bytes, None]:
    return
    yield b""  # pragma: no cover - makes this an async generator
