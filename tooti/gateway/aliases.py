"""Model aliases and priority tiers: public model names the gateway's config maps to the
model ids nodes serve (``[gateway.aliases]``).

::

    [gateway.aliases]
    "gpt-4o-mini" = ["qwen2.5-7b-instruct", "llama-3.1-8b"]   # one tier
    "chat" = "qwen2.5-7b-instruct"                             # a plain rename
    [gateway.aliases."smart"]
    tiers = [["qwen2.5-72b"], ["llama-3.1-70b", "mixtral"]]    # tier 1, then tier 2

Decisions (see ``docs/routing.md``):

* **A list is one tier**: its ids are interchangeable (like a LiteLLM model group), so
  the request goes to the best node among all of them, not to the first id's nodes
  first. Priority is said with ``tiers``. Within a tier, the routing policy (or the
  request's ``provider`` preferences) picks the best node of each id, and the least
  loaded of those picks (in-flight ÷ capacity, then measured TTFT; a tie goes to the id
  listed first) takes the request: policies rank nodes for one model id, and load is
  the measure every id shares.
* **Falling through**: a request goes to tier *n + 1* only when no node of tiers 1..n
  can take it *now* (none live, all cooling down, all at their concurrency limit or
  excluded by the request's preferences). It waits in the queue only at the last tier,
  so a full tier 1 never makes a client wait while tier 2 has room. A node that fails
  before the first byte is failed over within its tier, then down the tiers.
* **What each side sees**: the node gets its own model id in ``model``; the client's
  answer names the alias (``model`` of the JSON answer and of every streamed chunk),
  rewritten only for aliased requests. ``x-tooti-model`` still names the served id.
* **Visibility**: an alias is listed in ``/v1/models`` (``owned_by: "tooti-alias"``) and
  answered by ``/v1/models/{id}`` only when at least one of its ids is visible to the
  caller (served ready by a live node of its groups, and allowed by its key). A key
  limited to some models may use an alias named in its list (all its ids) or, else, the
  alias's ids its list names.
* An alias whose name is also a node model id wins: the config is the operator's word.
* Billing is by the node that served, as for any request; the usage ledger records the
  served id, the access log and events the alias.

Aliases are part of :class:`~tooti.settings.GatewaySettings`: SIGHUP swaps them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from tooti.config import Tiers, alias_tiers
from tooti.errors import APIError
from tooti.mesh.http import ResponseSend, Send
from tooti.settings import AliasTarget

Tier = tuple[tuple[str, ...], bool]
"""One step of a request's plan: the model ids tried together, and whether the request
may queue there when all their nodes are full (only an alias's last tier, and every
plain model)."""

OWNED_BY = "tooti-alias"
"""``owned_by`` of an alias in ``/v1/models``."""


class Aliases:
    """The alias table of one gateway configuration (see the module docstring)."""

    def __init__(self, aliases: Mapping[str, AliasTarget]) -> None:
        self.tiers: dict[str, Tiers] = alias_tiers(aliases)
        """Alias → its node model ids in tiers (nested aliases expanded)."""

    def __bool__(self) -> bool:
        return bool(self.tiers)

    def targets(self, name: str, allowed: Sequence[str] = ()) -> Tiers:
        """``name``'s tiers, keeping only the ids a key limited to ``allowed`` may use
        (all when ``allowed`` is empty or names the alias); empty tiers dropped."""
        tiers = self.tiers.get(name, ())
        if not allowed or name in allowed:
            return tiers
        kept = (tuple(m for m in tier if m in allowed) for tier in tiers)
        return tuple(tier for tier in kept if tier)

    def plan(self, models: Sequence[str], allowed: Sequence[str] = ()
             ) -> tuple[list[Tier], tuple[str, ...]] | None:
        """The tiers a request for ``models`` (its model, then its ``models``
        fallbacks) is tried in, and every node model id it may reach; None when no
        model of it is an alias (the request routes as it is).

        Raises 403 ``model_not_allowed`` for an alias none of whose ids the key may use."""
        if not any(m in self.tiers for m in models):
            return None
        plan: list[Tier] = []
        flat: dict[str, None] = {}
        for model in models:
            if model not in self.tiers:
                plan.append(((model,), True))
                flat[model] = None
                continue
            tiers = self.targets(model, allowed)
            if not tiers:
                raise APIError(403, f"this API key may not use the model '{model}'",
                               param="model", code="model_not_allowed",
                               type="permission_error")
            for i, tier in enumerate(tiers):
                plan.append((tier, i + 1 == len(tiers)))
                flat.update(dict.fromkeys(tier))
        return plan, tuple(flat)


class AliasedSend(ResponseSend):
    """The ``send`` of an aliased request: the answer's ``model`` (the node's id,
    ``"model":"<id>"`` with or without blanks, in the JSON answer and in each streamed
    event) is rewritten to the alias. A streamed answer's events are rewritten one
    send at a time (each is whole events); an answer sent with a ``content-length`` (a
    collected one, already held whole by the gateway) is joined, rewritten and sent
    with its new length. Only aliased requests pay for this.

    A :class:`~tooti.mesh.http.ResponseSend` whose ``started``, ``status``,
    ``answered`` and ``complete`` are the wrapped tracked send's, so the answer relay's
    marks reach :func:`~tooti.mesh.http.cancel_on_disconnect`."""

    __slots__ = ("_held", "_parts", "_pattern", "names", "served")

    def __init__(self, send: Send, names: Mapping[str, str], served: Any) -> None:
        self.send = send if isinstance(send, ResponseSend) else ResponseSend(send)
        self.names = names
        """Node model id → the alias the request named (the answer shows that)."""
        self.served = served
        """Has ``model``: the id the node was picked for (the request's Outcome)."""
        self._held: dict[str, Any] | None = None
        self._parts: list[bytes] = []
        self._pattern: tuple[str, re.Pattern[bytes], bytes] | None = None

    @property
    def started(self) -> bool:
        return self._tracked.started

    @started.setter
    def started(self, value: bool) -> None:
        self._tracked.started = value

    @property
    def status(self) -> int:
        return self._tracked.status

    @status.setter
    def status(self, value: int) -> None:
        self._tracked.status = value

    @property
    def complete(self) -> bool:
        return self._tracked.complete

    @complete.setter
    def complete(self, value: bool) -> None:
        self._tracked.complete = value

    @property
    def answered(self) -> bool:
        return self._tracked.answered

    @answered.setter
    def answered(self, value: bool) -> None:
        self._tracked.answered = value

    @property
    def _tracked(self) -> ResponseSend:
        send = self.send
        assert isinstance(send, ResponseSend)
        return send

    def _rewrite(self, body: bytes) -> bytes:
        model = self.served.model
        alias = self.names.get(model)
        if alias is None:
            return body
        if self._pattern is None or self._pattern[0] != model:
            self._pattern = (model, re.compile(
                rb'("model"\s*:\s*)"' + re.escape(_json_string(model)) + rb'"'),
                b'"' + _json_string(alias) + b'"')
        replacement = self._pattern[2]
        return self._pattern[1].sub(lambda m: m[1] + replacement, body)

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if any(name.lower() == b"content-length" for name, _ in message["headers"]):
                self._held = message
                return
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if self._held is not None:
                self._parts.append(body)
                if message.get("more_body", False):
                    return
                whole = self._rewrite(b"".join(self._parts))
                self._parts.clear()
                held, self._held = self._held, None
                await self.send({**held, "headers": [
                    (name, str(len(whole)).encode() if name.lower() == b"content-length"
                     else value) for name, value in held["headers"]]})
                message = {**message, "body": whole}
            elif body:
                message = {**message, "body": self._rewrite(body)}
        await self.send(message)


def _json_string(text: str) -> bytes:
    """``text`` as the inside of a JSON string (what an encoder writes between quotes)."""
    return msgspec.json.encode(text)[1:-1]


def alias_entry(name: str, created: int, nodes: int, models: Sequence[str]
                ) -> dict[str, Any]:
    """An alias's object in ``/v1/models``: ``owned_by`` :data:`OWNED_BY`, its node
    model ids visible to the caller in tier order under ``meta``."""
    return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY,
            "meta": {"alias": True, "models": list(models), "nodes": nodes}}
