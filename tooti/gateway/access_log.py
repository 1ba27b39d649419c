"""The access log: one record per ``/v1`` request the gateway answers, written when the
request ends, at INFO on the ``tooti.access`` logger.

Every ``/v1`` request gets one: served ones (after any failover, with the node that
served and the attempts it took), the ones refused (400, 401, 403, 404, 405, 413, 429,
503, ...), ``/v1/models`` and ``/v1/me*``, and those the client gave up on. The admin
API and ``/healthz`` are not access-logged: they are the operator's own traffic and
a load balancer's probes, and would drown the requests.

In the text format a record is one ``logfmt`` line (``key=value``; a value with a space,
a quote, ``=`` or a control character is double-quoted with JSON escapes, so a model
name can never forge a second line)::

    req=req_… key=key_… account=alice method=POST path=/v1/chat/completions
    model=llama-3 node=gpu-1 status=200 outcome=ok tokens=13/60 ttft_ms=42 ms=512 stream=yes

In the JSON format (:mod:`tooti.logging_setup`) the same fields are typed members:
``request_id``, ``key_id`` (null without a key), ``account``, ``method``, ``path``,
``model``, ``node``, ``attempts``, ``status``, ``outcome``, ``error``,
``prompt_tokens``, ``completion_tokens``, ``tokens_estimated``, ``ttft_ms``,
``duration_ms``, ``stream``.

What the fields mean (decided where the issue is silent, as an operator coming from
nginx, LiteLLM or Ollama would read them):

* ``key``: the API key's public id (``key_…`` of the accounts database,
  ``admin-key``, ``key-<16 hex>`` of a configured group key), never the key; ``-``
  when the caller presented none that is valid (an open gateway's anonymous caller, or a
  refused key: a 401 names no key).
* ``status``: the HTTP status the client got; ``499`` (nginx's "client closed
  request") when the client left before any answer started.
* ``outcome``: ``ok``, ``error`` or ``cancelled`` (the client left), from billing's
  :class:`~tooti.billing.base.Outcome` for a forwarded request (``failed``,
  ``failed_midstream`` and ``error`` are ``error``), else from the status. ``error``
  is the error code the client saw (``no_capacity``, ``invalid_api_key``, ...), or
  ``failed_midstream`` for a stream cut after its first token; never the message (it
  may echo the request).
* ``tokens``: prompt/completion as billing settled them (``~`` in front when they are
  the gateway's estimate: the node reported none, or the client left); ``-`` when no
  node served.
* ``ttft_ms``: from opening the stream on the serving node to its first token, the
  figure the events and the TUI show (time spent queued is in ``ms`` only).
* ``ms``: from the request's arrival to its end (the last byte handed to the server,
  billing included).

The record holds references to what the gateway already computed (the caller, the
request, billing's outcome and usage) and renders them only when a handler writes the
record; nothing is formatted while the access log is off.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import trio

from tooti import clock
from tooti.accounts.records import Caller
from tooti.billing.base import Outcome, Usage
from tooti.errors import APIError
from tooti.mesh.http import ClientGone

log = logging.getLogger("tooti.access")

CLIENT_CLOSED = 499
"""The status logged for a request whose client left before any answer started."""
MAX_VALUE = 256
"""Characters of a client-chosen value (path, model) kept in a record."""

_BARE = re.compile(r'[!#-<>-\[\]-~]+')
"""A logfmt value that needs no quotes: printable ASCII but space, ``"``, ``=`` and ``\\``."""

_OUTCOMES = {"ok": "ok", "cancelled": "cancelled"}
"""Billing's outcome status → the access log's (anything else is ``error``)."""


def enabled(on: bool) -> bool:
    """Whether a request should build a record: the gateway's switch, and the logger
    taking INFO (cheap: the logging module caches it)."""
    return on and log.isEnabledFor(logging.INFO)


