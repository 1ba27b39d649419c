"""What a node reports in END, decoded with a typed schema and checked against what the
gateway itself saw, before any of it reaches billing, metrics or health records.

A node is someone else's machine: its token counts decide what a client pays. Two
kinds of rule apply, and they are treated differently.

**Violations** are reports impossible whatever the client sent: counts that are not
integers ``0 <= n <= MAX_TOKENS`` (the schema), and completion tokens over the bytes of
the answer the gateway relayed to the client (a token is at least one byte of output,
so hidden tokens, such as an upstream's unshown reasoning, cannot be billed). A
violation is a :class:`UsageViolation`: the proxy penalizes the node
(:meth:`tooti.mesh.registry.Registry.penalize`) and bills the gateway's own estimate
instead, flagged ``estimated``.

**Bounds** depend on how the gateway reads the client's request (:func:`limits_for`):

* completion tokens ``<=`` the request's cap (the larger of ``max_tokens`` and
  ``max_completion_tokens``: vLLM honours the latter when both are given) times the
  choices generated per prompt (``n`` or ``best_of``) times the prompts of a batched
  ``/v1/completions`` request, when it gives a cap;
* prompt tokens ``<=`` the request body's bytes (a token is at least one byte of
  input, and JSON never encodes text in fewer bytes) ``+ prompt_token_allowance``
  (a chat template, a system prompt the server adds) ``+ media_token_allowance`` per
  image, audio, video or file part of a chat request (fetched by URL or sent as data,
  their tokens are not in the bytes).

A report over a bound is *clamped* to it and billed flagged ``estimated``, logged at
info, and the node is **not** penalized: a client chooses its request, and a client
must never be able to get an honest node banned (by batching prompts, say, or by a
request some backend reads differently from the gateway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from tooti.protocol.numbers import is_int

MAX_TOKENS = 2**31 - 1
"""Largest token count anyone may report (also the node's own bound on its backend)."""

Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
Text = str
"""Free text (bounded by the control frame size)."""

MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio",
                         "video_url", "video", "file", "input_file"})
"""Content part types of a chat message whose tokens are not in the body's bytes."""


class ReportedUsage(Struct, frozen=True):
    """END's ``usage``: counts the node (or its backend) measured."""

    prompt_tokens: Tokens | None = None
    """None when the node could not know (the gateway estimates from the body)."""
    completion_tokens: Tokens | None = None
    total_tokens: Annotated[int, Meta(ge=0, le=2 * MAX_TOKENS)] | None = None
    estimated: bool = False
    """The node counted delivered chunks because its backend reported nothing."""


class EndError(Struct, frozen=True):
    """END's ``error``: what failed, for the client's error object (built by
    :func:`end_error`, read by :func:`read_end_error`, answered by
    :func:`tooti.errors.from_end_info`)."""

    status: int | None = None
    code: Text | None = None
    message: Text | None = None
    param: Text | None = None
    type: Text | None = None


class EndReport(Struct, frozen=True):
    """An END payload, as far as the gateway reads it."""

    usage: ReportedUsage | None = None
    finish_reason: Annotated[str, Meta(max_length=64)] | None = None
    error: EndError | None = None
    retryable: bool | None = None


def end_error(status: int, code: str, message: str, *,
              retryable: bool | None = None) -> dict[str, Any]:
    """The END members that report a failed request: ``error`` with its HTTP ``status``,
    ``code`` and ``message``, and ``retryable`` unless None (then the gateway decides
    by the status whether another node may be tried)."""
    info: dict[str, Any] = {"error": {"status": status, "code": code, "message": message}}
    if retryable is not None:
        info["retryable"] = retryable
    return info


