"""The node's answers as Ollama's: a whole ``chat.completion`` (or embeddings list) as
Ollama's JSON answer (:func:`answer`), a ``chat.completion.chunk`` stream as Ollama's
NDJSON stream (:class:`NdjsonStream`), and the immediate answer of a request that only
loads a model (:func:`load_answer`). Sans-I/O; the requests come from
:mod:`tooti.fronts.ollama_api`, whose notes say how the counters and durations are
filled. What a node sends is not trusted: a malformed piece is left out, and embeddings
that are not finite numbers are a 502.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tooti.errors import APIError
from tooti.fronts.base import (
    MAX_JSON_DEPTH,
    SLOT,
    ChatRequest,
    Front,
    first_choice,
    node_error,
    reasoning_of,
    template,
)
from tooti.fronts.ollama_api import (
    JSON_CONTENT_TYPE,
    NDJSON_CONTENT_TYPE,
    SYSTEM_CLOCK,
    Clock,
    error_body,
    parse_chat,
    parse_embed,
    parse_embeddings,
    parse_generate,
    rfc3339,
    rfc3339_json,
)
from tooti.fronts.tool_calls import ToolCalls
from tooti.protocol.numbers import is_int, is_number

_encode = msgspec.json.encode
_decode_any = msgspec.json.decode


# -- answers -------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def done_reason(finish_reason: Any) -> str:
    """OpenAI's ``finish_reason`` as Ollama's ``done_reason`` (a tool call ends with
    ``stop`` in Ollama; other reasons pass as they are)."""
    if not isinstance(finish_reason, str) or finish_reason in ("tool_calls",
                                                               "function_call"):
        return "stop"
    return finish_reason


def _counts(usage: Any) -> dict[str, int]:
    usage = _dict(usage)
    counts = {}
    for theirs, ours in (("prompt_tokens", "prompt_eval_count"),
                         ("completion_tokens", "eval_count")):
        value = usage.get(theirs)
        if is_int(value) and value >= 0:
            counts[ours] = value
    return counts


def _tool_call(call: dict[str, Any], index: int) -> dict[str, Any] | None:
    """An OpenAI tool call as Ollama's (``arguments`` an object), or None when its
    arguments are not a JSON object."""
    function = _dict(call.get("function"))
    arguments: Any = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = _decode_any(arguments) if arguments.strip() else {}
        except (msgspec.DecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    out: dict[str, Any] = {"function": {"index": index, "name": _str(function.get("name")),
                                        "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tool_calls(calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Ollama's tool calls, and the text of those whose arguments are no object."""
    out: list[dict[str, Any]] = []
    stray: list[str] = []
    for call in calls:
        mapped = _tool_call(call, len(out))
        if mapped is None:
            stray.append(_str(_dict(call.get("function")).get("arguments")))
        else:
            out.append(mapped)
    return out, "".join(stray)


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """A choice's OpenAI ``logprobs.content`` as Ollama's ``logprobs`` (each token's
    ``token``, ``logprob`` and ``top_logprobs``)."""
    content = _dict(choice.get("logprobs")).get("content")
    out = []
    for item in content if isinstance(content, list) else []:
        if not isinstance(item, dict) or not _finite(item.get("logprob")):
            continue
        entry: dict[str, Any] = {"token": _str(item.get("token")), "logprob": item["logprob"]}
        top = item.get("top_logprobs")
        if isinstance(top, list):
            entry["top_logprobs"] = [
                {"token": _str(t.get("token")), "logprob": t["logprob"]} for t in top
                if isinstance(t, dict) and _finite(t.get("logprob"))]
        out.append(entry)
    return out


def _final(request: ChatRequest, created_at: str, durations: dict[str, int],
           finish_reason: Any, usage: Any) -> dict[str, Any]:
    return {"model": request.context.get("model", request.model), "created_at": created_at,
            "done": True, "done_reason": done_reason(finish_reason), **durations,
            **_counts(usage)}


