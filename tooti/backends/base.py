"""The contract every node backend fulfils.

A backend wraps one model server (or simulates one). The node calls it for
model discovery, health, and to serve one OpenAI-style request. Request bodies
arrive as the exact bytes the client sent (so tools, ``response_format``,
array content and every other field pass through intact) together with the
decoded JSON object for backends that need to look inside.

A response is an HTTP-like head (status, content type) plus an async iterator
of raw byte chunks in OpenAI wire format: a JSON object for a non-streaming
call, ``text/event-stream`` SSE events (ending with ``data: [DONE]``) for a
streaming one. The node forwards these bytes unchanged and reads usage from
them; a backend never needs to frame or meter anything itself.

Cancellation: the node runs :meth:`Backend.open` inside the stream's cancel
scope. When the client goes away the scope is cancelled, and the backend's
upstream HTTP request must be closed so the model server sees the disconnect.

Endpoints: each :class:`ModelInfo` names the endpoints its model serves (default
:data:`~tooti.protocol.schemas.ENDPOINTS`: chat/completions, completions, embeddings).
The pass-through endpoints (rerank, audio/speech, images/generations, responses) come
to :meth:`Backend.open` like the others, as JSON bytes; their answer may be any content
type (audio/speech answers binary audio) and is relayed as it comes. An
``audio/transcriptions`` upload is a multipart form that is never held whole: a backend
that serves it defines ``open_upload(endpoint, upload: Upload)``, an async context
manager yielding a :class:`BackendResponse` like :meth:`Backend.open`.

Health: :meth:`Backend.health` answers yes or no. A backend that can say why it is
unhealthy keeps the reason in a ``health_error`` string attribute (``""`` while
healthy): the URL it asked and the cause (connection refused, the HTTP status, a
timeout). :func:`health_problem` reads it for the node's log line, and falls back to
a generic sentence for backends (e.g. plugins') that keep none.

Loading: a backend that knows which models it will serve before it is up (the embedded
llama.cpp backend names its model from the start, and takes seconds to load it) may
define ``loading_models() -> list[ModelInfo]``: the models it is loading now (an empty
list once it is up, and once a start has failed: it is not loading any more). The node
then runs its :meth:`Backend.start` in the background, announces those models with
state ``loading`` from its first second, and as ``ready`` once :meth:`Backend.health`
passes and :meth:`Backend.models` lists them; a gateway answers requests for a model
only loading nodes serve with 503 ``model_loading`` and ``Retry-After``. A backend
without the method (a remote server that may be down cannot say what it will serve) is
started before the node dials, as before, and announces nothing until it answers
(:func:`loading_models`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import msgspec

from tooti.protocol.schemas import (
    ALL_ENDPOINTS,
    ENDPOINTS,
    LOADING,
    READY,
    ModelEntry,
    ModelState,
)
from tooti.settings import BackendSettings


@dataclass(frozen=True)
class ModelInfo:
    """One model a backend serves, as advertised in the tunnel's MODELS frame."""

    id: str
    endpoints: tuple[str, ...] = ENDPOINTS
    context_length: int | None = None
    max_concurrency: int = 8
    price_input: float = 0.0
    """Price per 1M prompt tokens, in the operator's currency unit."""
    price_output: float = 0.0
    """Price per 1M completion tokens."""
    warm: bool = True
    owned_by: str = "tooti"
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra metadata shown in ``/v1/models`` (e.g. ``{"simulated": true}``)."""
    state: ModelState = READY
    """``ready``, or ``loading`` while its backend starts (see :func:`loading_models`):
    a gateway routes only ready models and answers 503 ``model_loading`` for the rest."""

    @property
    def ready(self) -> bool:
        """True when the model takes requests (its state is ``ready``)."""
        return self.state == READY

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON-able dict sent in a MODELS frame."""
        wire: dict[str, Any] = {"id": self.id}
        if self.endpoints != ENDPOINTS:  # absent means the usual three: a shorter list
            wire["endpoints"] = list(self.endpoints)
        return {
            **wire,
            "context_length": self.context_length,
            "max_concurrency": self.max_concurrency,
            "price": {"input": self.price_input, "output": self.price_output},
            "warm": self.warm,
            "owned_by": self.owned_by,
            "meta": self.meta,
            "state": self.state,
        }

    @classmethod
    def from_wire(cls, entry: ModelEntry | dict[str, Any]) -> ModelInfo:
        """Build a ModelInfo from a MODELS frame entry, checked against its schema
        (:class:`~tooti.protocol.schemas.ModelEntry`, every value bounded); a dict is
        converted first and raises ValueError (``msgspec.ValidationError``) if invalid."""
        if not isinstance(entry, ModelEntry):
            entry = msgspec.convert(entry, ModelEntry)
        return cls(
            id=entry.id,
            endpoints=tuple(entry.endpoints or ENDPOINTS),
            context_length=entry.context_length,
            max_concurrency=entry.max_concurrency,
            price_input=entry.price.input,
            price_output=entry.price.output,
            warm=entry.warm,
            owned_by=entry.owned_by,
            meta=dict(entry.meta),
            state=entry.state,
        )