class AccessRecord:
    """One request's access record, filled in as the gateway learns its parts."""

    __slots__ = ("caller", "cancelled", "duration_ms", "error", "method", "model",
                 "outcome", "path", "request_id", "started", "status", "stream", "usage")

    def __init__(self, request_id: str, method: str, path: str) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.started = clock.now()
        self.caller: Caller | None = None
        self.model = ""
        """The model the request asked for (the one that served wins, see :attr:`outcome`)."""
        self.stream: bool | None = None
        self.outcome: Outcome | None = None
        """Billing's outcome, once a request was forwarded."""
        self.usage: Usage | None = None
        self.status = 0
        self.error = ""
        self.cancelled = False
        self.duration_ms = 0.0

    def failed(self, exc: BaseException) -> None:
        """The request's handler raised ``exc`` (the station answers an error)."""
        if isinstance(exc, APIError):
            self.status, self.error = exc.status, exc.code or exc.type
        elif isinstance(exc, ClientGone | trio.Cancelled):
            self.cancelled = True
        else:  # a bug: the station answers a 500 naming the request id
            self.status, self.error = 500, "internal_error"

    def end(self, started_status: int) -> None:
        """The request is over; ``started_status`` is the status of the answer the
        client got (0 when none started)."""
        self.duration_ms = (clock.now() - self.started) * 1000
        if started_status:
            self.status = started_status
        elif not self.status:
            self.cancelled = True
            self.status = CLIENT_CLOSED

    # ------------------------------------------------------------ rendering

    def _outcome(self) -> str:
        outcome = self.outcome
        if outcome is not None and outcome.status != "pending":
            return _OUTCOMES.get(outcome.status, "error")
        if self.cancelled:
            return "cancelled"
        return "ok" if self.status < 400 else "error"

    def _error(self) -> str:
        if self.error:
            return self.error
        outcome = self.outcome
        if outcome is not None and outcome.status in ("failed_midstream", "failed", "error"):
            return outcome.status
        return ""

    def log_fields(self) -> dict[str, Any]:
        """The record as typed JSON members (see the module docstring)."""
        outcome, usage, caller = self.outcome, self.usage, self.caller
        served = outcome is not None and outcome.served
        ttft = outcome.ttft_ms if outcome is not None and served else None
        return {
            "msg": f"{self.method} {self.path[:MAX_VALUE]} {self.status}",
            "request_id": self.request_id,
            "key_id": _key_id(caller) or None,
            "account": caller.account_name if caller is not None else "",
            "method": self.method,
            "path": self.path[:MAX_VALUE],
            "model": self._model(),
            "node": outcome.node_id if outcome is not None and outcome.node_id else None,
            "attempts": outcome.attempts if outcome is not None else 0,
            "status": self.status,
            "outcome": self._outcome(),
            "error": self._error() or None,
            "prompt_tokens": usage.prompt_tokens if usage is not None and served else None,
            "completion_tokens": usage.completion_tokens
            if usage is not None and served else None,
            "tokens_estimated": bool(usage is not None and served and usage.estimated),
            "ttft_ms": None if ttft is None else round(ttft, 1),
            "duration_ms": round(self.duration_ms, 1),
            "stream": self.stream,
        }

    def _model(self) -> str | None:
        outcome = self.outcome
        model = outcome.model if outcome is not None and outcome.model else self.model
        return model[:MAX_VALUE] or None

    def __str__(self) -> str:
        """The text form: one logfmt line of :meth:`log_fields` (empty ones left out,
        tokens as ``prompt/completion``, ``~`` marking an estimate)."""
        f = self.log_fields()
        parts = [f"req={f['request_id']}", f"key={f['key_id'] or '-'}"]
        if f["account"]:
            parts.append(f"account={_quoted(f['account'])}")
        parts.append(f"method={_quoted(f['method'])}")
        parts.append(f"path={_quoted(f['path'])}")
        if f["model"]:
            parts.append(f"model={_quoted(f['model'])}")
        if f["node"]:
            parts.append(f"node={_quoted(f['node'])}")
            if f["attempts"] > 1:
                parts.append(f"attempts={f['attempts']}")
        parts.append(f"status={f['status']}")
        parts.append(f"outcome={f['outcome']}")
        if f["error"]:
            parts.append(f"error={_quoted(f['error'])}")
        if f["prompt_tokens"] is not None:
            mark = "~" if f["tokens_estimated"] else ""
            parts.append(f"tokens={mark}{f['prompt_tokens']}/{f['completion_tokens']}")
        else:
            parts.append("tokens=-")
        if f["ttft_ms"] is not None:
            parts.append(f"ttft_ms={f['ttft_ms']:.0f}")
        parts.append(f"ms={f['duration_ms']:.0f}")
        if f["stream"] is not None:
            parts.append(f"stream={'yes' if f['stream'] else 'no'}")
        return " ".join(parts)

def write(record: AccessRecord) -> None:
    """Log ``record`` (rendered by the handler's formatter, if any handler takes it).
    The log record is made here rather than by ``log.info``: that would look up the
    caller's file and line in the stack, which no access record shows."""
    if log.isEnabledFor(logging.INFO):
        log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, record, (), None,
                                  "write"))


def _key_id(caller: Caller | None) -> str:
    """The caller's public key id; ``""`` for none (no caller yet, or the anonymous one)."""
    if caller is None or caller.source == "anonymous":
        return ""
    return caller.key_id


def _quoted(value: str) -> str:
    """``value`` as a logfmt value: bare when safe, else double-quoted with JSON escapes
    (so no value can break the line or fake another field)."""
    if _BARE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    if not escaped.isprintable():
        escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'