def _whole_durations(request: ChatRequest, clock: Clock) -> dict[str, int]:
    total = max(0, clock.monotonic_ns() - int(request.context.get("started_ns", 0)))
    return {"total_duration": total, "load_duration": 0, "prompt_eval_duration": 0,
            "eval_duration": total}


def load_answer(request: ChatRequest, clock: Clock = SYSTEM_CLOCK) -> bytes:
    """The whole answer to a request that only loads its model (``context["load"]``):
    ``done_reason: "load"``; one NDJSON line when streamed."""
    line: dict[str, Any] = {"model": request.context.get("model", request.model),
                            "created_at": rfc3339(clock.wall_ns())}
    if request.context.get("kind") == "generate":
        line["response"] = ""
    else:
        line["message"] = {"role": "assistant", "content": ""}
    line.update(done=True, done_reason="load")
    return _encode(line) + b"\n" if request.stream else _encode(line)


def answer(upstream: Any, request: ChatRequest, clock: Clock = SYSTEM_CLOCK) -> bytes:
    """The node's whole answer (a ``chat.completion``, or an embeddings list) as the
    Ollama JSON answer to ``request``; 502 when it is not a JSON object."""
    if not isinstance(upstream, dict):
        raise APIError(502, "the node's answer is not a JSON object", code="bad_gateway")
    kind = request.context.get("kind")
    if kind in ("embed", "embeddings"):
        return _embedding_answer(upstream, request, clock)
    choice = first_choice(upstream.get("choices")) or {}
    message = _dict(choice.get("message"))
    text = _str(message.get("content"))
    upstream_calls = message.get("tool_calls")
    calls, stray = _tool_calls([c for c in upstream_calls if isinstance(c, dict)]
                               if isinstance(upstream_calls, list) else [])
    text += stray
    thinking = reasoning_of(message) if request.context.get("think", True) else ""
    out = _final(request, rfc3339(clock.wall_ns()), _whole_durations(request, clock),
                 choice.get("finish_reason"), upstream.get("usage"))
    body = _reply(kind, text, thinking, calls, logprobs(choice))
    return _encode({"model": out.pop("model"), "created_at": out.pop("created_at"),
                    **body, **out})