@dataclass
class BackendResponse:
    """The head and body of one backend answer."""

    status: int
    content_type: str
    chunks: AsyncIterator[bytes]
    """Raw body bytes in OpenAI wire format, in arbitrary chunk boundaries.

    A failure after the head (upstream connection lost, ...) is raised from
    the iterator; the bundled backends raise :class:`BackendError` there too.
    Iterating after the :meth:`Backend.open` context was left is an error.
    """


class BackendStartError(RuntimeError):
    """A backend could not start at all (e.g. the embedded model's server): ``tooti run``
    stops with its message in one line, no traceback."""


@dataclass
class Upload:
    """A request body that is not held whole (``audio/transcriptions``' multipart form):
    the node hands it to :meth:`Backend.open_upload` as it arrives through the tunnel.

    ``chunks`` yields the body's bytes in arbitrary pieces (the tunnel's flow control
    bounds what is in flight); ``content_type`` is the client's, with its multipart
    ``boundary``; ``model`` the model the gateway routed the request for."""

    content_type: str
    model: str
    chunks: AsyncIterator[bytes]


def open_upload_of(backend: Backend) -> Any:
    """``backend.open_upload`` (see :class:`Upload`), or None for a backend without one:
    such a backend serves no streamed upload (and should announce none)."""
    method = getattr(backend, "open_upload", None)
    return method if callable(method) else None