def read_end_error(info: dict[str, Any]) -> EndError | None:
    """END's ``error``, read leniently (a peer's payload: the client gets an error
    whatever it holds); None when END holds no error object. A status outside
    ``400..599`` reads 502, a message that is not a string "backend error", and any
    other member that is not a string None."""
    err = info.get("error")
    if not isinstance(err, dict):
        return None
    status = err.get("status")
    message = err.get("message")
    return EndError(
        status=status if isinstance(status, int) and 400 <= status <= 599 else 502,
        code=_text(err.get("code")),
        message=message if isinstance(message, str) else "backend error",
        param=_text(err.get("param")),
        type=_text(err.get("type")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class UsageViolation(Exception):
    """A node's END report broke a rule of this module (the message says which)."""


@dataclass(frozen=True, slots=True)
class UsageLimits:
    """The most tokens one request can plausibly have used."""

    prompt: int
    """Most prompt tokens (see the module docstring)."""
    completion: int | None
    """``max_tokens`` (or ``max_completion_tokens``) times the choices generated (``n``
    or ``best_of``), 0 for embeddings; None = no cap."""


def limits_for(endpoint: str, body: dict[str, Any], body_bytes: int, allowance: int,
               per_media: int) -> UsageLimits:
    """The bounds of one request to ``endpoint`` with decoded ``body`` of ``body_bytes``
    bytes."""
    return UsageLimits(body_bytes + allowance + per_media * _media_parts(body),
                       completion_limit(endpoint, body))


def completion_limit(endpoint: str, body: dict[str, Any]) -> int | None:
    """:attr:`UsageLimits.completion` of a request to ``endpoint`` with decoded ``body``
    (what a node needs, without walking the messages for media parts)."""
    if endpoint == "embeddings":
        return 0
    caps = _counts(body, "max_tokens", "max_completion_tokens")
    if not caps:
        return None
    choices = _counts(body, "n", "best_of")
    return max(caps) * max([1, *choices]) * _prompts(endpoint, body)


def _counts(body: dict[str, Any], *fields: str) -> list[int]:
    """The non-negative integers among ``body``'s ``fields``."""
    values = (body.get(name) for name in fields)
    return [v for v in values if is_int(v) and v >= 0]


def _prompts(endpoint: str, body: dict[str, Any]) -> int:
    """How many prompts a ``/v1/completions`` request batches (each gets its own
    answers): one per string or token list in a ``prompt`` list, else one."""
    prompt = body.get("prompt")
    if endpoint != "completions" or not isinstance(prompt, list):
        return 1
    batched = sum(1 for item in prompt if isinstance(item, str | list))
    return max(1, batched)


def _media_parts(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content
                         if isinstance(part, dict) and part.get("type") in MEDIA_PARTS)
    return count


def read_end(info: dict[str, Any] | None) -> EndReport:
    """Decode an END payload; :class:`UsageViolation` if it does not fit the schema."""
    if not info:
        return EndReport()
    try:
        return msgspec.convert(info, EndReport)
    except msgspec.ValidationError as exc:
        raise UsageViolation(f"END does not fit its schema: {exc}") from None


def check_usage(usage: ReportedUsage | None, limits: UsageLimits, relayed: int
                ) -> tuple[ReportedUsage | None, str]:
    """``usage`` for a request within ``limits`` whose answer was ``relayed`` bytes,
    clamped to the request's bounds (flagged ``estimated``), and what was clamped ("" if
    nothing); raises :class:`UsageViolation` for a report no request could explain."""
    if usage is None:
        return None, ""
    completion = usage.completion_tokens or 0
    if completion > relayed:
        raise UsageViolation(f"reported {completion} completion tokens for an answer of "
                             f"{relayed} bytes")
    clamped: list[str] = []
    if limits.completion is not None and completion > limits.completion:
        clamped.append(f"{completion} completion tokens for a request capped at "
                       f"{limits.completion}")
        usage = msgspec.structs.replace(usage, completion_tokens=limits.completion)
    prompt = usage.prompt_tokens or 0
    if prompt > limits.prompt:
        clamped.append(f"{prompt} prompt tokens for a request allowing at most "
                       f"{limits.prompt}")
        usage = msgspec.structs.replace(usage, prompt_tokens=limits.prompt)
    if not clamped:
        return usage, ""
    total = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
    return msgspec.structs.replace(usage, total_tokens=total, estimated=True), \
        "; ".join(clamped)