def _reply(kind: Any, text: str, thinking: str, calls: Any,
           tokens: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The fields of an answer or a stream line: ``response`` (generate) or ``message``
    (chat: ``role``, ``content``, ``thinking``, ``tool_calls``), and ``logprobs``."""
    if kind == "generate":
        fields: dict[str, Any] = {"response": text}
        if thinking:
            fields["thinking"] = thinking
    else:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        fields = {"message": message}
    if tokens:
        fields["logprobs"] = tokens
    return fields


def _index(item: dict[str, Any]) -> int:
    index = item.get("index")
    return index if is_int(index) else 0


def _embedding_answer(upstream: dict[str, Any], request: ChatRequest, clock: Clock
                      ) -> bytes:
    data = upstream.get("data")
    items = sorted((d for d in data if isinstance(d, dict)) if isinstance(data, list)
                   else [], key=_index)
    vectors = [d.get("embedding") for d in items]
    if not all(isinstance(v, list) and all(_finite(x) for x in v) for v in vectors):
        raise APIError(502, "the node answered embeddings that are not float arrays",
                       code="bad_gateway")
    if request.context.get("kind") == "embeddings":
        return _encode({"embedding": vectors[0] if vectors else []})
    total = max(0, clock.monotonic_ns() - int(request.context.get("started_ns", 0)))
    out: dict[str, Any] = {"model": request.context.get("model", request.model),
                           "embeddings": vectors, "total_duration": total,
                           "load_duration": 0}
    prompt = _dict(upstream.get("usage")).get("prompt_tokens")
    if is_int(prompt) and prompt >= 0:
        out["prompt_eval_count"] = prompt
    return _encode(out)


# -- streams -------------------------------------------------------------------------


@dataclass
class NdjsonStream:
    """Turns a node's chat-completions stream into Ollama's NDJSON stream: a line per
    piece of text (``message.content``, or ``response`` for generate) or of thinking,
    the tool calls in one line once they are whole, then the ``done: true`` line with
    ``done_reason``, the node's counts and the durations (see the module's notes).

    Call :meth:`start` when the node's answer starts, :meth:`feed` with each decoded
    chunk (the usage chunk included; a chunk that is an ``{"error": ...}`` object ends
    the stream as :meth:`fail` does; one that is not an object is skipped),
    :meth:`finish` at ``[DONE]``; :meth:`fail` ends the stream with Ollama's
    ``{"error": ...}`` line, which the ``ollama`` client raises as ``ResponseError``.
    Tool calls are accumulated by :mod:`tooti.fronts.tool_calls` (past its bounds the
    stream fails) and sent whole in one line when the choice finishes."""

    request: ChatRequest
    clock: Clock = SYSTEM_CLOCK
    content_type: str = NDJSON_CONTENT_TYPE
    _opened_ns: int | None = None
    _first_token_ns: int | None = None
    _finish_reason: Any = None
    _usage: Any = None
    _calls: ToolCalls = field(default_factory=ToolCalls)
    _ended: bool = False
    _text_line: tuple[bytes, ...] = ()
    """A text-only line, cut at its ``created_at`` and its text (made at the first)."""

    def _line(self, fields: dict[str, Any], created_at: str | None = None) -> bytes:
        line = {"model": self.request.context.get("model", self.request.model),
                "created_at": created_at or rfc3339(self.clock.wall_ns()), **fields}
        return _encode(line) + b"\n"

    def _piece(self, text: str, thinking: str = "", calls: Any = None,
               tokens: list[dict[str, Any]] | None = None) -> bytes:
        if thinking or calls or tokens:
            fields = _reply(self.request.context.get("kind"), text, thinking, calls, tokens)
            fields["done"] = False
            return self._line(fields)
        if not self._text_line:  # the usual line: spliced from the constant pieces
            self._text_line = template(self._line({
                **_reply(self.request.context.get("kind"), SLOT, "", None, None),
                "done": False}, SLOT), 2)
        head, middle, tail = self._text_line
        return b"".join((head, rfc3339_json(self.clock.wall_ns()), middle, _encode(text),
                         tail))

    def start(self) -> bytes:
        """Nothing to send; notes when the node's answer started (``load_duration``)."""
        if self._opened_ns is None:
            self._opened_ns = self.clock.monotonic_ns()
        return b""

    def feed(self, chunk: Any) -> bytes:
        """The lines for one chat-completions chunk (may be empty)."""
        if self._ended or not isinstance(chunk, dict):
            return b""
        self.start()
        error = node_error(chunk)
        if error is not None:
            return self.fail(error)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choice = first_choice(chunk.get("choices"))
        if choice is None:
            return b""
        delta = _dict(choice.get("delta"))
        text = _str(delta.get("content"))
        thinking = reasoning_of(delta) if self.request.context.get("think", True) else ""
        calls = delta.get("tool_calls")
        try:
            for call in calls if isinstance(calls, list) else []:
                if self._calls.add(call) is not None and self._first_token_ns is None:
                    self._first_token_ns = self.clock.monotonic_ns()
        except APIError as exc:  # past the tool calls' bounds
            return self.fail(exc)
        out = b""
        tokens = logprobs(choice)
        if text or thinking or tokens:
            if self._first_token_ns is None:
                self._first_token_ns = self.clock.monotonic_ns()
            out = self._piece(text, thinking, tokens=tokens)
        if choice.get("finish_reason") is not None:
            self._finish_reason = choice["finish_reason"]
            out += self._flush_calls()
        return out

    def feed_text(self, text: str) -> bytes:
        """The line of a chunk carrying only ``text`` (what :meth:`feed` sends)."""
        line = self._text_line
        if line and text and not self._ended and self._first_token_ns is not None:
            head, middle, tail = line  # the usual token: as _piece writes it
            return b"".join((head, rfc3339_json(self.clock.wall_ns()), middle,
                             _encode(text), tail))
        if self._ended:
            return b""
        if self._opened_ns is None:
            self.start()
        if not text:
            return b""
        if self._first_token_ns is None:
            self._first_token_ns = self.clock.monotonic_ns()
        return self._piece(text)

    def _flush_calls(self) -> bytes:
        named = self._calls.named()
        self._calls.clear()
        if not named:
            return b""
        calls = [{"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                 if c.id else {"function": {"name": c.name, "arguments": c.arguments}}
                 for c in named]
        mapped, stray = _tool_calls(calls)
        return self._piece(stray, calls=mapped) if mapped or stray else b""

    def finish(self) -> bytes:
        """The pending tool calls, then the ``done: true`` line."""
        if self._ended:
            return b""
        out = self._flush_calls()
        self._ended = True
        now = self.clock.monotonic_ns()
        started = int(self.request.context.get("started_ns", now))
        opened = self._opened_ns if self._opened_ns is not None else now
        first = self._first_token_ns if self._first_token_ns is not None else now
        durations = {"total_duration": max(0, now - started),
                     "load_duration": max(0, opened - started),
                     "prompt_eval_duration": max(0, first - opened),
                     "eval_duration": max(0, now - first)}
        final = _final(self.request, rfc3339(self.clock.wall_ns()), durations,
                       self._finish_reason, self._usage)
        empty = ({"response": ""} if self.request.context.get("kind") == "generate"
                 else {"message": {"role": "assistant", "content": ""}})
        line = {"model": final.pop("model"), "created_at": final.pop("created_at"),
                **empty, **final}
        return out + _encode(line) + b"\n"

    def fail(self, error: APIError) -> bytes:
        """Ollama's mid-stream error line; the stream ends."""
        if self._ended:
            return b""
        self._ended = True
        return error_body(error) + b"\n"


def stream_translator(request: ChatRequest, clock: Clock = SYSTEM_CLOCK) -> NdjsonStream:
    """The :class:`~tooti.fronts.base.StreamTranslator` of a streamed chat or
    generate request."""
    return NdjsonStream(request, clock)


@dataclass(frozen=True, slots=True)
class OllamaFront:
    """``/api/chat``, ``/api/generate``, ``/api/embed`` or ``/api/embeddings`` as a
    :class:`~tooti.fronts.base.Front`. Made per request: ``live`` is the network's model
    ids the caller may use (names resolve against them, so ``request.model`` is the id
    to route and ``context["model"]`` the client's spelling), and ``clock`` stays
    injectable. A request with ``context["load"]`` is answered by
    :func:`load_answer` without asking a node. The listings (``/api/tags``, ``/api/ps``,
    ``/api/show``, ``/api/version``) are :mod:`tooti.fronts.ollama_models`."""

    kind: str = "chat"
    """``chat``, ``generate``, ``embed`` or ``embeddings``."""
    live: Collection[str] = ()
    clock: Clock = SYSTEM_CLOCK
    media_type: str = JSON_CONTENT_TYPE
    stream_media_type: str = NDJSON_CONTENT_TYPE

    def parse(self, raw: bytes, *, max_depth: int = MAX_JSON_DEPTH,
              request_id: str | None = None) -> ChatRequest:
        parser = _PARSERS[self.kind]
        request = parser(raw, live=self.live, clock=self.clock, max_depth=max_depth)
        request.context["request_id"] = request_id
        return request

    def answer(self, request: ChatRequest, completion: Any) -> bytes:
        return answer(completion, request, self.clock)

    def stream(self, request: ChatRequest) -> NdjsonStream:
        return NdjsonStream(request, self.clock)

    def error_body(self, error: APIError, request_id: str | None = None) -> bytes:
        return error_body(error, request_id)


_PARSERS = {"chat": parse_chat, "generate": parse_generate, "embed": parse_embed,
            "embeddings": parse_embeddings}


def ollama_front(kind: str = "chat", *, live: Collection[str] = (),
                 clock: Clock = SYSTEM_CLOCK) -> Front:
    """The :class:`OllamaFront` of one request to the route ``kind``."""
    return OllamaFront(kind, live, clock)