class BackendError(Exception):
    """A backend failed before producing a response head.

    ``status`` is the HTTP status to report (the upstream's where meaningful,
    502 for a transport failure); ``code`` is an OpenAI-style error code.
    ``retryable`` tells the gateway whether another node may succeed.
    """

    def __init__(
        self, message: str, *, status: int = 502, code: str = "backend_error",
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable


def bad_request(message: str) -> BackendError:
    """A 400 for a request the backend cannot serve as asked (never retried elsewhere)."""
    return BackendError(message, status=400, code="invalid_request_error", retryable=False)


def check_endpoint(endpoint: str) -> None:
    """Raise a 404 BackendError unless ``endpoint`` is one a node may announce
    (:data:`~tooti.protocol.schemas.ALL_ENDPOINTS`)."""
    if endpoint not in ALL_ENDPOINTS:
        raise BackendError(
            f"unknown endpoint {endpoint!r}", status=404, code="not_found", retryable=False
        )


def requested_model(endpoint: str, request: Any) -> str:
    """Check the endpoint and the body's shape; return the requested model name."""
    check_endpoint(endpoint)
    if not isinstance(request, dict):
        raise bad_request("the request body must be a JSON object")
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required")
    return model


class Backend(Protocol):
    """What a node needs from a backend (see the module docstring)."""

    type_name: str
    """The config name of this backend type (``openai``, ``simulated``, ...)."""

    async def start(self) -> None:
        """Prepare the backend (start a child server, open clients).

        Returns once the backend can answer :meth:`models`. Long-running
        supervision, if any, is done by :meth:`run`.
        """
        ...

    async def run(self) -> None:
        """Supervise whatever the backend owns until cancelled.

        Backends with nothing to supervise simply sleep forever. Called in the
        node's nursery after :meth:`start`.
        """
        ...

    async def models(self) -> list[ModelInfo]:
        """List the models this backend serves right now.

        May raise (e.g. :class:`BackendError` when a server cannot be asked);
        callers should then keep serving the previous list or none.
        """
        ...

    async def health(self) -> bool:
        """Return True when the backend can take traffic (when False, a backend may
        say why in a ``health_error`` attribute: see :func:`health_problem`)."""
        ...

    def open(
        self, endpoint: str, body: bytes, request: dict[str, Any]
    ) -> AbstractAsyncContextManager[BackendResponse]:
        """Start one request; the context yields the response head and body.

        ``endpoint`` is one of the endpoints the backend announced for the model
        (:data:`~tooti.protocol.schemas.ALL_ENDPOINTS`); ``body`` the client's exact
        bytes; ``request`` the decoded body. Raises :class:`BackendError` if
        no response head can be produced. Leaving the context (normally or by
        cancellation) closes the upstream request.
        """
        ...

    async def close(self) -> None:
        """Release every resource (clients, child processes)."""
        ...


def health_problem(backend: Backend) -> str:
    """Why ``backend``'s last :meth:`~Backend.health` check failed, e.g. ``health check
    failed: GET http://127.0.0.1:8000/health: connection refused`` (its
    ``health_error``, when it keeps one: the URL and the cause)."""
    detail = getattr(backend, "health_error", "")
    if isinstance(detail, str) and detail:
        return f"health check failed: {detail}"
    return "health check failed"


def announces_loading(backend: Backend) -> bool:
    """True if ``backend`` can say what it is loading (it has ``loading_models``): the
    node starts it in the background and announces its models as loading meanwhile."""
    return callable(getattr(backend, "loading_models", None))


def loading_models(backend: Backend) -> list[ModelInfo]:
    """The models ``backend`` is loading now, with state ``loading`` (none for a backend
    without ``loading_models``, or whose method raised)."""
    method = getattr(backend, "loading_models", None)
    if not callable(method):
        return []
    try:
        models = method()
    except Exception:  # a plugin's bug must not stop the node's health loop
        return []
    return [replace(info, state=LOADING) for info in models if isinstance(info, ModelInfo)]


def configured_endpoints(settings: BackendSettings, default: tuple[str, ...]
                         ) -> tuple[str, ...]:
    """The ``endpoints`` of a backend's settings, checked (ValueError naming an unknown
    one), or ``default`` when it names none."""
    unknown = [name for name in settings.endpoints if name not in ALL_ENDPOINTS]
    if unknown:
        raise ValueError(f"{settings.type} backend: unknown endpoints {unknown}; known: "
                         + ", ".join(ALL_ENDPOINTS))
    return tuple(dict.fromkeys(settings.endpoints)) or default


def usual_endpoints(settings: BackendSettings) -> tuple[str, ...]:
    """The ``endpoints`` of a backend that serves only the usual three (ollama, the
    embedded llama.cpp): a subset of them (e.g. ``["embeddings"]`` for an embedding
    model), or all three; ValueError naming a pass-through endpoint it cannot serve."""
    endpoints = configured_endpoints(settings, ENDPOINTS)
    beyond = [name for name in endpoints if name not in ENDPOINTS]
    if beyond:
        raise ValueError(f"{settings.type} backend: cannot serve {beyond} (only "
                         + ", ".join(ENDPOINTS) + "); serve them from an openai backend")
    return endpoints
